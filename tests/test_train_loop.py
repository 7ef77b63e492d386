"""The training loop on a tiny model: it learns, prior preservation mixes in the class, the right weights move."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.data import DataStream, Example
from dreambooth.families.sd.convert import write_diffusers_folder
from dreambooth.tiny_model import tiny_components
from tests.train_helpers import base_args, write_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "sks")


def _weights(folder, name):
    file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(folder / name / file)


def test_loss_falls_on_a_four_image_overfit(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    result = cli(*base_args(model, photos, out, "--max-train-steps", 40, "--learning-rate", "1e-3",
                            "--train-batch-size", 2, "--save-interval", 20, "--keep-last", 1,
                            "--save-sample-prompt", "a photo of sks thing", "--n-save-sample", 2,
                            "--save-infer-steps", 2, "--export-single-file"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "train_report.json").read_text())
    losses = report["losses"]["loss"]
    assert report["steps"] == 40 and len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    # what the user gets: the last checkpoint only (--keep-last 1), a loadable diffusers folder with samples,
    # an A1111 file per save, a loss curve
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-40"]
    final = out / "checkpoints" / "step-40"
    assert not torch.equal(_weights(final, "unet")["conv_in.weight"], _weights(model, "unet")["conv_in.weight"])
    # two 32 px samples, each enlarged to a 256 px tile, under a header with the step and the prompt (issue 17)
    grid = Image.open(final / "samples" / "prompt0-grid.png")
    assert grid.width >= 2 * 256 and grid.height > 256
    assert (out / "export" / "out-step-20.safetensors").is_file() and (
        out / "export" / "out-step-40.safetensors"
    ).is_file()
    assert Image.open(out / "loss_curve.png").size == (1100, 638)  # matplotlib's plot (dreambooth/plots.py)
    assert (out / "report.html").is_file()
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(final, local_files_only=True)  # complete and loadable
    # re-running a finished run does no work and keeps the result
    again = cli(*base_args(model, photos, out, "--max-train-steps", 40))
    assert again.exit_code == 0 and json.loads((out / "train_report.json").read_text())["steps"] == 40


def test_prior_preservation_batches_hold_instance_and_class_examples(tmp_path):
    instances = [Example(tmp_path / f"i{k}", "sks dog", 0) for k in range(3)]
    classes = {0: [Example(tmp_path / f"c{k}", "dog", 0) for k in range(5)]}
    stream = DataStream(instances, classes, seed=1, batch_size=2, random_flip=True)
    seen = set()
    for index in range(6):
        batch = stream.batch(index)
        assert batch.num_instance == 2 and len(batch.examples) == 4
        assert [e.prompt for e in batch.examples] == ["sks dog", "sks dog", "dog", "dog"]
        seen |= {e.path.name for e in batch.examples}
    assert seen == {"i0", "i1", "i2", "c0", "c1", "c2", "c3", "c4"}  # every image is used
    # each epoch is a permutation of the instance images
    epoch = [stream.batch(0).examples[:2], stream.batch(1).examples[:1]]
    assert sorted(e.path.name for group in epoch for e in group) == ["i0", "i1", "i2"]


def test_prior_preservation_generates_class_images_and_trains_on_both_losses(cli, model, photos, tmp_path):
    class_dir = tmp_path / "class"
    write_photos(class_dir, count=1, seed=5)  # a user's own class image counts towards --num-class-images
    args = base_args(model, photos, tmp_path / "out", "--max-train-steps", 4, "--with-prior-preservation",
                     "--class-prompt", "a photo of thing", "--class-data-dir", class_dir, "--num-class-images", 3,
                     "--sample-batch-size", 2, "--class-inference-steps", 2, "--prior-loss-weight", 0.5)  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert len(list(class_dir.glob("class-*.png"))) == 2 and len(list(class_dir.glob("*.png"))) == 3
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["class_images"] == 3
    losses = report["losses"]
    assert all(c > 0 for c in losses["class"]) and all(i > 0 for i in losses["instance"])
    for total, inst, cls in zip(losses["loss"], losses["instance"], losses["class"], strict=True):
        assert total == pytest.approx(inst + 0.5 * cls, rel=1e-5)


def test_text_encoder_trains_only_when_asked(cli, model, photos, tmp_path):
    common = ("--max-train-steps", 3, "--learning-rate", "1e-3")
    assert cli(*base_args(model, photos, tmp_path / "frozen", *common)).exit_code == 0
    assert cli(*base_args(model, photos, tmp_path / "trained", *common, "--train-text-encoder")).exit_code == 0
    base = _weights(model, "text_encoder")
    frozen = _weights(tmp_path / "frozen" / "checkpoints" / "step-3", "text_encoder")
    trained = _weights(tmp_path / "trained" / "checkpoints" / "step-3", "text_encoder")
    assert all(torch.equal(base[k], frozen[k]) for k in base)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert any("layers.0" in k for k in changed) and any("embeddings" in k for k in changed)


def test_v_prediction_models_learn_the_velocity(cli, photos, tmp_path):
    from diffusers import DDPMScheduler

    from dreambooth.objectives import DDPM, Noised

    folder = tmp_path / "tiny-v"
    write_diffusers_folder(folder, tiny_components(0, "sd2-v"), "sd2", "sd2-v")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    noised = Noised(noise, t, scheduler.add_noise(x0, noise, t))
    assert torch.allclose(DDPM(scheduler).target(x0, noised), velocity, atol=1e-6)
    epsilon = DDPMScheduler.from_config({**scheduler.config, "prediction_type": "epsilon"})
    assert torch.equal(DDPM(epsilon).target(x0, noised), noise)
    result = cli(*base_args(folder, photos, tmp_path / "out", "--max-train-steps", 2))
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["prediction_type"] == "v_prediction"
    saved = json.loads(
        (tmp_path / "out" / "checkpoints" / "step-2" / "scheduler" / "scheduler_config.json").read_text()
    )
    assert saved["prediction_type"] == "v_prediction"


def test_text_encoder_trains_for_the_first_n_steps_only(cli, model, photos, tmp_path, monkeypatch):
    from dreambooth import events

    out = tmp_path / "out"
    args = base_args(model, photos, out, "--max-train-steps", 4, "--learning-rate", "1e-3", "--save-interval", 1,
                     "--train-text-encoder", "--text-encoder-steps", 2)  # fmt: skip
    emit = events.emit

    def stop_at_step_3(event, **fields):  # stop after the text encoder froze: resume must cope with that
        emit(event, **fields)
        if event == "train_step" and fields["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(events, "emit", stop_at_step_3)
    assert cli(*args).exit_code == 130
    monkeypatch.setattr(events, "emit", emit)
    assert cli(*args).exit_code == 0
    base, steps = _weights(model, "text_encoder"), {}
    for n in (1, 2, 4):
        steps[n] = _weights(out / "checkpoints" / f"step-{n}", "text_encoder")
    key = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(base[key], steps[1][key]) and not torch.equal(steps[1][key], steps[2][key])
    assert all(torch.equal(steps[2][k], steps[4][k]) for k in base)
    assert not torch.equal(_weights(out / "checkpoints" / "step-2", "unet")["conv_in.weight"],
                           _weights(out / "checkpoints" / "step-4", "unet")["conv_in.weight"])  # fmt: skip


def test_sample_command_draws_images_and_a_grid(cli, model, tmp_path):
    result = cli("sample", model, "--prompt", "a photo of sks thing", "--num-images", 2, "--steps", 2,
                 "--output", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["sample-00.png", "sample-01.png", "sample-grid.png"]
    assert cli("sample", tmp_path, "--prompt", "x").exit_code == 2  # not a model folder: named, exit 2
