"""`dreambooth demo` (and `dreambooth run` with no config): the whole product on the built-in tiny model.

It is a real `run`: the tiny model arrives as a single file (as a user's download would), a few example images
of a subject are the instance data, and the four stages run as for a real model — convert, class images,
DreamBooth training with prior preservation, export — leaving OUTPUT/manifest.json, a checkpoint, the exported
file and a before/after sample grid. On a CPU it takes about a minute; any `dreambooth train` flag overrides
the demo's settings (e.g. `dreambooth demo --max-train-steps 20`).
"""

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dreambooth import events
from dreambooth.config import build_train_config
from dreambooth.fileio import atomic_path
from dreambooth.pipeline import RunConfig, run_pipeline

MODEL_NAME = "tiny-sd1.safetensors"
INSTANCE_PROMPT = "a sks glyph"
CLASS_PROMPT = "a glyph"
# Small enough for about a minute on two CPU cores; big enough that the loss visibly falls.
SETTINGS = {
    "resolution": 32,
    "with_prior_preservation": True,
    "prior_loss_weight": 1.0,
    "num_class_images": 8,
    "sample_batch_size": 4,
    "class_inference_steps": 10,
    "train_batch_size": 2,
    "max_train_steps": 60,
    "learning_rate": 1e-4,
    "save_interval": 30,
    "save_sample_prompt": (INSTANCE_PROMPT,),
    "n_save_sample": 4,
    "save_infer_steps": 10,
    "seed": 0,
}


def demo_inputs(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The demo's 'downloaded' model file and its instance images, made once under `folder`."""
    model = folder / "models" / MODEL_NAME
    if not model.is_file():
        from dreambooth.checkpoint.export import ExportOptions, export
        from dreambooth.tiny_model import write_tiny_diffusers

        with events.stage("making the built-in tiny model"), tempfile.TemporaryDirectory() as tmp:
            export(write_tiny_diffusers(Path(tmp) / "tiny", seed), model, ExportOptions())
    images = folder / "instance"
    if not images.is_dir() or not any(images.iterdir()):
        write_subject_images(images, count=5, seed=seed)
    return model, images


def write_subject_images(folder: Path, count: int, seed: int, size: int = 48) -> None:
    """The demo's subject: a two-colour glyph (a yellow cross on a magenta tile) on varied backgrounds."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        background = tuple(int(v) for v in rng.integers(30, 200, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        side = int(rng.integers(size // 2, size * 3 // 4))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        draw.rectangle([x, y, x + side, y + side], fill=(220, 40, 200))
        bar = max(2, side // 5)
        mid_x, mid_y = x + side // 2, y + side // 2
        draw.rectangle([mid_x - bar // 2, y + 2, mid_x + bar // 2, y + side - 2], fill=(250, 230, 40))
        draw.rectangle([x + 2, mid_y - bar // 2, x + side - 2, mid_y + bar // 2], fill=(250, 230, 40))
        with atomic_path(folder / f"glyph-{i}.png") as tmp:
            image.save(tmp, format="PNG")


def demo_config(output: Path, flags: dict) -> RunConfig:
    model, images = demo_inputs(output / "inputs")
    settings = {
        **SETTINGS,
        "model": model,
        "output": output,
        "instance_data_dir": images,
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    train = build_train_config(None, settings, class_images_root=output / "class_images")
    return RunConfig(train=train)


def run_demo(output: Path, flags: dict | None = None) -> dict:
    """The demo run, then a before/after grid: the base model's samples above the trained model's."""
    cfg = demo_config(output, flags or {})
    manifest = run_pipeline(cfg)
    grid = output / "samples" / "before_after.png"
    with events.stage("sampling before/after"):
        draw_before_after(Path(manifest["outputs"]["base"]), Path(manifest["outputs"]["final_checkpoint"]), cfg, grid)
    manifest["outputs"]["before_after_grid"] = str(grid)
    return manifest


def draw_before_after(base: Path, trained: Path, cfg: RunConfig, dest: Path, count: int = 4) -> Path:
    from dreambooth.sample import generate, image_grid, load_pipeline

    rows = []
    for model in (base, trained):
        pipe = load_pipeline(model)
        rows += generate(pipe, INSTANCE_PROMPT, count, seed=0, resolution=cfg.train.resolution, steps=10)
    with atomic_path(dest) as tmp:
        image_grid(rows, columns=count).save(tmp, format="PNG")
    return dest
