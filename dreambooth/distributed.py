"""Several processes, one run: accelerate (DDP or DeepSpeed ZeRO) set up for training, and each process's share.

Each process takes its own rows of every global batch (Shard) and draws the whole batch's noise from the shared
generator, so N processes compute what one process with an N times larger batch would.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dreambooth import events, trackers
from dreambooth.config import TrainConfig
from dreambooth.errors import EnvironmentProblem


def check_deepspeed(cfg: TrainConfig) -> None:
    """--distributed deepspeed-*: the library imports (on a machine without CUDA, as DeepSpeed's CPU accelerator,
    which is chosen here, before the import, so that DeepSpeed does not warn that it found no GPU)."""
    if not cfg.deepspeed:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError as exc:
        raise EnvironmentProblem(
            f"--distributed {cfg.distributed} needs DeepSpeed, which cannot be imported here ({exc})",
            "use the image (it has DeepSpeed), `pip install deepspeed` here, or --distributed ddp",
        ) from None


def make_accelerator(cfg: TrainConfig):
    """This process's share of the run: alone, or one of N (launched by accelerate or torchrun); DDP or DeepSpeed.

    Processes other than the first are silenced from here on: one progress bar and one report, not N."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    if cpu:  # accelerate imports DeepSpeed where it is installed (unwrap_model); told, it does not warn on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mixed = cfg.mixed_precision
    if cpu and mixed == "fp16":
        mixed = "no"
    plugin = None
    handlers = accelerator_handlers(cfg)
    if cfg.deepspeed:
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        check_deepspeed(cfg)
        plugin = DeepSpeedPlugin(
            zero_stage=int(cfg.distributed[-1]),
            offload_optimizer_device=cfg.offload_optimizer,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            gradient_clipping=cfg.max_grad_norm,
            zero3_init_flag=False,
        )
        # offloaded, the optimizer steps on the CPU: DeepSpeed's compiled CPU Adam when it builds here, torch's
        # AdamW otherwise (make_optimizer), which DeepSpeed refuses unless told that it is meant
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
        if cpu:
            # accelerate's CPU mode leaves DeepSpeed out; as a "device" run over gloo it hands the model to
            # DeepSpeed, whose CPU accelerator does the rest (how the tests run ZeRO on a machine without GPUs)
            import deepspeed.ops

            cpu = False
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            # DeepSpeed would compile its shared-memory all-reduce on first use: a C++ compiler the image does not
            # have, and a minute's build for nothing on a CPU run. Marked unbuildable, it falls back to gloo's.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    accelerator = Accelerator(
        mixed_precision=mixed, cpu=cpu, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        deepspeed_plugin=plugin, kwargs_handlers=handlers, **trackers.accelerator_kwargs(cfg),
    )  # fmt: skip
    if is_deepspeed(accelerator):  # ours, or one an --accelerate-config file asked for
        # accelerate reads DeepSpeed's micro-batch size off a dataloader, and batches come from DataStream
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    if not accelerator.is_main_process:
        events.silence(label=f"process {accelerator.process_index}")
    if mixed != cfg.mixed_precision:
        events.notice("--mixed-precision fp16 needs a GPU; training in fp32 on the CPU")
    return accelerator, mixed


def accelerator_handlers(cfg: TrainConfig) -> list:
    """How autocast and the fp16 loss scaler behave, where our settings differ from accelerate's defaults."""
    from accelerate.utils import AutocastKwargs, GradScalerKwargs

    handlers = []
    if cfg.gradient_checkpointing:
        # autocast keeps a half-precision copy of every weight it casts until the forward pass ends (1.7 GB for
        # SD 1.5's UNet) only to reuse it, and each weight is used once per pass: without the cache the casts
        # are the same, and with checkpointing they are freed block by block
        handlers.append(AutocastKwargs(cache_enabled=False))
    if cfg.fused_backward:  # the loss scale lives with the per-weight updates (performance.LossScale)
        handlers.append(GradScalerKwargs(enabled=False))
    return handlers


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_zero3(accelerator) -> bool:
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


@contextmanager
def whole_weights(accelerator, model):
    """DeepSpeed ZeRO-3 keeps each weight in pieces over the processes: gather them (all processes take part)
    for as long as a checkpoint and its samples need them. Every other set-up holds whole weights anyway."""
    if not is_zero3(accelerator):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(accelerator.unwrap_model(model).parameters())):
        yield


@contextmanager
def whole_on_load(accelerator):
    """Under ZeRO-3, transformers loads any model in pieces over the processes (it reads accelerate's DeepSpeed
    config); the frozen text encoder is not DeepSpeed's to hold, and in pieces it cannot run: load it whole."""
    if not is_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


@dataclass(frozen=True)
class Shard:
    """This process's rows of the global micro-batch: its instance rows, then (prior preservation) its class rows.

    Every process draws the noise for the whole global batch from the same generator and keeps its own rows: the
    generators stay in step, and N processes compute what one process with an N times larger batch would."""

    rows: torch.Tensor
    total: int

    @classmethod
    def of(cls, rank: int, world: int, batch_size: int, with_classes: bool) -> "Shard":
        size = world * batch_size
        mine = list(range(rank * batch_size, (rank + 1) * batch_size))
        if with_classes:  # the global batch is all instance examples, then all class examples
            mine += [size + row for row in mine]
        return cls(torch.tensor(mine), size * (2 if with_classes else 1))

    def randn(self, generator: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn((self.total, *shape), generator=generator)[self.rows]

    def randint(self, generator: torch.Generator, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.total,), generator=generator)[self.rows]

    def rand(self, generator: torch.Generator) -> torch.Tensor:
        return torch.rand((self.total,), generator=generator)[self.rows]
