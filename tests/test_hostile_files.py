"""Hostile files: each is one line naming the file, exit 2, with nothing run and nothing large allocated first."""

import json
import resource
import struct
import time
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
    assert_user_error(cli("inspect", src), str(src), "claims 4,398,046,511,104 bytes", "holds 16")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000


def legacy_claiming(path, elements: int):
    """A legacy-format .ckpt of 4 float zeros whose pickle then claims `elements` of them for the storage."""
    torch.save({"state_dict": {"w": torch.zeros(4)}}, path, _use_new_zipfile_serialization=False)
    blob = path.read_bytes()
    # the storage record ('storage', FloatStorage, key, 'cpu', 4, None) ends with BININT1 4, NONE, TUPLE
    assert blob.count(b"K\x04Nt") == 1
    path.write_bytes(blob.replace(b"K\x04Nt", b"\x8a\x06" + elements.to_bytes(6, "little") + b"Nt"))
    return path


def test_legacy_ckpt_that_claims_a_huge_storage_is_refused_before_torch_allocates_it(tmp_path, cli):
    """torch's legacy loader allocates `UntypedStorage(nbytes)` from the pickle's claim: 4 TiB here. The pre-scan
    refuses it first (the file has a few hundred bytes)."""
    src = legacy_claiming(tmp_path / "huge.ckpt", 2**40)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in ("inspect", "convert"):
        result = cli(command, src, *([tmp_path / "d"] if command == "convert" else []))
        assert_user_error(result, str(src), "its tensors claim 4,398,046,511,104 bytes", "and the file has")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000
    assert not (tmp_path / "d").exists()


def test_the_pre_scan_finds_a_global_before_torch_does(tmp_path, cli, monkeypatch):
    """A global off the allow-list is refused by the pickletools scan itself: torch.load is never called."""

    def never(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", never)
    for zipped, protocol in ((True, 2), (False, 2), (True, 4)):  # 4: STACK_GLOBAL, names pushed as strings
        src = tmp_path / f"evil-{zipped}-{protocol}.ckpt"
        state = {"state_dict": {"w": torch.ones(1)}, "x": Payload(tmp_path / "pwned")}
        torch.save(state, src, _use_new_zipfile_serialization=zipped, pickle_protocol=protocol)
        assert_user_error(cli("inspect", src), str(src), "references `posix.system`", "not on the allow-list")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_the_pre_scan_lets_an_honest_ckpt_through(tmp_path, zipped):
    from dreambooth.checkpoint.load import load_checkpoint, prescan_pickle_checkpoint

    src = tmp_path / "honest.ckpt"
    state = {"w": torch.arange(6.0).reshape(2, 3), "h": torch.ones(3, dtype=torch.float16), "i": torch.tensor([7])}
    torch.save({"state_dict": state, "global_step": 5}, src, _use_new_zipfile_serialization=zipped)
    prescan_pickle_checkpoint(src)
    loaded = load_checkpoint(src)
    assert all(torch.equal(loaded.tensors[k], v) for k, v in state.items())
    # a view shares its storage: counted once, not per tensor
    base = torch.zeros(100)
    torch.save({"a": base[:50], "b": base[50:]}, src, _use_new_zipfile_serialization=zipped)
    prescan_pickle_checkpoint(src)


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


# ── odd folders and files: symbolic links that loop or lead nowhere, configs that are not UTF-8 ──


def test_symlink_loops_and_dangling_links_in_an_image_folder_are_skipped_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "real.png")
    (folder / "self.png").symlink_to("self.png")  # a link to itself
    (folder / "ping.png").symlink_to("pong.png")  # two links to each other
    (folder / "pong.png").symlink_to("ping.png")
    (folder / "gone.png").symlink_to(tmp_path / "outside" / "missing.png")  # out of the folder, to nothing
    (folder / "loop.png").symlink_to(folder)  # a folder named like an image, and a loop of folders
    (folder / "sub").symlink_to(".")
    started = time.monotonic()
    images = data.check_instance_dir(folder, 64, "--instance-data-dir")
    assert images == [folder / "real.png"] and time.monotonic() - started < 10
    err = " ".join(capsys.readouterr().err.split())
    for name in ("self.png", "ping.png", "pong.png"):
        assert f"skipping {folder / name} (--instance-data-dir): a symbolic link that loops" in err
    assert f"{folder / 'gone.png'} (--instance-data-dir): a symbolic link to {tmp_path}/outside/missing.png, which" \
           " does not exist" in err  # fmt: skip
    assert "Traceback" not in err


def test_a_folder_of_only_broken_links_is_one_line(tmp_path, cli):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").symlink_to("a.png")
    result = cli("train", "--model", tmp_path / "m", "--instance-data-dir", folder, "--instance-prompt", "a sks dog",
                 "--output", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"--instance-data-dir {folder} has no usable images" in result.stderr


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_run_toml_that_is_not_utf8_is_one_line(tmp_path, cli, command):
    config = tmp_path / "run.toml"
    config.write_bytes('instance_prompt = "a photo of sks dög"\n'.encode("latin-1"))
    assert_user_error(cli(command, "--config", config), f"--config {config}: not UTF-8 text", "save the file as UTF-8")


def test_a_concepts_list_that_is_not_utf8_is_one_line(tmp_path, cli):
    concepts = tmp_path / "concepts_list.json"
    concepts.write_bytes('[{"instance_prompt": "a photo of sks dög", "instance_data_dir": "x"}]'.encode("latin-1"))
    result = cli("train", "--concepts-list", concepts, "--model", tmp_path / "m", "--output", tmp_path / "out")
    assert_user_error(result, f"--concepts-list {concepts}", "codec can't decode")
