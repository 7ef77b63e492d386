"""Hostile files: each is one line naming the file, exit 2, with nothing run and nothing large allocated first."""

import json
import resource
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import data
from dreambooth.errors import UserError
from tests.test_bad_input import Payload, assert_user_error


def safetensors_bytes(header: dict, payload: bytes = b"", *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + payload


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


LYING_HEADERS = {
    "header longer than the file": (safetensors_bytes({"w": f32([2], 0, 8)}, bytes(8), length=10**9), "claims"),
    "header not JSON": (struct.pack("<Q", 12) + b"{not json!!}" + bytes(8), "not JSON"),
    "header a JSON list": (safetensors_bytes([1, 2]), "not an object"),  # type: ignore[arg-type]
    "offsets past the end": (safetensors_bytes({"w": f32([4], 0, 16)}, bytes(8)), "outside the 8 data bytes"),
    "offsets reversed": (safetensors_bytes({"w": f32([0], 8, 0)}, bytes(8)), "outside"),
    "offsets overlap": (
        safetensors_bytes({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12)),
        "share bytes",
    ),
    "offsets not dtype x shape": (safetensors_bytes({"w": f32([3], 0, 8)}, bytes(8)), "needs 12 bytes"),
    "unknown dtype": (
        safetensors_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "dtype 'F128'",
    ),
    "absurd shape": (safetensors_bytes({"w": f32([2**20, 2**20], 0, 8)}, bytes(8)), "1,099,511,627,776 elements"),
    "negative shape": (safetensors_bytes({"w": f32([-1], 0, 8)}, bytes(8)), "not a list of sizes"),
    "metadata not strings": (safetensors_bytes({"__metadata__": {"a": 1}, "w": f32([2], 0, 8)}, bytes(8)), "strings"),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_safetensors_header_that_lies(tmp_path, cli, case, command):
    blob, needle = LYING_HEADERS[case]
    src = tmp_path / "m.safetensors"
    src.write_bytes(blob)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = cli(command, src, *([tmp_path / "d"] if command == "convert" else []))
    assert_user_error(result, str(src), needle)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing large allocated
    assert not (tmp_path / "d").exists()


def test_header_that_lies_in_a_diffusers_folder_and_a_vae_file(tmp_path, cli, tiny_sd1):
    assert cli("convert", tiny_sd1, tmp_path / "d").exit_code == 0
    weights = tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(LYING_HEADERS["offsets overlap"][0])
    assert_user_error(cli("export", tmp_path / "d", tmp_path / "o.safetensors"), "unet weights", "share bytes")
    assert not (tmp_path / "o.safetensors").exists()
    vae = tmp_path / "vae.safetensors"
    vae.write_bytes(LYING_HEADERS["absurd shape"][0])
    assert_user_error(cli("convert", tiny_sd1, tmp_path / "e", "--vae", vae), "vae.safetensors", "elements")


def test_an_honest_file_still_loads(tmp_path, cli, tiny_sd1):
    assert cli("inspect", tiny_sd1).exit_code == 0


# ── pickles: any global beyond the allow-list is refused, in both .ckpt containers ──


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "payload", [lambda marker: Payload(marker), lambda marker: np.random.default_rng(0)], ids=["os.system", "numpy"]
)
def test_pickle_with_a_global_beyond_the_allow_list(tmp_path, cli, zipped, payload):
    marker = tmp_path / "pwned"
    state = {"state_dict": {"model.diffusion_model.x": torch.ones(1)}, "extra": payload(marker)}
    src = tmp_path / "evil.ckpt"
    torch.save(state, src, _use_new_zipfile_serialization=zipped)
    result = cli("inspect", src)
    assert_user_error(result, str(src), "refusing", "references `")
    assert not marker.exists()


def test_a_plain_pickle_renamed_ckpt(tmp_path, cli):
    import pickle

    src = tmp_path / "raw.ckpt"
    for protocol in (2, 4):  # 4: torch's unpickler refuses its FRAME opcode before it reaches the global
        src.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(tmp_path / "pwned")}, protocol=protocol))
        assert_user_error(cli("inspect", src), str(src), "refusing")
    assert not (tmp_path / "pwned").exists()


def test_zip_ckpt_that_claims_a_huge_storage(tmp_path, cli):
    """The pickle inside says 2**40 elements; the record holds 16 bytes: refused without allocating them."""
    small = tmp_path / "small.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4)}}, small)
    big = b"\x8a\x06" + (2**40).to_bytes(6, "little")  # LONG1: 2**40
    src = tmp_path / "huge.ckpt"
    with zipfile.ZipFile(small) as zin, zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                blob = blob.replace(b"K\x04t", big + b"t").replace(b"K\x04\x85", big + b"\x85")
            zout.writestr(info, blob)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert_user_error(cli("inspect", src), str(src), "not a readable PyTorch checkpoint")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


# ── images ──


def png_claiming(path, width: int, height: int):
    """A real 8×8 PNG whose header then claims width × height (CRC fixed, so only the size lies)."""
    import zlib

    Image.new("RGB", (8, 8), "red").save(path)
    blob = bytearray(path.read_bytes())
    ihdr = blob.index(b"IHDR")
    blob[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    blob[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(blob[ihdr : ihdr + 17])))
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize(
    ("width", "height", "why"),
    [(100_000, 100_000, "DecompressionBomb"), (10_000, 10_000, "DecompressionBomb"), (600, 600, "")],
    ids=["bomb", "over-the-warning-limit", "lies-about-its-size"],
)
def test_an_image_that_lies_is_skipped_with_one_line(tmp_path, capsys, width, height, why):
    folder = tmp_path / "photos"
    folder.mkdir()
    png_claiming(folder / "a.png", width, height)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="has no usable images"):
        data.check_instance_dir(folder, 64, "--instance_data_dir")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000
    warning = capsys.readouterr().err.strip()
    assert "skipping" in warning and "a.png" in warning and why in warning
    assert len([line for line in warning.splitlines() if line.strip()]) <= 2, warning  # one line (rich may wrap)
