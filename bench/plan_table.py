"""`dreambooth plan`'s estimates for the released models' shapes, lever by lever (CPU, seconds each; no weights).

    .venv/bin/python bench/plan_table.py [--out bench/results/plan-estimates.md]

The models are the bundled full-size configs (dreambooth/assets/configs: SD 1.5, SDXL, FLUX.1 [dev]) as
config-only folders; each row is the estimate `dreambooth plan` prints for those settings (dreambooth/plan.py): peak
GPU memory allocated by PyTorch, and what a card needs with the allocator's slack and the CUDA context. These are
estimates, not measurements: bench/train.py records each GPU run's estimate beside its measured peak.
"""

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    model: str  # sd1 | sdxl | flux-dev
    what: str
    settings: dict = field(default_factory=dict)


LORA16 = {"adapter": "lora", "lora_rank": 16, "lora_alpha": 16}
FLUX_1024 = {**LORA16, "resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True}
ROWS = [
    Row("sd1", "SD 1.5 LoRA r16, 512 px, fp16", {**LORA16, "resolution": 512, "mixed_precision": "fp16"}),
    Row("sd1", "SD 1.5 full, 512 px, the classic recipe (8-bit Adam, checkpointing, fp16)",
        {"adapter": "full", "resolution": 512, "mixed_precision": "fp16", "use_8bit_adam": True,
         "gradient_checkpointing": True}),
    Row("sdxl", "SDXL LoRA r16, 1024 px, bf16, checkpointing",
        {**LORA16, "resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True}),
    Row("sdxl", "SDXL LoRA r16, 1024 px, bf16, checkpointing, fp8 base",
        {**LORA16, "resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True,
         "base_precision": "fp8"}),
    Row("sdxl", "SDXL full, 1024 px, bf16, 8-bit Adam, fused backward, checkpointing, fp8 text encoders",
        {"adapter": "full", "resolution": 1024, "mixed_precision": "bf16", "use_8bit_adam": True,
         "fused_backward": True, "max_grad_norm": 0.0, "gradient_checkpointing": True, "base_precision": "fp8"}),
    Row("sdxl", "SDXL full, 1024 px, as above with bf16 weights (--full-bf16)",
        {"adapter": "full", "resolution": 1024, "mixed_precision": "bf16", "use_8bit_adam": True, "full_bf16": True,
         "fused_backward": True, "max_grad_norm": 0.0, "gradient_checkpointing": True, "base_precision": "fp8"}),
    Row("sdxl", "SDXL full, 1024 px, --vram-budget 16GB", {"adapter": "full", "resolution": 1024,
        "mixed_precision": "bf16", "vram_budget": "16GB"}),
    Row("flux-dev", "Flux LoRA r16, 1024 px, bf16 base", FLUX_1024),
    Row("flux-dev", "Flux LoRA r16, 1024 px, fp8 base", {**FLUX_1024, "base_precision": "fp8"}),
    Row("flux-dev", "Flux LoRA r16, 1024 px, fp8 base, 8-bit Adam, 16 blocks swapped",
        {**FLUX_1024, "base_precision": "fp8", "use_8bit_adam": True, "blocks_to_swap": 16}),
    Row("flux-dev", "Flux LoRA r16, 1024 px, fp8 base, 8-bit Adam, 28 blocks swapped",
        {**FLUX_1024, "base_precision": "fp8", "use_8bit_adam": True, "blocks_to_swap": 28}),
    Row("flux-dev", "Flux LoRA r16, 1024 px, NF4 base", {**FLUX_1024, "base_precision": "nf4"}),
    Row("flux-dev", "Flux LoRA r16, 512 px, NF4 base", {**FLUX_1024, "resolution": 512, "base_precision": "nf4"}),
    Row("flux-dev", "Flux LoRA r16, 1024 px, --vram-budget 12GB", {**LORA16, "resolution": 1024,
        "mixed_precision": "bf16", "vram_budget": "12GB"}),
]  # fmt: skip


def estimate(row: Row, folder: Path, photos: Path) -> dict:
    from dreambooth import families, plan
    from dreambooth.config import build_train_config
    from dreambooth.families.base import ResolvedModel

    flags = {"model": str(folder), "instance_data_dir": str(photos), "instance_prompt": "a photo of sks thing",
             "output": str(folder.parent / "out"), **row.settings}  # fmt: skip
    family = families.get(row.model)
    model = ResolvedModel(row.model, folder=folder)
    cfg = plan.with_defaults(build_train_config(None, flags), family)
    started = time.perf_counter()
    if cfg.vram_budget is not None:
        _, result = plan.fit_budget(cfg, family, model)
    else:
        result = plan.estimate(cfg, family, model)
    out = result.to_dict()
    return {"model": row.model, "what": row.what, "peak_gpu_bytes": out["peak_gpu_bytes"],
            "card_needs_bytes": out["card_needs_bytes"], "peak_host_bytes": out["peak_host_bytes"],
            "settings": out["settings"], "chosen": out["chosen"],
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan-estimates.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.train_helpers import PIPELINES, config_only_folder, write_photos

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "photos", 1)
        folders = {kind: config_only_folder(kind, Path(tmp) / kind) for kind in PIPELINES}
        for row in ROWS:
            rows.append(estimate(row, folders[row.model], photos))
            print(json.dumps(rows[-1]), flush=True)
    gib = 2**30
    lines = ["# `dreambooth plan` estimates for the released shapes (not measurements)", "",
             f"`python bench/plan_table.py` — {time.strftime('%Y-%m-%d')}; peak = what PyTorch allocates at the "
             "run's peak (caching or training); card = peak + 10 % allocator slack + 0.5 GiB CUDA context.", "",
             "| run | peak (GiB) | card (GiB) | host RAM (GiB) | levers chosen |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        chosen = "; ".join(c.split(" (")[0] for c in r["chosen"]) or "–"
        lines.append(f"| {r['what']} | {r['peak_gpu_bytes'] / gib:.1f} | {r['card_needs_bytes'] / gib:.1f} | "
                     f"{r['peak_host_bytes'] / gib:.1f} | {chosen} |")  # fmt: skip
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
