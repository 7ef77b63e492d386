"""Sampling images from a model, and putting them side by side in a grid."""

from pathlib import Path

import torch
from PIL import Image

from dreambooth.families.base import ResolvedModel
from dreambooth.fileio import atomic_path
from dreambooth.grids import image_grid, labelled_grid
from dreambooth.preflight import check_model_folder


def load_pipeline(model: ResolvedModel, *, dtype: torch.dtype = torch.float32):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline), without safety
    checker, progress bars or network; and what its calls need besides the prompt (Flux: T5's length)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from dreambooth import families
    from dreambooth.families.base import Dtypes

    family = families.get(model.family)
    diffusers_logging.disable_progress_bar()  # its "Loading pipeline components" bar would cut through ours
    if model.folder is None:  # original-layout files: the family loads them, the pipeline wraps its models
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
    **call_kwargs,
) -> list[Image.Image]:
    """`num_images` images; image i always comes from seed + i, whatever the batch size."""
    images: list[Image.Image] = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
        out = pipe(
            [prompt] * count,
            negative_prompt=[negative_prompt] * count if negative_prompt else None,
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


def sample_model(
    model_dir: Path, prompt: str, dest: Path, num_images: int, seed: int, steps: int, guidance_scale: float
) -> list[Path]:
    """`dreambooth sample`: images from a trained (or any) diffusers folder."""
    check_model_folder(Path(model_dir), "MODEL_DIR")
    pipe, call_kwargs = load_pipeline(ResolvedModel.of_folder(Path(model_dir)))
    resolution = default_resolution(pipe)
    images = generate(pipe, prompt, num_images, seed, resolution=resolution, steps=steps, guidance_scale=guidance_scale,
                      **call_kwargs)  # fmt: skip
    return save_images(images, dest, "sample", prompt=prompt, seed=seed)


def default_resolution(pipe) -> int:
    """The size a model was made for: a UNet's sample size × the VAE's factor; Flux's default (1024 at full size,
    the VAE's sample size)."""
    if hasattr(pipe, "unet"):
        return pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe.vae.config.sample_size
