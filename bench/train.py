"""Training speed and memory: `dreambooth train` vs diffusers' own examples/dreambooth/train_dreambooth.py (SD 1.5)
and train_dreambooth_lora_flux.py (FLUX.1 [dev] LoRA), same GPU.

    .venv/bin/python bench/train.py --vendor --diffusers-git DIR   # once: the official script → bench/vendor/
    .venv/bin/python bench/train.py --pack                         # once: wheels the GPU image lacks → bench/wheels/
    python3 bench/train.py [--configs a,b] [--steps 70] [--budget-s 450]     # on the GPU (bench/gpu_session.sh)
    .venv/bin/python bench/train.py --smoke                        # the whole harness on CPU, tiny model, seconds
    .venv/bin/python bench/train.py --table bench/results/train-*.json --update-readme

Each configuration runs in its own process, started through this file's `_measure` wrapper, which runs the target
(`python -m dreambooth train …` or the official script, via runpy) unchanged and records, at exit:
- per step: a timestamp at the start of every `UNet2DConditionModel.forward` call (one per optimizer step in both
  programs: prior preservation puts instance and class images in one batch; gradient checkpointing re-runs blocks,
  not the top-level forward). On a GPU these are CUDA events, so recording them adds no host sync.
  Steady-state s/step is the median step after --warmup steps.
- peak memory: torch.cuda.max_memory_allocated / max_memory_reserved at exit and at the last step's start, and the
  most device memory in use (cudaMemGetInfo) seen at a step's start, which also counts what PyTorch's allocator
  does not see (CUDA context, bitsandbytes' paged optimizer states).
The model is SD 1.5 or FLUX.1 [dev] at full size with random weights (shapes, not values, decide speed and memory),
built in code (Flux's 12 B transformer and 4.7 B T5 written one tensor at a time as bf16: 33 GB of disk, under a
minute on the GPU machine); `UNet2DConditionModel.forward` or `FluxTransformer2DModel.forward` is the step's mark;
the instance and class images are made up, and there are enough class images that neither program generates any.
Results: bench/results/train-<device>.json (device, driver, versions, exact commands) and a markdown table.
"""

import argparse
import atexit
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENDOR = BENCH / "vendor"
WHEELS = BENCH / "wheels"
RESULTS = BENCH / "results"
LOCKS = (ROOT / "requirements" / "lock.txt", ROOT / "requirements" / "deepspeed-lock.txt")
# what a DeepSpeed measurement needs on the GPU machine besides diffusers
DEEPSPEED_PACK = "deepspeed,hjson,py-cpuinfo,msgpack,einops,ninja"
SOURCE_ONLY = {"deepspeed"}  # published without wheels: its source travels, built there against torch
# the official script of each model family's configurations
OFFICIAL_PATHS = {
    "sd15": "examples/dreambooth/train_dreambooth.py",
    "flux": "examples/dreambooth/train_dreambooth_lora_flux.py",
}
OFFICIAL_PATH = OFFICIAL_PATHS["sd15"]
OFFICIAL_URL = "https://raw.githubusercontent.com/huggingface/diffusers/{ref}/{path}"
CARRY_LIMIT_MIB = 64  # what travels to the GPU machine: working tree + carried paths
DEVICE_PYTHON = "3.12"  # the GPU image's python3 (/work/.library/device/KINDS.md)
DEVICE_CUDA = "130"  # its torch's CUDA (2.11+cu130): the bitsandbytes kernels it loads
README_BEGIN, README_END = "<!-- train-results:begin -->", "<!-- train-results:end -->"

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
NUM_INSTANCE_IMAGES, NUM_CLASS_IMAGES = 4, 8
LEARNING_RATE = "5e-6"
FLUX_LEARNING_RATE = "1e-4"
# the LoRA targets of diffusers' train_dreambooth_lora_flux.py when --lora_layers is not given (its default), which
# ours takes as module names: the same modules train in both
FLUX_DIFFUSERS_TARGETS = (
    "attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,"
    "ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2"
)


# ───────────────────────────── what is measured ─────────────────────────────


@dataclass(frozen=True)
class Config:
    """One measured run. The classic recipe (8-bit Adam, gradient checkpointing, fp16) is the default."""

    name: str
    contender: str  # "ours" (dreambooth train) or "official" (diffusers' train_dreambooth.py)
    what: str
    mixed_precision: str = "fp16"
    eight_bit_adam: bool = True
    checkpointing: bool = True
    batch_size: int = 1
    train_text_encoder: bool = False
    levers: tuple[str, ...] = ()  # further `dreambooth train` flags
    memory_cap_gb: float | None = None  # torch.cuda.set_per_process_memory_fraction: prove a small card's claim
    gpu_only: bool = False  # needs CUDA (paging, xformers) or is pointless on a CPU (compile): not in --smoke
    family: str = "sd15"  # sd15 (full fine-tune, train_dreambooth.py) | flux (LoRA, train_dreambooth_lora_flux.py)
    # | sdxl (ours only)
    lora_rank: int = 16  # flux: the LoRA's rank (both programs)
    resolution: int | None = None  # this configuration's own (default: the run's --resolution)


ZERO2_OFFLOAD = ("--distributed", "deepspeed-zero2", "--offload-optimizer", "cpu")
NO_CLIP = ("--max-grad-norm", "0")  # the step inside backward cannot clip (clipping needs every gradient first)

# In priority order: a run with a time budget measures from the top and skips what no longer fits.
CONFIGS = [
    Config("official-classic", "official", "diffusers' script: 8-bit Adam, checkpointing, fp16"),
    Config("ours-classic", "ours", "the same settings"),
    Config("ours-low-vram", "ours", "--low-vram profile", levers=("--low-vram",), gpu_only=True),
    Config(
        "ours-low-vram-cap6",
        "ours",
        "--low-vram, capped at 6 GiB",
        levers=("--low-vram",),
        memory_cap_gb=6,
        gpu_only=True,
    ),
    Config("official-bf16", "official", "diffusers' script, bf16", mixed_precision="bf16"),
    Config("ours-bf16", "ours", "classic, bf16", mixed_precision="bf16"),
    Config("ours-fused-backward", "ours", "classic + --fused-backward", levers=("--fused-backward", *NO_CLIP)),
    Config("ours-paged-adam", "ours", "classic + --paged-adam", levers=("--paged-adam",), gpu_only=True),
    Config("ours-channels-last", "ours", "classic + --channels-last", levers=("--channels-last",)),
    Config(
        "ours-adamw-foreach",
        "ours",
        "torch AdamW --adam-impl foreach (no 8-bit)",
        eight_bit_adam=False,
        levers=("--adam-impl", "foreach"),
    ),
    Config(
        "ours-adamw-fused",
        "ours",
        "torch AdamW --adam-impl fused (no 8-bit)",
        eight_bit_adam=False,
        levers=("--adam-impl", "fused"),
    ),
    Config(
        "ours-adamw-fused-backward",
        "ours",
        "torch AdamW fused, step inside backward",
        eight_bit_adam=False,
        levers=("--adam-impl", "fused", "--fused-backward", *NO_CLIP),
    ),
    Config("ours-torch-compile", "ours", "classic + --torch-compile", levers=("--torch-compile",), gpu_only=True),
    Config("official-batch4", "official", "diffusers' script, batch 4", batch_size=4),
    Config("ours-batch4", "ours", "classic, batch 4", batch_size=4),
    Config("official-text-encoder", "official", "diffusers' script, text encoder trained", train_text_encoder=True),
    Config("ours-text-encoder", "ours", "classic, text encoder trained", train_text_encoder=True),
    Config(
        "ours-low-vram-cap8",
        "ours",
        "--low-vram, capped at 8 GiB",
        levers=("--low-vram",),
        memory_cap_gb=8,
        gpu_only=True,
    ),
    Config("ours-classic-cap12", "ours", "classic, capped at 12 GiB", memory_cap_gb=12, gpu_only=True),
    # DeepSpeed ZeRO-2 with Adam's states in CPU memory: the diffusers docs' answer for cards under 8 GB
    Config(
        "ours-zero2-offload-cap8",
        "ours",
        "DeepSpeed ZeRO-2, optimizer offloaded to the CPU, capped at 8 GiB",
        eight_bit_adam=False,
        levers=ZERO2_OFFLOAD,
        memory_cap_gb=8,
        gpu_only=True,
    ),
    Config(
        "ours-adamw-for-loop",
        "ours",
        "torch AdamW --adam-impl for-loop (no 8-bit)",
        eight_bit_adam=False,
        levers=("--adam-impl", "for-loop"),
    ),
    # xformers is not in the GPU image (and its wheels are built for another torch): only on request
    Config(
        "official-xformers",
        "official",
        "diffusers' script + xformers",
        levers=("--attention", "xformers"),
        gpu_only=True,
    ),
    Config(
        "ours-xformers", "ours", "classic + --attention xformers", levers=("--attention", "xformers"), gpu_only=True
    ),
]
# FLUX.1 [dev] LoRA, rank 16, bf16 base, 8-bit AdamW, gradient checkpointing, no prior preservation (as the anchors
# publish their figures); last in the order: the full-size model alone is 33 GB to build
FLUX = {"family": "flux", "mixed_precision": "bf16"}
CONFIGS += [
    Config("official-flux-lora", "official", "train_dreambooth_lora_flux.py, rank 16, 512 px", **FLUX),
    Config("ours-flux-lora", "ours", "the same settings", **FLUX),
    Config("official-flux-lora-1024", "official", "train_dreambooth_lora_flux.py, rank 16, 1024 px", resolution=1024,
           **FLUX),
    Config("ours-flux-lora-1024", "ours", "the same settings, 1024 px", resolution=1024, **FLUX),
    Config("ours-flux-lora-all-linear", "ours", "rank 16, kohya's targets (every linear layer of the blocks)",
           levers=("--lora-targets", "all-linear"), **FLUX),
]  # fmt: skip
# The frozen base's levers (--base-precision, --blocks-to-swap): ours only, each with `dreambooth plan`'s estimate
# recorded beside the measured peak. Caps prove the small-card targets: Flux LoRA at 1024 px in 12 GiB with NF4 or
# fp8 + swapped blocks, 24 GiB with a bf16 base; SDXL LoRA in 8; SDXL full in 16; SD 1.5 LoRA in 4.
SD_LORA = ("--adapter", "lora", "--lora-rank", "16", "--lora-alpha", "16")
SDXL = {"family": "sdxl", "mixed_precision": "bf16", "resolution": 1024, "gpu_only": True}
CONFIGS += [
    Config("ours-sd15-lora-cap4", "ours", "SD 1.5 LoRA rank 16, capped at 4 GiB", levers=SD_LORA, memory_cap_gb=4,
           gpu_only=True),
    Config("ours-sdxl-lora-cap8", "ours", "SDXL LoRA rank 16, 1024 px, capped at 8 GiB", levers=SD_LORA,
           memory_cap_gb=8, **SDXL),
    Config("ours-sdxl-lora-fp8", "ours", "SDXL LoRA rank 16, 1024 px, fp8 base", levers=(*SD_LORA,
           "--base-precision", "fp8"), **SDXL),
    Config("ours-sdxl-full-cap16", "ours", "SDXL full, 1024 px, bf16 weights (--full-bf16), fused backward, fp8 "
           "frozen text encoders, 16 GiB", levers=("--full-bf16", "--fused-backward", *NO_CLIP, "--base-precision",
           "fp8"), memory_cap_gb=16, **SDXL),
    Config("ours-flux-lora-fp8", "ours", "rank 16, 512 px, fp8 base", levers=("--base-precision", "fp8"), gpu_only=True,
           **FLUX),
    Config("ours-flux-lora-nf4", "ours", "rank 16, 512 px, NF4 base", levers=("--base-precision", "nf4"), gpu_only=True,
           **FLUX),
    Config("ours-flux-lora-1024-cap24", "ours", "rank 16, 1024 px, bf16 base, capped at 24 GiB", resolution=1024,
           memory_cap_gb=24, gpu_only=True, **FLUX),
    Config("ours-flux-lora-1024-fp8", "ours", "rank 16, 1024 px, fp8 base", resolution=1024,
           levers=("--base-precision", "fp8"), gpu_only=True, **FLUX),
    Config("ours-flux-lora-1024-nf4-cap12", "ours", "rank 16, 1024 px, NF4 base, capped at 12 GiB", resolution=1024,
           levers=("--base-precision", "nf4"), memory_cap_gb=12, gpu_only=True, **FLUX),
    Config("ours-flux-lora-1024-fp8-swap16-cap12", "ours", "rank 16, 1024 px, fp8 base, 16 blocks swapped, 12 GiB",
           resolution=1024, levers=("--base-precision", "fp8", "--blocks-to-swap", "16"), memory_cap_gb=12,
           gpu_only=True, **FLUX),
    Config("ours-flux-lora-1024-fp8-swap28", "ours", "rank 16, 1024 px, fp8 base, 28 blocks swapped", resolution=1024,
           levers=("--base-precision", "fp8", "--blocks-to-swap", "28"), gpu_only=True, **FLUX),
    Config("ours-flux-lora-1024-budget12", "ours", "rank 16, 1024 px, --vram-budget 12GB (levers chosen by the plan)",
           resolution=1024, levers=("--vram-budget", "12GB"), memory_cap_gb=12, gpu_only=True, **FLUX),
]  # fmt: skip
ON_REQUEST = {"official-xformers", "ours-xformers"}
SMOKE = ("official-classic", "ours-classic", "ours-fused-backward", "official-flux-lora", "ours-flux-lora")


def cpu_variant(cfg: Config) -> Config:
    """What a CPU can run: fp32 (autocast fp16 needs a GPU) and torch's AdamW (8-bit Adam's kernels are CUDA's); the
    tiny model's own size."""
    return replace(cfg, mixed_precision="no", eight_bit_adam=False, what=f"{cfg.what} (on CPU: fp32, torch AdamW)",
                   resolution=None, lora_rank=4)  # fmt: skip


@dataclass(frozen=True)
class Inputs:
    model: Path
    instance_dir: Path
    class_dir: Path
    resolution: int
    steps: int  # training steps each program is asked for


@dataclass(frozen=True)
class Plan:
    """How each run is timed. Unless `full_runs`, a program is asked for one step more than is timed, and the
    wrapper ends it when that extra step begins: the timed steps are complete, and no run spends device time
    saving gigabytes of final weights (both programs would, in different amounts)."""

    timed_steps: int
    warmup: int
    full_runs: bool = False
    keep_outputs: bool = False

    @property
    def program_steps(self) -> int:
        return self.timed_steps if self.full_runs else self.timed_steps + 1

    @property
    def step_times(self) -> int:
        """Durations the UNet call timestamps give: one fewer than calls (a step ends where the next begins)."""
        return self.program_steps - 1


def ours_command(cfg: Config, inputs: Inputs, output: Path) -> list[str]:
    if cfg.family == "flux":
        return ours_flux_command(cfg, inputs, output)
    cmd = ["dreambooth", "train", "--model", str(inputs.model), "--output", str(output)]
    cmd += ["--instance-data-dir", str(inputs.instance_dir), "--instance-prompt", INSTANCE_PROMPT]
    cmd += ["--class-data-dir", str(inputs.class_dir), "--class-prompt", CLASS_PROMPT, "--with-prior-preservation"]
    cmd += ["--num-class-images", str(NUM_CLASS_IMAGES), "--resolution", str(inputs.resolution)]
    cmd += ["--train-batch-size", str(cfg.batch_size), "--max-train-steps", str(inputs.steps)]
    cmd += ["--learning-rate", LEARNING_RATE, "--lr-scheduler", "constant", "--seed", "0"]
    if "--low-vram" not in cfg.levers:  # the profile chooses these itself
        cmd += ["--mixed-precision", cfg.mixed_precision]
        cmd += ["--use-8bit-adam" if cfg.eight_bit_adam else "--no-use-8bit-adam"]
        cmd += ["--gradient-checkpointing" if cfg.checkpointing else "--no-gradient-checkpointing"]
    if cfg.train_text_encoder:
        cmd += ["--train-text-encoder"]
    return cmd + list(cfg.levers)


def ours_flux_command(cfg: Config, inputs: Inputs, output: Path) -> list[str]:
    """A Flux LoRA as diffusers' script trains it by default: its modules, rank = alpha, T5 at 512 tokens."""
    cmd = ["dreambooth", "train", "--model", str(inputs.model), "--output", str(output)]
    cmd += ["--instance-data-dir", str(inputs.instance_dir), "--instance-prompt", INSTANCE_PROMPT]
    cmd += ["--resolution", str(inputs.resolution), "--train-batch-size", str(cfg.batch_size)]
    cmd += ["--max-train-steps", str(inputs.steps), "--learning-rate", FLUX_LEARNING_RATE, "--seed", "0"]
    cmd += ["--adapter", "lora", "--lora-rank", str(cfg.lora_rank), "--lora-alpha", str(cfg.lora_rank)]
    if "--lora-targets" not in cfg.levers:
        cmd += ["--lora-targets", FLUX_DIFFUSERS_TARGETS]
    cmd += ["--lr-scheduler", "constant", "--mixed-precision", cfg.mixed_precision, "--guidance-scale", "1"]
    cmd += ["--use-8bit-adam" if cfg.eight_bit_adam else "--no-use-8bit-adam"]
    cmd += ["--gradient-checkpointing" if cfg.checkpointing else "--no-gradient-checkpointing"]
    return cmd + list(cfg.levers)


def official_flux_command(cfg: Config, inputs: Inputs, output: Path, script: Path) -> list[str]:
    cmd = ["python", str(script), "--pretrained_model_name_or_path", str(inputs.model), "--output_dir", str(output)]
    cmd += ["--instance_data_dir", str(inputs.instance_dir), "--instance_prompt", INSTANCE_PROMPT]
    cmd += ["--resolution", str(inputs.resolution), "--train_batch_size", str(cfg.batch_size)]
    cmd += ["--max_train_steps", str(inputs.steps), "--learning_rate", FLUX_LEARNING_RATE, "--seed", "0"]
    cmd += ["--rank", str(cfg.lora_rank), "--lora_alpha", str(cfg.lora_rank), "--guidance_scale", "1"]
    cmd += ["--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", cfg.mixed_precision]
    if cfg.eight_bit_adam:
        cmd += ["--use_8bit_adam"]
    if cfg.checkpointing:
        cmd += ["--gradient_checkpointing"]
    return cmd


def official_command(cfg: Config, inputs: Inputs, output: Path, script: Path) -> list[str]:
    if cfg.family == "flux":
        return official_flux_command(cfg, inputs, output, script)
    cmd = ["python", str(script), "--pretrained_model_name_or_path", str(inputs.model), "--output_dir", str(output)]
    cmd += ["--instance_data_dir", str(inputs.instance_dir), "--instance_prompt", INSTANCE_PROMPT]
    cmd += ["--class_data_dir", str(inputs.class_dir), "--class_prompt", CLASS_PROMPT, "--with_prior_preservation"]
    cmd += ["--prior_loss_weight", "1.0", "--num_class_images", str(NUM_CLASS_IMAGES)]
    cmd += ["--resolution", str(inputs.resolution), "--train_batch_size", str(cfg.batch_size)]
    cmd += ["--max_train_steps", str(inputs.steps), "--learning_rate", LEARNING_RATE, "--lr_scheduler", "constant"]
    cmd += ["--lr_warmup_steps", "0", "--seed", "0", "--mixed_precision", cfg.mixed_precision]
    if cfg.eight_bit_adam:
        cmd += ["--use_8bit_adam"]
    if cfg.checkpointing:
        cmd += ["--gradient_checkpointing"]
    if cfg.train_text_encoder:
        cmd += ["--train_text_encoder"]
    if cfg.levers == ("--attention", "xformers"):
        cmd += ["--enable_xformers_memory_efficient_attention"]
    return cmd


# ───────────────────────────── the wrapper around one run ─────────────────────────────


def measure(argv: list[str]) -> None:
    """`_measure --record FILE [--cap-gb G] -- TARGET…`: run TARGET in this process; write what it used at exit.

    TARGET is `-m MODULE ARGS…` or `SCRIPT ARGS…`, run with runpy as if started as `python TARGET…`.
    """
    parser = argparse.ArgumentParser(prog="bench/train.py _measure")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--cap-gb", type=float)
    parser.add_argument("--stop-after", type=int, help="end the program when step N+1 begins (N steps timed)")
    parser.add_argument("target", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target

    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cuda = torch.cuda.is_available()
    record: dict = {"cuda": cuda, "memory_cap_gb": args.cap_gb}
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    host_marks: list[float] = []
    device_marks: list = []
    loop = {"peak_allocated": 0, "peak_reserved": 0, "peak_device_used": 0}

    @torch.compiler.disable  # a compiled UNet must not trace the stopwatch
    def mark() -> None:
        host_marks.append(time.perf_counter())
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            device_marks.append(event)
            # host-side counters: no sync. They cover every step before this one
            loop["peak_allocated"] = torch.cuda.max_memory_allocated()
            loop["peak_reserved"] = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            loop["peak_device_used"] = max(loop["peak_device_used"], total - free)
        if args.stop_after is not None and len(host_marks) > args.stop_after:
            record["stopped_after_steps"] = args.stop_after
            write_record()
            os._exit(0)  # skips the final save (and the atexit record, written just now)

    def timed(original):
        @functools.wraps(original)
        def timed_forward(self, *a, **kw):
            mark()
            return original(self, *a, **kw)

        return timed_forward

    # the denoisers, patched on their classes before the target imports them: accelerate's autocast wrapper takes
    # this function too; one call per step in both programs (checkpointing re-runs blocks, not the forward)
    for denoiser in (UNet2DConditionModel, FluxTransformer2DModel):
        denoiser.forward = timed(denoiser.forward)

    def write_record() -> None:
        record["unet_forward_calls"] = len(host_marks)
        record["step_s_host"] = [round(b - a, 6) for a, b in itertools.pairwise(host_marks)]
        if cuda:
            try:
                torch.cuda.synchronize()
                record["step_s_device"] = [
                    round(a.elapsed_time(b) / 1e3, 6) for a, b in itertools.pairwise(device_marks)
                ]
            except RuntimeError as exc:  # a run that died of a CUDA error cannot time its events
                record["step_s_device_error"] = str(exc)
            stats = torch.cuda.memory_stats()
            record.update(
                {
                    "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                    "loop_peak_allocated_bytes": loop["peak_allocated"],
                    "loop_peak_reserved_bytes": loop["peak_reserved"],
                    "loop_peak_device_used_bytes": loop["peak_device_used"],
                    "alloc_retries": stats.get("num_alloc_retries", 0),
                    "ooms": stats.get("num_ooms", 0),
                }
            )
        import resource

        record["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        args.record.write_text(json.dumps(record, indent=1) + "\n")

    atexit.register(write_record)

    def cut_short(signum, frame) -> None:  # the harness's time limit: keep what was measured, then go
        record["cut_short"] = True
        write_record()
        os._exit(124)

    signal.signal(signal.SIGUSR1, cut_short)

    import runpy

    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        if importlib.util.find_spec("torchvision") is None:
            _install_torchvision_stand_in()
            record["torchvision"] = "stand-in (bench/train.py)"
        sys.argv = list(target)
        sys.path.insert(0, str(Path(target[0]).parent))
        runpy.run_path(target[0], run_name="__main__")


def _install_torchvision_stand_in() -> None:
    """The image transforms the official scripts take from torchvision, for environments without it (our locked venv,
    so --smoke runs them on CPU). Not used where torchvision is installed, as on the GPU image."""
    import types

    import numpy as np
    import torch
    from PIL import Image

    def crop(img, size, top, left):
        return img.crop((left, top, left + size, top + size))

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class Resize:  # an int size: the shorter side becomes `size`, as torchvision does
        def __init__(self, size, interpolation=None):
            self.size = size

        def __call__(self, img):
            w, h = img.size
            scale = self.size / min(w, h)
            return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, img):
            w, h = img.size
            return crop(img, self.size, round((h - self.size) / 2), round((w - self.size) / 2))

    class RandomCrop(CenterCrop):
        @staticmethod
        def get_params(img, output_size):  # (top, left, height, width), as torchvision's
            w, h = img.size
            th, tw = output_size
            return int(torch.randint(0, h - th + 1, ())), int(torch.randint(0, w - tw + 1, ())), th, tw

        def __call__(self, img):
            top, left, _, _ = self.get_params(img, (self.size, self.size))
            return crop(img, self.size, top, left)

    class RandomHorizontalFlip:
        def __init__(self, p=0.5):
            self.p = p

        def __call__(self, img):
            return img.transpose(Image.FLIP_LEFT_RIGHT) if float(torch.rand(())) < self.p else img

    class ToTensor:
        def __call__(self, img):
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean[0], std[0]

        def __call__(self, x):
            return (x - self.mean) / self.std

    transforms = types.ModuleType("torchvision.transforms")
    transforms.__path__ = []  # a package: the Flux script imports torchvision.transforms.functional
    for cls in (Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor, Normalize):
        setattr(transforms, cls.__name__, cls)
    transforms.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.crop = lambda img, top, left, height, width: img.crop((left, top, left + width, top + height))
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules |= {"torchvision": torchvision, "torchvision.transforms": transforms,
                    "torchvision.transforms.functional": functional}  # fmt: skip


# ───────────────────────────── inputs: model and images ─────────────────────────────


def build_model(argv: list[str]) -> None:
    """`_build DEST [--tiny] [--flux | --sdxl]`: an SD 1.5 (or FLUX.1 [dev], or SDXL) diffusers folder with random
    weights, full size or the tiny test model.

    In its own process, so that the harness holds none of the gigabytes while the runs are measured."""
    import torch

    if "--flux" in argv:
        return build_flux(Path(argv[0]), tiny="--tiny" in argv)
    model_type = "sdxl" if "--sdxl" in argv else "sd1"

    from dreambooth.families.sd import components as comp
    from dreambooth.families.sd.convert import write_diffusers_folder
    from dreambooth.families.sd.spec import bundled_config
    from dreambooth.tiny_model import write_tiny_diffusers

    dest, tiny = Path(argv[0]), "--tiny" in argv
    if tiny:
        write_tiny_diffusers(dest, model_type=model_type)
        return
    torch.manual_seed(0)
    components = {}
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if model_type == "sdxl" else comp.COMPONENTS
    for name in names:
        config = {k: v for k, v in bundled_config(model_type, name).items() if not k.startswith("_")}
        model = comp.build_model(name, config)  # fp32: the official script refuses to train half weights
        components[name] = comp.Component(name, config, {k: v.contiguous() for k, v in model.state_dict().items()})
        del model
    write_diffusers_folder(dest, components, model_type, model_type)


def build_flux(dest: Path, *, tiny: bool) -> None:
    """FLUX.1 [dev] as a diffusers folder: full size, each tensor drawn (N(0, 0.02²), bf16) as it is written, so the
    12 B transformer never sits in memory whole; or the tiny test model."""
    import torch

    from dreambooth.checkpoint.tensorfile import LazyTensor
    from dreambooth.families.flux import parts
    from dreambooth.tiny_model import write_tiny_flux

    if tiny:
        write_tiny_flux(dest)
        return
    components = {}
    for number, role in enumerate(("transformer", "vae", "text_encoder", "text_encoder_2")):
        config = parts.bundled_config("flux-dev", role)
        shapes = parts.expected_shapes(role, config)
        if role == "text_encoder_2":
            shapes.pop("encoder.embed_tokens.weight")  # one copy of T5's shared embedding
        state = {}
        for index, (key, shape) in enumerate(shapes.items()):

            def make(shape=shape, seed=number * 100_000 + index):
                generator = torch.Generator().manual_seed(seed)
                return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

            state[key] = LazyTensor(shape, "BF16", make)
        components[role] = (config, state)
    parts.write_folder(dest, components, "flux-dev")


def make_images(folder: Path, count: int, resolution: int, seed: int) -> None:
    """Smooth random pictures (gradients and blobs): JPEG-sized like photos, any content will do."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    for i in range(count):
        channels = [np.sin(xx * rng.uniform(1, 8) + yy * rng.uniform(1, 8) + rng.uniform(0, 6)) for _ in range(3)]
        pixels = ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)


def prepare_inputs(work: Path, *, tiny: bool, resolution: int, steps: int, env: dict, family: str = "sd15") -> Inputs:
    model = work / (f"model-tiny-{family}" if tiny else f"model-{family}")
    if not (model / "model_index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        flags = (["--tiny"] if tiny else []) + ({"flux": ["--flux"], "sdxl": ["--sdxl"]}.get(family, []))
        cmd = [sys.executable, str(Path(__file__).resolve()), "_build", str(model), *flags]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    images = work / f"images-{resolution}"
    if not (images / "done").is_file():
        make_images(images / "instance", NUM_INSTANCE_IMAGES, resolution, seed=1)
        make_images(images / "class", NUM_CLASS_IMAGES, resolution, seed=2)
        (images / "done").touch()
    return Inputs(model, images / "instance", images / "class", resolution, steps)


# ───────────────────────────── the official script ─────────────────────────────


def pinned_version(package: str) -> str:
    """The version requirements/lock.txt (or deepspeed-lock.txt) pins."""
    for lock in LOCKS:
        match = re.search(rf"^{re.escape(package)}==([^\s\\;]+)", lock.read_text(), re.MULTILINE | re.IGNORECASE)
        if match:
            return match.group(1)
    raise SystemExit(f"{package} is not pinned in {' or '.join(map(str, LOCKS))}")


def official_script_path(version: str, family: str = "sd15") -> Path:
    return VENDOR / f"diffusers-{version}" / Path(OFFICIAL_PATHS[family]).name


def vendor_official_scripts(version: str, git_dir: Path | None = None, allow_nearest: bool = False) -> list[Path]:
    """Every family's official script, from one diffusers release."""
    return [vendor_official_script(version, git_dir, allow_nearest, path) for path in OFFICIAL_PATHS.values()]


def source_file(script: Path) -> Path:
    """Where a vendored script's provenance is: SOURCE.json for the SD script (as always), SOURCE-<name>.json else."""
    name = "SOURCE.json" if script.name == Path(OFFICIAL_PATH).name else f"SOURCE-{script.stem}.json"
    return script.parent / name


def vendor_official_script(
    version: str, git_dir: Path | None = None, allow_nearest: bool = False, script: str = OFFICIAL_PATH
) -> Path:
    """Put diffusers' examples/dreambooth script (train_dreambooth.py, or another: `script`) of release `version`
    into bench/vendor/ (ignored by git: it is their code, run as it is, never copied into ours), with SOURCE.json
    saying where it came from.

    Sources, in order: a diffusers git clone or mirror (`--diffusers-git`: tag v<version>, or the release branches
    v<version>-patch / v<version>-release), then GitHub's raw file at tag v<version>. PyPI's sdist holds no
    examples/. With `allow_nearest`, a clone lacking that release gives its newest release at or below it, and
    SOURCE.json says so ("exact": false).
    """
    dest = official_script_path(version, next(f for f, p in OFFICIAL_PATHS.items() if p == script))
    ref, text, source = None, None, None
    if git_dir is not None:
        refs = git_release_refs(git_dir)
        exact = [r for r in (f"v{version}", f"v{version}-patch", f"v{version}-release") if r in refs]
        older = sorted((v, r) for r, v in refs.items() if v <= _version_tuple(version))
        ref = exact[0] if exact else (older[-1][1] if allow_nearest and older else None)
        if ref is not None:
            text = _git(git_dir, "show", f"{ref}:{script}")
            commit = _git(git_dir, "rev-parse", f"{ref}^{{commit}}").strip()
            source = {"git": str(git_dir), "ref": ref, "commit": commit}
    if text is None:
        import urllib.request

        url = OFFICIAL_URL.format(ref=f"v{version}", path=script)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                text, ref, source = response.read().decode(), f"v{version}", {"url": url}
        except OSError as exc:
            raise SystemExit(
                f"could not get {script} of diffusers {version}: {url}: {exc}. Pass --diffusers-git DIR "
                "(a clone: git clone --bare https://github.com/huggingface/diffusers DIR), and --allow-nearest if it "
                f"lacks v{version}"
            ) from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    about = {
        "file": script,
        "wanted": f"v{version}",
        "ref": ref,
        "exact": ref in (f"v{version}", f"v{version}-patch", f"v{version}-release"),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        **source,
    }
    source_file(dest).write_text(json.dumps(about, indent=2) + "\n")
    print(f"{dest.relative_to(ROOT)}: {about['ref']} ({'exact' if about['exact'] else 'NEAREST, not exact'})")
    return dest


def git_release_refs(git_dir: Path) -> dict[str, tuple[int, ...]]:
    """Release tags (vX.Y.Z) and release branches (vX.Y.Z-release, vX.Y.Z-patch) → their version."""
    out = _git(git_dir, "for-each-ref", "--format=%(refname:short)", "refs/tags", "refs/heads")
    refs = {}
    for ref in out.split():
        if m := re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)(-release|-patch)?", ref):
            refs[ref] = tuple(int(g) for g in m.groups()[:3])
    return refs


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


# ───────────────────────────── wheels for the GPU machine ─────────────────────────────

PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]


def pack_wheels(packages: list[str], python_version: str, dest: Path = WHEELS) -> list[dict]:
    """`pip download --no-deps` the pinned wheels of `packages` for the GPU image's Python into `dest`
    (bench/wheels/), and say whether they fit in what travels there (64 MiB with the working tree and
    bench/vendor/). bitsandbytes keeps only the kernels of the GPU machine's CUDA (see trim_bitsandbytes)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = _pip()
    rows = []
    for package in packages:
        spec = f"{package}=={pinned_version(package)}"
        if package in SOURCE_ONLY:
            cmd = [*pip, "download", "--no-deps", "--no-binary=:all:", "-d", str(dest), spec]
        else:
            cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version]
            cmd += ["--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)]]
            cmd += ["-d", str(dest), spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        name = package.replace("-", "_").lower()
        files = sorted(f for f in dest.glob("*") if f.name.lower().replace("-", "_").startswith(name + "_"))
        if package == "bitsandbytes" and done.returncode == 0:
            for wheel in files:
                trim_bitsandbytes(wheel, DEVICE_CUDA)
        rows.append(
            {
                "package": spec,
                "ok": done.returncode == 0 and bool(files),
                "files": [f.name for f in files],
                "mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
                **({"error": done.stderr.strip().splitlines()[-1:]} if done.returncode else {}),
            }
        )
    tree = working_tree_mib()
    vendor = _folder_mib(VENDOR)
    total = tree + vendor + sum(r["mib"] for r in rows)
    for r in rows:
        print(f"{r['package']:>28}: {r['mib']:6.1f} MiB  {'ok' if r['ok'] else 'FAILED ' + str(r.get('error'))}")
    print(
        f"travels: working tree {tree:.1f} + bench/vendor {vendor:.1f} + wheels {total - tree - vendor:.1f} "
        f"= {total:.1f} MiB of {CARRY_LIMIT_MIB}: {'fits' if total <= CARRY_LIMIT_MIB else 'TOO BIG'}"
    )
    return rows


def trim_bitsandbytes(wheel: Path, cuda: str) -> None:
    """Keep one CUDA build of bitsandbytes' kernels (and the CPU one) in its wheel: the wheel carries one library
    per CUDA and ROCm version, 41 MiB, of which the GPU machine loads the one for its torch's CUDA (3.4 MiB in
    all). pip installs the trimmed wheel as it is (it does not check RECORD's hashes)."""
    keep = re.compile(rf"libbitsandbytes_(cuda{cuda}|cpu)\.so$")
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", info.filename) and not keep.search(info.filename):
                continue
            zout.writestr(info, zin.read(info.filename))
    trimmed.replace(wheel)


def _pip() -> list[str]:
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    for candidate in ("python3", "pip3", "pip"):  # the locked venv (uv) has no pip of its own
        if path := shutil.which(candidate):
            return [path, "-m", "pip"] if candidate == "python3" else [path]
    raise SystemExit("no pip found to download wheels with")


def working_tree_mib() -> float:
    """Tracked files and untracked ones git does not ignore: what a device call sends besides `carry`."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    files = {ROOT / p for p in out.decode().split("\0") if p}
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def _folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20 if folder.is_dir() else 0.0


# ───────────────────────────── the run ─────────────────────────────


def device_info(env: dict) -> dict:
    """Asked of a child process: the harness itself never initialises CUDA (its context would count against the
    runs' device memory)."""
    code = (
        "import json, torch\n"
        "d = {'cuda': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda}\n"
        "if d['cuda']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d |= {'name': p.name, 'capability': f'{p.major}.{p.minor}',\n"
        "          'total_memory_gib': round(p.total_memory / 2**30, 1), 'multiprocessors': p.multi_processor_count,\n"
        "          'cudnn': torch.backends.cudnn.version()}\n"
        "print(json.dumps(d))\n"
    )
    info = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)
    if info["cuda"]:
        info["driver"] = _nvidia_smi("driver_version")
        info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    else:
        info |= {"name": f"CPU ({os.cpu_count()} cores, {platform.machine()})", "slug": f"cpu-{os.cpu_count()}core"}
    info |= {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    return info


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "xformers", "huggingface-hub"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    init = ROOT / "dreambooth" / "__init__.py"  # this tree's; in the test image the package is installed instead
    if init.is_file():
        out["dreambooth"] = re.search(r'__version__ = "(.+)"', init.read_text())[1]
    else:
        out["dreambooth"] = version("dreambooth")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        out["dreambooth_commit"] = commit.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        out["dreambooth_commit"] = None  # the GPU machine gets a copy of the tree without .git
    return out


def child_env(smoke: bool, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env |= {
        "PYTHONPATH": os.pathsep.join(path),  # ours from this tree; carried wheels (--target dir) after it
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DIFFUSERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),  # nothing written into the user's cache
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    if env.pop("PYTHONDONTWRITEBYTECODE", None):
        # every run would compile torch's, diffusers' and transformers' sources again (~20 s on 2 cores): cache the
        # bytecode once for all runs (and later harness runs), outside the source trees
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "dreambooth-bench-pycache")
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke test is a CPU run, also on a machine with a GPU
        # the tiny model gains nothing from threads, and on shared cores OpenMP's spinning threads made its steps
        # ten times slower (1.5 s against 0.1 s on 2 busy cores)
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def one_rank_environment() -> dict[str, str]:
    """What torchrun sets in the one process of a one-process run (a free port for its rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    return {**ranks, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def run_config(
    cfg: Config, inputs: Inputs, plan: Plan, work: Path, env: dict, script: Path | None, timeout: float
) -> dict:
    out = work / "runs" / cfg.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    row = {**asdict(cfg), "levers": list(cfg.levers)}
    if cfg.contender == "official":
        if script is None:
            return row | {"status": "skipped", "reason": "no official script: run `bench/train.py --vendor` first"}
        command = official_command(cfg, inputs, out / "output", script)
        target = command[1:]
    else:
        command = ours_command(cfg, inputs, out / "output")
        target = ["-m", "dreambooth", *command[1:]]
    record = out / "record.json"
    wrapped = [sys.executable, str(Path(__file__).resolve()), "_measure", "--record", str(record)]
    wrapped += ["--cap-gb", str(cfg.memory_cap_gb)] if cfg.memory_cap_gb else []
    wrapped += [] if plan.full_runs else ["--stop-after", str(plan.timed_steps)]
    wrapped += ["--", *target]
    row |= {"command": shlex.join(command), "wrapped_command": shlex.join(wrapped)}
    print(f"── {cfg.name}: {row['command']}", flush=True)
    if "--distributed" in cfg.levers:
        # `dreambooth train` would start DeepSpeed's process through accelerate's launcher, out of the measuring
        # wrapper's reach; as rank 0 of a one-process world (what the launcher sets) it trains in the wrapper
        env = {**env, **one_rank_environment()}
    started = time.perf_counter()
    with open(out / "log.txt", "wb") as log:
        proc = subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the wrapper writes its record of the steps so far
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            returncode = None
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["returncode"] = returncode
    measured = json.loads(record.read_text()) if record.is_file() else {}
    row |= summarise(measured, plan)
    if returncode == 0 and row.get("steps_measured"):
        row["status"] = "ok"
    else:
        row["status"] = "timeout" if returncode is None else "failed"
        row["log_tail"] = (out / "log.txt").read_text(errors="replace")[-3000:]
    if cfg.contender == "ours":
        row["ours_report"] = _ours_report(out / "output" / "train_report.json")
        row["plan"] = plan_estimate(command, env)
        measured_peak = row.get("peak_allocated_gib")  # the whole run's, caching included, as the plan's peak is
        if row["plan"].get("peak_gpu_bytes") and measured_peak:
            row["plan_error"] = round(row["plan"]["peak_gpu_bytes"] / (measured_peak * 2**30) - 1, 3)
    if measured.get("torchvision"):
        row["torchvision"] = measured["torchvision"]
    if not plan.keep_outputs:
        shutil.rmtree(out / "output", ignore_errors=True)  # GBs of checkpoints per run at full size
    _print_row(row)
    return row


def plan_estimate(command: list[str], env: dict) -> dict:
    """What `dreambooth plan` estimates for this run's flags (its peak GPU allocation, to set beside the measured
    one: the target is within 10 %)."""
    args = [a for a in command[2:] if a != "--dry-run"]
    cmd = [sys.executable, "-m", "dreambooth", "--log-format", "json", "plan", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in done.stdout.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "plan":
            event = json.loads(line)
            return {k: event[k] for k in ("peak_gpu_bytes", "card_needs_bytes", "peak_host_bytes", "settings")}
    return {"error": done.stderr[-500:] or done.stdout[-500:]}


def summarise(measured: dict, plan: Plan) -> dict:
    """Steady state: the steps after `warmup` (the first ones pay for cuDNN/allocator warm-up and compilation)."""
    if not measured:
        return {}
    times = measured.get("step_s_device") or measured.get("step_s_host") or []
    steady = times[plan.warmup :]
    out = {
        "unet_forward_calls": measured.get("unet_forward_calls"),
        "timer": "cuda events" if measured.get("step_s_device") else "host clock",
        "steps_measured": len(steady),
        "first_step_s": times[0] if times else None,
    }
    if measured.get("unet_forward_calls") != plan.program_steps:  # something else ran the UNet too
        calls = measured.get("unet_forward_calls")
        out["warning"] = f"{calls} UNet calls for {plan.program_steps} steps: step times suspect"
    if steady:
        out |= {
            "step_s_median": round(statistics.median(steady), 5),
            "step_s_mean": round(statistics.fmean(steady), 5),
            "step_s_min": round(min(steady), 5),
            "step_s_max": round(max(steady), 5),
            "steps_per_s": round(1 / statistics.median(steady), 3),
        }
    gib = 2**30
    peaks = ("peak_allocated", "peak_reserved", "loop_peak_allocated", "loop_peak_reserved", "loop_peak_device_used")
    for key in peaks:
        if f"{key}_bytes" in measured:
            out[f"{key}_gib"] = round(measured[f"{key}_bytes"] / gib, 3)
    for key in ("alloc_retries", "ooms"):
        if key in measured:
            out[key] = measured[key]
    out["max_rss_gib"] = round(measured.get("max_rss_bytes", 0) / gib, 3)
    return out


def _ours_report(path: Path) -> dict | None:
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    keep = ("optimizer", "attention", "mixed_precision", "training_seconds", "peak_memory", "final_loss")
    return {k: report.get(k) for k in keep}


def _print_row(row: dict) -> None:
    if row["status"] == "ok":
        print(
            f"   {row['status']}: {row['step_s_median']:.4f} s/step  "
            f"peak {row.get('peak_allocated_gib', '–')} GiB allocated, "
            f"{row.get('peak_reserved_gib', '–')} GiB reserved  "
            f"({row['wall_s']} s)",
            flush=True,
        )
    else:
        tail = row.get("log_tail", row.get("reason", "")).strip().splitlines()[-1:] or [""]
        print(f"   {row['status']}: {tail[0]}", flush=True)


def comparisons(rows: list[dict]) -> dict:
    """Steps/s ratios (> 1: faster): ours vs the official script at the same settings, each lever vs ours-classic."""
    ok = {r["name"]: r for r in rows if r.get("status") == "ok"}
    out = {}
    for r in ok.values():
        if r["contender"] != "ours":
            continue
        twin = official_twin(r, rows)
        reference = "ours-flux-lora" if _field(r, "family") == "flux" else "ours-classic"
        base = twin["name"] if twin else (reference if r["name"] != reference else None)
        if base in ok:
            out[f"{r['name']}_vs_{base}"] = round(ok[base]["step_s_median"] / r["step_s_median"], 3)
    return out


def _field(row: dict, key: str):
    """A result row's setting; rows written before a setting existed have its default."""
    return row.get(key, next(f.default for f in fields(Config) if f.name == key))


def official_twin(row: dict, rows: list[dict]) -> dict | None:
    """The official run with exactly this ours run's settings, if this run adds no lever of ours."""
    if row["contender"] != "ours" or row["levers"] or row.get("memory_cap_gb"):
        return None
    keys = ("mixed_precision", "eight_bit_adam", "checkpointing", "batch_size", "train_text_encoder", "family",
            "lora_rank", "resolution")  # fmt: skip
    for r in rows:
        if r["contender"] == "official" and not r["levers"] and all(_field(r, k) == _field(row, k) for k in keys):
            return r
    return None


def markdown_table(report: dict) -> str:
    dev = report["device"]
    title = f"{dev['name']}" + (f", driver {dev['driver']}" if dev.get("driver") else "")
    v = report["versions"]
    lines = [
        f"**{title}** — torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
        f"bitsandbytes {v['bitsandbytes']}; {report['settings']['resolution']} px (unless a row says), prior "
        "preservation in the SD 1.5 rows (Flux LoRA rows: none, as the anchors publish theirs), "
        f"median of {report['settings']['steps']} timed steps after the first {report['settings']['warmup']}"
        + (" (**smoke run: tiny model on CPU, not a benchmark**)" if report["smoke"] else ""),
        "",
        "| configuration | what | batch | precision | s/step | steps/s | vs official | peak allocated GiB "
        "| peak reserved GiB | device used GiB | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        twin = official_twin(r, report["results"])
        ok = twin and twin.get("status") == "ok" and r.get("step_s_median")
        speedup = f"{twin['step_s_median'] / r['step_s_median']:.2f}×" if ok else ""
        precision = "low-vram" if "--low-vram" in r["levers"] else r["mixed_precision"]
        cells = [
            r["name"],
            r["what"],
            str(r["batch_size"]),
            precision,
            _fmt(r.get("step_s_median"), ".4f"),
            _fmt(r.get("steps_per_s"), ".2f"),
            speedup,
            _fmt(r.get("peak_allocated_gib"), ".2f"),
            _fmt(r.get("peak_reserved_gib"), ".2f"),
            _fmt(r.get("loop_peak_device_used_gib"), ".2f"),
            r["status"] + (f" ({r['reason']})" if r.get("reason") else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_report(report: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    name = f"train-{report['device']['slug']}" + ("-smoke" if report["smoke"] else "")
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)  # rewritten after every run: a session cut short keeps what it measured
    (results_dir / f"{name}.md").write_text(markdown_table(report))
    return path


def update_readme(reports: list[dict], readme: Path = BENCH / "README.md") -> None:
    """Replace the results section of bench/README.md (between its markers) with these reports' tables."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} … {README_END} section")
    tables = "\n".join(markdown_table(r) for r in reports if not r["smoke"]) or "No GPU results yet.\n"
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n{tables}{README_END}{tail}")


def select(names: str | None, smoke: bool) -> list[Config]:
    by = {c.name: c for c in CONFIGS}
    if names:
        unknown = [n for n in names.split(",") if n not in by]
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; --list shows them")
        chosen = [by[n] for n in names.split(",")]
    else:
        chosen = [by[n] for n in SMOKE] if smoke else [c for c in CONFIGS if c.name not in ON_REQUEST]
    if smoke:
        chosen = [cpu_variant(c) for c in chosen if not c.gpu_only]
    return chosen


def run_benchmark(args: argparse.Namespace) -> dict:
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    configs = select(args.configs, args.smoke)
    version = pinned_version("diffusers")
    scripts, about_scripts = {}, {}
    for family in OFFICIAL_PATHS:
        script = (args.official_script if family == "sd15" else None) or official_script_path(version, family)
        scripts[family] = script if script.is_file() else None
        if scripts[family] is not None:
            source = source_file(script)
            about = json.loads(source.read_text()) if source.is_file() else {"path": str(script)}
            about_scripts[family] = about | {"sha256": hashlib.sha256(script.read_bytes()).hexdigest()}

    work_root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    work_root.mkdir(parents=True, exist_ok=True)
    env = child_env(args.smoke, work_root)
    timed = args.steps or (args.warmup + 3 if args.smoke else args.warmup + 60)
    plan = Plan(timed, args.warmup, full_runs=args.full_runs, keep_outputs=args.keep)
    resolution = args.resolution or (32 if args.smoke else 512)
    report = {
        "benchmark": "dreambooth train vs diffusers examples/dreambooth/train_dreambooth.py (SD 1.5 shapes) and "
        "train_dreambooth_lora_flux.py (FLUX.1 [dev] shapes)",
        "smoke": args.smoke,
        "device": device_info(env),
        "versions": versions(),
        "official_script": about_scripts.get("sd15"),
        "official_scripts": about_scripts,
        "settings": {
            "model": "tiny SD 1.x and Flux (dreambooth/tiny_model.py)"
            if args.smoke
            else "SD 1.5 / FLUX.1 [dev] full size, random weights",
            "resolution": resolution,
            "steps": plan.timed_steps,
            "program_steps": plan.program_steps,
            "warmup": plan.warmup,
            "steps_measured": plan.step_times - plan.warmup,
            "full_runs": plan.full_runs,
            "prior_preservation": True,
            "instance_images": NUM_INSTANCE_IMAGES,
            "class_images": NUM_CLASS_IMAGES,
            "learning_rate": float(LEARNING_RATE),
        },
        "harness_command": shlex.join([sys.executable, *sys.argv]),
        "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": [],
    }
    try:
        t = time.perf_counter()
        prepared: dict[tuple[str, int], Inputs] = {}

        def inputs_of(cfg: Config) -> Inputs:  # each family's model and images, made when first needed
            key = (cfg.family, cfg.resolution or resolution)
            if key not in prepared:
                made = time.perf_counter()
                prepared[key] = prepare_inputs(work_root, tiny=args.smoke, resolution=key[1],
                                               steps=plan.program_steps, env=env, family=cfg.family)  # fmt: skip
                report.setdefault("setup_s_by_family", {})[f"{key[0]}-{key[1]}"] = round(time.perf_counter() - made, 1)
            return prepared[key]

        report["setup_s"] = round(time.perf_counter() - t, 1)
        for cfg in configs:
            timeout = args.run_timeout_s
            if deadline is not None:
                left = deadline - time.monotonic()
                walls = [r["wall_s"] for r in report["results"] if r.get("wall_s")]
                expected = max(walls) if walls else 30.0  # the slowest so far: a run cut off measures nothing
                if left < min(expected, 60.0) or left < 20:
                    report["results"].append(
                        {**asdict(cfg), "levers": list(cfg.levers), "status": "skipped", "reason": "time budget"}
                    )
                    continue
            inputs = inputs_of(cfg)  # the first run of a family builds its model (full-size Flux: 33 GB)
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())  # what the build left of the budget
                if timeout < 20:
                    report["results"].append(
                        {**asdict(cfg), "levers": list(cfg.levers), "status": "skipped", "reason": "time budget"}
                    )
                    continue
            script = scripts.get(cfg.family)  # SDXL: ours only
            report["results"].append(run_config(cfg, inputs, plan, work_root, env, script, timeout))
            report["comparisons"] = comparisons(report["results"])
            report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_report(report, args.results_dir)
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    report["comparisons"] = comparisons(report["results"])
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = write_report(report, args.results_dir)
    print(markdown_table(report))
    print(f"wrote {path}")
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    internal = {"_measure": measure, "_build": build_model}
    if argv and argv[0] in internal:
        return internal[argv[0]](argv[1:])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: the harness end to end")
    parser.add_argument("--configs", help="comma-separated names (see --list); default: all but xformers")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--steps", type=int, help="steps timed per run (default warmup + 60; smoke warmup + 3)")
    parser.add_argument("--full-runs", action="store_true", help="let each program finish (and save) as usual")
    parser.add_argument("--warmup", type=int, help="steps left out of the median (default 10; smoke 1)")
    parser.add_argument("--resolution", type=int, help="default 512 (smoke 32)")
    parser.add_argument("--budget-s", type=float, help="stop starting runs when this much time is spent")
    parser.add_argument("--run-timeout-s", type=float, default=600, help="kill a run after this long")
    parser.add_argument("--work-dir", type=Path, help="model, images, run outputs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and each run's output")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--official-script", type=Path, help="default: bench/vendor/diffusers-<pinned>/…")
    parser.add_argument("--vendor", action="store_true", help="fetch the official script into bench/vendor/, exit")
    parser.add_argument("--diffusers-git", type=Path, help="for --vendor: a diffusers clone (bare is fine)")
    parser.add_argument("--allow-nearest", action="store_true", help="for --vendor: nearest older release if needed")
    parser.add_argument("--pack", action="store_true", help="download the GPU image's missing wheels, exit")
    parser.add_argument("--pack-packages", default="diffusers,bitsandbytes," + DEEPSPEED_PACK)
    parser.add_argument("--python-version", default=DEVICE_PYTHON, help="for --pack: the GPU machine's Python")
    parser.add_argument("--table", nargs="+", type=Path, help="print the tables of these result files, exit")
    parser.add_argument("--update-readme", action="store_true", help="with --table: put them into bench/README.md")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 10

    if args.list:
        for c in CONFIGS:
            tags = [t for t, on in (("gpu only", c.gpu_only), ("on request", c.name in ON_REQUEST)) if on]
            print(f"{c.name:28} {c.what}" + (f"  [{', '.join(tags)}]" if tags else ""))
        return None
    if args.vendor:
        vendor_official_scripts(pinned_version("diffusers"), args.diffusers_git, args.allow_nearest)
        return None
    if args.pack:
        rows = pack_wheels(args.pack_packages.split(","), args.python_version)
        return None if all(r["ok"] for r in rows) else sys.exit(1)
    if args.table:
        reports = [json.loads(p.read_text()) for p in args.table]
        for r in reports:
            print(markdown_table(r))
        if args.update_readme:
            update_readme(reports)
        return None
    report = run_benchmark(args)
    failed = [r["name"] for r in report["results"] if r["status"] in ("failed", "timeout")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return None


if __name__ == "__main__":
    main()
