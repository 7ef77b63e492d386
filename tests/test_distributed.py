"""Several processes (gloo on the CPU, through the real launcher): the same training as one process with the same
global batch, checkpoints that resume with another number of processes, one writer, class images made once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth.config import TrainConfig, build_train_config
from dreambooth.data import DataStream, Example
from dreambooth.distributed import Shard
from dreambooth.errors import UserError
from dreambooth.launch import launched, launcher_args, read_settings
from tests.train_helpers import base_args

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
# prior preservation (class rows in the batch, class images to make), flips, offset noise: every part of the batch
# that has to be split across processes; 4 steps, a checkpoint at step 2 to resume from
RUN = (
    "--max-train-steps", 4, "--save-interval", 2, "--learning-rate", "1e-3", "--random-flip", "--offset-noise", 0.05,
    "--with-prior-preservation", "--class-prompt", "a photo of thing", "--num-class-images", 4,
    "--sample-batch-size", 1, "--class-inference-steps", 2,
)  # fmt: skip

# Installed into the launched processes through PYTHONPATH: records which process renamed what into place. Every
# file that matters lands by os.replace (atomic writes), so this log says who wrote it.
TRACER = """
import json, os
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    with open(os.path.join(os.environ["WRITES_LOG"], f"{os.getpid()}.jsonl"), "a") as log:
        log.write(json.dumps({"rank": os.environ.get("RANK"), "dst": os.fspath(dst)}) + "\\n")
os.replace = replace
"""


def launch(tmp: Path, *args: object) -> list[dict]:
    """`dreambooth train ...` in a subprocess, as a user runs it; returns the log of files renamed into place."""
    log = tmp / "writes"
    log.mkdir(exist_ok=True)
    (tmp / "tracer").mkdir(exist_ok=True)
    (tmp / "tracer" / "sitecustomize.py").write_text(TRACER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "tracer"), os.getcwd()]), "WRITES_LOG": str(log)}
    env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "dreambooth", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for path in log.glob("*.jsonl") for line in path.read_text().splitlines()]


def train_here(*args: object) -> None:
    """`dreambooth train ...` in this process (one process needs no launcher)."""
    from dreambooth.cli import main

    try:
        main(["--debug", *map(str, args)])
    except SystemExit as exc:
        assert exc.code in (0, None)


def assert_same_training(a: Path, b: Path, base: dict) -> None:
    """Equal up to float rounding (one process sums the batch, two sum halves and average). Adam turns that rounding
    into ±lr for the few weights whose gradient is ~0 (biases a GroupNorm follows), so the bulk is compared."""
    report_a, report_b = (json.loads((out / "train_report.json").read_text()) for out in (a, b))
    assert report_a["losses"]["loss"] == pytest.approx(report_b["losses"]["loss"], abs=1e-5)
    assert report_a["losses"]["class"] == pytest.approx(report_b["losses"]["class"], abs=1e-5)
    wa, wb = (load_file(out / "checkpoints" / "step-4" / UNET) for out in (a, b))
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    moved = torch.cat([(wa[k] - base[k]).abs().flatten() for k in wa])
    assert diff.mean() < 0.01 * moved.mean()
    assert (diff > 1e-5).float().mean() < 0.01


@pytest.fixture(scope="module")
def base(model):
    return load_file(model / UNET)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model, photos):
    """One process with batch 2, and two processes with batch 1 each: the same global batch."""
    tmp = tmp_path_factory.mktemp("runs")
    one, two = tmp / "one", tmp / "two"
    train_here(*base_args(model, photos, one, *RUN, "--class-data-dir", one / "class", "--train-batch-size", 2))
    writes = launch(tmp, *base_args(model, photos, two, *RUN, "--class-data-dir", two / "class", "--num-processes", 2))
    return one, two, writes


@pytest.fixture(autouse=True)
def _no_launch_environment(monkeypatch):
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_two_processes_train_like_one_with_the_same_global_batch(runs, base):
    one, two, _ = runs
    assert_same_training(one, two, base)
    report = json.loads((two / "train_report.json").read_text())
    assert report["world_size"] == 2 and report["distributed"] == "ddp"
    assert (report["per_device_batch_size"], report["gradient_accumulation_steps"]) == (1, 1)
    assert report["global_batch_size"] == 2 and report["learning_rate"] == 1e-3
    state = torch.load(two / "checkpoints" / "step-4" / "training_state.pt", weights_only=False)
    assert (state["world_size"], state["samples_seen"]) == (2, 8)  # 4 steps × 2 examples, counted once


def test_only_the_first_process_writes_and_class_images_are_made_once(runs):
    one, two, writes = runs
    by_rank: dict[str, set[str]] = {}
    for w in writes:
        by_rank.setdefault(w["rank"], set()).add(os.path.relpath(w["dst"], two))
    classes = {rank: {p for p in paths if p.startswith("class")} for rank, paths in by_rank.items()}
    assert set(by_rank) == {"0", "1"}
    assert by_rank["1"] == classes["1"]  # the second process wrote class images and nothing else
    assert classes["0"] and classes["1"] and not classes["0"] & classes["1"]  # each made its share, none twice
    assert {"train_report.json", "checkpoints/step-2", "checkpoints/step-4"} <= by_rank["0"]
    # the same images one process makes (image i from seed + i), each once
    made = sorted(p.name for p in (two / "class").iterdir())
    assert made == sorted(p.name for p in (one / "class").iterdir()) and len(made) == 4
    # the same pictures: equal up to float rounding (each launched process computes with fewer threads, so its
    # sums add up in another order), far from what another seed draws
    pixels = {run: [np.asarray(Image.open(run / "class" / n), dtype=np.float32) for n in made] for run in (one, two)}
    for a, b in zip(pixels[one], pixels[two], strict=True):
        assert np.abs(a - b).mean() < 1.0, "a class image differs from the one-process run's"
    assert np.abs(pixels[one][0] - pixels[one][1]).mean() > 5.0  # seeds seed+0 and seed+1: really different
    assert not [p for p in two.rglob("*") if p.name.endswith(".tmp")]


def test_checkpoint_of_two_processes_resumes_with_one(cli, runs, base, model, photos, tmp_path):
    one, two, _ = runs
    out = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    args = base_args(model, photos, out, *RUN, "--class-data-dir", two / "class", "--train-batch-size", 2)
    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "written by 2 processes and continues with 1" in result.stderr
    assert_same_training(one, out, base)


def test_checkpoint_of_one_process_resumes_with_two(runs, base, model, photos, tmp_path):
    one, _, _ = runs
    out = tmp_path / "resumed"
    shutil.copytree(one / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    launch(tmp_path, *base_args(model, photos, out, *RUN, "--class-data-dir", one / "class", "--num-processes", 2))
    assert json.loads((out / "train_report.json").read_text())["world_size"] == 2
    assert_same_training(one, out, base)


# ───────────────────────────── the pieces, without launching ─────────────────────────────


def test_process_slices_of_the_stream_make_up_one_process_batches(tmp_path):
    instances = [Example(tmp_path / f"i{k}", "sks", 0) for k in range(5)]
    classes = {0: [Example(tmp_path / f"c{k}", "thing", 0) for k in range(3)]}
    whole = DataStream(instances, classes, seed=3, batch_size=4, random_flip=True)
    part = DataStream(instances, classes, seed=3, batch_size=2, random_flip=True)
    for index in range(4):
        big = whole.batch(index)
        slices = [part.at(index * 4 + rank * 2) for rank in range(2)]
        assert [e for s in slices for e in s.examples[:2]] == big.examples[:4]  # instance rows
        assert [e for s in slices for e in s.examples[2:]] == big.examples[4:]  # class rows
        assert [f for s in slices for f in s.flips[:2]] == big.flips[:4]
    # each process keeps its rows of one draw for the whole batch: instance rows, then class rows
    assert Shard.of(0, 2, 2, with_classes=True).rows.tolist() == [0, 1, 4, 5]
    assert Shard.of(1, 2, 2, with_classes=True).rows.tolist() == [2, 3, 6, 7]
    generator = torch.Generator().manual_seed(0)
    whole_draw = torch.randn((8, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(Shard.of(1, 2, 2, with_classes=True).randn(generator, 3), whole_draw[[2, 3, 6, 7]])


def test_settings_travel_to_the_processes_unchanged(tmp_path):
    cfg = build_train_config(
        None,
        {"model": tmp_path / "m", "instance_data_dir": tmp_path / "p", "instance_prompt": "sks", "output": "out",
         "save_sample_prompt": ["a", "b"], "num_processes": 2, "vae": tmp_path / "vae"},
    )  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(cfg.to_dict()))
    assert read_settings(tmp_path / "train.json") == cfg


def test_launcher_arguments(tmp_path):
    concepts = build_train_config(
        None, {"model": tmp_path, "instance_data_dir": tmp_path, "instance_prompt": "x"}
    ).concepts

    def cfg(**kw) -> TrainConfig:
        return TrainConfig(model=tmp_path, concepts=concepts, **kw)

    args = launcher_args(cfg(num_processes=8, num_machines=2, machine_rank=1, main_process_ip="10.0.0.1"), Path("s"))
    joined = " ".join(args)
    assert "--multi_gpu --num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in joined
    assert joined.endswith("--module dreambooth train-worker s")
    single = " ".join(launcher_args(cfg(num_processes=2), Path("s")))
    assert "--main_process_port 0" in single  # any free port on one machine
    with_file = " ".join(launcher_args(cfg(accelerate_config=tmp_path / "a.yaml"), Path("s")))
    assert f"--config_file {tmp_path / 'a.yaml'}" in with_file and "--multi_gpu" not in with_file


def test_processes_started_by_a_launcher_train_in_themselves(monkeypatch):
    assert not launched()
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun, accelerate launch
    assert launched()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"num_processes": 3, "num_machines": 2}, "cannot be spread evenly"),
        ({"num_processes": 2, "num_machines": 2}, "--main-process-ip"),
        ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h", "num_processes": 2}, "--machine-rank 2"),
        ({"offload_optimizer": "cpu"}, "needs DeepSpeed"),
        ({"distributed": "deepspeed-zero2", "train_text_encoder": True}, "--train-text-encoder"),
        ({"distributed": "fsdp"}, "--distributed 'fsdp'"),
        ({"num_processes": 0}, "--num-processes"),
    ],
)
def test_bad_scaling_settings_name_the_flag(tmp_path, flags, message):
    base = {"model": tmp_path, "instance_data_dir": tmp_path, "instance_prompt": "sks"}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        build_train_config(None, {**base, **flags})


def test_deepspeed_that_is_not_installed_is_an_environment_problem(cli, model, photos, tmp_path, monkeypatch):
    """Where DeepSpeed cannot be imported (a host without it): exit 3, naming the fix, before anything starts."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed → ImportError
    result = cli(*base_args(model, photos, tmp_path / "o", "--distributed", "deepspeed-zero2"))
    assert result.exit_code == 3, result.stderr
    assert "deepspeed-zero2" in result.stderr and "--distributed ddp" in result.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("zero, offload", [("deepspeed-zero2", "cpu"), ("deepspeed-zero3", "none")])
def test_deepspeed_zero_trains_like_one_process(runs, base, model, photos, tmp_path, zero, offload):
    """ZeRO-2 with Adam's states in CPU memory, and ZeRO-3 (the UNet's weights in pieces over the processes), two
    processes over gloo (DeepSpeed's CPU accelerator): the same training as one plain process with the same global
    batch; the first process writes whole weights. A ZeRO-2 checkpoint resumes without DeepSpeed (the weights are
    whole in it; Adam's moments, DeepSpeed's shards, start afresh)."""
    one, _, _ = runs
    out = tmp_path / "zero"
    args = ("--class-data-dir", one / "class", "--distributed", zero, "--offload-optimizer", offload)
    writes = launch(tmp_path, *base_args(model, photos, out, *RUN, *args, "--num-processes", 2))
    report = json.loads((out / "train_report.json").read_text())
    assert (report["distributed"], report["zero_stage"], report["offload_optimizer"]) == (
        "deepspeed",
        int(zero[-1]),
        offload,
    )
    assert (report["world_size"], report["global_batch_size"]) == (2, 2)
    # on the CPU torch's AdamW (DeepSpeed's compiled CPU Adam is tried with GPUs)
    assert report["optimizer"] == "AdamW (torch)" + (", offloaded to the CPU" if offload == "cpu" else "")
    assert_same_training(one, out, base)
    assert {w["rank"] for w in writes} == {"0"}  # class images came from the one run: only checkpoints here
    if zero != "deepspeed-zero2":
        return
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    again = ("--class-data-dir", one / "class", "--train-batch-size", 2, "--resume")
    launch(tmp_path, *base_args(model, photos, resumed, *RUN, *again))
    state = torch.load(resumed / "checkpoints" / "step-4" / "training_state.pt", weights_only=False)
    assert (state["step"], state["world_size"], state["samples_seen"]) == (4, 1, 8)


def test_accelerate_config_file_must_exist(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path / "o", "--accelerate-config", tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "--accelerate-config" in result.stderr


def test_a_lora_trains_in_two_processes_like_in_one(tmp_path, model, photos):
    """DDP over a peft-wrapped UNet and text encoder: two processes × batch 1 learn the LoRA one process learns
    with batch 2 (to float rounding), and only LoRA weights travel in the checkpoint."""
    lora = ("--adapter", "lora", "--lora-rank", 4, "--train-text-encoder", "--max-train-steps", 3,
            "--save-interval", 100, "--learning-rate", "1e-3", "--random-flip")  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(*base_args(model, photos, one, *lora, "--train-batch-size", 2))
    launch(tmp_path, *base_args(model, photos, two, *lora, "--num-processes", 2))
    report_one, report_two = (json.loads((out / "train_report.json").read_text()) for out in (one, two))
    assert report_two["world_size"] == 2 and report_two["adapter"] == "lora"
    assert report_one["losses"]["loss"] == pytest.approx(report_two["losses"]["loss"], abs=1e-5)
    for part in ("unet", "text_encoder"):
        a, b = (load_file(out / "checkpoints" / "step-3" / "lora" / f"{part}.safetensors") for out in (one, two))
        assert a.keys() == b.keys() and any("lora_B" in k for k in a)
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), (part, key)
