"""`--optimizer`: the optimizer that trains, each taken from its authors' own package with the settings they
recommend, and what each one can be combined with.

    adamw               torch's AdamW (the default)
    adamw8bit           bitsandbytes' AdamW8bit: the two moments in 8 bits (--use-8bit-adam)
    paged-adamw8bit     the same in paged memory, which the driver moves to the host under pressure (--paged-adam)
    prodigy             prodigyopt's Prodigy: Adam whose step size d it estimates itself; --learning-rate is a factor
                        on d (1.0)
    adafactor           transformers' Adafactor: the second moment factored into a row and a column per matrix
    schedulefree-adamw  schedulefree's AdamWScheduleFree: no schedule; it trains a point y and averages x, the model
    came                came-pytorch's CAME: Adafactor's factored moments plus a confidence-weighted update
    lion8bit            bitsandbytes' Lion8bit: one momentum, and every update the same size (its sign)

`--optimizer-args` sets the constructor's own keyword arguments (kohya's spelling: `key=value`, values Python
literals). bitsandbytes' 8-bit kernels are used on a CUDA GPU only; elsewhere the same algorithm runs with 32-bit
states (torch's AdamW for the AdamW ones, bitsandbytes' 32-bit Lion for lion8bit), said in a notice.
"""

import ast
import io
import shlex
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dreambooth import events
from dreambooth.errors import UserError

if TYPE_CHECKING:  # the names and settings above are read by config.py, which loads no ML library
    import torch

# Lion's sign update is larger than Adam's: its authors take a learning rate 3-10× smaller than AdamW's and a weight
# decay as many times larger (the decay applied is lr × λ). DreamBooth runs are short: the gentle end, 3.
LION_FACTOR = 3


@dataclass(frozen=True)
class Kind:
    """One optimizer: what the report calls it, which settings it takes, and what it cannot combine with."""

    title: str  # for the report and the plan
    keys: tuple[str, ...]  # what --optimizer-args may set: the constructor's keyword arguments
    recommended: tuple[tuple[str, object], ...] = ()  # its authors' settings, before --optimizer-args
    adam_settings: bool = True  # --adam-beta1/--adam-beta2/--adam-epsilon are its betas and eps
    not_per_weight: str | None = None  # why it cannot step one weight at a time (--fused-backward)
    not_deepspeed: str | None = None  # why it cannot run on DeepSpeed's partitions
    eval_mode: bool = False  # schedule-free: the model is the averaged x, set by optimizer.eval()


_ADAMW_KEYS = ("betas", "eps", "weight_decay", "amsgrad")
KINDS = {
    "adamw": Kind("AdamW", _ADAMW_KEYS),
    "adamw8bit": Kind("8-bit AdamW", (*_ADAMW_KEYS, "min_8bit_size")),
    "paged-adamw8bit": Kind("8-bit AdamW (paged)", (*_ADAMW_KEYS, "min_8bit_size")),
    "prodigy": Kind(
        "Prodigy",
        (
            "betas",
            "beta3",
            "eps",
            "weight_decay",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "d0",
            "d_coef",
            "growth_rate",
            "slice_p",
        ),
        # its authors' advice for diffusion models: AdamW-style decay, Adam's bias correction, and no lr in d's
        # denominator while a warmup holds the lr near 0
        (("decouple", True), ("use_bias_correction", True), ("safeguard_warmup", True)),
        not_per_weight="Prodigy estimates one step size d from all weights' gradients together",
        not_deepspeed="Prodigy's step size d would be estimated by each process from its own share of the weights",
    ),
    "adafactor": Kind(
        "Adafactor",
        (
            "eps",
            "clip_threshold",
            "decay_rate",
            "beta1",
            "weight_decay",
            "scale_parameter",
            "relative_step",
            "warmup_init",
        ),
        # the constant-lr form kohya documents: --learning-rate as given, not Adafactor's own relative steps
        (("relative_step", False), ("scale_parameter", False), ("warmup_init", False)),
        adam_settings=False,
        not_deepspeed="Adafactor factors each weight matrix's moments, and DeepSpeed hands it flat shards",
    ),
    "schedulefree-adamw": Kind(
        "schedule-free AdamW",
        ("betas", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power"),
        not_per_weight="schedule-free switches all weights between their trained and averaged values together",
        not_deepspeed="schedule-free switches the weights between their trained and averaged values, and DeepSpeed "
        "keeps its own copies of them",
        eval_mode=True,
    ),
    "came": Kind(
        "CAME",
        ("betas", "eps", "clip_threshold", "weight_decay"),
        (("betas", (0.9, 0.999, 0.9999)), ("eps", (1e-30, 1e-16))),  # the paper's and its package's
        adam_settings=False,
        not_deepspeed="CAME factors each weight matrix's moments, and DeepSpeed hands it flat shards",
    ),
    "lion8bit": Kind(
        "8-bit Lion", ("betas", "weight_decay", "min_8bit_size"), (("betas", (0.9, 0.99)),), adam_settings=False
    ),
}
OPTIMIZERS = tuple(KINDS)
# kohya's --optimizer_type spellings (any case), and the class path kohya takes for CAME
SPELLINGS = {
    **{name.replace("-", ""): name for name in KINDS},
    "pagedadamw8bit": "paged-adamw8bit",
    "adamwschedulefree": "schedulefree-adamw",
    "came_pytorch.came": "came",
}


def normalise(name: str) -> str:
    """Our name for an --optimizer value in our or kohya's spelling; one line for an unknown one."""
    key = str(name).strip().lower().replace("-", "")
    if key not in SPELLINGS:
        raise UserError(f"--optimizer {name!r} is unknown", f"use {' | '.join(OPTIMIZERS)}")
    return SPELLINGS[key]


def split_args(value) -> tuple[str, ...]:
    """--optimizer-args as "key=value" items: one string (space-separated, shell quoting for values with spaces),
    or a list of items (a config file, kohya's TOML)."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:  # an unclosed quote
            raise UserError(f"--optimizer-args {value!r}: {exc}", "e.g. --optimizer-args 'weight_decay=0.01'") from None
    return tuple(str(item).strip() for item in value if str(item).strip())


def parse_args(items: tuple[str, ...], name: str) -> dict:
    """The --optimizer-args items as keyword arguments, each key checked against what `name` takes."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"--optimizer-args {item!r} is not key=value", "e.g. --optimizer-args 'weight_decay=0.01'")
        if key not in KINDS[name].keys:
            hint = "--learning-rate sets it" if key == "lr" else f"it takes {', '.join(KINDS[name].keys)}"
            raise UserError(f"--optimizer-args: --optimizer {name} takes no {key!r}", hint)
        try:
            out[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(
                f"--optimizer-args {item!r}: {text!r} is not a Python literal",
                "write numbers, True/False, None, or tuples like betas=0.9,0.99",
            ) from None
    if name == "adafactor" and (out.get("relative_step") or out.get("warmup_init")):
        raise UserError(
            "--optimizer-args relative_step/warmup_init=True: Adafactor would then choose its own learning rate, "
            "and this trainer schedules --learning-rate",
            "keep relative_step=False and warmup_init=False (set --learning-rate and --lr-scheduler instead)",
        )
    return out


def default_lr(name: str, adapter_default: float) -> float:
    """The learning rate when --learning-rate is not given."""
    if name == "prodigy":
        return 1.0  # a factor on the step size Prodigy estimates: its authors leave it at 1
    if name == "lion8bit":
        return adapter_default / LION_FACTOR
    return adapter_default


def settings(cfg) -> dict:
    """The optimizer's keyword arguments (besides the learning rate): the --adam-* flags where they apply, its
    authors' recommended settings, then --optimizer-args."""
    name = cfg.optimizer
    kind = KINDS[name]
    out = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon} if kind.adam_settings else {}
    decay = cfg.adam_weight_decay
    if name == "lion8bit" and "adam_weight_decay" not in cfg.explicit:
        decay *= LION_FACTOR  # the same decay lr × λ as AdamW's
    out["weight_decay"] = decay
    out.update(kind.recommended)
    out.update(parse_args(cfg.optimizer_args, name))
    return out


# ───────────────────────────── building it ─────────────────────────────


def build(groups: list[dict], cfg, device: "torch.device") -> tuple["torch.optim.Optimizer", str, dict]:
    """(the optimizer, its name for the report, its settings). `groups`: torch param groups, each {"params": [...],
    "lr": ...}. With --fused-backward, one optimizer per weight, stepped inside backward (performance.py)."""
    from dreambooth import performance

    kwargs = settings(cfg)
    make, title = _maker(cfg, kwargs, device, groups[0]["lr"])
    if cfg.offload_optimizer == "cpu":
        title += ", offloaded to the CPU"
    try:
        if cfg.fused_backward:
            # fp16 gradients need loss scaling, done per weight inside backward; bf16 and fp32 need none
            scale = performance.LossScale() if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
            optimizer = performance.FusedBackwardOptimizer(groups, make, scale)
            title += ", stepped inside backward"
        else:
            optimizer = make(groups)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:  # the package's checks of its arguments
        raise UserError(
            f"--optimizer {cfg.optimizer} refused its settings ({exc or type(exc).__name__})",
            "check --optimizer-args and the --adam-* flags",
        ) from None
    if KINDS[cfg.optimizer].eval_mode:
        optimizer.train()  # schedule-free: steps are taken in train mode
    return optimizer, title, kwargs


def _maker(cfg, kwargs: dict, device: "torch.device", lr: float):
    """(a function making the optimizer over param groups, its name)."""
    name = cfg.optimizer
    if name in ("adamw8bit", "paged-adamw8bit", "lion8bit"):
        found = _bitsandbytes(name, device)
        if found is not None:
            cls, title = found
            return lambda groups: cls(groups, lr=lr, **kwargs), title
        kwargs = {k: v for k, v in kwargs.items() if k != "min_8bit_size"}  # a setting of the 8-bit states only
        if name == "lion8bit":
            return _lion32(device, kwargs, lr)
    elif name == "prodigy":
        from prodigyopt import Prodigy

        def prodigy(groups):
            with redirect_stdout(io.StringIO()):  # it prints a line about weight decay on stdout (JSON logs)
                return Prodigy(groups, lr=lr, **kwargs)

        return prodigy, "Prodigy (prodigyopt)"
    elif name == "adafactor":
        from transformers.optimization import Adafactor

        return lambda groups: Adafactor(groups, lr=lr, **kwargs), "Adafactor (transformers)"
    elif name == "schedulefree-adamw":
        from schedulefree import AdamWScheduleFree

        return lambda groups: AdamWScheduleFree(groups, lr=lr, **kwargs), "AdamWScheduleFree (schedulefree)"
    elif name == "came":
        from came_pytorch import CAME

        return lambda groups: CAME(groups, lr=lr, **kwargs), "CAME (came-pytorch)"
    return _adamw(cfg, kwargs, device, lr)


def _adamw(cfg, kwargs: dict, device: "torch.device", lr: float):
    import torch

    from dreambooth import performance

    if cfg.offload_optimizer == "cpu" and device.type == "cuda":
        try:
            # the optimizer's step runs on the CPU while the GPU waits: DeepSpeed's vectorised CPU Adam is several
            # times faster there than torch's. It is compiled on first use (needs g++ and ninja), or prebuilt.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            DeepSpeedCPUAdam([torch.zeros(1, requires_grad=True)])  # builds or loads the kernel, or fails
            return lambda groups: DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True, **kwargs), "DeepSpeedCPUAdam"
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]  # compiler errors run long
            events.notice(f"--offload-optimizer cpu: DeepSpeed's CPU Adam is not usable here ({why}); torch AdamW")
    impl = performance.adamw_kwargs(cfg.adam_impl)
    title = "AdamW (torch)" if cfg.adam_impl == "auto" else f"AdamW (torch, {cfg.adam_impl})"
    return lambda groups: torch.optim.AdamW(groups, lr=lr, **kwargs, **impl), title


def _bitsandbytes(name: str, device: "torch.device"):
    """(bitsandbytes' 8-bit class, its name) where its kernels really run on `device`; else None, said."""
    class_name = {"adamw8bit": "AdamW8bit", "paged-adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}[name]
    try:
        if device.type != "cuda":
            raise RuntimeError("it needs a CUDA GPU")
        import bitsandbytes as bnb

        # importing is not enough: prove the kernel runs (paged: the states live in unified memory, which the
        # driver moves to the host under memory pressure)
        step_runs(getattr(bnb.optim, class_name), device)
        return getattr(bnb.optim, class_name), f"{class_name} (bitsandbytes)"
    except Exception as exc:
        what = "8-bit Lion" if name == "lion8bit" else "8-bit AdamW"
        instead = "bitsandbytes' 32-bit Lion" if name == "lion8bit" else "torch AdamW"
        events.notice(f"--optimizer {name}: {what} cannot run here ({exc}); using {instead}")
        return None


def _lion32(device: "torch.device", kwargs: dict, lr: float):
    """Lion with 32-bit states, where the 8-bit kernels do not run; refused where bitsandbytes does not run at all
    (torch has no Lion, and another algorithm would want another learning rate)."""
    try:
        import bitsandbytes as bnb

        step_runs(bnb.optim.Lion, device)
    except Exception as exc:
        raise UserError(
            f"--optimizer lion8bit: bitsandbytes' Lion cannot run here ({exc})",
            "pick another --optimizer (e.g. adamw), or see `dreambooth doctor`",
        ) from None
    return lambda groups: bnb.optim.Lion(groups, lr=lr, **kwargs), "Lion (bitsandbytes, 32-bit states)"


def step_runs(cls, device) -> str:
    """One real step of a bitsandbytes optimizer on `device`; raises when its kernels cannot run there."""
    import torch

    p = torch.nn.Parameter(torch.randn(4096, device=device))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    cls([p], lr=1e-3).step()
    if torch.equal(before, p.detach()):
        raise RuntimeError(f"a {cls.__name__} step left the weights unchanged")
    import bitsandbytes as bnb

    return f"{cls.__name__} step ran (bitsandbytes {bnb.__version__})"


# ───────────────────────────── schedule-free's two points ─────────────────────────────


@contextmanager
def evaluated(optimizer, params: dict[str, "torch.nn.Parameter"]) -> Iterator[None]:
    """Schedule-free trains at a point y and averages x, the model: x in place for what runs inside (samples,
    checkpoints and exports, the held-out loss), then y back exactly. Exactly: from a copy in host memory, because
    y → x → y by the optimizer's formulas rounds, and a run stopped and resumed must equal one that was not."""
    from dreambooth.ema import load_raw_weights, raw_weights

    trained = raw_weights(params)
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        load_raw_weights(params, trained)


# ───────────────────────────── its memory ─────────────────────────────


def state_bytes(name: str, tensors, kwargs: dict | None = None) -> int:
    """Bytes of the optimizer's state for the trained `tensors` (real or meta), as each package allocates it."""
    kwargs = kwargs or {}
    return sum(_tensor_state_bytes(name, t, kwargs) for t in tensors)


def _tensor_state_bytes(name: str, t: "torch.Tensor", kwargs: dict) -> int:
    n, size = t.numel(), t.element_size()
    if name in ("adamw8bit", "paged-adamw8bit", "lion8bit"):
        states = 1 if name == "lion8bit" else 2
        if n < kwargs.get("min_8bit_size", 4096):
            return states * 4 * n  # small tensors keep 32-bit states
        return states * (n + 4 * -(-n // 256))  # a byte each, and an fp32 scale per block of 256
    if name == "prodigy":  # Adam's two moments, and s and the initial weights p0 for estimating d (every slice_p-th)
        return 2 * n * size + 2 * -(-n // kwargs.get("slice_p", 1)) * size
    if name in ("adafactor", "came"):  # fp32 whatever the weights' precision
        factored = t.dim() >= 2
        rows, cols = (t.shape[:-1].numel(), t.shape[:-2].numel() * t.shape[-1]) if factored else (0, 0)
        second = (rows + cols) if factored else n  # Adafactor's second moment, per row and per column
        if name == "came":  # CAME: the first moment, and the instability factored like the second moment
            return 4 * (n + second + (rows + cols if factored else 0))
        return 4 * (second + (n if kwargs.get("beta1") is not None else 0))
    return 2 * n * size  # AdamW's two moments; schedule-free's z and second moment
