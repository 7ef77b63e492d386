"""Training images: loading and checking them, their captions, the buckets they are cut to, the order they are seen
in, crops and flips, and the caches.

The data order is a pure function of (seed, position in the stream), not of an iterator's hidden state: that is
what lets a resumed run see exactly the batches an uninterrupted one would, with nothing to save but the step.
"""

import errno
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from dreambooth import events
from dreambooth.buckets import MASK_SUFFIX, Size, image_size, is_photo
from dreambooth.errors import UserError

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
    for path in sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")):
        if not is_photo(path.name):
            continue
        if path.is_symlink() and not path.exists():  # a link that loops, or points at nothing: said, not a mystery
            if warn:
                events.warn(f"skipping {path} ({flag}): {_broken_link(path)}")
            continue
        if not path.is_file():  # a folder, a FIFO or a device named like an image
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


def _broken_link(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself)"
    return f"a symbolic link to {os.readlink(path)}, which does not exist"


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


# ───────────────────────────── loss masks ─────────────────────────────


def mask_path(image: Path) -> Path:
    """The mask file beside an image: photo-1.jpg → photo-1.mask.png."""
    return image.with_name(image.stem + MASK_SUFFIX)


def _alpha(image: Image.Image) -> Image.Image | None:
    """An image's alpha channel as 8-bit greyscale, None when it has none."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        return None
    return image.convert("RGBA").getchannel("A")


def load_mask(mask: Path, photo: Path) -> Image.Image:
    """The loss weights of `photo` as 8-bit greyscale of its size (white trains, black does not, grey weighs in
    between): the mask file, or, where `mask` is the photo itself, its alpha channel. EXIF rotation applied to both,
    as `load_rgb` applies it to the photo."""
    if mask == photo:
        with Image.open(photo) as image:
            alpha = _alpha(ImageOps.exif_transpose(image))
        if alpha is None:
            raise ValueError(f"{photo} has no alpha channel")
        return alpha
    return load_rgb(mask).convert("L")  # grey stays grey: L of (v, v, v) is exactly v


def find_mask(photo: Path) -> Path | None:
    """Where `photo`'s loss mask comes from: its mask file, else the photo itself when it has an alpha channel that
    is not fully opaque, else None (it trains whole). A mask file that cannot be read, or whose size is not the
    photo's, is refused by name: it would weigh the wrong pixels."""
    path = mask_path(photo)
    if path.is_file():
        try:
            mask = load_mask(path, photo)
        except Exception as exc:  # PIL raises many kinds for broken files
            raise UserError(
                f"--masked-loss: mask file {path} cannot be read ({type(exc).__name__}: {exc})",
                "save it again as a greyscale PNG of the photo's size (white trains, black does not), or remove it",
            ) from None
        height, width = image_size(photo)
        if mask.size != (width, height):
            raise UserError(
                f"--masked-loss: mask file {path} is {mask.width}×{mask.height} px, and its photo {photo} is "
                f"{width}×{height} px",
                "make the mask from the photo as it is (the same size), or remove the mask file",
            )
        return path
    with Image.open(photo) as image:
        alpha = _alpha(image)
        if alpha is not None and alpha.getextrema()[0] < 255:  # an alpha channel that hides nothing is no mask
            return photo
    return None


def check_some_masked(examples: list["Example"], concepts) -> None:
    """--masked-loss with no mask at all is a mistake (a misnamed mask file, most likely), not a run to start."""
    if any(e.mask is not None for e in examples):
        return
    folders = ("folders " if len(concepts) > 1 else "folder ") + ", ".join(str(c.instance_data_dir) for c in concepts)
    example = examples[0].path if examples else Path("photo.jpg")
    raise UserError(
        f"--masked-loss: no image in the instance {folders} has a mask (expected {mask_path(example).name} beside "
        f"{example.name}, or photos with an alpha channel)",
        "add masks named like photo.mask.png beside photo.jpg (white trains, black does not), or drop --masked-loss",
    )


# ───────────────────────────── captions ─────────────────────────────


def caption_path(image: Path, extension: str) -> Path:
    """The caption file beside an image: photo-1.jpg + ".txt" → photo-1.txt (kohya's sidecar convention)."""
    return image.with_name(image.stem + extension)


def read_caption(image: Path, extension: str) -> str:
    """The image's caption: the first non-empty line of its sidecar file, '' when there is none. UTF-8 (a BOM is
    fine); anything else is refused by name, because guessing an encoding would train on mojibake."""
    path = caption_path(image, extension)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise UserError(f"caption file {path} cannot be read ({exc.strerror})", "check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption file {path} is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x})",
            "save it as UTF-8 (in most editors: Save As → Encoding UTF-8)",
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def identifier(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The words that name the subject: those of the instance prompt that the class prompt does not have
    ('a photo of sks dog' vs 'a photo of dog' → ['sks']); without a class prompt, all the instance prompt's."""
    words = _words(instance_prompt)
    own = [w for w in words if w not in set(_words(class_prompt or ""))] if class_prompt else []
    return own or words


def instance_caption(caption: str, instance_prompt: str, class_prompt: str | None) -> str:
    """What an instance image trains with. A caption that lacks the subject's identifier would teach the model
    the photo without the token that is meant to call it up: the instance prompt goes in front of it then."""
    if not caption:
        return instance_prompt
    if set(identifier(instance_prompt, class_prompt)) <= set(_words(caption)):
        return caption
    return f"{instance_prompt}, {caption}"


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    concept: int
    captioned: bool = False  # the prompt came from the image's caption file
    # --masked-loss: the file whose pixels weigh the loss, photo.mask.png or the photo itself (its alpha channel);
    # None: the image trains whole
    mask: Path | None = None


def instance_examples(
    images: dict[int, list[Path]], concepts, caption_extension: str | None, *, masks: bool = False
) -> list[Example]:
    """Every instance image with what it trains with: its caption (the trigger kept), or the instance prompt; and
    with `masks` (--masked-loss) where its loss mask comes from."""
    examples = []
    for i, paths in images.items():
        concept = concepts[i]
        for path in paths:
            caption = read_caption(path, caption_extension) if caption_extension else ""
            prompt = instance_caption(caption, concept.instance_prompt, concept.class_prompt)
            mask = find_mask(path) if masks else None
            examples.append(Example(path, prompt, i, captioned=bool(caption), mask=mask))
    return examples


def class_examples_of(paths: list[Path], class_prompt: str, concept: int, caption_extension: str | None):
    """Class images train with the class prompt, or with their own caption file where they have one."""
    examples = []
    for path in paths:
        caption = read_caption(path, caption_extension) if caption_extension else ""
        examples.append(Example(path, caption or class_prompt, concept, captioned=bool(caption)))
    return examples


# ───────────────────────────── aspect-ratio buckets ─────────────────────────────


# ───────────────────────────── pixels ─────────────────────────────


def to_tensor(
    image: Image.Image, size: Size, center_crop: bool, rng: random.Random, flip: bool, mask: Image.Image | None = None
):
    """Resize to cover `size` (height, width), crop it out (centred, or at a random place), maybe flip: CHW in
    [-1, 1], the geometry SDXL conditions on: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), the
    crop's corner in the resized (and, when flipped, mirrored) image's pixels, and the image's loss mask (greyscale,
    its size) cut exactly the same way, [1, H, W] in [0, 1] (None without one)."""
    target_h, target_w = size
    scale = max(target_h / image.height, target_w / image.width)
    resized = (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale)))
    original = (image.height, image.width)
    if center_crop:
        left, top = (resized[0] - target_w) // 2, (resized[1] - target_h) // 2
    else:
        left, top = rng.randint(0, resized[0] - target_w), rng.randint(0, resized[1] - target_h)
    box = (left, top, left + target_w, top + target_h)

    def cut(picture: Image.Image) -> np.ndarray:
        picture = picture.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0).crop(box)
        return np.asarray(ImageOps.mirror(picture) if flip else picture, dtype=np.float32)

    pixels = torch.from_numpy(cut(image) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    weights = torch.from_numpy(cut(mask) / 255.0)[None] if mask is not None else None
    if flip:
        left = resized[0] - target_w - left  # the same pixels, seen as a crop of the mirrored image
    geometry = (*original, top, left, target_h, target_w)
    return pixels, geometry, weights


def latent_mask(weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask [1, H, W] on the latent grid (h, w): each latent pixel weighs the mean of the pixels it encodes."""
    return F.interpolate(weights[None], size=grid, mode="area")[0]


@dataclass
class Batch:
    examples: list[Example]  # instance examples first, then (with prior preservation) as many class examples
    flips: list[bool]
    positions: list[int]
    num_instance: int
    prompts: list[str] | None = None  # what each row trains with: its prompt, or "" where the caption was dropped
    size: Size | None = None  # the batch's bucket (height, width); None: the square crop of --resolution
    # [B, 6] float: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per row, in pixels; set by the
    # LatentSource that cut the pixels (the crop is drawn where the image is)
    geometry: torch.Tensor | None = None
    # --masked-loss: [B, 1, h, w] loss weights on the latent grid (ones for a row without a mask), set with geometry
    masks: torch.Tensor | None = None


class DataStream:
    """An endless, seeded stream of examples. Position p of the stream is instance example perm_e[p % N] of
    epoch e = p // N; with prior preservation it is paired with a class example of the same concept.

    With buckets, every global micro-batch (`group` consecutive positions from a multiple of `group`: what all
    processes together train on in one micro-step) holds images of one bucket. An epoch is then: the images in a
    seeded order, gathered by bucket, each bucket's list cut into groups (the last one filled up by starting the
    bucket's list again), the groups shuffled. Its length depends only on the dataset and `group`, so position p
    is still epoch p // length, and the whole order a pure function of (seed, position)."""

    def __init__(
        self,
        instances: list[Example],
        classes: dict[int, list[Example]] | None,
        seed: int,
        batch_size: int,
        random_flip: bool,
        *,
        buckets: dict[Path, Size] | None = None,
        group: int | None = None,
        caption_dropout: float = 0.0,
    ) -> None:
        self.instances = instances
        self.classes = classes
        self.seed = seed
        self.batch_size = batch_size
        self.random_flip = random_flip
        self.buckets = buckets
        self.group = group or batch_size
        self.caption_dropout = caption_dropout
        self._perm: tuple[int, list[int]] | None = None
        self._order: tuple[int, list[int]] | None = None
        if buckets is not None:
            counts = self.bucket_counts()
            self.epoch_length = sum(-(-n // self.group) * self.group for n in counts.values())

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.instances), generator=generator).tolist())
        return self._perm[1]

    def _bucket_order(self, epoch: int) -> list[int]:
        """Epoch `epoch` with buckets: instance indices, `epoch_length` of them, each run of `group` one bucket."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            by_bucket: dict[Size, list[int]] = {}
            for index in torch.randperm(len(self.instances), generator=generator).tolist():
                by_bucket.setdefault(self.buckets[self.instances[index].path], []).append(index)
            groups = []
            for size in sorted(by_bucket):
                members = by_bucket[size]
                filled = [members[k % len(members)] for k in range(-(-len(members) // self.group) * self.group)]
                groups += [filled[k : k + self.group] for k in range(0, len(filled), self.group)]
            shuffled = torch.randperm(len(groups), generator=generator).tolist()
            self._order = (epoch, [index for g in shuffled for index in groups[g]])
        return self._order[1]

    def rng(self, position: int, kind: int) -> random.Random:
        """Per-example randomness (crop, flip, caption dropout) that depends on nothing but the seed and the
        position."""
        return random.Random(f"{self.seed}:{position}:{kind}")

    def batch(self, index: int) -> Batch:
        """The `index`-th micro-batch of a one-process run."""
        return self.at(index * self.batch_size)

    def at(self, start: int) -> Batch:
        """`batch_size` examples from stream position `start` on. Several processes each take their own
        consecutive slice of one global micro-batch, so together they see what one process would."""
        positions = list(range(start, start + self.batch_size))
        size = None
        if self.buckets is None:
            n = len(self.instances)
            examples = [self.instances[self._permutation(p // n)[p % n]] for p in positions]
        else:
            if start // self.group != (start + self.batch_size - 1) // self.group:
                raise ValueError(f"positions {start}…{positions[-1]} straddle two global micro-batches of {self.group}")
            length = self.epoch_length
            examples = [self.instances[self._bucket_order(p // length)[p % length]] for p in positions]
            size = self.buckets[examples[0].path]
        flips = [self.random_flip and self.rng(p, 0).random() < 0.5 for p in positions]
        prompts = [
            "" if self.caption_dropout and self.rng(p, 3).random() < self.caption_dropout else e.prompt
            for e, p in zip(examples, positions, strict=True)
        ]
        num_instance = len(examples)
        if self.classes is not None:
            # the class image at stream position p cycles through the concept's class images
            class_examples = [
                self.classes[e.concept][p % len(self.classes[e.concept])]
                for e, p in zip(examples, positions, strict=True)
            ]
            examples = examples + class_examples
            flips = flips + [self.random_flip and self.rng(p, 1).random() < 0.5 for p in positions]
            prompts = prompts + [e.prompt for e in class_examples]
            positions = positions + positions
        return Batch(examples, flips, positions, num_instance, prompts, size)

    def all_prompts(self) -> list[str]:
        """Every prompt a batch can hold (the empty one too, with caption dropout): what a prompt cache holds."""
        examples = self.instances + [e for group in (self.classes or {}).values() for e in group]
        return sorted({e.prompt for e in examples} | ({""} if self.caption_dropout else set()))

    def bucket_counts(self) -> dict[Size, int]:
        """Bucket → how many instance images it holds (empty without buckets)."""
        counts: dict[Size, int] = {}
        for e in self.instances:
            if self.buckets is not None:
                counts[self.buckets[e.path]] = counts.get(self.buckets[e.path], 0) + 1
        return dict(sorted(counts.items()))

    def cache_entries(self) -> list[tuple[Path, Path | None, Size | None]]:
        """(image, its mask, bucket) of every crop a batch can ask for: an instance image in its bucket; a class
        image in each bucket its concept's instance images are in (it is cut to the bucket of the batch it joins)."""
        if self.buckets is None:
            examples = self.instances + [e for group in (self.classes or {}).values() for e in group]
            unique = sorted({(e.path, e.mask) for e in examples}, key=lambda pair: (pair[0], str(pair[1])))
            return [(path, mask, None) for path, mask in unique]
        entries = {(e.path, e.mask, self.buckets[e.path]) for e in self.instances}
        for concept, group in (self.classes or {}).items():
            sizes = {self.buckets[e.path] for e in self.instances if e.concept == concept}
            entries |= {(e.path, e.mask, size) for e in group for size in sizes}
        return sorted(entries, key=lambda entry: (entry[2], entry[0], str(entry[1])))


class LatentSource:
    """Latent distributions for a batch: from a cache made once (VAE frozen, so its output never changes), or
    by encoding on the fly. Either way the caller samples from (mean, logvar) with its own generator.

    With `masked` (--masked-loss) each row's loss mask is cut with its pixels and brought to the latent grid; the
    cache keeps it beside the latents, keyed on the mask's file as it is on the flip: a crop and its mask are made
    together, so neither is ever served without the other."""

    def __init__(
        self, vae, resolution: int, center_crop: bool, device: torch.device, dtype: torch.dtype, masked: bool = False
    ) -> None:
        self.vae = vae
        self.resolution = resolution
        self.center_crop = center_crop
        self.device = device
        self.dtype = dtype
        self.masked = masked
        # (image, mask, flipped, bucket) → (latent distribution, geometry, latent-grid mask or None): one entry per
        # crop a batch can ask for
        self.cache: dict[tuple, tuple[torch.Tensor, tuple, torch.Tensor | None]] | None = None

    def _size(self, size: Size | None) -> Size:
        return size if size is not None else (self.resolution, self.resolution)

    def _pixels(self, path: Path, mask: Path | None, flip: bool, rng: random.Random, size: Size | None):
        weights = load_mask(mask, path) if mask is not None else None
        return to_tensor(load_rgb(path), self._size(size), self.center_crop, rng, flip, weights)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        return self.vae.encode(pixels).latent_dist.parameters.float()

    def _masks(self, weights: list[torch.Tensor | None], params: torch.Tensor) -> torch.Tensor | None:
        """The batch's [B, 1, h, w] latent-grid masks (ones where a row has none); None without --masked-loss."""
        if not self.masked:
            return None
        ones = torch.ones(1, *params.shape[2:])
        return torch.stack([w if w is not None else ones for w in weights])

    def build_cache(
        self, entries: list[tuple[Path, Path | None, Size | None]], flips: bool, seed: int, chunk: int = 4
    ) -> None:
        """Encode every (image, mask, bucket) once (and its mirror image, when flipping). The crop is drawn once per
        image and bucket. `entries`: DataStream.cache_entries()."""
        keys = [(p, m, f, self._size(s)) for p, m, s in entries for f in ((False, True) if flips else (False,))]
        keys.sort(key=lambda key: key[3])  # stable: same-size crops stack into one VAE batch
        self.cache = {}
        start = 0
        while start < len(keys):
            part = [k for k in keys[start : start + chunk] if k[3] == keys[start][3]]
            made = [self._pixels(p, m, f, random.Random(f"{seed}:cache:{p.name}"), s) for p, m, f, s in part]
            params = self._encode(torch.stack([pixels for pixels, _, _ in made]))
            for key, one, (_, geometry, weights) in zip(part, params, made, strict=True):
                grid = latent_mask(weights, one.shape[1:]) if weights is not None else None
                self.cache[key] = (one.cpu(), geometry, grid)
            start += len(part)

    def distributions(self, batch: Batch, stream: DataStream) -> torch.Tensor:
        """The batch's latent distributions; records each row's geometry on the batch (`batch.geometry`), and with
        --masked-loss its mask on the latent grid (`batch.masks`)."""
        size = self._size(batch.size)
        if self.cache is not None:
            entries = [self.cache[(e.path, e.mask, f, size)] for e, f in zip(batch.examples, batch.flips, strict=True)]
            batch.geometry = torch.tensor([geometry for _, geometry, _ in entries], dtype=torch.float32)
            params = torch.stack([params for params, _, _ in entries])
            batch.masks = self._masks([grid for _, _, grid in entries], params)
            return params.to(self.device)
        made = [
            self._pixels(e.path, e.mask, f, stream.rng(p, 2), size)
            for e, f, p in zip(batch.examples, batch.flips, batch.positions, strict=True)
        ]
        batch.geometry = torch.tensor([geometry for _, geometry, _ in made], dtype=torch.float32)
        params = self._encode(torch.stack([pixels for pixels, _, _ in made]))
        grid = params.shape[2:]
        batch.masks = self._masks([latent_mask(w, grid) if w is not None else None for _, _, w in made], params)
        return params


def sample_latents(params: torch.Tensor, eps: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
    """Draw latents from the VAE's diagonal Gaussian, as the denoiser takes them: (sample − shift) · scale. `eps`
    (standard normal, the latents' shape) comes from the training generator, so a resumed run, or several processes,
    replay exactly the same draw."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    sample = mean + std * eps.to(mean.device)
    return (sample - shift if shift else sample) * scale


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
