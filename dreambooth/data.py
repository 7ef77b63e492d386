"""Training images: loading and checking them, the order they are seen in, crops and flips, and the caches.

The data order is a pure function of (seed, position in the stream), not of an iterator's hidden state: that is
what lets a resumed run see exactly the batches an uninterrupted one would, with nothing to save but the step.
"""

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dreambooth import events
from dreambooth.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_SIDE_FRACTION = 4  # images whose short side is under resolution/4 would be upscaled into mush: refuse them


def load_rgb(path: Path) -> Image.Image:
    """Open any common image as 8-bit RGB the way it is meant to be seen: EXIF rotation applied,
    transparency flattened onto white, CMYK/palette/16-bit/greyscale converted."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not in the middle of training
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip (PIL's convert("L") would clip at 255)
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, L, YCbCr, F, 1 …
    return image


def scan_images(folder: Path, resolution: int, flag: str, *, warn: bool = True) -> list[Path]:
    """The usable images in a folder, in a stable order. Unreadable or tiny ones are skipped with a warning."""
    usable = []
    min_side = max(8, resolution // MIN_SIDE_FRACTION)
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            image = load_rgb(path)
        except Exception as exc:  # PIL raises many kinds for broken files; any of them means "skip it"
            if warn:
                events.warn(f"skipping {path} ({flag}): not a readable image ({type(exc).__name__}: {exc})")
            continue
        if min(image.size) < min_side:
            if warn:
                events.warn(
                    f"skipping {path} ({flag}): {image.width}×{image.height} px is too small for --resolution "
                    f"{resolution} (need at least {min_side} px on the short side)"
                )
            continue
        usable.append(path)
    return usable


def check_instance_dir(folder: Path, resolution: int, flag: str) -> list[Path]:
    if not folder.exists():
        raise UserError(f"{flag} {folder} does not exist", "pass the folder that holds your subject's photos")
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder", "pass the folder that holds the photos")
    images = scan_images(folder, resolution, flag)
    if not images:
        raise UserError(
            f"{flag} {folder} has no usable images",
            f"add a few photos (.jpg/.png/.webp, at least {max(8, resolution // MIN_SIDE_FRACTION)} px) to it",
        )
    return images


def to_tensor(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random, flip: bool) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; CHW in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    concept: int


@dataclass
class Batch:
    examples: list[Example]  # instance examples first, then (with prior preservation) as many class examples
    flips: list[bool]
    positions: list[int]
    num_instance: int


class DataStream:
    """An endless, seeded stream of examples. Position p of the stream is instance example perm_e[p % N] of
    epoch e = p // N; with prior preservation it is paired with a class example of the same concept."""

    def __init__(
        self,
        instances: list[Example],
        classes: dict[int, list[Example]] | None,
        seed: int,
        batch_size: int,
        random_flip: bool,
    ) -> None:
        self.instances = instances
        self.classes = classes
        self.seed = seed
        self.batch_size = batch_size
        self.random_flip = random_flip
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.instances), generator=generator).tolist())
        return self._perm[1]

    def rng(self, position: int, kind: int) -> random.Random:
        """Per-example randomness (crop, flip) that depends on nothing but the seed and the position."""
        return random.Random(f"{self.seed}:{position}:{kind}")

    def batch(self, index: int) -> Batch:
        """The `index`-th micro-batch of a one-process run."""
        return self.at(index * self.batch_size)

    def at(self, start: int) -> Batch:
        """`batch_size` examples from stream position `start` on. Several processes each take their own
        consecutive slice of one global micro-batch, so together they see what one process would."""
        n = len(self.instances)
        positions = list(range(start, start + self.batch_size))
        examples = [self.instances[self._permutation(p // n)[p % n]] for p in positions]
        flips = [self.random_flip and self.rng(p, 0).random() < 0.5 for p in positions]
        num_instance = len(examples)
        if self.classes is not None:
            # the class image at stream position p cycles through the concept's class images
            class_examples = [
                self.classes[e.concept][p % len(self.classes[e.concept])]
                for e, p in zip(examples, positions, strict=True)
            ]
            examples = examples + class_examples
            flips = flips + [self.random_flip and self.rng(p, 1).random() < 0.5 for p in positions]
            positions = positions + positions
        return Batch(examples, flips, positions, num_instance)


class LatentSource:
    """Latent distributions for a batch: from a cache made once (VAE frozen, so its output never changes), or
    by encoding on the fly. Either way the caller samples from (mean, logvar) with its own generator."""

    def __init__(self, vae, resolution: int, center_crop: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.vae = vae
        self.resolution = resolution
        self.center_crop = center_crop
        self.device = device
        self.dtype = dtype
        self.cache: dict[tuple[Path, bool], torch.Tensor] | None = None

    def _pixels(self, path: Path, flip: bool, rng: random.Random) -> torch.Tensor:
        return to_tensor(load_rgb(path), self.resolution, self.center_crop, rng, flip)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        return self.vae.encode(pixels).latent_dist.parameters.float()

    def build_cache(self, paths: list[Path], flips: bool, seed: int, chunk: int = 4) -> None:
        """Encode every image once (and its mirror image, when flipping). The crop is drawn once per image."""
        keys = [(p, f) for p in paths for f in ((False, True) if flips else (False,))]
        self.cache = {}
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            pixels = torch.stack([self._pixels(p, f, random.Random(f"{seed}:cache:{p.name}")) for p, f in part])
            for key, params in zip(part, self._encode(pixels), strict=True):
                self.cache[key] = params.cpu()

    def distributions(self, batch: Batch, stream: DataStream) -> torch.Tensor:
        if self.cache is not None:
            params = [self.cache[(e.path, f)] for e, f in zip(batch.examples, batch.flips, strict=True)]
            return torch.stack(params).to(self.device)
        pixels = torch.stack(
            [
                self._pixels(e.path, f, stream.rng(p, 2))
                for e, f, p in zip(batch.examples, batch.flips, batch.positions, strict=True)
            ]
        )
        return self._encode(pixels)


def sample_latents(params: torch.Tensor, scaling_factor: float, eps: torch.Tensor) -> torch.Tensor:
    """Draw latents from the VAE's diagonal Gaussian. `eps` (standard normal, the latents' shape) comes from the
    training generator, so a resumed run, or several processes, replay exactly the same draw."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * eps.to(mean.device)) * scaling_factor


class PromptCache:
    """Each prompt's conditioning (a dict of tensors, whatever the family makes of it): computed once per prompt
    while the text encoders are frozen, and computed afresh (with grad) while they train."""

    def __init__(self, encode) -> None:
        self.encode = encode  # prompts → {name: tensor [B, …]}
        self.cache: dict[str, dict[str, torch.Tensor]] | None = None

    def build(self, prompts: list[str]) -> None:
        self.cache = {}
        with torch.no_grad():
            for prompt in sorted(set(prompts)):
                self.cache[prompt] = {k: v[0].float() for k, v in self.encode([prompt]).items()}

    def drop(self) -> None:
        self.cache = None

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return self.encode(prompts)
        names = self.cache[prompts[0]]
        return {k: torch.stack([self.cache[p][k] for p in prompts]) for k in names}
