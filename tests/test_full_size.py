"""Round trips on full-size checkpoints: the real SD 1.x / 2.x key layouts and shapes, random values.

Slow (about a minute each, several GB of RAM and disk), so marked `slow`; CI runs them. Files are compared
tensor by tensor from disk, and each test deletes its files, so peak RAM stays near one checkpoint.
"""

import gc
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.original_layouts import SD1, SD2, original_state_dict

pytestmark = pytest.mark.slow

CASES = [  # (model type, EMA, dtype): fp32 shows bit-identity at full precision; EMA files are run at fp16
    ("sd1", False, torch.float32),  # to halve their 7-9 GB
    ("sd1", True, torch.float16),
    ("sd2", False, torch.float32),
    ("sd2-v", True, torch.float16),
]


def assert_files_equal(got_path, want_path, cast=None) -> None:
    with safe_open(got_path, "pt") as got, safe_open(want_path, "pt") as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want.keys():  # noqa: SIM118 (safe_open is not a dict)
            expected = want.get_tensor(key)
            if cast is not None and expected.is_floating_point():
                expected = expected.to(cast)
            actual = got.get_tensor(key)
            assert actual.dtype == expected.dtype and actual.shape == expected.shape, key
            assert torch.equal(actual, expected), key


@pytest.mark.parametrize(("model_type", "ema", "dtype"), CASES, ids=lambda v: str(v).removeprefix("torch."))
def test_full_size_round_trip(tmp_path, cli, model_type, ema, dtype):
    layout = SD1 if model_type == "sd1" else SD2
    src = tmp_path / "original.safetensors"
    try:
        state = original_state_dict(layout, ema=ema, dtype=dtype)
        save_file(state, src)
        del state
        gc.collect()

        result = cli("convert", src, tmp_path / "d", "--model-type", model_type)
        assert result.exit_code == 0, result.stderr
        assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
        assert_files_equal(tmp_path / "out.safetensors", src)
        if dtype == torch.float32:
            assert cli("export", tmp_path / "d", tmp_path / "half.safetensors", "--half").exit_code == 0
            assert_files_equal(tmp_path / "half.safetensors", src, cast=torch.float16)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 10-25 GB per case: don't keep it for pytest's retention
