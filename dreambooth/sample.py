"""Sampling images from a model, and putting them side by side in a grid."""

import math
from pathlib import Path

import torch
from PIL import Image

from dreambooth.fileio import atomic_path
from dreambooth.preflight import check_model_folder


def load_pipeline(model_dir: Path, *, vae_dir: Path | None = None, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline from a local folder, without safety checker, progress bars or network."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # its "Loading pipeline components" bar would cut through ours
    extra = {"vae": AutoencoderKL.from_pretrained(vae_dir, dtype=dtype)} if vae_dir else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        )
        images.extend(out.images)
    return images


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


def save_images(images: list[Image.Image], folder: Path, stem: str) -> list[Path]:
    """Each image as PNG, plus `<stem>-grid.png`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{stem}-{i:02d}.png")
        with atomic_path(paths[-1]) as tmp:
            image.save(tmp, format="PNG")
    with atomic_path(folder / f"{stem}-grid.png") as tmp:
        image_grid(images, columns=min(len(images), 4)).save(tmp, format="PNG")
    return [*paths, folder / f"{stem}-grid.png"]


def sample_model(
    model_dir: Path, prompt: str, dest: Path, num_images: int, seed: int, steps: int, guidance_scale: float
) -> list[Path]:
    """`dreambooth sample`: images from a trained (or any) diffusers folder."""
    check_model_folder(Path(model_dir), "MODEL_DIR")
    pipe = load_pipeline(model_dir)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = generate(pipe, prompt, num_images, seed, resolution=resolution, steps=steps, guidance_scale=guidance_scale)
    return save_images(images, dest, "sample")
