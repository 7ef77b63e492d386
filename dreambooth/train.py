"""`dreambooth train`: DreamBooth fine-tuning on accelerate. Read it top to bottom:

    set-up (check inputs → model → class images → models, optimizer, caches → resume)
    loop: batch → noise → predict → loss → step → maybe save / sample / log
    report

The loop does not know which parameters train: it optimises whatever has requires_grad (UNet, and the text
encoder when asked; LoRA adapters later). All randomness of the loop comes from one CPU generator and from
(seed, position) for the data, both saved in each checkpoint, which is what makes a resumed run bit-identical.
"""

import json
import math
import os
import random
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth import __version__, events, performance, trackers
from dreambooth.checkpoint.convert import WEIGHT_FILES
from dreambooth.config import TrainConfig
from dreambooth.data import DataStream, Example, LatentSource, PromptEncoder, check_instance_dir, sample_latents
from dreambooth.errors import EnvironmentProblem, UserError
from dreambooth.fileio import atomic_dir, atomic_path, write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
REPORT_FILE = "train_report.json"


# ───────────────────────────── checks that run before any heavy work ─────────────────────────────


def check_model_folder(folder: Path, flag: str) -> None:
    """A diffusers folder with everything training needs; the message names what is missing."""
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder", "pass a diffusers folder or a .ckpt/.safetensors file")
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    for name, weights in WEIGHT_FILES.items():
        if not (folder / name / "config.json").is_file():
            missing.append(f"{name}/config.json")
        if not any(
            p.name.startswith(weights) for p in (folder / name).glob("*") if p.suffix in (".safetensors", ".bin")
        ):
            missing.append(f"{name}/{weights}.safetensors")
    tokenizer = folder / "tokenizer"
    if not ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()):
        missing.append("tokenizer/vocab.json + merges.txt")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise UserError(
            f"{flag} {folder} is an incomplete diffusers folder: missing {', '.join(missing)}",
            "point it at the folder's top (the one with model_index.json), or re-run `dreambooth convert`",
        )


def check_output(output: Path) -> None:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output {output} cannot be created ({exc.strerror})", "choose a writable folder") from None
    if not output.is_dir() or not os.access(output, os.W_OK | os.X_OK):
        raise UserError(f"--output {output} is not writable", "choose a writable folder, or fix its permissions")


def cache_entry(root: Path, src: Path) -> Path:
    """Where a conversion of the file `src` lives under `root`: keyed on path, size and mtime, because hashing
    gigabytes on every run would cost more than it saves."""
    import hashlib

    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / f"{src.stem}-{key}"


def resolve_model(cfg: TrainConfig) -> Path:
    """The base model as a diffusers folder; a single file is converted once into the cache."""
    src = cfg.model
    if src.is_dir():
        check_model_folder(src, "--model")
        return src
    if not src.exists():
        raise UserError(f"--model {src} does not exist", "pass a diffusers folder or a .ckpt/.safetensors file")
    if src.suffix.lower() not in (".ckpt", ".safetensors"):
        raise UserError(f"--model {src} is neither a folder nor a .ckpt/.safetensors file", "convert it first")
    from dreambooth.checkpoint.convert import ConvertOptions, convert

    dest = cache_entry(cfg.cache / "converted", src)
    if not (dest / "model_index.json").is_file():
        with events.stage(f"converting {src.name} into {dest}"):
            convert(src, dest, ConvertOptions(overwrite=True))
    check_model_folder(dest, "--model")
    return dest


def resolve_vae(cfg: TrainConfig, model_dir: Path) -> Path | None:
    """--vae as a diffusers VAE folder: given as one (or a model folder with vae/), or a single file (e.g.
    vae-ft-mse-840000-ema-pruned.safetensors) converted once into the cache. Checkpoints and exports carry it."""
    src = cfg.vae
    if src is None:
        return None
    if src.is_dir():
        folder = src / "vae" if (src / "vae" / "config.json").is_file() else src
        if not (folder / "config.json").is_file() or not any(folder.glob("diffusion_pytorch_model*")):
            raise UserError(
                f"--vae {src} is not a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors)",
                "pass e.g. MODEL/vae, or a single VAE file (.safetensors/.ckpt)",
            )
    elif not src.exists():
        raise UserError(f"--vae {src} does not exist", "pass a diffusers VAE folder or a .safetensors/.ckpt file")
    elif src.suffix.lower() not in (".ckpt", ".safetensors", ".pt"):
        raise UserError(f"--vae {src} is neither a folder nor a .safetensors/.ckpt/.pt file", "pass a VAE file")
    else:
        from dreambooth.checkpoint.convert import component_config_file
        from dreambooth.checkpoint.vae_file import load_vae

        folder = cache_entry(cfg.cache / "vae", src)
        if not (folder / "config.json").is_file():
            from safetensors.torch import save_file

            with events.stage(f"converting the VAE {src.name} into {folder}"):
                vae = load_vae(src, "sd1")  # SD 1.x and 2.x share the VAE's architecture and scaling factor
                with atomic_dir(folder, overwrite=True) as tmp:
                    save_file(vae.state, tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
                    write_json(tmp / "config.json", component_config_file("vae", vae.config))
    vae_config = json.loads((folder / "config.json").read_text())
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    if vae_config.get("latent_channels", 4) != unet_config.get("in_channels", 4):
        raise UserError(
            f"--vae {src} makes {vae_config.get('latent_channels')}-channel latents, and the model's UNet takes "
            f"{unet_config.get('in_channels')}",
            "pass a VAE of the model's family (Stable Diffusion 1.x/2.x VAEs make 4 channels)",
        )
    return folder


def _folder_bytes(folder: Path, fp32: bool) -> int:
    """What a component costs on disk when saved in fp32 (or as stored)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        size = path.stat().st_size
        if fp32:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                dtype = f.get_slice(keys[0]).get_dtype() if keys else "F32"
            size = size * 4 // {"F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)
        total += size
    return total


def check_disk(cfg: TrainConfig, model_dir: Path) -> dict:
    """Estimate what the planned checkpoints need and refuse up front if the disk cannot hold them."""
    per_weight = 0.5 if cfg.save_fp16 else 1.0
    unet = _folder_bytes(model_dir / "unet", fp32=True)
    text = _folder_bytes(model_dir / "text_encoder", fp32=True)
    trained = unet + (text if cfg.train_text_encoder else 0)
    # weights we write (frozen parts are hard-linked when the filesystem allows, else copied: count them)
    checkpoint = (
        int(trained * per_weight) + (0 if cfg.train_text_encoder else text) + _folder_bytes(model_dir / "vae", True)
    )
    checkpoint += trained * (0.5 if cfg.use_8bit_adam else 2)  # optimizer moments
    checkpoint += trained if cfg.save_fp16 else 0  # fp32 master weights, for an exact resume
    saves = len(save_steps(cfg))
    kept = min(saves, cfg.keep_last + 1) if cfg.keep_last else saves  # +1: the new one exists before pruning
    export = (unet + text + _folder_bytes(model_dir / "vae", True)) // 2 if cfg.export_single_file else 0
    need = int(kept * checkpoint + saves * export)
    free = shutil.disk_usage(cfg.output).free
    if need > free:
        raise EnvironmentProblem(
            f"--output {cfg.output}: the planned {saves} checkpoints need about {need / 2**30:.1f} GiB, "
            f"and only {free / 2**30:.1f} GiB is free",
            "free space, pass --keep-last 1 or --save-fp16, or raise --save-interval",
        )
    return {"estimated_bytes": need, "free_bytes": free, "checkpoints_planned": saves}


def save_steps(cfg: TrainConfig) -> list[int]:
    steps = [s for s in range(cfg.save_interval, cfg.max_train_steps, cfg.save_interval) if s >= cfg.save_min_steps]
    return [*steps, cfg.max_train_steps]


def preflight(cfg: TrainConfig) -> dict[int, list[Path]]:
    """Inputs the user gave, checked cheaply: instance folders and their images, class folders, output."""
    check_output(cfg.output)
    images = {}
    for i, concept in enumerate(cfg.concepts):
        flag = "--instance-data-dir" if len(cfg.concepts) == 1 else f"--concepts-list entry {i} instance_data_dir"
        images[i] = check_instance_dir(concept.instance_data_dir, cfg.resolution, flag)
    if cfg.with_prior_preservation:
        from dreambooth.prior import check_class_dirs_writable, missing_class_images

        check_class_dirs_writable(cfg, missing_class_images(cfg))
    return images


# ───────────────────────────── checkpoints on disk ─────────────────────────────


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint (atomic writes: a folder under its final name is complete)."""
    found = []
    for path in (output / CHECKPOINTS).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _link_or_copy(src: str, dst: str) -> None:
    """Frozen parts are identical in every checkpoint: hard-link them where the filesystem allows."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _halve_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})


def _without_ema(extras: Path, dest: Path) -> None:
    """The original file's EMA copy describes the untrained UNet: a trained checkpoint must not carry it."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(extras).items() if not k.startswith("model_ema.")}
    if state:
        save_file(state, dest, metadata={"format": "pt"})


# ───────────────────────────── the pieces of set-up ─────────────────────────────


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float, device: torch.device):
    """8-bit AdamW (bitsandbytes) when asked and it really runs on this device; torch AdamW otherwise.
    With --fused-backward, one of them per weight, stepped inside backward (dreambooth/performance.py)."""
    kwargs = dict(
        lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    make = None
    if cfg.use_8bit_adam:
        try:
            if device.type != "cuda":
                raise RuntimeError("it needs a CUDA GPU")
            import bitsandbytes as bnb

            from dreambooth.doctor import adamw8bit_step_runs

            adamw8bit_step_runs(device)  # importing is not enough: prove the kernel runs
            # paged: the states live in unified memory, which the driver moves to the CPU under memory pressure
            eight_bit = bnb.optim.PagedAdamW8bit if cfg.paged_adam else bnb.optim.AdamW8bit

            def make(group):
                return eight_bit(group, **kwargs)

            name = f"{eight_bit.__name__} (bitsandbytes)"
        except Exception as exc:
            events.notice(f"--use-8bit-adam: 8-bit AdamW cannot run here ({exc}); using torch AdamW")
    if make is None and cfg.offload_optimizer == "cpu" and device.type == "cuda":
        try:
            # the optimizer's step runs on the CPU while the GPU waits: DeepSpeed's vectorised CPU Adam is several
            # times faster there than torch's. It is compiled on first use (needs g++ and ninja), or prebuilt.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            DeepSpeedCPUAdam([torch.zeros(1, requires_grad=True)])  # builds or loads the kernel, or fails

            def make(group):
                return DeepSpeedCPUAdam(group, adamw_mode=True, **kwargs)

            name = "DeepSpeedCPUAdam"
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]  # compiler errors run long
            events.notice(f"--offload-optimizer cpu: DeepSpeed's CPU Adam is not usable here ({why}); torch AdamW")
    if make is None:
        impl = performance.adamw_kwargs(cfg.adam_impl)

        def make(group):
            return torch.optim.AdamW(group, **kwargs, **impl)

        name = "AdamW (torch)" if cfg.adam_impl == "auto" else f"AdamW (torch, {cfg.adam_impl})"
    if cfg.offload_optimizer == "cpu":
        name += ", offloaded to the CPU"
    if cfg.fused_backward:
        # fp16 gradients need loss scaling, done per weight inside backward; bf16 and fp32 need none
        scale = performance.LossScale() if cfg.mixed_precision == "fp16" and device.type == "cuda" else None
        return performance.FusedBackwardOptimizer(params, make, scale), f"{name}, stepped inside backward"
    return make(params), name


def set_attention(unet, cfg: TrainConfig, device: torch.device) -> str:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if cfg.attention == "xformers":
        try:
            if device.type != "cuda":
                raise RuntimeError("xformers needs a CUDA GPU")
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:
            events.notice(f"--attention xformers: not usable here ({exc}); using PyTorch SDPA")
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


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


def quiet_progress_bars() -> None:
    """Our bars are the ones the user reads; the libraries' loading bars would interleave with them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (SD 1.x, SD 2.x base) or the velocity (SD 2.x 768-v)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    raise UserError(
        f"the model's scheduler has prediction_type {noise_scheduler.config.prediction_type!r}",
        "only epsilon and v_prediction models can be trained",
    )


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def stop_on_signals():
    """SIGTERM (docker stop) and SIGINT (Ctrl-C) ask the loop to save and stop at the next step boundary;
    a second Ctrl-C stops at once."""
    requested: list[int] = []

    def handler(signum, frame):
        requested.append(signum)
        signal.signal(signal.SIGINT, previous[signal.SIGINT])

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield lambda: bool(requested)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class History:
    losses: list[float] = field(default_factory=list)
    instance_losses: list[float] = field(default_factory=list)
    class_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ───────────────────────────── train ─────────────────────────────


def train(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    with stop_on_signals() as should_stop:
        return _train(cfg, started, should_stop)


def _train(cfg: TrainConfig, started: float, should_stop) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    # first, so that with several processes only the first one converts, writes and speaks
    accelerator, mixed = make_accelerator(cfg)

    # --- check everything the user gave before anything heavy -----------------------------------------
    instance_images = preflight(cfg)
    with accelerator.main_process_first():  # a single model or VAE file is converted once, into the shared cache
        model_dir = resolve_model(cfg)
        vae_dir = resolve_vae(cfg, model_dir)
    if vae_dir is not None:  # from here on (class images, checkpoints, exports) the VAE is that folder
        cfg = replace(cfg, vae=vae_dir)
    if cfg.fused_backward and accelerator.num_processes > 1:
        raise UserError(
            f"--fused-backward updates each weight inside backward, and {accelerator.num_processes} processes run",
            "launch one process, or pass --no-fused-backward",
        )
    disk = check_disk(cfg, model_dir)
    resume_from = latest_checkpoint(cfg.output)
    if cfg.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint in {cfg.output / CHECKPOINTS}", "drop --resume to start afresh")
    state = torch.load(resume_from / STATE_FILE, weights_only=False) if resume_from else None
    if state is not None and state["step"] >= cfg.max_train_steps:
        events.notice(f"{resume_from} already reached step {state['step']} (--max-train-steps {cfg.max_train_steps})")
        history = History(**state["history"])
        return _write_report(cfg, state["step"], history, started, resume_from, {}, accelerator.is_main_process)

    quiet_progress_bars()

    # --- device, precision, seed -------------------------------------------------------------------------
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    # frozen parts run in half precision; trained parameters stay fp32 ("master weights"): fp16 gradients
    # cannot be unscaled in place, which is the "Attempting to unscale FP16 gradients" failure
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if state is not None:
        seed = state["seed"]
    else:
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    if world > 1:  # each process drew its own random seed: all take the first one's
        from accelerate.utils import broadcast_object_list

        seed = broadcast_object_list([seed])[0]
    if state is None:
        # the same seed gives the same run: the loop draws from its own generator, this covers the libraries
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- class images for prior preservation (the base model, before its weights change) --------------
    classes = None
    if cfg.with_prior_preservation:
        from dreambooth.data import scan_images
        from dreambooth.prior import generate_class_images, missing_class_images

        missing = missing_class_images(cfg)
        accelerator.wait_for_everyone()  # all processes counted the same missing images before any is written
        generate_class_images(cfg, model_dir, seed, device, weight_dtype, should_stop, missing, rank, world)
        accelerator.wait_for_everyone()  # each made its share; from here on every process sees them all
        if missing:
            events.notice(f"generated {sum(missing.values())} class images")
        classes = {}
        for i, concept in enumerate(cfg.concepts):
            paths = scan_images(concept.class_data_dir, cfg.resolution, "--class-data-dir")
            # exactly --num-class-images of them, the same ones on every run (sorted names)
            classes[i] = [Example(p, concept.class_prompt, i) for p in paths[: cfg.num_class_images]]
    instances = [Example(p, cfg.concepts[i].instance_prompt, i) for i, paths in instance_images.items() for p in paths]

    # --- models: a resumed run takes its weights from the checkpoint -------------------------------------
    weights_dir = resume_from or model_dir
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    text_dtype = torch.float32 if cfg.train_text_encoder else weight_dtype
    with whole_on_load(accelerator):
        text_encoder = CLIPTextModel.from_pretrained(weights_dir / "text_encoder", dtype=text_dtype)
    unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet").float()
    vae = AutoencoderKL.from_pretrained(vae_dir or model_dir / "vae", dtype=weight_dtype)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    prediction_type = noise_scheduler.config.prediction_type
    if state is not None and "master_weights" in state:  # the checkpoint's files were fp16: restore exact fp32
        unet.load_state_dict(state["master_weights"]["unet"])
        if "text_encoder" in state["master_weights"]:
            text_encoder.load_state_dict(state["master_weights"]["text_encoder"])

    train_text_encoder = cfg.train_text_encoder and (
        cfg.text_encoder_steps is None or (state["step"] if state else 0) < cfg.text_encoder_steps
    )
    vae.requires_grad_(False)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    attention = set_attention(unet, cfg, device)
    if cfg.gradient_checkpointing:  # recompute activations in backward: far less memory for ~25 % more time
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            # transformers 5 renamed it; the old name warns
            getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    if cfg.channels_last:
        performance.use_channels_last(unet)
    if cfg.torch_compile:
        events.notice(f"--torch-compile: {performance.compile_blocks(unet)} UNet blocks compile on first use")

    trained_models = [unet, text_encoder] if cfg.train_text_encoder else [unet]
    params = [p for m in trained_models for p in m.parameters() if p.requires_grad]
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer, optimizer_name = make_optimizer(params, cfg, lr, device)
    # the step inside backward: its loss scale and skipped steps are its own (accelerate's scaler is off then)
    fused = optimizer if isinstance(optimizer, performance.FusedBackwardOptimizer) else None
    # counted in optimizer steps whatever the number of processes, and stepped by the loop itself (not handed to
    # accelerate, which would step it once per process): so its saved state resumes with any number of processes
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    prepared = accelerator.prepare(*trained_models, optimizer)
    unet = prepared[0]
    if cfg.train_text_encoder:
        text_encoder = prepared[1]
    optimizer = prepared[-1]
    if cfg.train_text_encoder and not train_text_encoder:
        # resumed past --text-encoder-steps: it stays in the optimizer (so the saved state fits) but gets no grads
        # (after prepare: DDP refuses to wrap a model of which nothing trains)
        text_encoder.requires_grad_(False)
    vae.to(device)
    text_encoder.to(device)

    # --- caches: a frozen VAE / text encoder gives the same output every epoch, so compute it once -------
    stream = DataStream(instances, classes, seed, cfg.train_batch_size, cfg.random_flip)
    latents = LatentSource(vae, cfg.resolution, cfg.center_crop, device, weight_dtype)
    prompts = PromptEncoder(tokenizer, text_encoder, device)
    all_examples = instances + [e for group in (classes or {}).values() for e in group]
    if cfg.cache_latents:
        with events.stage("caching VAE latents", images=len(all_examples)):
            latents.build_cache(sorted({e.path for e in all_examples}), cfg.random_flip, seed)
        vae.to("cpu")  # not needed on the GPU again until samples are drawn
    if not train_text_encoder:
        prompts.build_cache([e.prompt for e in all_examples])
        if not cfg.train_text_encoder:
            text_encoder.to("cpu")

    # --- resume: optimizer, schedule, generator, RNGs, history; the data order follows from the step ------
    generator = torch.Generator().manual_seed(seed)
    history = History()
    step = 0
    samples_seen = 0  # stream positions consumed by all processes together: the data position, in any world size
    if state is not None:
        if is_deepspeed(accelerator) or state["optimizer"] is None:
            # DeepSpeed holds the optimizer in per-process shards that only fit the same set-up again
            events.notice("this run does not restore Adam's moments (DeepSpeed): they start afresh from here")
        else:
            optimizer.load_state_dict(state["optimizer"])
        # one param group per weight with --fused-backward, one in all without: the schedule fits either way
        schedule = performance.fit_scheduler_state(state["lr_scheduler"], len(optimizer.param_groups))
        lr_scheduler.load_state_dict(schedule)
        # the learning rate of the step to come under *this* run's schedule: a run continued to more steps has a
        # longer cosine/polynomial decay than the one that saved (whose last lr may have been 0); same length, same lr
        for group, base, rate in zip(
            optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * rate(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        set_rng_states(state["rng"])
        history = History(**state["history"])
        step = state["step"]
        # checkpoints from before several processes existed: one process, the batch of their own settings
        old = state["config"]
        samples_seen = state.get("samples_seen", step * old["gradient_accumulation_steps"] * old["train_batch_size"])
        events.notice(f"resuming from {resume_from} (step {step})")
        if state.get("world_size", 1) != world:
            events.notice(f"it was written by {state.get('world_size', 1)} processes and continues with {world}")

    setup = {
        "device": str(device),
        "mixed_precision": mixed,
        "optimizer": optimizer_name,
        "attention": attention,
        "prediction_type": prediction_type,
        "seed": seed,
        "model_dir": str(model_dir),
        "instance_images": len(instances),
        "class_images": sum(len(v) for v in (classes or {}).values()),
        "disk": disk,
        # how the batch is made up: global = per device × accumulation × processes; lr already --scale-lr'd
        "world_size": world,
        "distributed": "deepspeed" if is_deepspeed(accelerator) else ("ddp" if world > 1 else "none"),
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None,
        "offload_optimizer": cfg.offload_optimizer,
        "per_device_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world,
        "learning_rate": lr,
        "scale_lr": cfg.scale_lr,
    }
    events.emit("train_start", step=step, max_train_steps=cfg.max_train_steps, **setup)

    def save(step: int) -> Path:
        with whole_weights(accelerator, unet):
            if accelerator.is_main_process:  # one process writes checkpoints, samples and exports
                save_checkpoint(
                    cfg, step, model_dir, vae_dir, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler,
                    optimizer, lr_scheduler, generator, history, seed, weight_dtype, device,
                    extra_state={"samples_seen": samples_seen, "world_size": world},
                )  # fmt: skip
            accelerator.wait_for_everyone()  # the others wait: none runs ahead, or exits, before it is complete
        return cfg.output / CHECKPOINTS / f"step-{step}"

    # --- the loop -----------------------------------------------------------------------------------------
    scaling = vae.config.scaling_factor
    num_timesteps = noise_scheduler.config.num_train_timesteps
    accum = cfg.gradient_accumulation_steps
    saves = set(save_steps(cfg))
    shard = Shard.of(rank, world, cfg.train_batch_size, with_classes=classes is not None)
    # DeepSpeed runs the UNet in the half precision it converted it to, where autocast would not cast its inputs
    input_dtype = weight_dtype if is_deepspeed(accelerator) else None
    last_saved = resume_from
    loop_started, first_step = time.perf_counter(), step
    unet.train()
    text_encoder.train(train_text_encoder)
    progress = events.progress("training", cfg.max_train_steps, completed=step)
    with trackers.session(accelerator, cfg), progress as advance:
        while step < cfg.max_train_steps:
            if train_text_encoder and cfg.text_encoder_steps is not None and step >= cfg.text_encoder_steps:
                # the text encoder has learned the token; from here on it is frozen (its grads stay None, so the
                # optimizer skips it) and its embeddings can be cached like a frozen one's
                train_text_encoder = False
                text_encoder.requires_grad_(False)
                text_encoder.eval()
                prompts.build_cache([e.prompt for e in all_examples])

            total, parts = 0.0, [0.0, 0.0]
            for _ in range(accum):  # gradient accumulation: several micro-batches, one optimizer step
                # this process's slice of the global micro-batch
                batch = stream.at(samples_seen + rank * cfg.train_batch_size)
                samples_seen += world * cfg.train_batch_size
                n = batch.num_instance
                # latents from the VAE's distribution; noise and timesteps from the run's own generator
                dist = latents.distributions(batch, stream)
                lat = sample_latents(dist, scaling, shard.randn(generator, dist.shape[1] // 2, *dist.shape[2:]))
                noise = shard.randn(generator, *lat.shape[1:]).to(device)
                if cfg.offset_noise:  # lets the model learn overall brightness (very dark / very bright images)
                    noise += cfg.offset_noise * shard.randn(generator, lat.shape[1], 1, 1).to(device)
                timesteps = shard.randint(generator, num_timesteps).to(device)
                noisy = noise_scheduler.add_noise(lat, noise, timesteps)
                # v-models (SD 2.x 768-v) learn the velocity, not the noise
                target = training_target(noise_scheduler, lat, noise, timesteps)
                # accumulate: DDP exchanges gradients after the last micro-batch only (and scales the loss by 1/accum)
                with accelerator.autocast(), accelerator.accumulate(*trained_models):
                    hidden = prompts([e.prompt for e in batch.examples])
                    if input_dtype is not None:
                        noisy, hidden = noisy.to(input_dtype), hidden.to(input_dtype)
                    if cfg.channels_last:
                        noisy = noisy.contiguous(memory_format=torch.channels_last)
                    pred = unet(noisy, timesteps, hidden).sample
                per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if cfg.snr_gamma is not None:  # min-SNR: easy (low-noise) timesteps stop dominating the loss
                    from diffusers.training_utils import compute_snr

                    snr = compute_snr(noise_scheduler, timesteps)
                    clipped = torch.minimum(snr, torch.full_like(snr, cfg.snr_gamma))
                    per_example = per_example * (clipped / (snr + 1 if prediction_type == "v_prediction" else snr))
                # prior preservation: the class half of the batch keeps the model's idea of the class
                instance_loss = per_example[:n].mean()
                class_loss = per_example[n:].mean() if n < len(per_example) else torch.zeros((), device=device)
                loss = instance_loss + cfg.prior_loss_weight * class_loss
                # divides by --gradient-accumulation-steps; with --fused-backward the weights update in here
                accelerator.backward(fused.scale_loss(loss) if fused else loss)
                total += loss.item() / accum
                parts[0] += instance_loss.item() / accum
                parts[1] += class_loss.item() / accum

            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            skipped = fused.step_was_skipped if fused else optimizer.step_was_skipped
            if not skipped:  # an fp16 overflow skips the step, and the schedule waits for it
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:  # what is logged is the whole batch's loss, the mean over the processes' slices
                stats = torch.tensor([total, *parts], dtype=torch.float64, device=device)
                total, *parts = (accelerator.reduce(stats, "sum") / world).tolist()

            current_lr = lr_scheduler.get_last_lr()[0]
            history.losses.append(total)
            history.instance_losses.append(parts[0])
            history.class_losses.append(parts[1])
            history.lrs.append(current_lr)
            fields = {"loss": round(total, 5), "lr": current_lr}
            if cfg.with_prior_preservation:
                fields["class_loss"] = round(parts[1], 5)
            if device.type == "cuda":
                fields["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
            advance(1, **fields)
            events.emit("train_step", step=step, **fields)
            trackers.log_step(accelerator, cfg, step, {**fields, "instance_loss": parts[0]})

            stopping = should_stop()
            if world > 1:  # a signal reaches one process, or each at its own moment: all stop at the same step
                asked = torch.tensor([float(stopping)], device=device)
                stopping = accelerator.reduce(asked, "sum").item() > 0
            if step in saves or stopping:
                history.seconds += time.perf_counter() - loop_started
                loop_started = time.perf_counter()
                last_saved = save(step)
                trackers.log_samples(accelerator, cfg, step, last_saved / "samples")
            if stopping:
                events.notice(f"stopped at step {step}; saved {last_saved}. Run the same command again to resume.")
                raise KeyboardInterrupt
    history.seconds += time.perf_counter() - loop_started
    setup["steps_this_run"] = step - first_step
    return _write_report(cfg, step, history, started, last_saved, setup, accelerator.is_main_process)


def save_checkpoint(
    cfg, step, model_dir, vae_dir, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler,
    optimizer, lr_scheduler, generator, history, seed, weight_dtype, device, extra_state=None,
) -> Path:  # fmt: skip
    """<output>/checkpoints/step-N/: a complete diffusers folder, the training state, and samples.

    Written into a temporary folder and renamed: a kill at any instant leaves the previous checkpoint intact.
    """
    from dreambooth.checkpoint.convert import EXTRAS_FILE, PROVENANCE_FILE

    dest = cfg.output / CHECKPOINTS / f"step-{step}"
    unet_m = accelerator.unwrap_model(unet)
    text_m = accelerator.unwrap_model(text_encoder)
    with events.stage(f"saving checkpoint step-{step}"), atomic_dir(dest, overwrite=True) as tmp:
        unet_m.save_pretrained(tmp / "unet", safe_serialization=True)
        if cfg.train_text_encoder:
            text_m.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        else:
            shutil.copytree(model_dir / "text_encoder", tmp / "text_encoder", copy_function=_link_or_copy)
        shutil.copytree(vae_dir or model_dir / "vae", tmp / "vae", copy_function=_link_or_copy)
        for name in ("tokenizer", "scheduler"):
            shutil.copytree(model_dir / name, tmp / name, copy_function=_link_or_copy)
        shutil.copy2(model_dir / "model_index.json", tmp / "model_index.json")
        if (model_dir / EXTRAS_FILE).is_file():
            _without_ema(model_dir / EXTRAS_FILE, tmp / EXTRAS_FILE)
        provenance = {}
        if (model_dir / PROVENANCE_FILE).is_file():
            provenance = json.loads((model_dir / PROVENANCE_FILE).read_text())
        provenance["trained"] = {"by": f"dreambooth {__version__}", "step": step, "base": str(model_dir), "seed": seed}
        write_json(tmp / PROVENANCE_FILE, provenance)
        master = {}
        if cfg.save_fp16:
            _halve_weights(tmp / "unet")
            master["unet"] = unet_m.state_dict()
            if cfg.train_text_encoder:
                _halve_weights(tmp / "text_encoder")
                master["text_encoder"] = text_m.state_dict()
        training_state = {
            "step": step,
            "seed": seed,
            # DeepSpeed's is in per-process shards: resuming restarts Adam's moments there
            "optimizer": None if is_deepspeed(accelerator) else optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "generator": generator.get_state(),
            "rng": rng_states(),
            "history": history.__dict__,
            "config": cfg.to_dict(),
        }
        training_state.update(extra_state or {})
        if master:
            training_state["master_weights"] = master
        torch.save(training_state, tmp / STATE_FILE)
        if cfg.save_sample_prompt:
            draw_samples(cfg, tmp / "samples", unet_m, text_m, vae, tokenizer, noise_scheduler, seed, accelerator)
    if cfg.keep_last:
        done = sorted(
            (int(p.name.split("-")[1]), p)
            for p in (cfg.output / CHECKPOINTS).glob("step-*")
            if (p / STATE_FILE).is_file()
        )
        for _, old in done[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    if cfg.export_single_file:
        from dreambooth.checkpoint.export import ExportOptions, export

        name = cfg.output.resolve().name or "dreambooth"
        with events.stage(f"exporting step-{step} as one file"):
            export(dest, cfg.output / "export" / f"{name}-step-{step}.safetensors", ExportOptions(half=True))
    events.emit("checkpoint_saved", step=step, path=str(dest))
    return dest


def draw_samples(cfg, folder, unet, text_encoder, vae, tokenizer, noise_scheduler, seed, accelerator) -> None:
    """Samples with a fixed seed, so the same prompt at successive checkpoints shows what training changed."""
    from dreambooth.sample import generate, pipeline_from_modules, save_images

    device = accelerator.device
    places = {m: (next(m.parameters()).device, m.training) for m in (unet, text_encoder, vae)}
    # the loop's random streams must not move because samples were drawn (a resumed run draws none here)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), accelerator.autocast():
        for m in places:
            m.to(device).eval()
        pipe = pipeline_from_modules(unet, text_encoder, vae, tokenizer, dict(noise_scheduler.config))
        for i, prompt in enumerate(cfg.save_sample_prompt):
            images = generate(
                pipe, prompt, cfg.n_save_sample, seed, resolution=cfg.resolution, steps=cfg.save_infer_steps,
                guidance_scale=cfg.save_guidance_scale, negative_prompt=cfg.save_sample_negative_prompt,
            )  # fmt: skip
            save_images(images, folder, f"prompt{i}")
        (folder / "prompts.txt").write_text("\n".join(cfg.save_sample_prompt) + "\n")
    for m, (where, training) in places.items():
        m.to(where).train(training)


# ───────────────────────────── what the user gets at the end ─────────────────────────────


def _peak_memory() -> dict:
    import resource

    out = {"cpu_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _write_report(cfg, step, history: History, started, checkpoint, setup, write: bool = True) -> dict:
    report = {
        "steps": step,
        "seconds": round(time.perf_counter() - started, 2),
        "training_seconds": round(history.seconds, 2),
        "final_checkpoint": str(checkpoint) if checkpoint else None,
        "report": str(cfg.output / REPORT_FILE),
        "loss_curve": str(cfg.output / "loss_curve.png"),
        "peak_memory": _peak_memory(),
        "final_loss": history.losses[-1] if history.losses else None,
        **setup,
        "settings": cfg.to_dict(),
        "losses": {
            "loss": history.losses,
            "instance": history.instance_losses,
            "class": history.class_losses,
            "lr": history.lrs,
        },
    }
    if not write:  # another process writes it
        return report
    write_json(cfg.output / REPORT_FILE, report)
    if history.losses:
        with atomic_path(cfg.output / "loss_curve.png") as tmp:
            loss_curve(history.losses).save(tmp, format="PNG")
    return report


def loss_curve(losses: list[float], size: tuple[int, int] = (800, 400)):
    """The loss per step (grey) and its moving average (blue), drawn with PIL (no matplotlib in the image)."""
    from PIL import Image, ImageDraw

    w, h = size
    pad_l, pad_r, pad_t, pad_b = 60, 20, 20, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [v for v in losses if math.isfinite(v)] or [0.0]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad_l + (w - pad_l - pad_r) * (i / max(1, len(losses) - 1))
        y = pad_t + (h - pad_t - pad_b) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle([pad_l, pad_t, w - pad_r, h - pad_b], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = xy(0, v)[1]
        draw.text((5, y - 6), f"{v:.4f}", fill="black")
    draw.text((pad_l, h - pad_b + 8), "step 1", fill="black")
    draw.text((w - pad_r - 80, h - pad_b + 8), f"step {len(losses)}", fill="black")
    draw.text((w // 2 - 20, h - 20), "loss", fill="black")
    points = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=(180, 180, 180), width=1)
    smooth, ema = [], None
    for v in losses:
        if math.isfinite(v):
            ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append(ema if ema is not None else lo)
    if len(smooth) > 1:
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    return image
