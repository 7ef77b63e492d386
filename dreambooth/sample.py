"""Sampling images from a model, and putting them side by side in a grid."""

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dreambooth.checkpoint.folders import PROVENANCE_FILE
from dreambooth.errors import UserError
from dreambooth.families.base import ResolvedModel
from dreambooth.fileio import atomic_path, read_json_object
from dreambooth.grids import image_grid, labelled_grid


def load_pipeline(model: ResolvedModel, *, dtype: torch.dtype = torch.float32, as_in_training: bool = False):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline), without safety
    checker, progress bars or network; and what its calls need besides the prompt (Flux: T5's length).
    `as_in_training`: with the sampler training's samples use (SD: DDIM), not the folder's own (class images
    keep the folder's, as the classic script made them)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from dreambooth import families
    from dreambooth.families.base import Dtypes

    family = families.get(model.family)
    diffusers_logging.disable_progress_bar()  # its "Loading pipeline components" bar would cut through ours
    if model.folder is None or as_in_training:  # the family loads the models, its sampling pipeline wraps them
        c = family.load(model, Dtypes(dtype, dtype, dtype))
        return family.sampling_pipeline(c, c.denoiser, c.text_encoders, c.vae), family.sample_kwargs
    extra = {"vae": diffusers.AutoencoderKL.from_pretrained(model.vae, dtype=dtype)} if model.vae else {}
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(
        model.folder, dtype=dtype, local_files_only=True, **family.pipeline_options, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, family.sample_kwargs


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    num_images: int,
    seed: int,
    *,
    resolution: int,
    steps: int = 20,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    embeds=None,
    **call_kwargs,
) -> list[Image.Image]:
    """`num_images` images; image i always comes from seed + i, whatever the batch size."""
    images: list[Image.Image] = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
        # prompts read in chunks (--max-token-length) reach the pipeline as embeddings; else as text, as always
        text = {"prompt": [prompt] * count, "negative_prompt": [negative_prompt] * count if negative_prompt else None}
        if embeds is not None:
            text = embeds([prompt] * count, [negative_prompt or ""] * count)
        out = pipe(
            **text,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generators,
            output_type="np",  # floats: a NaN is still visible here, a PIL image would be silently black
            **call_kwargs,
        )
        check_finite_images(out.images, prompt)
        images.extend(Image.fromarray((image * 255).round().astype("uint8")) for image in out.images)
    return images


def chunked_prompts(family, pipe, max_tokens: int):
    """What `generate` passes for prompts read in 75-token chunks (`--max-token-length` over 75): None otherwise."""
    if max_tokens <= 75 or not hasattr(family, "pipeline_embeds"):
        return None
    return lambda prompts, negative: family.pipeline_embeds(pipe, prompts, negative, max_tokens)


def check_finite_images(images, prompt: str) -> None:
    """A sample that is NaN/inf comes out black: say so, and what usually causes it, instead of saving it silently."""
    import numpy as np

    bad = int(sum(not np.isfinite(image).all() for image in images))
    if bad:
        from dreambooth import events

        events.warn(
            f"{bad} of {len(images)} images for {prompt!r} are not finite numbers (they would be black): the VAE "
            "overflowed in fp16 or the weights diverged. Use a VAE fixed for fp16 (--vae, e.g. sdxl-vae-fp16-fix), "
            "--mixed-precision bf16/no, or a lower --learning-rate"
        )


def save_images(
    images: list[Image.Image], folder: Path, stem: str, *, prompt: str | None = None, seed: int = 0,
    step: int | None = None,
) -> list[Path]:  # fmt: skip
    """Each image as PNG (as drawn), plus `<stem>-grid.png`: labelled with the prompt, the step and each image's
    seed (image i comes from seed + i) when the prompt is given; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{stem}-{i:02d}.png")
        with atomic_path(paths[-1]) as tmp:
            image.save(tmp, format="PNG")
    columns = min(len(images), 4)
    if prompt is None:
        grid = image_grid(images, columns=columns)
    else:
        grid = labelled_grid(images, prompt, [seed + i for i in range(len(images))], step, columns)
    with atomic_path(folder / f"{stem}-grid.png") as tmp:
        grid.save(tmp, format="PNG")
    return [*paths, folder / f"{stem}-grid.png"]


@dataclass(frozen=True)
class SampleOptions:
    """`dreambooth sample`: what to draw, and from what besides MODEL."""

    prompt: str
    num_images: int = 4
    seed: int = 0
    steps: int | None = None  # the family's (SD 20, Flux dev 20, schnell 4)
    guidance_scale: float | None = None  # the family's (SD 7.5, Flux dev its distilled 3.5, schnell none)
    negative_prompt: str | None = None
    resolution: int | None = None  # a LoRA checkpoint's training resolution, else the model's own size
    loras: tuple[str, ...] = ()  # LoRA files, each FILE or FILE:SCALE
    max_token_length: int | None = None  # a checkpoint's own, else 75 (CLIP's window; 150, 225: chunks)
    vae: Path | None = None
    clip_l: Path | None = None
    t5xxl: Path | None = None
    ae: Path | None = None
    cache_dir: Path | None = None

    def lora_files(self) -> list[tuple[Path, float]]:
        out = []
        for spec in self.loras:
            path, _, scale = spec.rpartition(":") if _has_scale(spec) else (spec, "", "1")
            try:
                value = float(scale)
            except ValueError:
                raise UserError(f"--lora {spec}: {scale!r} is not a scale", "write FILE or FILE:0.8") from None
            if not Path(path).is_file():
                raise UserError(f"--lora {path} does not exist", "pass an exported LoRA file (.safetensors)")
            out.append((Path(path), value))
        return out


def _has_scale(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    return bool(sep) and bool(head) and tail.replace(".", "", 1).replace("-", "", 1).isdigit()


@dataclass(frozen=True)
class ModelSource:
    """A base model as the flags name it (what `preflight.resolve_model` reads: the same names as TrainConfig's)."""

    model: Path
    cache: Path
    vae: Path | None = None
    clip_l: Path | None = None
    t5xxl: Path | None = None
    ae: Path | None = None


def refuse_lycoris_file(path: Path) -> None:
    """diffusers (which --lora loads files through) reads kohya's LoRA files, not LyCORIS' LoHa and LoKr, and drops
    a kohya DoRA's dora_scale (with a warning), which would draw another model than the one trained."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    kinds = {".hada_": "LoHa", ".lokr_": "LoKr", ".dora_scale": "DoRA"}
    kind = next((kinds[k] for k in kinds if any(k in name for name in names)), None)
    if kind is not None:
        raise UserError(
            f"--lora {path} is a {kind} file, which diffusers cannot load",
            "sample its training checkpoint folder instead (checkpoints/step-N), or load the file in ComfyUI",
        )


def sample_model(model: Path, options: SampleOptions, dest: Path) -> list[Path]:
    """`dreambooth sample`: images from any model the CLI reads — a diffusers folder, a single file (SD, or Flux's
    transformer with its parts), a full or LoRA training checkpoint as it is (the base its record names plus what
    trained), each with --lora files on top."""
    import tempfile

    from dreambooth import families

    with tempfile.TemporaryDirectory(prefix="dreambooth-sample-") as tmp:
        pipe, family, resolution, max_tokens = sampling_pipeline(Path(model), options, Path(options.cache_dir or tmp))
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        loras = options.lora_files()
        if loras:
            names = [f"lora{i}" for i in range(len(loras))]
            for (path, _), name in zip(loras, names, strict=True):
                refuse_lycoris_file(path)
                pipe.load_lora_weights(str(path), adapter_name=name)
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        family = families.get(family) if isinstance(family, str) else family
        images = generate(
            pipe, options.prompt, options.num_images, options.seed,
            resolution=options.resolution or resolution, steps=options.steps or family.sample_steps,
            guidance_scale=family.sample_guidance if options.guidance_scale is None else options.guidance_scale,
            negative_prompt=options.negative_prompt, embeds=chunked_prompts(family, pipe, max_tokens),
            **family.sample_kwargs,
        )  # fmt: skip
    return save_images(images, dest, "sample", prompt=options.prompt, seed=options.seed)


def inference_dtype(family: str) -> torch.dtype:
    """Half precision on a GPU (Flux's is bf16: its activations overflow fp16), fp32 on the CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if family.startswith("flux") else torch.float16


def sampling_pipeline(model: Path, options: SampleOptions, cache: Path):
    """(pipeline, family, default resolution) for MODEL."""
    from dreambooth.formats.lora import is_lora_checkpoint

    if is_lora_checkpoint(model):
        if options.loras:
            raise UserError(f"{model} is a LoRA checkpoint; --lora adds LoRA files to a model", "drop --lora")
        return checkpoint_pipeline(model, options.max_token_length)
    record = read_json_object(model / PROVENANCE_FILE) if model.is_dir() else {}
    if model.is_dir() and record.get("base_model") and not (model / "model_index.json").is_file():
        # what trained, the base by its record (Flux: no copy of T5 in it)
        return checkpoint_pipeline(model, options.max_token_length)
    from dreambooth.preflight import resolve_model

    source = ModelSource(model, cache, options.vae, options.clip_l, options.t5xxl, options.ae)
    resolved = resolve_model(source)
    pipe, _ = load_pipeline(resolved, dtype=inference_dtype(resolved.family), as_in_training=True)
    return pipe, resolved.family, default_resolution(pipe), options.max_token_length or 75


def _trained_components(checkpoint: Path):
    """(family, components, config) of a training checkpoint's base with what it trained restored, as training
    left them: the same models the checkpoint's own samples came from."""
    import torch

    from dreambooth import adapters, families
    from dreambooth.checkpoints import STATE_FILE
    from dreambooth.config import TrainConfig
    from dreambooth.families.base import Dtypes

    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    cfg = TrainConfig.from_dict(state["config"])
    record = read_json_object(checkpoint / PROVENANCE_FILE)
    base = _base_of(record, checkpoint)
    if cfg.vae is not None and base.folder is not None:  # trained with a replacement VAE: its samples used it
        base = ResolvedModel(base.family, folder=base.folder, vae=cfg.vae)
    family = families.get(base.family)
    dtype = inference_dtype(base.family)
    c, _, _ = adapters.load_trained(family, adapters.get(cfg.adapter), base, cfg, Dtypes(dtype, dtype, dtype),
                                    checkpoint=checkpoint, state=state)  # fmt: skip
    return family, c, cfg


def _base_of(record: dict, checkpoint: Path) -> ResolvedModel:
    from dreambooth.families.base import Part

    described = record.get("base_model")
    if described and described.get("parts"):
        return ResolvedModel(described["family"], parts={r: Part(Path(p)) for r, p in described["parts"].items()})
    folder = Path((described or {}).get("folder") or record.get("trained", {}).get("base", ""))
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"{checkpoint} was trained on {folder}, which is not there any more",
            "put the base model back where it was trained from (the checkpoint's dreambooth.json names it)",
        )
    return ResolvedModel.of_folder(folder)


def checkpoint_pipeline(checkpoint: Path, max_tokens: int | None):
    """A training checkpoint as it is: a LoRA's (the base with the adapter), or a Flux full fine-tune's (the base
    with the transformer it holds) — the pipeline its own samples came from, reading prompts as training did."""
    family, c, cfg = _trained_components(checkpoint)
    pipe = family.sampling_pipeline(c, c.denoiser, c.text_encoders, c.vae)
    return pipe, family, cfg.resolution, max_tokens or cfg.max_token_length


def default_resolution(pipe) -> int:
    """The size a model was made for: a UNet's sample size × the VAE's factor; Flux's default (1024 at full size,
    the VAE's sample size)."""
    if hasattr(pipe, "unet"):
        return pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.vae.config.sample_size
