"""`--ema-decay`: the average of the trained weights, what checkpoints and exports hold, and resume."""

import json

import pytest
import torch

from dreambooth.ema import EMA, trained_parameters
from dreambooth.families.base import Dtypes, ResolvedModel
from tests.train_helpers import base_args, straight_and_resumed

LORA = ("--adapter", "lora", "--lora-rank", 4, "--save-interval", 100, "--learning-rate", "1e-2")


def test_the_average_follows_the_formula_and_the_start_step():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": p}, decay=0.9, device=torch.device("cpu"), start_step=1)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update(step)
        expected = torch.full((3,), value) if step <= 1 else 0.9 * expected + 0.1 * value
        assert torch.allclose(ema.shadow["w"], expected)
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow["w"])
    assert torch.equal(p.detach(), torch.full((3,), 3.0))  # the raw weights are back


def trained_state(model, checkpoint):
    """The weights a checkpoint's files give (the adapter's own restore), by the EMA's names."""
    from dreambooth import adapters, families
    from dreambooth.launch import read_settings

    state = torch.load(checkpoint / "training_state.pt", weights_only=False)
    (checkpoint.parent / "settings.json").write_text(json.dumps(state["config"]))
    cfg = read_settings(checkpoint.parent / "settings.json")
    family = families.of_folder(model)
    c = family.load(ResolvedModel.of_folder(model), Dtypes(torch.float32, torch.float32, torch.float32))
    adapter = adapters.get(cfg.adapter)
    trained = adapter.prepare(c, cfg, family)
    adapter.restore(c, checkpoint, state)
    return {k: v.detach() for k, v in trained_parameters(trained).items()}, state


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_a_checkpoint_holds_the_average_and_its_state_the_raw_weights(cli, model, photos, tmp_path, adapter):
    flags = (*LORA, "--max-train-steps", 3, "--ema-decay", 0.5)
    if adapter == "full":
        flags = ("--adapter", "full", "--learning-rate", "1e-3", "--max-train-steps", 3, "--ema-decay", 0.5)
    result = cli(*base_args(model, photos, tmp_path / "out", *flags))
    assert result.exit_code == 0, result.stderr
    files, state = trained_state(model, tmp_path / "out" / "checkpoints" / "step-3")
    assert files.keys() == state["ema"].keys() == state["raw_weights"].keys()
    assert all(torch.equal(files[k], state["ema"][k]) for k in files)  # what export and sample read
    assert any(not torch.equal(files[k], state["raw_weights"][k]) for k in files)
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["ema"]["decay"] == 0.5 and report["ema"]["checkpoints_hold"] == "the average"


def test_without_export_ema_the_files_are_the_raw_weights(cli, model, photos, tmp_path):
    flags = (*LORA, "--max-train-steps", 3, "--ema-decay", 0.5, "--no-export-ema")
    assert cli(*base_args(model, photos, tmp_path / "out", *flags)).exit_code == 0
    files, state = trained_state(model, tmp_path / "out" / "checkpoints" / "step-3")
    assert state["raw_weights"] is None and state["ema"] is not None
    assert any(not torch.equal(files[k], state["ema"][k]) for k in files)


def test_the_exported_lora_is_the_average(cli, model, photos, tmp_path):
    from safetensors.torch import load_file

    for name, extra in (("ema", ("--ema-decay", 0.5)), ("raw", ())):
        assert cli(*base_args(model, photos, tmp_path / name, *LORA, "--max-train-steps", 3, *extra)).exit_code == 0
        assert (
            cli("export", tmp_path / name / "checkpoints" / "step-3", tmp_path / f"{name}.safetensors").exit_code == 0
        )
    ema, raw = load_file(tmp_path / "ema.safetensors"), load_file(tmp_path / "raw.safetensors")
    assert ema.keys() == raw.keys()
    # the same training (the average changes nothing of it): only the weights written differ
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if "lora_up" in k)


def test_a_run_with_an_average_resumes_bit_identically(cli, model, photos, tmp_path, monkeypatch):
    flags = (*LORA, "--max-train-steps", 4, "--ema-decay", 0.7, "--ema-start-step", 1, "--random-flip")
    straight_and_resumed(cli, monkeypatch, model, photos, tmp_path, flags, stop_at=2)
    states = [
        torch.load(tmp_path / r / "checkpoints" / "step-4" / "training_state.pt", weights_only=False) for r in "ab"
    ]
    for key in ("ema", "raw_weights"):
        a, b = (s[key] for s in states)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--ema-decay", 1.5), "--ema-decay must be between 0 and 1"),
        (("--export-ema",), "--export-ema needs --ema-decay"),
        (("--ema-decay", 0.9, "--ema-start-step", -1), "--ema-start-step must not be negative"),
    ],
)
def test_bad_ema_settings_are_one_line_and_exit_2(cli, model, photos, tmp_path, flags, expected):
    result = cli(*base_args(model, photos, tmp_path / "out", *LORA, *flags))
    assert result.exit_code == 2 and expected in result.stderr and "Traceback" not in result.stderr
