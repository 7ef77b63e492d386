"""Peak host RAM while a base model loads for training, by --base-precision (CPU only, no GPU needed).

    .venv/bin/python bench/load_memory.py --family sdxl [--work-dir DIR] [--precisions auto,fp8] [--keep]

Builds the model at full size with random weights (bench/train.py's `_build`: SDXL's UNet, both CLIPs and the VAE,
fp32 files, ~14 GB; FLUX.1 [dev]'s transformer, CLIP-L, T5-XXL and VAE, bf16 files, 33 GB: `--precisions fp8`, as
bf16 it would not fit a 24 GB machine) unless it is in --work-dir already, then loads it in a fresh process per
precision exactly as training does (the family's loader, then adapters.store_base) with bf16 as the run's precision
and a LoRA's frozen parts, and records:
- rss_after_imports: the process before the model (Python, torch, diffusers, transformers);
- peak_rss: getrusage's maxrss at the end (the peak over the process's life);
- loaded: peak_rss - rss_after_imports, what loading added at its peak;
- stored: the bytes of every part as stored (parameters, buffers and stored layers);
- ratio: loaded / stored (1.0: loading never held more than the result).
Results go to bench/results/load-memory-<family>-<machine>.json and .md.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_once(folder: Path, precision: str) -> dict:
    """In this process: load `folder` as a bf16 LoRA run with --base-precision `precision` would."""
    import torch

    from dreambooth import adapters, families
    from dreambooth.families.base import Dtypes, ResolvedModel
    from dreambooth.storage import BaseStorage, return_freed_memory, stored_layers

    before = rss_bytes()
    started = time.perf_counter()
    model = ResolvedModel.of_folder(folder)
    family = families.get(model.family)
    dtypes = Dtypes(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    storage = BaseStorage(precision, frozenset({family.denoiser_name, *family.text_encoder_names}))
    if storage.stores:
        return_freed_memory()  # as adapters.load_trained does
    c = family.load(model, dtypes, storage)
    adapters.store_base(c, family, storage, dtypes)
    seconds = time.perf_counter() - started
    stored = 0
    for part in (*c.models.values(), c.vae):
        stored += sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
        stored += sum(m.stored.numel() * m.stored.element_size() for m in stored_layers(part))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "precision": precision,
        "rss_after_imports_bytes": before,
        "peak_rss_bytes": peak,
        "loaded_bytes": peak - before,
        "stored_bytes": stored,
        "ratio": round((peak - before) / stored, 3),
        "load_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sdxl", choices=["sdxl", "sd15", "flux"])
    parser.add_argument("--work-dir", default="/tmp/bench-load-memory")
    parser.add_argument("--precisions", default="auto,fp8")
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--machine", default=f"cpu-{os.cpu_count()}core")
    parser.add_argument("--keep", action="store_true", help="keep the built model in --work-dir")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model: a dry run of the harness")
    parser.add_argument("--_load", nargs=2, metavar=("FOLDER", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._load:  # the child: one load, its record on stdout
        # the imports training makes, before the baseline
        import diffusers  # noqa: F401
        import transformers  # noqa: F401

        from dreambooth import adapters, families, storage  # noqa: F401
        from dreambooth.families import stream  # noqa: F401

        print(json.dumps(load_once(Path(args._load[0]), args._load[1])))
        return

    folder = Path(args.work_dir) / f"model-{args.family}{'-tiny' if args.tiny else ''}"
    if not (folder / "model_index.json").is_file():
        flags = {"sdxl": ["--sdxl"], "flux": ["--flux"]}.get(args.family, []) + (["--tiny"] if args.tiny else [])
        subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "_build", str(folder), *flags], check=True)
    rows = []
    for precision in args.precisions.split(","):
        done = subprocess.run([sys.executable, __file__, "--_load", str(folder), precision], check=True,
                              capture_output=True, text=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import torch

    report = {
        "benchmark": "peak host RAM while loading a base for training (bf16 run, LoRA: every part but the VAE frozen)",
        "family": args.family,
        "model": f"{args.family} full size, random weights, {'bf16' if args.family == 'flux' else 'fp32'} files "
        "(bench/train.py _build)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__},
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "results": rows,
    }
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.results_dir) / f"load-memory-{args.family}{'-tiny' if args.tiny else ''}-{args.machine}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Peak host RAM loading {args.family} (full size) — {args.machine}", "",
             f"`{report['command']}`, {report['date']}, torch {torch.__version__}", "",
             "| --base-precision | after imports | peak RSS | added by loading | stored size | added / stored | s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['rss_after_imports_bytes'] / GIB:.2f} GiB | {r['peak_rss_bytes'] / GIB:.2f} GiB "
            f"| {r['loaded_bytes'] / GIB:.2f} GiB | {r['stored_bytes'] / GIB:.2f} GiB | {r['ratio']} | {r['load_s']} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
