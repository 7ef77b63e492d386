"""Sample grids that explain themselves: the prompt (wrapped), the step and each image's seed written on them,
models side by side labelled, and small samples enlarged pixel for pixel to a size a person can judge.

PIL only (no torch): the report page and the trackers use these without loading a model.
"""

import math

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid


READABLE_SIDE = 256  # px: smaller samples (a tiny model's 32 px) are enlarged to at least this, pixel for pixel
PAD, TEXT_SIZE, TITLE_SIZE = 8, 15, 18
INK, MUTED, PAPER = (20, 20, 20), (90, 90, 90), (255, 255, 255)


def readable(image: Image.Image, side: int = READABLE_SIDE) -> Image.Image:
    """`image` enlarged by a whole factor until its shorter side is at least `side`, nearest-neighbour: each pixel
    becomes a square block, so what the model drew is shown, not a blur of it."""
    factor = max(1, math.ceil(side / min(image.size)))
    return image.convert("RGB").resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system fonts needed


def wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken between words (a word longer than a line stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _line_height(font) -> int:
    top, bottom = font.getbbox("Hgjy")[1::2]
    return bottom - top + 4


def _text_block(lines: list[tuple[str, object, tuple]], width: int) -> Image.Image:
    """Lines of (text, font, colour) on white, `width` wide."""
    height = PAD + sum(_line_height(font) for _, font, _ in lines) + PAD // 2
    block = Image.new("RGB", (width, height), PAPER)
    draw, y = ImageDraw.Draw(block), PAD
    for text, font, colour in lines:
        draw.text((PAD, y), text, font=font, fill=colour)
        y += _line_height(font)
    return block


def _stack(parts: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), PAPER)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def _captioned_row(images: list[Image.Image], captions: list[str], label: str | None = None) -> Image.Image:
    """Tiles side by side with a caption under each, and optionally a label column on the left."""
    tiles = [readable(image) for image in images]
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    font, label_font = _font(TEXT_SIZE), _font(TITLE_SIZE)
    label_w = 190 if label else 0
    caption_h = _line_height(font) + PAD
    row = Image.new("RGB", (label_w + len(tiles) * (tile_w + PAD) + PAD, tile_h + caption_h + PAD), PAPER)
    draw = ImageDraw.Draw(row)
    if label:
        for n, line in enumerate(wrap(label, label_font, label_w - 2 * PAD)):
            draw.text((PAD, PAD + n * _line_height(label_font)), line, font=label_font, fill=INK)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        x = label_w + PAD + i * (tile_w + PAD)
        row.paste(tile, (x, PAD // 2))
        draw.text((x, PAD // 2 + tile_h + 3), caption, font=font, fill=MUTED)
    return row


def labelled_grid(
    images: list[Image.Image], prompt: str, seeds: list[int], step: int | None = None, columns: int = 4
) -> Image.Image:
    """One prompt's samples: a header with the step and the prompt (wrapped), a caption "seed S" under each image."""
    rows = [
        _captioned_row(images[i : i + columns], [f"seed {s}" for s in seeds[i : i + columns]])
        for i in range(0, len(images), columns)
    ]
    width = max(r.width for r in rows)
    title = [(f"step {step}", _font(TITLE_SIZE), INK)] if step is not None else []
    prompt_lines = [
        (line, _font(TEXT_SIZE), INK) for line in wrap(f"prompt: {prompt}", _font(TEXT_SIZE), width - 2 * PAD)
    ]
    return _stack([_text_block(title + prompt_lines, width), *rows])


def comparison_grid(sections: list[tuple[str, list[tuple[str, list[Image.Image]]]]], seeds: list[int]) -> Image.Image:
    """Models side by side on the same prompts and seeds: per prompt a header, then one labelled row per model,
    e.g. [("a sks shape", [("before: the base model", images), ("after: step 150", images)]), …]."""
    parts = []
    for prompt, rows in sections:
        drawn = [_captioned_row(images, [f"seed {s}" for s in seeds[: len(images)]], label) for label, images in rows]
        width = max(r.width for r in drawn)
        header = wrap(f"prompt: {prompt}", _font(TITLE_SIZE), width - 2 * PAD)
        parts += [_text_block([(line, _font(TITLE_SIZE), INK) for line in header], width), *drawn]
    return _stack(parts)
