"""`dreambooth doctor`: what this environment can do — proven by running a tiny op, not by importing."""

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# the locked stack's main packages: what `dreambooth doctor` reports and a run's manifest records
STACK = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "xformers",
    "deepspeed",
    "peft",
    "safetensors",
)
PACKAGES = (*STACK, "dreambooth")
LOW_DISK_GB = 10.0  # one SD 1.x training run with a few fp16 checkpoints and exports


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _try(name: str, fn, *, warn_only: bool = False) -> Check:
    try:
        return Check(name, "ok", fn())
    except Exception as exc:  # a failing check is a finding, not a crash
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return Check(name, "warn" if warn_only else "fail", text)


def check_gpu() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        hint = (
            "no CUDA GPU visible: training runs on the CPU (slow). In Docker: `--gpus all` + NVIDIA Container Toolkit"
        )
        if is_wsl():
            hint += f"; on WSL2 also a current Windows NVIDIA driver (/dev/dxg present: {Path('/dev/dxg').exists()})"
        return [Check("gpu", "warn", hint)]
    props = torch.cuda.get_device_properties(0)
    driver = _nvidia_smi("driver_version") or "unknown"
    detail = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}, driver {driver}"
    return [Check("gpu", "ok", detail)]


def _nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_sdpa() -> list[Check]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    checks = []
    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    backends |= {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for name, backend in backends.items():

        def run(backend=backend) -> str:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, q, q)
            assert torch.isfinite(out).all()
            return f"ran on {device}"

        checks.append(_try(f"sdpa:{name}", run, warn_only=True))
    return checks


def check_xformers() -> Check:
    def run() -> str:
        import torch
        import xformers
        import xformers.ops as xops

        if not torch.cuda.is_available():
            raise RuntimeError(
                f"xformers {xformers.__version__} imports, but its kernels need a CUDA GPU (SDPA is used)"
            )
        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        out = xops.memory_efficient_attention(q, q, q)
        assert torch.isfinite(out).all()
        return f"memory_efficient_attention ran (xformers {xformers.__version__})"

    return _try("xformers", run, warn_only=True)


def adamw8bit_step_runs(device) -> str:
    """One real AdamW8bit step on `device`; raises when bitsandbytes' kernels cannot run there."""
    import bitsandbytes as bnb

    from dreambooth.optimizers import step_runs

    return step_runs(bnb.optim.AdamW8bit, device)


def check_bitsandbytes() -> Check:
    def run() -> str:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("8-bit AdamW needs a CUDA GPU here; training falls back to torch AdamW")
        return adamw8bit_step_runs("cuda")

    return _try("bitsandbytes", run, warn_only=True)


def check_paths(paths: dict[str, bool]) -> list[Check]:
    """`paths`: folder → must it be writable. Missing folders are fine outside the container."""
    checks = []
    for folder, writable in paths.items():
        p = Path(folder)
        if not p.exists():
            continue
        if writable and not os.access(p, os.W_OK):
            fix = f"`chown -R {os.getuid()}:{os.getgid()} <host dir>` or run with `--user $(id -u):$(id -g)`"
            checks.append(Check(f"volume:{folder}", "fail", f"{folder} is not writable by uid {os.getuid()}: {fix}"))
            continue
        free = shutil.disk_usage(p).free / 1e9
        status = "warn" if writable and free < LOW_DISK_GB else "ok"
        checks.append(Check(f"volume:{folder}", status, f"{'rw' if writable else 'ro'}, {free:.1f} GB free"))
    return checks


def is_wsl() -> bool:
    try:
        return "microsoft" in Path("/proc/version").read_text().lower() or Path("/dev/dxg").exists()
    except OSError:
        return False


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_doctor() -> dict:
    checks = [*check_gpu(), *check_sdpa(), check_xformers(), check_bitsandbytes()]
    # where a run's output goes when none is named: $DREAMBOOTH_OUTPUT (/output in the image, whose root filesystem
    # is read-only, the working directory included), else ./output
    default_output = os.environ.get("DREAMBOOTH_OUTPUT", ".")
    default_paths = {"/models": False, "/data": False, "/output": True, "/cache": True, default_output: True}
    checks += check_paths(default_paths)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wsl": is_wsl(),
        "versions": versions(),
        "checks": [asdict(c) for c in checks],
        "ok": all(c.status != "fail" for c in checks),
    }
