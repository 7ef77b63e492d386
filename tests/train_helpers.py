"""Shared pieces for the training tests: a tiny model folder and a few tiny photos, made in code."""

import json
import shutil
import signal
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreambooth.tiny_model import write_tiny_diffusers

RES = 32  # the tiny VAE halves it: 16×16 latents


def write_photos(folder: Path, count: int = 4, *, size=(40, 48), seed: int = 0, hue: int = 0) -> Path:
    """Simple, distinct pictures: a coloured disc on a textured background, a little different each time."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        background = (rng.random((size[1], size[0], 3)) * 60 + 40).astype(np.uint8)
        image = Image.fromarray(background, "RGB")
        draw = ImageDraw.Draw(image)
        colour = ((hue + 200 + 10 * i) % 256, (hue + 40 * i) % 256, (hue + 90) % 256)
        cx, cy, r = size[0] // 2 + i, size[1] // 2 - i, min(size) // 3
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        image.save(folder / f"photo-{i}.png")
    return folder


def tiny_model(folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        write_tiny_diffusers(folder, seed=0)
    return folder


def base_args(model: Path, photos: Path, output: Path, *extra: object) -> list[str]:
    return [
        "train",
        "--model", model,
        "--instance-data-dir", photos,
        "--instance-prompt", "a photo of sks thing",
        "--output", output,
        "--resolution", RES,
        "--seed", 7,
        *extra,
    ]  # fmt: skip


def sigterm_at_step(monkeypatch, step: int) -> None:
    """A real SIGTERM, delivered while training logs `step`: the run saves a checkpoint there and exits 130."""
    from dreambooth import events

    emit = events.emit

    def emit_and_stop(event, **fields):
        emit(event, **fields)
        if event == "train_step" and fields["step"] == step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(events, "emit", emit_and_stop)


PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux-dev": "FluxPipeline"}


def config_only_folder(kind: str, dest: Path) -> Path:
    """A diffusers folder with the bundled full-size configs and no weights: all the estimate reads."""
    source = Path(str(resources.files("dreambooth") / "assets" / "configs" / kind))
    index = {"_class_name": PIPELINES[kind]}
    for path in source.glob("*.json"):
        if path.stem != "scheduler":
            (dest / path.stem).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / path.stem / "config.json")
            index[path.stem] = ["diffusers", "unused"]
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


def straight_and_resumed(cli, monkeypatch, model: Path, photos: Path, tmp_path: Path, flags, stop_at: int) -> None:
    """The same training twice: into tmp_path/a straight through, and into tmp_path/b stopped by SIGTERM at step
    `stop_at` (exit 130) and run again to the end."""
    assert cli(*base_args(model, photos, tmp_path / "a", *flags)).exit_code == 0
    sigterm_at_step(monkeypatch, stop_at)
    assert cli(*base_args(model, photos, tmp_path / "b", *flags)).exit_code == 130
    monkeypatch.undo()
    assert cli(*base_args(model, photos, tmp_path / "b", *flags)).exit_code == 0
