"""Round trips on full-size checkpoints: the real SD 1.x / 2.x key layouts and shapes, random values.

Slow (about a minute each, several GB of RAM and disk), so marked `slow`; CI runs them. Files are compared
tensor by tensor from disk, so peak RAM stays near one checkpoint. Disk is the scarcer resource on a CI machine
whose Docker images share the disk: the source file is reduced to one digest per tensor and deleted before the
export, and each file is deleted once checked, so no test holds more than two checkpoints on disk at a time (a
full-size SDXL: 13 GB, not 20).
"""

import gc
import hashlib
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.original_layouts import SD1, SD2, SDXL, SDXL_REFINER, original_state_dict, write_original_file

pytestmark = pytest.mark.slow

CASES = [  # (model type, EMA, dtype): fp32 shows bit-identity at full precision; EMA files are run at fp16
    ("sd1", False, torch.float32),  # to halve their 7-9 GB
    ("sd1", True, torch.float16),
    ("sd2", False, torch.float32),
    ("sd2-v", True, torch.float16),
]


def tensor_digest(tensor: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], str]:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest()


def file_digests(path, cast=None) -> dict[str, tuple]:
    """Each tensor's dtype, shape and sha256 (of its values cast to `cast` when it is floating point): what a file
    must hold, kept after the file itself is deleted."""
    with safe_open(path, "pt") as f:
        digests = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(key)
            if cast is not None and tensor.is_floating_point():
                tensor = tensor.to(cast)
            digests[key] = tensor_digest(tensor)
        return digests


def assert_file_holds(path, digests: dict[str, tuple]) -> None:
    """The file holds exactly these tensors, bit for bit; the file is deleted afterwards (disk, see the top)."""
    with safe_open(path, "pt") as got:
        assert sorted(got.keys()) == sorted(digests)
        for key, want in digests.items():
            assert tensor_digest(got.get_tensor(key)) == want, key
    path.unlink()


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
        want = file_digests(src)
        want_half = file_digests(src, cast=torch.float16) if dtype == torch.float32 else None
        src.unlink()
        assert cli("export", tmp_path / "d", tmp_path / "out.safetensors").exit_code == 0
        assert_file_holds(tmp_path / "out.safetensors", want)
        if want_half is not None:
            assert cli("export", tmp_path / "d", tmp_path / "half.safetensors", "--half").exit_code == 0
            assert_file_holds(tmp_path / "half.safetensors", want_half)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 10-25 GB per case: don't keep it for pytest's retention


def test_full_size_sd1_lora_trains_and_its_file_has_the_published_names(tmp_path, cli):
    """A LoRA run on the real SD 1.x shapes (random values, 64 px, 2 steps): the exported kohya file names exactly
    the golden modules (tests/golden/lora-sd1-kohya.txt), and diffusers' load_lora_weights takes every one."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    from tests.test_lora_files import golden
    from tests.train_helpers import write_photos

    src = tmp_path / "sd15.safetensors"
    try:
        save_file(original_state_dict(SD1, dtype=torch.float16), src)
        gc.collect()
        out = tmp_path / "out"
        photos = write_photos(tmp_path / "photos", count=2, size=(64, 64))
        args = ("train", "--model", src, "--instance-data-dir", photos,
                "--instance-prompt", "a photo of sks thing", "--output", out, "--resolution", 64, "--seed", 0,
                "--max-train-steps", 2, "--adapter", "lora", "--lora-rank", 4, "--train-text-encoder",
                "--export-single-file", "--cache-dir", tmp_path / "cache")  # fmt: skip
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        checkpoint_bytes = sum(p.stat().st_size for p in (out / "checkpoints" / "step-2").rglob("*") if p.is_file())
        assert checkpoint_bytes < 30 * 2**20  # rank 4: megabytes, not the UNet's gigabytes
        (exported,) = (out / "export").glob("*-lora-step-2.safetensors")
        with safe_open(exported, "pt") as f:
            modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()})  # noqa: SIM118
        assert modules == sorted(golden("lora-sd1-kohya.txt"))
        (converted,) = (tmp_path / "cache" / "converted").iterdir()
        pipe = StableDiffusionPipeline.from_pretrained(converted, dtype=torch.float16)
        pipe.load_lora_weights(exported)
        loaded = sum(isinstance(m, LoraLayer) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())
        assert loaded == len(modules)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("model_type", ["sdxl", "sdxl-refiner"])
def test_full_size_sdxl_round_trip(tmp_path, cli, model_type):
    """SDXL base 1.0 (2515 keys, 3.5 B parameters) and the refiner at their real shapes, fp16 as released: the
    file is written tensor by tensor, so the test holds about one checkpoint in memory at a time (~7 GB)."""
    import json

    from dreambooth.families.sd.spec import FAMILIES, bundled_config

    src = tmp_path / "original.safetensors"
    layout = SDXL if model_type == "sdxl" else SDXL_REFINER
    try:
        write_original_file(src, layout, schedule_buffers=False, dtype=torch.float16)
        result = cli("convert", src, tmp_path / "d")
        assert result.exit_code == 0, result.stderr
        # read off the real shapes, the configs are Stability's/diffusers' own (what shapes can tell)
        for name in FAMILIES[model_type].components:
            written = json.loads((tmp_path / "d" / name / "config.json").read_text())
            for key, value in bundled_config(model_type, name).items():
                if not key.startswith("_"):
                    assert written[key] == value, (name, key)
        want = file_digests(src)
        src.unlink()
        result = cli("export", tmp_path / "d", tmp_path / "out.safetensors")
        assert result.exit_code == 0, result.stderr
        assert_file_holds(tmp_path / "out.safetensors", want)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
