"""`dreambooth train`: DreamBooth fine-tuning on accelerate. Read it top to bottom:

    setup   check inputs → model → class images → family + adapter → optimizer, caches → resume
    fit     batch → noise → family.predict → loss → step → maybe save / sample / log
    report

The loop knows no model family and no adapter: the family (dreambooth/families/) encodes prompts, calls the
denoiser and says what it learns; the adapter (dreambooth/adapters.py: full fine-tune or LoRA) says what trains and
what a checkpoint holds. All randomness of the loop comes from one CPU generator and from (seed, position) for the
data, both saved in each checkpoint, which is what makes a resumed run bit-identical.
"""

import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dreambooth import adapters, events, families, optimizers, performance, plan, trackers, validation
from dreambooth.blockswap import BlockSwap
from dreambooth.buckets import assign_buckets, bucket_grid, bucket_name
from dreambooth.checkpoints import (
    CHECKPOINTS,
    REPORT_FILE,
    STATE_FILE,
    checkpoint_dir,
    finished_checkpoints,
    latest_checkpoint,
    prune,
    remove_scratch,
)
from dreambooth.config import TrainConfig
from dreambooth.data import (
    DataStream,
    Example,
    LatentSource,
    PromptCache,
    check_some_masked,
    class_examples_of,
    instance_examples,
    sample_latents,
    scan_images,
)
from dreambooth.distributed import Shard, is_deepspeed, make_accelerator, whole_on_load, whole_weights
from dreambooth.ema import EMA, load_raw_weights, raw_weights, trained_parameters
from dreambooth.errors import EnvironmentProblem, TrainingDiverged, UserError
from dreambooth.families.base import Components, Family, LatentFormat, ResolvedModel
from dreambooth.families.sd.prompts import token_counts
from dreambooth.fileio import atomic_dir, human_bytes, mount_point, write_json
from dreambooth.losses import apply_masks, elementwise_loss, huber_threshold
from dreambooth.objectives import Objective
from dreambooth.plots import loss_plot
from dreambooth.preflight import preflight, resolve_model
from dreambooth.report import write_report_page

__all__ = ["CHECKPOINTS", "REPORT_FILE", "STATE_FILE", "latest_checkpoint", "train"]


def save_steps(cfg: TrainConfig) -> list[int]:
    steps = [s for s in range(cfg.save_interval, cfg.max_train_steps, cfg.save_interval) if s >= cfg.save_min_steps]
    return [*steps, cfg.max_train_steps]


def check_disk(cfg: TrainConfig, adapter, c, trained: dict) -> dict:
    """Estimate what the planned checkpoints and exports need and refuse up front if the disk cannot hold them."""
    saves = len(save_steps(cfg))
    kept = min(saves, cfg.keep_last + 1) if cfg.keep_last else saves  # +1: the new one exists before pruning
    export = adapter.export_bytes(c, trained) if cfg.export_single_file else 0
    need = int(kept * adapter.checkpoint_bytes(c, trained, cfg) + saves * export)
    free = shutil.disk_usage(cfg.output).free
    if need > free:
        raise EnvironmentProblem(
            f"--output {cfg.output}: the planned {saves} checkpoints need about {human_bytes(need)} "
            f"({need / 2**30:.2f} GiB) on the disk {mount_point(cfg.output)}, and only {human_bytes(free)} is free",
            "free space, pass --keep-last 1 or --save-fp16, or raise --save-interval",
        )
    return {"estimated_bytes": need, "free_bytes": free, "checkpoints_planned": saves}


def make_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device):
    """The optimizer --optimizer names, from its own package (dreambooth/optimizers.py): (the optimizer, its name,
    its settings), both for the report. `groups`: torch param groups, each {"params": [...], "lr": ...}."""
    return optimizers.build(groups, cfg, device)


def quiet_progress_bars() -> None:
    """Our bars are the ones the user reads; the libraries' loading bars would interleave with them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


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
    skipped_steps: list[int] = field(default_factory=list)  # fp16 steps the gradient scaler threw away
    validation: list[list[float]] = field(default_factory=list)  # [step, held-out loss]


@dataclass
class Run:
    """Everything set-up hands the loop: the models, what trains, the optimizer, the data, and where it stands."""

    cfg: TrainConfig
    accelerator: object
    family: Family
    adapter: object
    c: Components
    objective: Objective
    latent_format: LatentFormat
    trained: dict[str, torch.nn.Module]  # as prepared by accelerate (DDP / DeepSpeed wrappers)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    fused: performance.FusedBackwardOptimizer | None
    lr_scheduler: object
    stream: DataStream
    latents: LatentSource
    prompts: PromptCache
    all_examples: list[Example]
    with_classes: bool
    generator: torch.Generator
    history: History
    seed: int
    setup: dict
    weight_dtype: torch.dtype
    step: int = 0
    samples_seen: int = 0  # stream positions consumed by all processes together: the data position, any world size
    last_saved: Path | None = None
    text_encoders_train: bool = False
    swap: BlockSwap | None = None  # --blocks-to-swap
    ema: EMA | None = None  # --ema-decay
    held_out: validation.ValidationSet | None = None  # --validation-split / --validation-dir


# ───────────────────────────── train ─────────────────────────────


def train(cfg: TrainConfig, model: ResolvedModel | None = None, instance_images: dict | None = None) -> dict:
    """`model`, `instance_images`: what the caller (`dreambooth run`) resolved and checked already; else done here."""
    started = time.perf_counter()
    with stop_on_signals() as should_stop, input_vanishes(cfg):
        run = setup(cfg, should_stop, model, instance_images)
        if isinstance(run, dict):  # nothing left to train: the report of the finished run
            return run
        try:
            fit(run, should_stop)
        except TrainingDiverged as exc:
            run.setup["stopped"] = {"reason": "diverged", "step": run.step, "message": exc.message}
            run.setup["steps_this_run"] = run.step - run.setup["first_step"]
            _write_report(run.cfg, run.step, run.history, started, run.last_saved, run.setup,
                          run.accelerator.is_main_process)  # fmt: skip
            raise
        run.setup["steps_this_run"] = run.step - run.setup["first_step"]
        return _write_report(run.cfg, run.step, run.history, started, run.last_saved, run.setup,
                             run.accelerator.is_main_process)  # fmt: skip


@contextmanager
def input_vanishes(cfg: TrainConfig):
    """An image (or its folder, or the volume) deleted or unmounted while training reads it is one line naming it,
    not a traceback; the checkpoints written so far stay, and the same command resumes from the last one."""
    try:
        yield
    except FileNotFoundError as exc:
        if not exc.filename:
            raise
        last = latest_checkpoint(cfg.output)
        raise UserError(
            f"{exc.filename} disappeared while training was reading its inputs",
            "put it (or its folder or volume) back and run the same command again: training resumes from "
            + (str(last) if last else "the start"),
        ) from exc


def class_examples(cfg: TrainConfig, accelerator, model: ResolvedModel, seed: int, weight_dtype, should_stop):
    """Prior preservation's class examples per concept, the missing class images generated first by the base model
    (before its weights change), each process making its share; None without prior preservation."""
    if not cfg.with_prior_preservation:
        return None
    from dreambooth.preflight import missing_class_images
    from dreambooth.prior import generate_class_images

    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    missing = missing_class_images(cfg)
    accelerator.wait_for_everyone()  # all processes counted the same missing images before any is written
    generate_class_images(cfg, model, seed, device, weight_dtype, should_stop, missing, rank, world)
    accelerator.wait_for_everyone()  # each made its share; from here on every process sees them all
    if missing:
        events.notice(f"generated {sum(missing.values())} class images")
    classes = {}
    for i, concept in enumerate(cfg.concepts):
        paths = scan_images(concept.class_data_dir, cfg.resolution, "--class-data-dir")
        # exactly --num-class-images of them, the same ones on every run (sorted names)
        classes[i] = class_examples_of(paths[: cfg.num_class_images], concept.class_prompt, i, cfg.caption_extension)
    return classes


def make_stream(cfg: TrainConfig, instances: list[Example], classes, seed: int, world: int, state) -> DataStream:
    """The data order. With buckets each global micro-batch (per-device batch × processes) is one bucket, so the
    order depends on that size: a checkpoint resumes with buckets only where it is the same."""
    group = cfg.train_batch_size * world
    buckets = None
    if cfg.buckets:
        grid = bucket_grid(cfg.resolution, cfg.bucket_min_side, cfg.bucket_max_side, cfg.bucket_step)
        buckets = assign_buckets([e.path for e in instances], grid, cfg.bucket_step)
        saved = state["config"]["train_batch_size"] * state.get("world_size", 1) if state is not None else group
        if saved != group:
            raise UserError(
                f"--buckets: the checkpoint was trained {saved} images per global micro-batch (--train-batch-size × "
                f"processes), and this run has {group}; each such batch is one bucket, so the order would change",
                f"resume with --train-batch-size {cfg.train_batch_size} × processes = {saved}, or use another --output",
            )
    return DataStream(
        instances, classes, seed, cfg.train_batch_size, cfg.random_flip,
        buckets=buckets, group=group, caption_dropout=cfg.caption_dropout,
    )  # fmt: skip


def param_groups(c, trained: dict, lr: float, text_lr: float) -> list[dict]:
    """The optimizer's param groups: the text encoders' own when their learning rate differs."""
    text = c.text_models(trained)
    if text and text_lr != lr:
        return [{"params": adapters.trainable({c.denoiser_name: trained[c.denoiser_name]}), "lr": lr},
                {"params": adapters.trainable(text), "lr": text_lr}]  # fmt: skip
    # one group: the layout of the optimizer state that checkpoints have always had
    return [{"params": adapters.trainable(trained), "lr": lr}]


def check_inputs(cfg: TrainConfig, accelerator, model: ResolvedModel | None, instance_images: dict | None):
    """Everything the user gave, checked before anything heavy (once: `run` has done it already): the images and
    their captions and masks, the held-out ones, the model (a single file converted once) and its family; the
    family's defaults and the --vram-budget levers applied. (cfg, model, family, instances, held_out)."""
    instance_images = instance_images if instance_images is not None else preflight(cfg)
    # captions are read (and a file that is not UTF-8 refused) before anything heavy
    instances = instance_examples(instance_images, cfg.concepts, cfg.caption_extension, masks=cfg.masked_loss)
    if cfg.masked_loss:  # a mask file that is unreadable or of another size was refused just above, by name
        check_some_masked(instances, cfg.concepts)
    instances, held_out = validation.split(cfg, instances)  # --validation-split / --validation-dir
    if model is None:
        with accelerator.main_process_first():  # a single model or VAE file is converted once, into the cache
            model = resolve_model(cfg)
    if model.vae is not None:  # from here on (class images, checkpoints, exports) the VAE is that folder
        cfg = replace(cfg, vae=model.vae)
    family = families.get(model.family)  # before class images: a model that cannot train stops here
    family.check(cfg)
    cfg = adapters.with_family_defaults(cfg, family)
    cfg = plan.apply_budget(cfg, family, model)  # --vram-budget: the levers the user left open, chosen to fit
    if cfg.fused_backward and accelerator.num_processes > 1:
        raise UserError(
            f"--fused-backward updates each weight inside backward, and {accelerator.num_processes} processes run",
            "launch one process, or pass --no-fused-backward",
        )
    return cfg, model, family, instances, held_out


def setup(cfg: TrainConfig, should_stop, model: ResolvedModel | None, instance_images: dict | None) -> "Run | dict":
    started = time.perf_counter()
    # first, so that with several processes only the first one converts, writes and speaks
    accelerator, mixed = make_accelerator(cfg)

    cfg, model, family, instances, held_out = check_inputs(cfg, accelerator, model, instance_images)
    if accelerator.is_main_process:
        remove_scratch(cfg.output)  # what a killed run left half-written
    resume_from, state = resume_point(cfg, accelerator.is_main_process)
    if cfg.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint in {cfg.output / CHECKPOINTS}", "drop --resume to start afresh")
    if state is not None and state["step"] >= cfg.max_train_steps:
        events.notice(f"{resume_from} already reached step {state['step']} (--max-train-steps {cfg.max_train_steps})")
        # what set-up knows without loading the model: a killed run's rerun reports (and exports) the same seed
        known = {"seed": state["seed"], "first_step": state["step"], "steps_this_run": 0}
        return _write_report(cfg, state["step"], History(**state["history"]), started, resume_from, known,
                             accelerator.is_main_process)  # fmt: skip
    check_same_adapter(cfg, resume_from, state)
    check_same_optimizer(cfg, resume_from, state)
    quiet_progress_bars()

    # --- device, precision, seed -------------------------------------------------------------------------
    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    seed = choose_seed(cfg, state, world)

    # --- class images for prior preservation (the base model, before its weights change) --------------
    classes = class_examples(cfg, accelerator, model, seed, weight_dtype, should_stop)

    # --- the model: its family loads the base, the adapter decides what trains, a checkpoint restores it ---
    adapter = adapters.get(cfg.adapter)
    c, objective, trained, attention, swap = load_model(
        cfg, accelerator, family, adapter, model, weight_dtype, resume_from=resume_from, state=state
    )
    disk = check_disk(cfg, adapter, c, trained)
    text_encoders_train = cfg.train_text_encoder and (
        cfg.text_encoder_steps is None or (state["step"] if state else 0) < cfg.text_encoder_steps
    )

    # --- optimizer and schedule: the text encoders may have their own learning rate ----------------------
    lr, text_lr = learning_rates(cfg, accelerator.num_processes)
    groups = param_groups(c, trained, lr, text_lr)
    params = [p for g in groups for p in g["params"]]
    optimizer, optimizer_name, optimizer_args = make_optimizer(groups, cfg, device)
    # the step inside backward: its loss scale and skipped steps are its own (accelerate's scaler is off then)
    fused = optimizer if isinstance(optimizer, performance.FusedBackwardOptimizer) else None
    lr_scheduler = make_lr_scheduler(cfg, optimizer)

    # --- caches: a frozen VAE / text encoder gives the same output every epoch, so compute it once -------
    # before the denoiser goes to the GPU: the peak is the encoders' or the denoiser's, never both (Flux's T5-XXL
    # and transformer together would not fit where each alone does)
    c.vae.to(device)
    for encoder in c.text_encoders.values():
        encoder.to(device)
    stream = make_stream(cfg, instances, classes, seed, world, state)
    held_out_set = validation.prepare(cfg, held_out, c.vae, device, seed)  # while the VAE is on the device
    latents, prompts = make_caches(cfg, family, c, stream, seed, device, text_encoders_train,
                                   [e.prompt for e in held_out])  # fmt: skip

    trained, optimizer = prepare_trained(accelerator, c, trained, optimizer, freeze_text=not text_encoders_train)
    all_examples = instances + [e for group in (classes or {}).values() for e in group]

    run = Run(
        cfg=cfg, accelerator=accelerator, family=family, adapter=adapter, c=c, objective=objective,
        latent_format=family.latent_format(c), trained=trained, params=params,
        optimizer=optimizer, fused=fused, lr_scheduler=lr_scheduler, stream=stream, latents=latents, prompts=prompts,
        all_examples=all_examples, with_classes=classes is not None, generator=torch.Generator().manual_seed(seed),
        history=History(), seed=seed, setup={}, weight_dtype=weight_dtype, text_encoders_train=text_encoders_train,
        swap=swap, ema=start_ema(cfg, accelerator, trained), held_out=held_out_set,
    )  # fmt: skip
    if state is not None:
        resume(run, state, resume_from)
    run.setup = describe_setup(
        run, model, instances, classes, held_out, mixed=mixed, optimizer=(optimizer_name, optimizer_args),
        attention=attention, disk=disk, learning_rates=(lr, text_lr if c.text_models(trained) else None),
    )  # fmt: skip
    run.last_saved = resume_from
    events.emit("train_start", step=run.step, max_train_steps=cfg.max_train_steps, **run.setup)
    return run


def prepare_trained(accelerator, c: Components, trained: dict, optimizer, *, freeze_text: bool):
    """accelerate wraps what trains (the device; DDP or DeepSpeed) together with the optimizer, and the components
    use the wrapped models from here on. With `freeze_text` (resumed past --text-encoder-steps) the trained text
    encoders stay in the optimizer, so the saved state fits, but get no gradients; after prepare, because DDP
    refuses to wrap a model of which nothing trains."""
    names, text = list(trained), list(c.text_models(trained))
    *prepared, optimizer = accelerator.prepare(*trained.values(), optimizer)
    trained = dict(zip(names, prepared, strict=True))
    c.denoiser = trained[c.denoiser_name]
    c.text_encoders.update(c.text_models(trained))
    if freeze_text:
        for name in text:
            trained[name].requires_grad_(False)
    return trained, optimizer


def describe_setup(
    run: Run, model: ResolvedModel, instances: list, classes: dict | None, held_out: list, *, mixed: str,
    optimizer: tuple[str, dict], attention: str, disk: dict, learning_rates: tuple[float, float | None],
) -> dict:  # fmt: skip
    """What the run is, as train_start's event and the report's settings tell it."""
    cfg, c = run.cfg, run.c
    return {
        "device": str(run.accelerator.device),
        "family": run.family.name,
        **run.adapter.describe(cfg),
        "mixed_precision": mixed,
        "optimizer": optimizer[0],
        "optimizer_args": optimizer[1],
        "attention": attention,
        **describe_levers(cfg, c, run.swap, held_out, instances),
        "prediction_type": c.prediction_type,
        "objective": run.objective.name,
        "seed": run.seed,
        "model_dir": str(model.folder or model.parts["transformer"].path),
        "model": model.describe(),
        **describe_data(cfg, instances, classes, run.all_examples, run.stream),
        "max_token_length": cfg.max_token_length,
        "long_prompts": describe_long_prompts(run.family, c, run.stream.all_prompts() + list(cfg.save_sample_prompt)),
        "trainable_parameters": sum(p.numel() for p in run.params),
        "disk": disk,
        **describe_batch(cfg, run.accelerator),
        "learning_rate": learning_rates[0],
        "learning_rate_from": cfg.lr_source,
        "text_encoder_lr": learning_rates[1],
        "scale_lr": cfg.scale_lr,
        "first_step": run.step,
    }


def describe_levers(cfg: TrainConfig, c: Components, swap: BlockSwap | None, held_out: list, instances: list) -> dict:
    """The report's account of the memory levers, the held-out images, the EMA and the loss masks (None where
    unused)."""
    validates = {
        "images": len(held_out),
        "every": cfg.validation_interval,
        "levels": list(validation.LEVELS),
        "from": str(cfg.validation_dir) if cfg.validation_dir else f"--validation-split {cfg.validation_split}",
    }
    ema = {"decay": cfg.ema_decay, "device": cfg.ema_device, "start_step": cfg.ema_start_step,
           "checkpoints_hold": "the average" if cfg.export_ema else "the raw weights"}  # fmt: skip
    return {
        "base_precision": cfg.base_precision,
        "base_storage": c.extra["base_storage"],
        "block_swap": swap.describe() if swap else None,
        "validation": validates if held_out else None,
        "ema": ema if cfg.ema_decay else None,
        "masked_loss": describe_masks(instances) if cfg.masked_loss else None,
    }


def describe_masks(instances: list[Example]) -> dict:
    """--masked-loss: how many of the instance images trained with a mask, from a file or from their alpha channel
    (said once in the console too: a misnamed mask file shows here as a photo that trains whole)."""
    from_alpha = sum(e.mask is not None and e.mask == e.path for e in instances)
    from_files = sum(e.mask is not None and e.mask != e.path for e in instances)
    whole = len(instances) - from_files - from_alpha
    events.notice(
        f"--masked-loss: {from_files + from_alpha} of {len(instances)} instance images have a mask ({from_files} "
        f"from mask files, {from_alpha} from their alpha channel); {whole} train whole"
    )
    return {"instance_images": len(instances), "from_files": from_files, "from_alpha": from_alpha, "whole": whole}


def check_same_adapter(cfg: TrainConfig, resume_from: Path | None, state: dict | None) -> None:
    if state is not None and state["config"].get("adapter", "full") != cfg.adapter:
        raise UserError(
            f"{resume_from} was trained with --adapter {state['config'].get('adapter', 'full')}, "
            f"and this run asks for --adapter {cfg.adapter}",
            "use another --output for the other adapter, or the same --adapter to continue",
        )


def check_same_optimizer(cfg: TrainConfig, resume_from: Path | None, state: dict | None) -> None:
    """Each optimizer's state has its own layout: a checkpoint continues with the optimizer that wrote it."""
    if state is None:
        return
    old = state["config"]
    saved = old.get("optimizer") or (
        "paged-adamw8bit" if old.get("paged_adam") else "adamw8bit" if old.get("use_8bit_adam") else "adamw"
    )
    if saved != cfg.optimizer:
        raise UserError(
            f"{resume_from} was trained with --optimizer {saved}, and this run asks for --optimizer {cfg.optimizer}",
            f"use --optimizer {saved} to continue, or another --output for the other optimizer",
        )


def load_model(
    cfg: TrainConfig, accelerator, family, adapter, model: ResolvedModel, weight_dtype, *, resume_from, state
):
    """The family loads the base and names its objective, the adapter decides what trains, the checkpoint resumed
    from (if any) restores it, and the speed and memory levers apply: (components, the objective, the trained
    models by name, the attention implementation, the block swap or None)."""
    with whole_on_load(accelerator):
        # restored before the levers: compiled blocks would rename the weights it loads
        c, objective, trained = adapters.load_trained(family, adapter, model, cfg, adapter.dtypes(cfg, weight_dtype),
                                                      checkpoint=resume_from, state=state)  # fmt: skip
    attention = family.set_attention(c, cfg.attention, accelerator.device)
    if cfg.gradient_checkpointing:
        for name, module in trained.items():
            performance.enable_gradient_checkpointing(module, denoiser=name == c.denoiser_name)
    if cfg.channels_last:
        performance.use_channels_last(c.denoiser)
    if cfg.torch_compile:
        blocks = family.blocks(c.denoiser)
        performance.compile_blocks(blocks)
        events.notice(f"--torch-compile: {len(blocks)} {c.denoiser_name} blocks compile on first use")
    swap = start_block_swap(cfg, family, c, adapter.dtypes(cfg, weight_dtype).denoiser, accelerator.device)
    return c, objective, trained, attention, swap


def start_block_swap(cfg: TrainConfig, family, c: Components, dtype, device) -> BlockSwap | None:
    """--blocks-to-swap N: the frozen layers of the denoiser's last N blocks move to host memory (before anything
    goes to the GPU) and come over per use (dreambooth/blockswap.py)."""
    from dreambooth.storage import storable, store

    if not cfg.blocks_to_swap:
        return None
    blocks = family.blocks(c.denoiser)
    if cfg.blocks_to_swap > len(blocks):
        raise UserError(
            f"--blocks-to-swap {cfg.blocks_to_swap}: {family.title}'s {c.denoiser_name} has {len(blocks)} blocks",
            f"pass at most {len(blocks)}",
        )
    swapped = blocks[len(blocks) - cfg.blocks_to_swap :]
    # what --base-precision did not store already becomes a stored layer in the compute precision
    store(c.denoiser, storable(c.denoiser, swapped, "auto"), "auto", dtype)
    swap = BlockSwap(blocks, cfg.blocks_to_swap, device)
    events.notice(f"--blocks-to-swap {cfg.blocks_to_swap}: {cfg.blocks_to_swap} of {len(blocks)} "
                  f"{c.denoiser_name} blocks ({human_bytes(swap.swapped_bytes())}) stay in host memory")  # fmt: skip
    return swap


def start_ema(cfg: TrainConfig, accelerator, trained: dict) -> EMA | None:
    """--ema-decay: the average of the trained weights, on the training device or in host memory."""
    if not cfg.ema_decay:
        return None
    device = accelerator.device if cfg.ema_device == "gpu" else torch.device("cpu")
    params = trained_parameters({n: accelerator.unwrap_model(m) for n, m in trained.items()})
    return EMA(params, cfg.ema_decay, device, cfg.ema_start_step)


def ema_applied(run: "Run"):
    """The EMA's weights in place while a checkpoint is written and its samples drawn (--export-ema)."""
    return run.ema.applied() if run.ema is not None and run.cfg.export_ema else nullcontext()


def model_weights(run: "Run"):
    """Schedule-free's averaged weights (its eval mode) in place while samples are drawn, a checkpoint is written
    and the held-out loss measured: they are the model; the point it trains at comes back after. Other optimizers
    train the model itself."""
    if not optimizers.KINDS[run.cfg.optimizer].eval_mode:
        return nullcontext()
    return optimizers.evaluated(run.optimizer, _trained_params(run))


def _trained_params(run: "Run") -> dict:
    return trained_parameters({n: run.accelerator.unwrap_model(m) for n, m in run.trained.items()})


def weights_kept_aside(run: "Run") -> dict | None:
    """The weights training continues from, where a checkpoint's files hold others (the EMA's with --export-ema,
    schedule-free's average): kept in its state, so that a resumed run continues from them exactly."""
    if run.ema is not None and run.cfg.export_ema:
        return raw_weights(run.ema.params)
    if optimizers.KINDS[run.cfg.optimizer].eval_mode:
        return raw_weights(_trained_params(run))
    return None


def choose_seed(cfg: TrainConfig, state: dict | None, world: int) -> int:
    """The run's seed: the checkpoint's when resuming, else --seed, else a random one (recorded in the report)."""
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
    return seed


def learning_rates(cfg: TrainConfig, processes: int) -> tuple[float, float]:
    """(UNet's, text encoders') learning rates; --scale-lr multiplies by the examples per optimizer step."""
    lr = cfg.lr
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * processes
    return lr, lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr


def make_lr_scheduler(cfg: TrainConfig, optimizer):
    """Counted in optimizer steps whatever the number of processes, and stepped by the loop itself (not handed to
    accelerate, which would step it once per process): so its saved state resumes with any number of processes."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
    )  # fmt: skip


def make_caches(
    cfg: TrainConfig, family, c, stream: DataStream, seed: int, device, text_encoders_train: bool, extra_prompts=()
):
    """The latent source and the prompt cache. A frozen VAE or text encoder gives the same output every epoch:
    with --cache-latents, or text encoders that do not train, it is computed once and the model leaves the GPU."""
    # in the VAE's own precision: the family may keep it in fp32 (SDXL's overflows in fp16)
    latents = LatentSource(c.vae, cfg.resolution, cfg.center_crop, device, next(c.vae.parameters()).dtype,
                           masked=cfg.masked_loss)  # fmt: skip
    prompts = PromptCache(lambda batch: family.encode(c, batch))
    if cfg.cache_latents:
        entries = stream.cache_entries()  # with buckets: a class image once per bucket it may be cut to
        with events.stage("caching VAE latents", images=len(entries)):
            latents.build_cache(entries, cfg.random_flip, seed)
        c.vae.to("cpu")  # not needed on the GPU again until samples are drawn
    if not text_encoders_train:
        prompts.build(stream.all_prompts() + list(extra_prompts))  # the held-out images' prompts too
        if not cfg.train_text_encoder:
            for encoder in c.text_encoders.values():
                encoder.to("cpu")
    return latents, prompts


def describe_data(cfg: TrainConfig, instances, classes, all_examples, stream) -> dict:
    """The report's account of what was trained on: images, captions, buckets."""
    return {
        "instance_images": len(instances),
        "class_images": sum(len(v) for v in (classes or {}).values()),
        "caption_extension": cfg.caption_extension,
        "captions": sum(e.captioned for e in all_examples),  # examples whose prompt came from a caption file
        "caption_dropout": cfg.caption_dropout,
        "buckets": {bucket_name(size): n for size, n in stream.bucket_counts().items()} if cfg.buckets else None,
    }


def describe_long_prompts(family, c, prompts: list[str]) -> dict:
    """Per text encoder: how many of the run's prompts and captions are longer than what it reads, the longest, and
    the tokens cut off; said once in the console when any are (they would train without their ends)."""
    out = {}
    unique = sorted(set(prompts))
    for encoder, tokenizer, window in family.prompt_windows(c):
        counts = token_counts(tokenizer, unique) if unique else []
        over = [n for n in counts if n > window]
        out[encoder] = {"window": window, "prompts": len(counts), "over": len(over),
                        "longest": max(counts, default=0), "tokens_dropped": sum(n - window for n in over)}  # fmt: skip
        if over:
            hint = ("pass --max-token-length 150 or 225 to read them in 75-token chunks" if encoder == "CLIP"
                    else "shorten them" if encoder == "CLIP-L" else "pass --t5-max-length up to 512")  # fmt: skip
            events.warn(f"{len(over)} of {len(counts)} prompts and captions are longer than the {window} tokens "
                        f"{encoder} reads here (the longest is {max(over)}; {sum(n - window for n in over)} tokens "
                        f"are cut off in all): {hint}")  # fmt: skip
    return out


def describe_batch(cfg: TrainConfig, accelerator) -> dict:
    """How the batch is made up: global = per device × accumulation × processes (lr already --scale-lr'd)."""
    world = accelerator.num_processes
    return {
        "world_size": world,
        "distributed": "deepspeed" if is_deepspeed(accelerator) else ("ddp" if world > 1 else "none"),
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None,
        "offload_optimizer": cfg.offload_optimizer,
        "per_device_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps * world,
    }


def resume(run: Run, state: dict, checkpoint: Path) -> None:
    """Optimizer, schedule, generator, RNGs, history and data position from a checkpoint (the adapter restored the
    weights); the data order follows from the position."""
    optimizer, lr_scheduler = run.optimizer, run.lr_scheduler
    if is_deepspeed(run.accelerator) or state["optimizer"] is None:
        # DeepSpeed holds the optimizer in per-process shards that only fit the same set-up again
        events.notice("this run does not restore Adam's moments (DeepSpeed): they start afresh from here")
    else:
        optimizer.load_state_dict(state["optimizer"])
    # one param group per weight with --fused-backward, one in all without: the schedule fits either way
    lr_scheduler.load_state_dict(performance.fit_scheduler_state(state["lr_scheduler"], len(optimizer.param_groups)))
    # the learning rate of the step to come under *this* run's schedule: a run continued to more steps has a
    # longer cosine/polynomial decay than the one that saved (whose last lr may have been 0); same length, same lr
    for group, base, rate in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True):
        group["lr"] = base * rate(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    scaler = run.accelerator.scaler
    if state.get("scaler") is not None and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    run.generator.set_state(state["generator"])
    set_rng_states(state["rng"])
    run.history = History(**state["history"])
    run.step = state["step"]
    # a checkpoint whose files hold the EMA's (or schedule-free's averaged) weights keeps the trained ones in its
    # state: training continues from those
    params = _trained_params(run)
    if state.get("raw_weights") is not None:
        load_raw_weights(params, state["raw_weights"])
    if run.ema is not None:
        if state.get("ema") is not None:
            run.ema.load_state_dict(state["ema"])
        else:
            run.ema.restart()  # from the raw weights just restored
            events.notice(f"--ema-decay: {checkpoint} has no average; it starts from the weights at step {run.step}")
    # checkpoints from before several processes existed: one process, the batch of their own settings
    old = state["config"]
    default_seen = run.step * old["gradient_accumulation_steps"] * old["train_batch_size"]
    run.samples_seen = state.get("samples_seen", default_seen)
    events.notice(f"resuming from {checkpoint} (step {run.step})")
    if state.get("world_size", 1) != run.accelerator.num_processes:
        events.notice(f"it was written by {state.get('world_size', 1)} processes and continues with "
                      f"{run.accelerator.num_processes}")  # fmt: skip


def fit(run: Run, should_stop) -> None:
    """The loop: batch → noise → predict → loss → step → maybe save / sample / log, until --max-train-steps."""
    cfg, accelerator, family, c = run.cfg, run.accelerator, run.family, run.c
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    latent_format, objective = run.latent_format, run.objective
    accum = cfg.gradient_accumulation_steps
    saves = set(save_steps(cfg))
    shard = Shard.of(rank, world, cfg.train_batch_size, with_classes=run.with_classes)
    # DeepSpeed runs the UNet in the half precision it converted it to, where autocast would not cast its inputs
    input_dtype = run.weight_dtype if is_deepspeed(accelerator) else None
    loop_started = time.perf_counter()
    skipped_in_a_row = 0  # fp16 steps the gradient scaler threw away because of inf/NaN gradients
    swap_bytes = 0
    for model in run.trained.values():
        model.train()
    progress = events.progress("training", cfg.max_train_steps, completed=run.step)
    with trackers.session(accelerator, cfg), progress as advance:
        while run.step < cfg.max_train_steps:
            if run.text_encoders_train and cfg.text_encoder_steps is not None and run.step >= cfg.text_encoder_steps:
                freeze_text_encoders(run)

            total, instance_total, class_total = 0.0, 0.0, 0.0
            moved = run.swap.bytes_moved if run.swap else 0
            for _ in range(accum):  # gradient accumulation: several micro-batches, one optimizer step
                batch = run.stream.at(run.samples_seen + rank * cfg.train_batch_size)  # this process's slice
                run.samples_seen += world * cfg.train_batch_size
                # latents from the VAE's distribution; noise and timesteps from the run's own generator
                dist = run.latents.distributions(batch, run.stream)
                check_finite_latents(dist, run)
                generator = run.generator
                eps = shard.randn(generator, dist.shape[1] // 2, *dist.shape[2:])
                latents = sample_latents(dist, eps, latent_format.scale, latent_format.shift)
                noised = objective.draw(latents, shard, generator)  # noise, timesteps (or σ), the noisy input
                target = objective.target(latents, noised)
                noisy = noised.input
                # accumulate: DDP exchanges gradients after the last micro-batch only (and scales the loss by 1/accum)
                with accelerator.autocast(), accelerator.accumulate(*run.trained.values()):
                    cond = run.prompts(batch.prompts)  # captions; "" where caption dropout struck
                    if input_dtype is not None:
                        noisy, cond = noisy.to(input_dtype), {k: v.to(input_dtype) for k, v in cond.items()}
                    if cfg.channels_last:
                        noisy = noisy.contiguous(memory_format=torch.channels_last)
                    # (orig h, w, crop top, left, target h, w) per row: SDXL's size and crop conditioning
                    pred = family.predict(c, noisy, noised.timesteps, cond, batch.geometry.to(device))
                weights = objective.weights(noised)
                losses = elementwise_loss(pred, target, cfg.loss, huber_threshold(cfg, objective, noised))
                losses = apply_masks(losses, batch.masks)  # --masked-loss; class rows' masks are ones
                instance_loss, class_loss = prior_preserving_loss(losses, weights, batch.num_instance)
                loss = instance_loss + cfg.prior_loss_weight * class_loss
                # divides by --gradient-accumulation-steps; with --fused-backward the weights update in here
                accelerator.backward(run.fused.scale_loss(loss) if run.fused else loss)
                total += loss.item() / accum
                instance_total += instance_loss.item() / accum
                class_total += class_loss.item() / accum

            skipped = optimizer_step(run)
            swap_bytes += (run.swap.bytes_moved - moved) if run.swap else 0  # the steps', not the samples'
            run.step += 1
            # what is logged is the whole batch's loss, the mean over the processes' slices
            total, instance_total, class_total = mean_over_processes(accelerator, total, instance_total, class_total)
            log_step(run, total, instance_total, class_total, advance)
            after_step(run, skipped)
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            if skipped:
                run.history.skipped_steps.append(run.step)
            check_diverged(run, total, skipped_in_a_row)

            stopping = any_process_stops(accelerator, should_stop())
            if run.step in saves or stopping:
                run.history.seconds += time.perf_counter() - loop_started
                loop_started = time.perf_counter()
                run.last_saved = save(run)
                trackers.log_samples(accelerator, cfg, run.step, run.last_saved / "samples")
            if stopping:
                events.notice(f"stopped at step {run.step}; saved {run.last_saved}. Run the same command again to "
                              "resume.")  # fmt: skip
                raise KeyboardInterrupt
    run.history.seconds += time.perf_counter() - loop_started
    record_swap(run, swap_bytes)


def freeze_text_encoders(run: Run) -> None:
    """At --text-encoder-steps the text encoders have learned the token; from here on they are frozen (their grads
    stay None, so the optimizer skips them) and their embeddings can be cached like frozen ones'."""
    run.text_encoders_train = False
    for name in run.c.text_models(run.trained):
        run.trained[name].requires_grad_(False)
        run.trained[name].eval()
    run.prompts.build(run.stream.all_prompts())


def optimizer_step(run: Run) -> bool:
    """Clip, step, schedule, clear; whether the step was skipped (an fp16 overflow: the schedule waits for it)."""
    if run.cfg.max_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
    run.optimizer.step()
    skipped = run.fused.step_was_skipped if run.fused else run.optimizer.step_was_skipped
    if not skipped:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return skipped


def mean_over_processes(accelerator, *values: float) -> list[float]:
    if accelerator.num_processes == 1:
        return list(values)
    stats = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return (accelerator.reduce(stats, "sum") / accelerator.num_processes).tolist()


def any_process_stops(accelerator, stopping: bool) -> bool:
    """A signal reaches one process, or each at its own moment: all stop at the same step."""
    if accelerator.num_processes == 1:
        return stopping
    asked = torch.tensor([float(stopping)], device=accelerator.device)
    return accelerator.reduce(asked, "sum").item() > 0


def prior_preserving_loss(losses, weights, num_instance: int):
    """(instance loss, class loss) from the per-element `losses`: the batch's instance rows, then its class rows
    (prior preservation: the class half keeps the model's idea of the class). `weights`: the objective's
    per-example weights (min-SNR, debiased estimation, …)."""
    per_example = losses.mean(dim=tuple(range(1, losses.ndim)))
    if weights is not None:
        per_example = per_example * weights
    instance_loss = per_example[:num_instance].mean()
    class_loss = per_example[num_instance:].mean() if num_instance < len(per_example) else per_example.new_zeros(())
    return instance_loss, class_loss


MAX_SKIPPED_IN_A_ROW = 20  # a scaler halves its scale at each: 2**-20 of the start means it will not recover


def check_finite_latents(dist: torch.Tensor, run: Run) -> None:
    """NaN latents come from a VAE that overflowed (SDXL's in fp16): every step on them would train on garbage."""
    if not torch.isfinite(dist).all():
        base = run.c.extra["base"]
        vae = base.vae or (base.folder / "vae" if base.folder else base.parts["vae"].path)
        raise UserError(
            f"the VAE ({vae}) gives non-finite latents in {next(run.c.vae.parameters()).dtype} at step {run.step}",
            "pass a VAE that is finite in fp16 (--vae, e.g. sdxl-vae-fp16-fix for SDXL) or --mixed-precision no",
        )


def check_diverged(run: Run, loss: float, skipped_in_a_row: int) -> None:
    """A loss that is no longer a finite number, or an fp16 scaler that keeps throwing steps away, stops the run
    here: every later step would train on garbage, and its checkpoints would give black images."""
    where = run.last_saved or "no checkpoint yet"
    hint = (
        f"lower --learning-rate (now {run.setup.get('learning_rate', run.cfg.lr):g}), try --mixed-precision bf16 or "
        f"no, or a VAE that is finite in fp16 (--vae); the last good checkpoint is kept ({where})"
    )
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged at step {run.step}: the loss is {loss}", hint)
    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise TrainingDiverged(
            f"training diverged at step {run.step}: the fp16 gradient scaler skipped {skipped_in_a_row} steps in a "
            "row (inf/NaN gradients)",
            hint,
        )


def check_finite_weights(run: Run, trained: dict) -> None:
    """Before a checkpoint is written: a weight that is inf/NaN means the run broke (with a finite loss, e.g. a
    loss that under-flowed); such a checkpoint is never written, so --keep-last never prunes the last good one."""
    for name, model in trained.items():
        for key, p in model.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise TrainingDiverged(
                    f"training diverged by step {run.step}: {name} weight {key} is not finite; nothing was saved",
                    f"lower --learning-rate (now {run.cfg.lr:g}) or try --mixed-precision bf16; the last good "
                    f"checkpoint is kept ({run.last_saved or 'none yet'})",
                )


def record_swap(run: Run, swap_bytes: int) -> None:
    """--blocks-to-swap in the report: the swap's counts and what moved per optimizer step of this run."""
    if run.swap is not None:
        steps = max(1, run.step - run.setup["first_step"])
        run.setup["block_swap"] = {**run.swap.describe(), "bytes_moved_per_step": swap_bytes // steps}


def after_step(run: Run, skipped: bool) -> None:
    """What follows an optimizer step: the EMA's update (unless fp16 skipped the step), and every
    --validation-every steps (and at the last) the held-out loss."""
    if run.ema is not None and not skipped:
        run.ema.update(run.step)
    if run.held_out is not None and (
        run.step % run.cfg.validation_interval == 0 or run.step == run.cfg.max_train_steps
    ):
        validate(run)


def validate(run: Run) -> None:
    """The held-out loss now: in the history (so in the report and the checkpoint), the events and the trackers."""
    with model_weights(run):
        loss = validation.validation_loss(run, run.held_out)
    run.history.validation.append([run.step, loss])
    events.emit("validation", step=run.step, loss=round(loss, 6))
    trackers.log_step(run.accelerator, run.cfg, run.step, {"validation_loss": loss})


def log_step(run: Run, total: float, instance_loss: float, class_loss: float, advance) -> None:
    current_lr = run.lr_scheduler.get_last_lr()[0]
    run.history.losses.append(total)
    run.history.instance_losses.append(instance_loss)
    run.history.class_losses.append(class_loss)
    run.history.lrs.append(current_lr)
    fields = {"loss": round(total, 5), "lr": current_lr}
    if run.with_classes:
        fields["class_loss"] = round(class_loss, 5)
    if run.accelerator.device.type == "cuda":
        fields["mem"] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}G"
    advance(1, **fields)
    events.emit("train_step", step=run.step, **fields)
    trackers.log_step(run.accelerator, run.cfg, run.step, {**fields, "instance_loss": instance_loss})


# ───────────────────────────── checkpoints ─────────────────────────────


def resume_point(cfg: TrainConfig, main_process: bool) -> tuple[Path | None, dict | None]:
    """The newest finished checkpoint that reads back whole, and its training state. A damaged one — a truncated
    state or weight file (a full disk, a copy cut short) — is set aside as step-N.damaged with a warning, and the
    one before it is used: a run resumes from the last good checkpoint instead of failing on the latest."""
    from dreambooth.checkpoint.load import check_safetensors

    for step, folder in reversed(finished_checkpoints(cfg.output)):
        try:
            for weights in sorted(folder.rglob("*.safetensors")):
                check_safetensors(weights)  # the header against the file's size: a truncated file fails here
            state = torch.load(folder / STATE_FILE, weights_only=False)
            if not isinstance(state, dict) or state.get("step") != step:
                raise ValueError(f"{STATE_FILE} is not the training state of step {step}")
            return folder, state
        except Exception as exc:
            why = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip().splitlines()[0][:200]
            aside = folder.with_name(f"{folder.name}.damaged")
            if main_process:
                n = 1
                while aside.exists():
                    n += 1
                    aside = folder.with_name(f"{folder.name}.damaged-{n}")
                os.replace(folder, aside)
            events.warn(f"checkpoint {folder} is damaged ({why}): set aside as {aside.name}; resuming from the "
                        "finished one before it, if any")  # fmt: skip
    return None, None


def save(run: Run) -> Path:
    """Every process takes part (ZeRO-3 gathers the weights); the first one writes, the others wait for it."""
    with whole_weights(run.accelerator, run.trained[run.c.denoiser_name]):
        if run.accelerator.is_main_process:
            save_checkpoint(run)
        run.accelerator.wait_for_everyone()  # none runs ahead, or exits, before it is complete
    return checkpoint_dir(run.cfg.output, run.step)


def save_checkpoint(run: Run) -> Path:
    """<output>/checkpoints/step-N/: what the adapter stores (a full diffusers folder, or the LoRA layers), the
    training state, and samples. Written into a temporary folder and renamed: a kill at any instant leaves the
    previous checkpoint intact."""
    cfg, accelerator = run.cfg, run.accelerator
    dest = checkpoint_dir(cfg.output, run.step)
    trained = {name: accelerator.unwrap_model(model) for name, model in run.trained.items()}
    check_finite_weights(run, trained)
    need = int(run.adapter.checkpoint_bytes(run.c, trained, cfg))  # for the message if the disk fills up
    with events.stage(f"saving checkpoint step-{run.step}"), atomic_dir(dest, overwrite=True, need=need) as tmp:
        # --export-ema: the checkpoint's weights are the average's; schedule-free: its averaged x
        with ema_applied(run), model_weights(run):
            extra = run.adapter.save(tmp, run.c, trained, cfg, run.step, run.seed, run.family)
        training_state = {
            "step": run.step,
            "seed": run.seed,
            # DeepSpeed's is in per-process shards: resuming restarts Adam's moments there
            "optimizer": None if is_deepspeed(accelerator) else run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "generator": run.generator.get_state(),
            "rng": rng_states(),
            "history": run.history.__dict__,
            "config": cfg.to_dict(),
            "samples_seen": run.samples_seen,
            "world_size": accelerator.num_processes,
            **extra,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "raw_weights": weights_kept_aside(run),
        }
        torch.save(training_state, tmp / STATE_FILE)
        if cfg.save_sample_prompt:
            with ema_applied(run), model_weights(run):
                draw_samples(run, tmp / "samples", trained)
    if cfg.keep_last:
        prune(cfg.output, cfg.keep_last)
    if cfg.export_single_file:
        name = cfg.output.resolve().name or "dreambooth"
        with events.stage(f"exporting step-{run.step}"):
            run.adapter.export(dest, cfg.output / "export", name, run.step)
    events.emit("checkpoint_saved", step=run.step, path=str(dest))
    return dest


def draw_samples(run: Run, folder: Path, trained: dict) -> None:
    """Samples with a fixed seed, so the same prompt at successive checkpoints shows what training changed."""
    from dreambooth.sample import chunked_prompts, generate, save_images

    cfg, c, device = run.cfg, run.c, run.accelerator.device
    denoiser = trained[c.denoiser_name]
    text_encoders = {n: trained.get(n, m) for n, m in c.text_encoders.items()}
    places = {m: (next(m.parameters()).device, m.training) for m in (denoiser, c.vae, *text_encoders.values())}
    # the loop's random streams must not move because samples were drawn (a resumed run draws none here)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), run.accelerator.autocast():
        for m in places:
            m.to(device).eval()
        pipe = run.family.sampling_pipeline(c, denoiser, text_encoders, c.vae)
        for i, prompt in enumerate(cfg.save_sample_prompt):
            images = generate(
                pipe, prompt, cfg.n_save_sample, run.seed, resolution=cfg.resolution, steps=cfg.save_infer_steps,
                guidance_scale=cfg.save_guidance_scale, negative_prompt=cfg.save_sample_negative_prompt,
                embeds=chunked_prompts(run.family, pipe, cfg.max_token_length), **run.family.sample_kwargs,
            )  # fmt: skip
            save_images(images, folder, f"prompt{i}", prompt=prompt, seed=run.seed, step=run.step)
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
            "skipped": history.skipped_steps,
            "validation": history.validation,
        },
    }
    if not write:  # another process writes it
        return report
    write_json(cfg.output / REPORT_FILE, report)
    if history.losses:
        steps = [step for step, _ in finished_checkpoints(cfg.output)]
        loss_plot(report["losses"], cfg.output / "loss_curve.png", steps, title=f"training loss, {cfg.output.name}")
    write_report_page(cfg.output)
    return report
