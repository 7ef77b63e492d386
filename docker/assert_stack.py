"""Build-time proof that the image holds exactly the locked stack and that it works (the Docker build fails otherwise).

    python docker/assert_stack.py requirements/lock.txt requirements/deepspeed-lock.txt

1. every package pinned in the lock files is installed at exactly that version, and nothing unlocked is installed;
2. torch, diffusers, transformers, accelerate, bitsandbytes, xformers, deepspeed and peft import and report the locked
   versions;
3. tiny CPU ops run: a torch matmul + backward, a diffusers UNet and a CLIP text encoder forward pass, an accelerate
   Accelerator, bitsandbytes' blockwise quantization; xformers' compiled extension is loaded and was built for this
   torch (the "xFormers can't load C++/CUDA extensions" failure mode); DeepSpeed reads a ZeRO-2 offload config.
   A peft LoRA layer is injected and gets gradients.
GPU kernels cannot run at build time (no GPU in a build): `dreambooth doctor` proves those on the target machine.
Exit status 1 with one line per problem.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

CORE = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "xformers", "deepspeed", "peft")
# Installed by `python -m venv` itself, not by the lock; the project's own wheel is added after this check.
ALLOWED_EXTRA = {"pip", "setuptools", "dreambooth"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(version: str) -> str:
    return version.split("+", 1)[0]  # torch may carry a local tag such as +cu128


def parse_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    if not pins:
        raise SystemExit(f"assert_stack: no `name==version` pins found in {path}")
    return pins


def check_installed(pins: dict[str, str]) -> list[str]:
    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for name, want in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}=={want} is in the lock file but not installed")
        elif base_version(have) != want:
            problems.append(f"{name} is {have}, the lock file says {want}")
    extra = sorted(set(installed) - set(pins) - ALLOWED_EXTRA)
    if extra:
        problems.append(f"installed but not in the lock file: {', '.join(extra)}")
    return problems


def check_core(pins: dict[str, str]) -> list[str]:
    problems = []
    for name in CORE:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = __import__(name)
        except Exception as exc:
            problems.append(f"`import {name}` failed: {type(exc).__name__}: {exc}")
            continue
        have = base_version(getattr(module, "__version__", "?"))
        want = pins.get(name)
        if want is None:
            problems.append(f"{name} is not pinned in the lock file")
        elif have != want:
            problems.append(f"{name}.__version__ is {have}, the lock file says {want}")
        for w in caught:
            if "can't load" in str(w.message) or "C++/CUDA extensions" in str(w.message):
                problems.append(f"{name} warned at import: {str(w.message).splitlines()[0]}")
        print(f"  {name:<13} {have}")
    return problems


def run(name: str, fn, problems: list[str]) -> None:
    started = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:
        problems.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        print(f"  FAIL {name}")
        return
    print(f"  ok   {name} ({time.perf_counter() - started:.1f} s){': ' + detail if detail else ''}")


def op_torch() -> str:
    import torch

    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    return f"cuda build {torch.version.cuda}, threads {torch.get_num_threads()}"


def op_xformers() -> str:
    import torch
    import xformers

    if not getattr(xformers, "_has_cpp_library", False):
        raise RuntimeError("xformers' C++/CUDA extension did not load (built for another torch?)")
    from xformers import _cpp_lib

    meta = getattr(_cpp_lib, "_build_metadata", None)
    built_for = getattr(meta, "torch_version", None) if meta is not None else None
    if built_for and base_version(built_for) != base_version(torch.__version__):
        raise RuntimeError(f"xformers was built for torch {built_for}, this is torch {torch.__version__}")
    # importing xformers.ops registers the memory-efficient attention ops (it fails when they cannot load)
    import xformers.ops

    return f"extension built for torch {built_for or '?'}"


def op_bitsandbytes() -> str:
    import bitsandbytes.functional as F
    import torch

    x = torch.randn(4096)
    q, state = F.quantize_blockwise(x)
    err = (F.dequantize_blockwise(q, state) - x).abs().max().item()
    if not err < 0.1:
        raise RuntimeError(f"blockwise 8-bit round trip error {err:.3f}")
    return f"8-bit blockwise round trip on CPU, max error {err:.4f}"


def op_diffusers() -> str:
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=32,
    )
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == (1, 4, 8, 8)
    return "tiny UNet2DConditionModel forward"


def op_transformers() -> str:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000
    )
    with torch.no_grad():
        out = CLIPTextModel(config)(torch.randint(0, 1000, (1, 77))).last_hidden_state
    assert out.shape == (1, 77, 32)
    return "tiny CLIPTextModel forward"


def op_accelerate() -> str:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    return f"Accelerator on {accelerator.device}"


def op_deepspeed() -> str:
    from deepspeed.runtime.config import DeepSpeedConfig

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }
    parsed = DeepSpeedConfig(config)  # no process group: one process
    assert parsed.zero_optimization_stage == 2 and parsed.zero_config.offload_optimizer is not None
    return "ZeRO-2 offload config"


def op_peft() -> str:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False), model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    model(torch.ones(1, 4)).sum().backward()
    return f"LoRA layer trains ({len(trainable)} tensors)"


def main() -> int:
    locks = [Path(arg) for arg in sys.argv[1:]] or [Path("requirements/lock.txt")]
    # the lock files agree where they overlap (deepspeed-lock.txt is compiled against lock.txt)
    pins = {name: version for lock in locks for name, version in parse_lock(lock).items()}
    print(f"assert_stack: {len(pins)} pinned packages in {', '.join(map(str, locks))}")
    problems = check_installed(pins)
    problems += check_core(pins)
    for name, fn in (
        ("torch op", op_torch),
        ("xformers extension", op_xformers),
        ("bitsandbytes op", op_bitsandbytes),
        ("diffusers op", op_diffusers),
        ("transformers op", op_transformers),
        ("accelerate", op_accelerate),
        ("deepspeed", op_deepspeed),
        ("peft LoRA", op_peft),
    ):
        run(name, fn, problems)
    if problems:
        for problem in problems:
            print(f"assert_stack: FAIL {problem}", file=sys.stderr)
        return 1
    print("assert_stack: the image holds exactly the locked stack, and it works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
