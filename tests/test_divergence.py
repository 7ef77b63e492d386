"""A run that diverges stops at once with one line, exit 2, and never writes or keeps a broken checkpoint."""

import json

import torch
from safetensors.torch import load_file

from tests.train_helpers import base_args


def _finite(folder) -> bool:
    return all(torch.isfinite(t).all() for p in folder.rglob("*.safetensors") for t in load_file(p).values())


def test_a_learning_rate_that_blows_up_stops_the_run_and_keeps_the_last_good_checkpoint(cli, model, photos, tmp_path):
    out = tmp_path / "out"
    flags = ("--max-train-steps", 30, "--save-interval", 1, "--keep-last", 1, "--learning-rate", "1e6",
             "--max-grad-norm", 0)  # fmt: skip
    result = cli(*base_args(model, photos, out, *flags))
    assert result.exit_code == 2, result.stderr
    assert "training diverged at step" in result.stderr or "training diverged by step" in result.stderr
    assert "--learning-rate" in result.stderr and "Traceback" not in result.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["stopped"]["reason"] == "diverged" and report["steps"] < 30
    # every checkpoint left is finite, and --keep-last did not prune the last good one away
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert checkpoints, "the last good checkpoint is gone"
    assert all(_finite(c) for c in checkpoints)
