"""The synthetic world of the built-in tiny model: captioned 32 px pictures of coloured shapes, and the demo subject.

Pretraining data (tools/pretrain_tiny.py) are scenes of one shape of one colour on a plain background, drawn with
PIL from a seed and captioned like "a red circle on a blue background" (words sometimes left out, so that short
prompts such as "a shape" or "a red circle" mean something too). "shape" is the class word: "a shape" is any of
them, which is what prior preservation has to keep.

The demo subject is a glyph the model never saw: a magenta tile with a yellow cross on it ("a sks shape"). Its
magenta is in no caption's palette and no pretraining scene has two colours in one object.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (130, 40, 170),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
CLASS_WORD = "shape"
SUBJECT = "subject"  # the shape name of the demo glyph in a Scene (never in a caption)
SUBJECT_TILE = (225, 50, 190)  # magenta: in no caption, so no pretraining picture has it
SUBJECT_CROSS = (250, 225, 40)
# Backgrounds of the instance pictures: green is left out, so "a sks shape on a green background" asks for
# something the fine-tune never showed (prompt fidelity is a test of the prior, not of memory)
SUBJECT_BACKGROUNDS = ("blue", "white", "black", "orange", "purple")


@dataclass(frozen=True)
class Scene:
    """One picture: a shape (or the subject) of a colour, centred at (x, y), `size` px across, on a background."""

    shape: str
    colour: str | None  # None for the subject, which has its own two colours
    background: str
    x: float
    y: float
    size: float


def random_scene(rng: random.Random) -> Scene:
    colour, background = rng.sample(list(COLOURS), 2)  # two different colours: the shape is always visible
    return Scene(rng.choice(SHAPES), colour, background, *_placement(rng))


def subject_scene(rng: random.Random, background: str | None = None) -> Scene:
    background = background or rng.choice(SUBJECT_BACKGROUNDS)
    return Scene(SUBJECT, None, background, *_placement(rng))


def _placement(rng: random.Random) -> tuple[float, float, float]:
    """Centre and size: 14–24 px across, so that a shape spans 4–6 of the 8×8 latent pixels the model draws in.

    (11–20 px, 3–5 latent pixels, left the tiny model barely above chance at telling shapes apart.) Centres
    stay within 12–20 px, so even the largest shape stays on the 32 px canvas.
    """
    size = rng.uniform(14, 24)
    return rng.uniform(12, 20), rng.uniform(12, 20), size


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Drawn 4× larger and scaled down: smooth edges, like a photo rather than pixel art."""
    k = 4 * resolution / RESOLUTION
    big = round(resolution * 4)
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    x, y, r = scene.x * k, scene.y * k, scene.size * k / 2
    box = [x - r, y - r, x + r, y + r]
    if scene.shape == SUBJECT:
        draw.rounded_rectangle(box, radius=r * 0.25, fill=SUBJECT_TILE)
        _cross(draw, x, y, r * 0.75, r * 0.22, SUBJECT_CROSS)
    else:
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            s = r * 0.85  # a square looks bigger than a circle of the same width: even them out
            draw.rectangle([x - s, y - s, x + s, y + s], fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
        elif scene.shape == "cross":
            _cross(draw, x, y, r, r * 0.33, fill)
        else:
            raise ValueError(f"unknown shape {scene.shape!r}")
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def _cross(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, half_bar: float, fill) -> None:
    draw.rectangle([x - half_bar, y - r, x + half_bar, y + r], fill=fill)
    draw.rectangle([x - r, y - half_bar, x + r, y + half_bar], fill=fill)


def full_caption(scene: Scene) -> str:
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption that leaves words out now and then, so partial prompts ("a shape", "a red circle") are learned.

    Each attribute is named or not independently; the shape is named by its own word or by the class word.
    """
    colour = f"{scene.colour} " if rng.random() < 0.8 else ""
    shape = scene.shape if rng.random() < 0.8 else CLASS_WORD
    background = f" on a {scene.background} background" if rng.random() < 0.7 else ""
    return f"a {colour}{shape}{background}"


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def pixels(scene_list: list[Scene], resolution: int = RESOLUTION) -> np.ndarray:
    """N×H×W×3 uint8."""
    return np.stack([np.asarray(render(s, resolution)) for s in scene_list])


def subject_scenes(count: int, seed: int) -> list[Scene]:
    """The instance pictures' scenes: backgrounds in turn, position and size from the seed."""
    rng = random.Random(f"subject:{seed}")
    return [subject_scene(rng, SUBJECT_BACKGROUNDS[i % len(SUBJECT_BACKGROUNDS)]) for i in range(count)]


def write_instance_images(dest_dir: Path, n: int = 5, seed: int = 0) -> list[Path]:
    """The demo's instance data: `n` PNGs of the subject in `dest_dir` (the same files for the same seed)."""
    from dreambooth.fileio import atomic_path

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(subject_scenes(n, seed)):
        paths.append(dest_dir / f"sks-{i}.png")
        with atomic_path(paths[-1]) as tmp:
            render(scene).save(tmp, format="PNG")
    return paths
