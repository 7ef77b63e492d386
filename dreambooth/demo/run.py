"""`dreambooth demo` (and `dreambooth run` with no config): the whole product on the built-in tiny model.

It is a real `run`: the tiny pretrained model (dreambooth/assets/tiny/, a text-to-image model of coloured
shapes that follows shape and colour prompts) arrives as a single file, as a user's download would;
five pictures of a glyph it never saw are the instance data ("a sks shape"), and the four stages run as for a
real model — convert, class images ("a shape"), DreamBooth training with prior preservation, export — leaving
OUTPUT/manifest.json, a checkpoint, the exported file, a before/after sample grid and OUTPUT/fidelity.json
(subject fidelity before and after, prompt fidelity, prior drift: dreambooth/demo/fidelity.py). On a CPU it takes
about 45 seconds; any `dreambooth train` flag overrides the demo's settings (e.g. `--max-train-steps 20`).
"""

import shutil
from pathlib import Path

from dreambooth import events
from dreambooth.config import LORA_KINDS, build_train_config
from dreambooth.demo import synthetic
from dreambooth.demo.fidelity import fidelity_report, score_before_after
from dreambooth.demo.settings import (
    CLASS_PROMPT,
    DEMO_MODEL_FILE,
    FIDELITY_SAMPLES,
    INSTANCE_IMAGES,
    INSTANCE_PROMPT,
    LORA_SETTINGS,
    MODEL_NAME,
    SETTINGS,
)
from dreambooth.fileio import atomic_path, write_json
from dreambooth.formats.lora import is_lora_checkpoint
from dreambooth.pipeline import RunConfig, run_pipeline
from dreambooth.report import write_report_page

FIDELITY_SEED = 0  # the fidelity samples' first seed (image i: seed + i)


def demo_inputs(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """The demo's 'downloaded' model file and its instance images, made once under `folder`."""
    model = folder / "models" / MODEL_NAME
    if not model.is_file():
        model.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(model) as tmp:
            shutil.copyfile(DEMO_MODEL_FILE, tmp)
    images = folder / "instance"
    if not images.is_dir() or not any(images.iterdir()):
        synthetic.write_instance_images(images, n=INSTANCE_IMAGES, seed=seed)
    return model, images


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
    given = {k: v for k, v in flags.items() if v is not None}
    if given.get("adapter") in LORA_KINDS:
        settings.update(LORA_SETTINGS)
    settings.update(given)
    train = build_train_config(None, settings, class_images_root=output / "class_images")
    return RunConfig(train=train)


def run_demo(output: Path, flags: dict | None = None) -> dict:
    """The demo run, then the fidelity scores of the base and the trained model, and a grid of their samples."""
    cfg = demo_config(output, flags or {})
    manifest = run_pipeline(cfg)
    base, trained = Path(manifest["outputs"]["base"]), Path(manifest["outputs"]["final_checkpoint"])
    if is_lora_checkpoint(trained):  # a LoRA is judged as users get it: the exported file, loaded into the base
        trained = Path(manifest["outputs"]["export"])
    with events.stage("scoring subject fidelity, prompt fidelity and prior drift"):
        (before, before_samples), (after, after_samples) = score_before_after(
            base, trained, FIDELITY_SAMPLES, FIDELITY_SEED
        )
    scores = fidelity_report(before, after, FIDELITY_SAMPLES, seed=FIDELITY_SEED)
    write_json(output / "fidelity.json", scores)
    grid = output / "samples" / "before_after.png"
    after_label = f"after: {Path(manifest['outputs']['final_checkpoint']).name}" + (" (LoRA)" if trained.suffix else "")
    draw_before_after(before_samples, after_samples, grid, after_label)
    manifest["outputs"]["before_after_grid"] = str(grid)
    manifest["outputs"]["fidelity"] = str(output / "fidelity.json")
    manifest["outputs"]["report_page"] = str(write_report_page(output))  # again: now with before/after and scores
    events.notice(
        f"subject fidelity {scores['subject_fidelity_before']:.2f} → {scores['subject_fidelity_after']:.2f}, "
        f"prompt fidelity {scores['prompt_fidelity_after']:.2f}, prior drift {scores['prior_drift']:.2f} "
        f"({output / 'fidelity.json'})"
    )
    return manifest


def draw_before_after(
    before: dict[str, list],
    after: dict[str, list],
    dest: Path,
    after_label: str = "after: the fine-tune",
    count: int = 4,
) -> Path:
    """Per prompt ("a sks shape", "… on a green background", "a shape") the base model's row above the trained one's,
    each labelled, the seed under each image (both models drew from the same seeds)."""
    from dreambooth.grids import comparison_grid

    sections = [
        (prompt, [("before: the base model", before[prompt][:count]), (after_label, after[prompt][:count])])
        for prompt in before
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        comparison_grid(sections, seeds=list(range(FIDELITY_SEED, FIDELITY_SEED + count))).save(tmp, format="PNG")
    return dest
