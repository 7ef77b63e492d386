"""Every bad input: one line naming the file and the fix, exit code 2, and no partial output left behind."""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import write_original


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def _truncated(tmp_path, suffix):
    src = write_original(tmp_path / f"full{suffix}", "sd1")
    data = src.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    return tmp_path / f"cut{suffix}"


def _write(path, data):
    if isinstance(data, dict):
        save_file(data, path)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda p: p / "nope.safetensors", "does not exist"),
    "directory": (lambda p: p, "is a folder"),
    "empty": (lambda p: _write(p / "e.ckpt", b""), "is empty"),
    "truncated-safetensors": (lambda p: _truncated(p, ".safetensors"), "truncated or corrupt"),
    "truncated-ckpt": (lambda p: _truncated(p, ".ckpt"), "truncated or corrupt"),
    "random-bytes": (lambda p: _write(p / "r.ckpt", os.urandom(4096)), "neither"),
    "json": (lambda p: _write(p / "m.safetensors", json.dumps({"a": 1})), "JSON"),
    "lora": (
        lambda p: (
            save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.ones(4, 4)}, p / "l.safetensors")
            or p / "l.safetensors"
        ),
        "LoRA",
    ),
    "sdxl": (
        lambda p: (
            save_file({"conditioner.embedders.0.transformer.x": torch.ones(2)}, p / "xl.safetensors")
            or p / "xl.safetensors"
        ),
        "SDXL",
    ),
    "vae-only": (
        lambda p: (
            save_file({"encoder.down.0.block.0.conv1.weight": torch.ones(2)}, p / "v.safetensors")
            or p / "v.safetensors"
        ),
        "not a Stable Diffusion",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_source_is_one_line_exit_2_and_leaves_nothing(tmp_path, cli, case):
    make, needle = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    src = make(tmp_path / "in")
    dest = tmp_path / "out"
    result = cli("convert", src, dest)
    assert_user_error(result, needle)
    assert str(src.name) in result.stderr or case == "directory"
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


def test_non_empty_destination_needs_overwrite(tmp_path, cli, tiny_sd1):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert_user_error(cli("convert", tiny_sd1, dest, "--model-type", "sd1"), "not empty", "--overwrite")
    assert (dest / "keep.txt").read_text() == "mine"

    assert cli("convert", tiny_sd1, dest, "--model-type", "sd1", "--overwrite").exit_code == 0
    assert not (dest / "keep.txt").exists() and (dest / "model_index.json").is_file()


def test_wrong_model_type_flag_is_named(tmp_path, cli, tiny_sd1):
    assert_user_error(cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd2-v"), "--model-type")


def test_export_of_an_incomplete_folder(tmp_path, cli, tiny_sd1):
    assert cli("convert", tiny_sd1, tmp_path / "d", "--model-type", "sd1").exit_code == 0
    (tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert_user_error(cli("export", tmp_path / "d", tmp_path / "o.safetensors"), "incomplete", "vae")
    assert not (tmp_path / "o.safetensors").exists()
    assert_user_error(cli("export", tmp_path / "nothing", tmp_path / "o.safetensors"), "does not exist")
    assert_user_error(cli("export", tmp_path / "d", tmp_path / "o.bin"), "unknown file type")


class Payload:
    """Unpickling this would create a marker file — if the loader ever executed it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_pickle_never_runs(tmp_path, cli):
    marker = tmp_path / "pwned"
    state = {"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "payload": Payload(marker)}
    torch.save(state, tmp_path / "evil.ckpt")
    result = cli("convert", tmp_path / "evil.ckpt", tmp_path / "d")
    assert_user_error(result, "refusing", "system")
    assert not marker.exists()
    assert not (tmp_path / "d").exists()


def test_real_sd1_ckpt_structure_loads(tmp_path, cli):
    """Released SD 1.x .ckpt files pickle Lightning's ModelCheckpoint class and numpy scalars besides tensors."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names[:-1]:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[names[-1]] = module
    try:
        from tests.original_layouts import TINY_SD1, original_state_dict

        checkpoint = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": original_state_dict(TINY_SD1),
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1), "monitor": np.float32(0.2)}},
        }
        torch.save(checkpoint, tmp_path / "sd.ckpt", pickle_protocol=2)  # protocol 2, as the releases used
    finally:
        for name in names:
            sys.modules.pop(name, None)

    assert "pytorch_lightning" not in sys.modules
    result = cli("inspect", tmp_path / "sd.ckpt", "--json", "--model-type", "sd1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "sd1" and report["other_entries"]["global_step"] == 470000
    assert "pytorch_lightning" not in sys.modules  # stood in for, never imported


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    """One safetensors file in 256 has a header length whose low byte is 0x80, a pickle's first byte."""
    import torch
    from safetensors.torch import save_file

    from dreambooth.checkpoint.load import sniff_format

    for pad in range(256):
        path = tmp_path / f"m{pad}.safetensors"
        save_file({"w": torch.zeros(2)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        raise AssertionError("no padding gave a header length with low byte 0x80")
    assert sniff_format(path) == "safetensors"
    pickled = tmp_path / "m.ckpt"
    torch.save({"w": torch.zeros(2)}, pickled, _use_new_zipfile_serialization=False)
    assert sniff_format(pickled) == "pickle"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--no-such-flag"], "No such option: --no-such-flag"),
        (["train", "--max-train-steps", "many"], "Invalid value for '--max-train-steps'"),
        (["nonsense"], "No such command"),
    ],
)
def test_usage_errors_are_one_message_and_exit_2_not_a_traceback(argv, message, capsys):
    """What the console script does (not CliRunner, which catches these itself): typer's own click raises them."""
    from dreambooth.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and "Traceback" not in err
