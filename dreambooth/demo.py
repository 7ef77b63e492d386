"""`dreambooth demo`: the product's path end to end on the built-in tiny model, offline, in seconds on a CPU.

Today that path is single file → diffusers → single file: we make the tiny model's single file (as a user
would bring one), convert it, export it back, prove the round trip is exact, and draw a sample with the
converted folder. Training joins this path when `dreambooth train` lands.
"""

import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dreambooth import events
from dreambooth.checkpoint.convert import ConvertOptions, convert
from dreambooth.checkpoint.export import ExportOptions, export
from dreambooth.fileio import atomic_path, write_json
from dreambooth.tiny_model import write_tiny_diffusers


def run_demo(output: Path, seed: int = 0) -> dict:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    source = output / "models" / "tiny-sd1.safetensors"
    with events.stage("making the built-in tiny SD 1.x model"), tempfile.TemporaryDirectory() as tmp:
        export(write_tiny_diffusers(Path(tmp) / "tiny", seed), source, ExportOptions())
    with events.stage("convert: single file → diffusers folder"):
        converted = convert(source, output / "base", ConvertOptions(overwrite=True))
    exported_file = output / "export" / "tiny-sd1-demo.safetensors"
    with events.stage("export: diffusers folder → A1111 single file"):
        exported = export(output / "base", exported_file, ExportOptions())
    original, round_trip = load_file(source), load_file(exported_file)
    identical = original.keys() == round_trip.keys() and all(torch.equal(original[k], round_trip[k]) for k in original)
    with events.stage("sample with the converted folder"):
        sample = draw_sample(output / "base", output / "samples" / "sample.png", seed)
    report = {
        "source": str(source),
        "converted": converted,
        "exported": exported,
        "round_trip_identical": identical,
        "sample": str(sample),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(output / "demo_report.json", report)
    return report


def draw_sample(model_dir: Path, dest: Path, seed: int) -> Path:
    from dreambooth.sample import generate, load_pipeline

    image = generate(load_pipeline(model_dir), "a photo of sks dog", 1, seed, resolution=64, steps=4)[0]
    with atomic_path(dest) as tmp:
        image.save(tmp, format="PNG")
    return dest
