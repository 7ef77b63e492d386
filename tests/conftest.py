"""Shared fixtures: tiny original-layout checkpoints built in code, and a way to run the CLI in-process."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.original_layouts import TINY_SD1, TINY_SD2, original_state_dict
from tests.train_helpers import tiny_model, write_photos

# Tests never touch a network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

LAYOUTS = {"sd1": TINY_SD1, "sd2": TINY_SD2}


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run `dreambooth ARGS…` through the real entry point (error handling included), capture its output."""
    from dreambooth.cli import main

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def write_original(path: Path, family: str, *, ema: bool = False, dtype=torch.float32, metadata=None, seed=0) -> Path:
    state = original_state_dict(LAYOUTS[family], ema=ema, dtype=dtype, seed=seed)
    if path.suffix == ".safetensors":
        save_file(state, path, metadata=metadata)
    else:
        torch.save({"state_dict": state}, path)
    return path


@pytest.fixture
def tiny_sd1(tmp_path) -> Path:
    return write_original(tmp_path / "tiny-sd1.safetensors", "sd1")


@pytest.fixture
def tiny_sd2(tmp_path) -> Path:
    return write_original(tmp_path / "tiny-sd2.safetensors", "sd2")


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A tiny random diffusers model, built once: the base model of the training tests (none writes into it)."""
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """Three small subject photos (test_train_loop uses four of its own)."""
    return write_photos(tmp_path_factory.mktemp("photos") / "sks", count=3)
