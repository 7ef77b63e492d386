"""Which files are photos, image sizes and aspect-ratio buckets: names and plain arithmetic on headers, no pixels
decoded and no torch.

Training (dreambooth/data.py, train.py) and the web page (which shows the bucket each photo would go to) share it.
"""

import math
from pathlib import Path

from PIL import ExifTags, Image

Size = tuple[int, int]  # (height, width) in pixels, the order of a tensor's last two dimensions
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # the photos training reads
MASK_SUFFIX = ".mask.png"  # photo.jpg's loss mask is photo.mask.png beside it (--masked-loss)


def is_mask(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def is_photo(name: str) -> bool:
    """A file name training reads as a photo (a loss mask weighs a photo, it is none)."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not is_mask(name)


def image_size(path: Path) -> Size:
    """(height, width) as `load_rgb` will see the image, read from the header (EXIF rotation included) without
    decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned by a quarter
            width, height = height, width
    return height, width


def bucket_grid(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """(height, width) buckets of about resolution² pixels and never more: for each side from min_side to max_side
    in steps, the longest other side (a multiple of `step`, at most max_side) that keeps the area within
    resolution². Sorted by aspect ratio, tallest first; the square resolution × resolution is one of them."""
    area = resolution * resolution
    grid = set()
    for side in range(min_side, max_side + 1, step):
        other = min(max_side, area // side // step * step)
        if other >= min_side:
            grid |= {(side, other), (other, side)}
    return sorted(grid, key=lambda size: (size[1] / size[0], size[0]))


def assign_bucket(height: int, width: int, grid: list[Size], step: int) -> Size:
    """The bucket of an image of height × width: the one whose aspect ratio is closest to its own (in log space,
    so 2:1 and 1:2 are equally far from 1:1; ties go to the larger bucket). An image smaller than that bucket is
    never upscaled into it (kohya's bucket_no_upscale): it gets a bucket of the same shape scaled down to what
    it fills, sides rounded down to `step` (at least one step)."""
    aspect = math.log(width / height)
    bucket_h, bucket_w = min(grid, key=lambda b: (abs(math.log(b[1] / b[0]) - aspect), -b[0] * b[1]))
    if bucket_h <= height and bucket_w <= width:
        return bucket_h, bucket_w
    scale = min(height / bucket_h, width / bucket_w)
    return max(step, int(bucket_h * scale) // step * step), max(step, int(bucket_w * scale) // step * step)


def assign_buckets(paths: list[Path], grid: list[Size], step: int) -> dict[Path, Size]:
    return {path: assign_bucket(*image_size(path), grid, step) for path in paths}


def bucket_name(size: Size) -> str:
    """'768x512' for a bucket 768 wide and 512 high: width × height, the way image sizes are written."""
    return f"{size[1]}x{size[0]}"
