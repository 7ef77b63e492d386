"""Stopping and resuming: a run stopped at step k and resumed ends bit-identical to one that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.train_helpers import base_args, sigterm_at_step

# everything that draws random numbers or carries state across steps, all at once
HARD = (
    "--max-train-steps", 6, "--learning-rate", "1e-3", "--train-batch-size", 2, "--save-interval", 100,
    "--train-text-encoder", "--random-flip", "--gradient-accumulation-steps", 2, "--lr-scheduler", "cosine",
    "--lr-warmup-steps", 2, "--offset-noise", 0.05, "--snr-gamma", 5, "--save-fp16", "--no-cache-latents",
)  # fmt: skip


def _master_weights(out, step):
    state = torch.load(out / "checkpoints" / f"step-{step}" / "training_state.pt", weights_only=False)
    return state["master_weights"]


def test_stopped_and_resumed_run_is_bit_identical(cli, model, photos, tmp_path, monkeypatch):
    straight = cli(*base_args(model, photos, tmp_path / "a", *HARD))
    assert straight.exit_code == 0, straight.stderr

    sigterm_at_step(monkeypatch, 3)
    stopped = cli(*base_args(model, photos, tmp_path / "b", *HARD))
    assert stopped.exit_code == 130
    assert (tmp_path / "b" / "checkpoints" / "step-3" / "training_state.pt").is_file()
    monkeypatch.undo()
    resumed = cli(*base_args(model, photos, tmp_path / "b", *HARD))
    assert resumed.exit_code == 0, resumed.stderr

    a, b = _master_weights(tmp_path / "a", 6), _master_weights(tmp_path / "b", 6)
    for part in ("unet", "text_encoder"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    report_a = json.loads((tmp_path / "a" / "train_report.json").read_text())
    report_b = json.loads((tmp_path / "b" / "train_report.json").read_text())
    assert report_a["losses"] == report_b["losses"]
    # the saved files are fp16 (--save-fp16); the exact fp32 weights travel in the training state
    unet_file = load_file(tmp_path / "b" / "checkpoints" / "step-6" / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet_file["conv_in.weight"].dtype == torch.float16


def test_resume_flag_without_a_checkpoint_is_an_error(cli, model, photos, tmp_path):
    result = cli(*base_args(model, photos, tmp_path / "o", "--resume"))
    assert result.exit_code == 2 and "--resume" in result.stderr


def test_sigterm_saves_a_resumable_checkpoint_and_exits_130(model, photos, tmp_path):
    out = tmp_path / "out"
    args = [str(a) for a in base_args(model, photos, out, "--max-train-steps", 100000, "--save-interval", 100000)]
    command = [sys.executable, "-c", "from dreambooth.cli import main; main()", "--log-format", "json", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "train_step" and event["step"] >= 2:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "training did not start"
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    events_after = [json.loads(line) for line in rest.splitlines()]
    saved = [e for e in events_after if e["event"] == "checkpoint_saved"]
    assert len(saved) == 1
    step = saved[0]["step"]
    state = torch.load(out / "checkpoints" / f"step-{step}" / "training_state.pt", weights_only=False)
    assert state["step"] == step
    # and the same command picks it up (here asked to stop two steps later)
    args = [str(a) for a in base_args(model, photos, out, "--max-train-steps", step + 2, "--resume")]
    done = subprocess.run([sys.executable, "-c", "from dreambooth.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out / 'checkpoints' / f'step-{step}'}" in done.stderr
    assert json.loads((out / "train_report.json").read_text())["steps"] == step + 2


# Installed into the training subprocess through PYTHONPATH: SIGKILL (no handler, no cleanup) at one instant of
# writing checkpoint step-2, which is assembled in a hidden `.step-2.*.tmp` folder and renamed into place.
KILLER = """
import os, signal
import safetensors.torch, torch
point = os.environ["KILL_AT"]
def killing(name, real, is_it):
    def wrapper(*args, **kwargs):
        if point == name and is_it(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
safetensors.torch.save_file = killing("weights", safetensors.torch.save_file, lambda t, f, *a: ".step-2." in str(f))
torch.save = killing("state", torch.save, lambda o, f, *a: ".step-2." in str(f))
os.replace = killing("rename", os.replace, lambda s, d, *a: str(d).endswith("step-2") and ".step-2." in str(s))
"""


@pytest.mark.parametrize("point", ["weights", "state", "rename"])
def test_a_kill_while_saving_never_spoils_the_last_finished_checkpoint(model, photos, tmp_path, point):
    (tmp_path / "killer").mkdir()
    (tmp_path / "killer" / "sitecustomize.py").write_text(KILLER)
    run = [*base_args(model, photos, tmp_path / "out", "--max-train-steps", 3, "--save-interval", 1)]
    command = [sys.executable, "-c", "from dreambooth.cli import main; main()", *map(str, run)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "killer"), os.getcwd()]), "KILL_AT": point}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    from dreambooth.checkpoints import latest_checkpoint

    last = latest_checkpoint(tmp_path / "out")
    assert last == tmp_path / "out" / "checkpoints" / "step-1"  # the half-written step-2 is not taken for one
    assert not (tmp_path / "out" / "checkpoints" / "step-2").exists()
    assert torch.load(last / "training_state.pt", weights_only=False)["step"] == 1
    load_file(last / "unet" / "diffusion_pytorch_model.safetensors")

    # the same command again resumes from step 1 and ends where an uninterrupted run ends
    env.pop("KILL_AT")
    resumed = subprocess.run(command, env={**env, "KILL_AT": "none"}, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "step 1" in resumed.stderr
    straight = tmp_path / "straight"
    run = [*base_args(model, photos, straight, "--max-train-steps", 3, "--save-interval", 1)]
    done = subprocess.run([*command[:3], *map(str, run)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (load_file(o / "checkpoints" / "step-3" / "unet" / "diffusion_pytorch_model.safetensors")
            for o in (tmp_path / "out", straight))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)
    leftovers = [p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == [] or all(name.endswith(".tmp") for name in leftovers)  # the killed run's scratch only
