"""Every command imports only what its work needs (issue 17, item 4): `dreambooth --help` and every command's
--help load no ML library, `inspect` and `convert` of a .safetensors file load none either, and the file commands
(inspect, convert, export) and `report` never load the training stack. Checked in a fresh interpreter through the
real entry point, by what ends up in sys.modules (not by timing, which depends on the machine)."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from dreambooth.formats.convert import convert
from tests.conftest import write_original
from tests.original_layouts import SAFETENSORS_DTYPES, SD1, original_shapes

# what the training stack is: the loop, its launcher, and the libraries only training needs
TRAINING = ("dreambooth.train", "dreambooth.launch", "accelerate", "peft", "deepspeed", "bitsandbytes")
ML = ("torch", "diffusers", "transformers", "xformers", "matplotlib", "tensorboard", "wandb", *TRAINING)
COMMANDS = ("convert", "export", "inspect", "train", "run", "sample", "doctor", "demo", "report")

PROBE = """
import json, sys
from dreambooth.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def loaded_by(*args: object) -> tuple[int, set[str]]:
    """(exit code, names in sys.modules) after `dreambooth ARGS…` in a new Python process."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


def heavy(modules: set[str], names=ML) -> list[str]:
    return sorted(n for n in names if n in modules)


def test_help_loads_no_ml_library():
    code, modules = loaded_by("--help")
    assert code == 0 and heavy(modules) == []


def test_each_commands_help_loads_no_ml_library():
    """All commands' --help in one process (one interpreter start instead of nine): nothing heavy, none of them."""
    probe = PROBE.replace("main(sys.argv[1:])", "[main([c, '--help']) for c in sys.argv[1:]]")
    result = subprocess.run([sys.executable, "-c", probe, *COMMANDS], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["code"] == 0 and heavy(set(report["modules"])) == []


def test_report_of_a_run_loads_no_ml_library(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_report.json").write_text(json.dumps({"steps": 0, "settings": {}, "losses": {}}))
    code, modules = loaded_by("report", run)
    assert code == 0 and heavy(modules) == []


def write_sparse_sd1(path) -> None:
    """A full-size SD 1.5 fp16 file (the real keys and shapes, 2.1 GB) of zeros, as a sparse file: no disk, no time.
    Full size, because the shapes of the released architectures are what ship (dreambooth/assets/shapes/): a tiny
    model's are read off a model built with diffusers."""
    header, offset = {}, 0
    for key, (shape, kind) in original_shapes(SD1).items():
        dtype = SAFETENSORS_DTYPES[torch.float16 if kind.is_floating_point else kind]
        size = math.prod(shape) * (2 if kind.is_floating_point else kind.itemsize)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def file_commands(tmp_path_factory) -> dict[str, set[str]]:
    """inspect and convert of a full-size SD 1.5 file, export of a tiny model, each in its own process:
    command → modules loaded."""
    folder = tmp_path_factory.mktemp("startup")
    write_sparse_sd1(folder / "sd15.safetensors")
    convert(write_original(folder / "tiny-sd1.safetensors", "sd1"), folder / "tiny")
    loaded = {}
    for args in (
        ("inspect", folder / "sd15.safetensors"),
        ("convert", folder / "sd15.safetensors", folder / "model", "--model-type", "sd1"),
        ("export", folder / "tiny", folder / "o.safetensors"),
    ):
        code, loaded[args[0]] = loaded_by(*args)
        assert code == 0, args
    shutil.rmtree(folder / "model")  # 2.1 GB
    return loaded


def test_file_commands_never_load_the_training_loop(file_commands):
    for command, modules in file_commands.items():
        assert heavy(modules, ("dreambooth.train", "dreambooth.launch", "deepspeed")) == [], command


def test_file_commands_load_none_of_accelerate_peft_bitsandbytes(file_commands):
    for command, modules in file_commands.items():
        assert heavy(modules, TRAINING) == [], f"dreambooth {command} imports {heavy(modules, TRAINING)}"


def test_convert_and_inspect_of_a_safetensors_file_load_no_ml_library(file_commands):
    """Converting renames tensors and copies their bytes (checkpoint/tensorfile.py): no torch, no diffusers.
    Importing torch alone takes longer than copying a 2 GB model (bench/results/convert-process-*.json)."""
    for command in ("inspect", "convert"):
        assert heavy(file_commands[command]) == [], f"dreambooth {command} imports {heavy(file_commands[command])}"
