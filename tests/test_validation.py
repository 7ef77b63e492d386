"""Validation on held-out images (`--validation-split`, `--validation-dir`): which images, what it measures, that it
changes nothing of training, resume, the report, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth.config import build_train_config
from dreambooth.data import instance_examples
from dreambooth.validation import split
from tests.flux_helpers import FLUX_FLAGS
from tests.train_helpers import base_args, straight_and_resumed, write_photos

LORA = ("--adapter", "lora", "--lora-rank", 4, "--save-interval", 100, "--learning-rate", "1e-2")


def lora(out, step):
    folder = out / "checkpoints" / f"step-{step}" / "lora"
    return {f"{p.stem}.{k}": v for p in folder.glob("*.safetensors") for k, v in load_file(p).items()}


def report(out):
    return json.loads((out / "train_report.json").read_text())


def test_a_split_holds_out_the_same_images_every_time_and_never_all(model, tmp_path):
    photos = write_photos(tmp_path / "ten", count=10)
    flags = {"model": str(model), "instance_data_dir": str(photos), "instance_prompt": "a photo of sks thing",
             "output": str(tmp_path / "out"), "validation_split": 0.2}  # fmt: skip
    cfg = build_train_config(None, flags)
    examples = instance_examples({0: sorted(photos.glob("*.png"))}, cfg.concepts, None)
    train, held = split(cfg, examples)
    assert len(held) == 2 and len(train) == 8 and not {e.path for e in held} & {e.path for e in train}
    assert split(cfg, list(reversed(examples)))[1] == list(reversed(held))  # by name, not by order


def test_validation_changes_nothing_of_training_and_measures_the_model(cli, model, photos, tmp_path):
    """The held-out loss on the training images themselves falls as the LoRA learns them; the LoRA trained with
    validation every step is bit for bit the one trained without."""
    flags = (*LORA, "--max-train-steps", 6)
    assert cli(*base_args(model, photos, tmp_path / "plain", *flags)).exit_code == 0
    run = cli(*base_args(model, photos, tmp_path / "val", *flags, "--validation-dir", photos, "--validation-every", 1))
    assert run.exit_code == 0, run.stderr
    a, b = lora(tmp_path / "plain", 6), lora(tmp_path / "val", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got = report(tmp_path / "val")
    steps = [step for step, _ in got["losses"]["validation"]]
    losses = [loss for _, loss in got["losses"]["validation"]]
    assert steps == [1, 2, 3, 4, 5, 6] and losses[-1] < losses[0]
    assert got["validation"]["images"] == 3 and got["validation"]["every"] == 1
    assert (tmp_path / "val" / "loss_curve.png").is_file()


def test_a_split_run_resumes_with_the_same_validation_losses(cli, model, tmp_path, monkeypatch):
    photos = write_photos(tmp_path / "photos", count=5)
    flags = (*LORA, "--max-train-steps", 4, "--validation-split", 0.2, "--validation-every", 2, "--random-flip")
    straight_and_resumed(cli, monkeypatch, model, photos, tmp_path, flags, stop_at=3)
    a, b = report(tmp_path / "a"), report(tmp_path / "b")
    assert a["losses"]["validation"] == b["losses"]["validation"] and len(a["losses"]["validation"]) == 2
    assert a["instance_images"] == 4  # one of five held out


def test_a_flux_lora_validates(cli, photos, tmp_path):
    from dreambooth.tiny_model import write_tiny_flux

    flux = write_tiny_flux(tmp_path / "flux", 0)
    flags = (*LORA, *FLUX_FLAGS, "--max-train-steps", 2, "--validation-dir", photos, "--validation-every", 1)
    result = cli(*base_args(flux, photos, tmp_path / "out", *flags))
    assert result.exit_code == 0, result.stderr
    assert [step for step, _ in report(tmp_path / "out")["losses"]["validation"]] == [1, 2]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--validation-split", 0.6), "--validation-split must be in [0, 0.5)"),
        (("--validation-split", 0.1, "--validation-dir", "."), "--validation-split and --validation-dir both"),
        (("--validation-every", 0, "--validation-split", 0.1), "--validation-every must be at least 1"),
    ],
)
def test_bad_validation_settings_are_one_line_and_exit_2(cli, model, photos, tmp_path, flags, expected):
    result = cli(*base_args(model, photos, tmp_path / "out", *LORA, *flags))
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_split_that_leaves_nothing_to_train_on_and_an_empty_folder_are_refused(cli, model, tmp_path):
    one = write_photos(tmp_path / "one", count=1)
    result = cli(*base_args(model, one, tmp_path / "a", *LORA, "--validation-split", 0.4))
    assert result.exit_code == 2 and "leaves none to train on" in result.stderr
    (tmp_path / "empty").mkdir()
    result = cli(*base_args(model, one, tmp_path / "b", *LORA, "--validation-dir", tmp_path / "empty"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr
