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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth import __version__, events
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
    import hashlib

    from dreambooth.checkpoint.convert import ConvertOptions, convert

    stat = src.stat()  # keyed on path, size and mtime: hashing gigabytes on every run would cost more than it saves
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cfg.cache / "converted" / f"{src.stem}-{key}"
    if not (dest / "model_index.json").is_file():
        with events.stage(f"converting {src.name} into {dest}"):
            convert(src, dest, ConvertOptions(overwrite=True))
    check_model_folder(dest, "--model")
    return dest


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
    """8-bit AdamW (bitsandbytes) when asked and it really runs on this device; torch AdamW otherwise."""
    kwargs = dict(
        lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )
    if cfg.use_8bit_adam:
        try:
            if device.type != "cuda":
                raise RuntimeError("it needs a CUDA GPU")
            import bitsandbytes as bnb

            from dreambooth.doctor import adamw8bit_step_runs

            adamw8bit_step_runs(device)  # importing is not enough: prove the kernel runs
            return bnb.optim.AdamW8bit(params, **kwargs), "AdamW8bit (bitsandbytes)"
        except Exception as exc:
            events.notice(f"--use-8bit-adam: 8-bit AdamW cannot run here ({exc}); using torch AdamW")
    return torch.optim.AdamW(params, **kwargs), "AdamW (torch)"


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
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    # --- check everything the user gave before anything heavy -----------------------------------------
    instance_images = preflight(cfg)
    model_dir = resolve_model(cfg)
    vae_dir = cfg.vae
    if vae_dir is not None:
        vae_dir = vae_dir / "vae" if (vae_dir / "vae" / "config.json").is_file() else vae_dir
        if not (vae_dir / "config.json").is_file():
            raise UserError(f"--vae {cfg.vae} is not a diffusers VAE folder (no config.json)", "pass e.g. MODEL/vae")
    disk = check_disk(cfg, model_dir)
    resume_from = latest_checkpoint(cfg.output)
    if cfg.resume and resume_from is None:
        raise UserError(f"--resume: no checkpoint in {cfg.output / CHECKPOINTS}", "drop --resume to start afresh")
    state = torch.load(resume_from / STATE_FILE, weights_only=False) if resume_from else None
    if state is not None and state["step"] >= cfg.max_train_steps:
        events.notice(f"{resume_from} already reached step {state['step']} (--max-train-steps {cfg.max_train_steps})")
        return _write_report(cfg, state["step"], History(**state["history"]), started, resume_from, {})

    quiet_progress_bars()

    # --- device, precision, seed -------------------------------------------------------------------------
    cpu = not torch.cuda.is_available()
    mixed = cfg.mixed_precision
    if cpu and mixed == "fp16":
        events.notice("--mixed-precision fp16 needs a GPU; training in fp32 on the CPU")
        mixed = "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu)
    device = accelerator.device
    # frozen parts run in half precision; trained parameters stay fp32 ("master weights"): fp16 gradients
    # cannot be unscaled in place, which is the "Attempting to unscale FP16 gradients" failure
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if state is not None:
        seed = state["seed"]
    else:
        seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    if state is None:
        # the same seed gives the same run: the loop draws from its own generator, this covers the libraries
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- class images for prior preservation (the base model, before its weights change) --------------
    classes = None
    if cfg.with_prior_preservation:
        from dreambooth.data import scan_images
        from dreambooth.prior import generate_class_images

        made = generate_class_images(cfg, model_dir, seed, device, weight_dtype, should_stop)
        if made:
            events.notice(f"generated {made} class images")
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

    trained_models = [unet, text_encoder] if cfg.train_text_encoder else [unet]
    params = [p for m in trained_models for p in m.parameters() if p.requires_grad]
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer, optimizer_name = make_optimizer(params, cfg, lr, device)
    if cfg.train_text_encoder and not train_text_encoder:
        # resumed past --text-encoder-steps: it stays in the optimizer (so the saved state fits) but gets no grads
        text_encoder.requires_grad_(False)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    prepared = accelerator.prepare(*trained_models, optimizer, lr_scheduler)
    unet = prepared[0]
    if cfg.train_text_encoder:
        text_encoder = prepared[1]
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
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
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        set_rng_states(state["rng"])
        history = History(**state["history"])
        step = state["step"]
        events.notice(f"resuming from {resume_from} (step {step})")

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
    }
    events.emit("train_start", step=step, max_train_steps=cfg.max_train_steps, **setup)

    def save(step: int) -> Path:
        return save_checkpoint(
            cfg, step, model_dir, vae_dir, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler,
            optimizer, lr_scheduler, generator, history, seed, weight_dtype, device,
        )  # fmt: skip

    # --- the loop -----------------------------------------------------------------------------------------
    scaling = vae.config.scaling_factor
    num_timesteps = noise_scheduler.config.num_train_timesteps
    accum = cfg.gradient_accumulation_steps
    saves = set(save_steps(cfg))
    last_saved = resume_from
    loop_started, first_step = time.perf_counter(), step
    unet.train()
    text_encoder.train(train_text_encoder)
    with events.progress("training", cfg.max_train_steps, completed=step) as advance:
        while step < cfg.max_train_steps:
            if train_text_encoder and cfg.text_encoder_steps is not None and step >= cfg.text_encoder_steps:
                # the text encoder has learned the token; from here on it is frozen (its grads stay None, so the
                # optimizer skips it) and its embeddings can be cached like a frozen one's
                train_text_encoder = False
                text_encoder.requires_grad_(False)
                text_encoder.eval()
                prompts.build_cache([e.prompt for e in all_examples])

            total, parts = 0.0, [0.0, 0.0]
            for micro in range(accum):  # gradient accumulation: several micro-batches, one optimizer step
                batch = stream.batch(step * accum + micro)
                n = batch.num_instance
                # latents from the VAE's distribution; noise and timesteps from the run's own generator
                lat = sample_latents(latents.distributions(batch, stream), scaling, generator)
                noise = torch.randn(lat.shape, generator=generator).to(device)
                if cfg.offset_noise:  # lets the model learn overall brightness (very dark / very bright images)
                    noise += cfg.offset_noise * torch.randn((*lat.shape[:2], 1, 1), generator=generator).to(device)
                timesteps = torch.randint(0, num_timesteps, (lat.shape[0],), generator=generator).to(device)
                noisy = noise_scheduler.add_noise(lat, noise, timesteps)
                # v-models (SD 2.x 768-v) learn the velocity, not the noise
                target = training_target(noise_scheduler, lat, noise, timesteps)
                with accelerator.autocast():
                    hidden = prompts([e.prompt for e in batch.examples])
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
                accelerator.backward(loss / accum)
                total += loss.item() / accum
                parts[0] += instance_loss.item() / accum
                parts[1] += class_loss.item() / accum

            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

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

            stopping = should_stop()
            if step in saves or stopping:
                history.seconds += time.perf_counter() - loop_started
                loop_started = time.perf_counter()
                last_saved = save(step)
            if stopping:
                events.notice(f"stopped at step {step}; saved {last_saved}. Run the same command again to resume.")
                raise KeyboardInterrupt
    history.seconds += time.perf_counter() - loop_started
    setup["steps_this_run"] = step - first_step
    return _write_report(cfg, step, history, started, last_saved, setup)


def save_checkpoint(
    cfg, step, model_dir, vae_dir, accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler,
    optimizer, lr_scheduler, generator, history, seed, weight_dtype, device,
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
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "generator": generator.get_state(),
            "rng": rng_states(),
            "history": history.__dict__,
            "config": cfg.to_dict(),
        }
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


def _write_report(cfg, step, history: History, started, checkpoint, setup) -> dict:
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
