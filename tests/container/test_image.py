"""The built image, driven with docker from the host, as users run it (`make test-container` runs these).

Each test starts real containers of DREAMBOOTH_TEST_IMAGE_RUNTIME (`make` sets it to the image it just built):
not root, no network, read-only /models and /data, the built-in demo when nothing is configured, `docker stop`
in the middle of training, and what a missing GPU looks like.
"""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

IMAGE = os.environ.get("DREAMBOOTH_TEST_IMAGE_RUNTIME")
DOCKER = os.environ.get("DOCKER", "docker")
pytestmark = pytest.mark.skipif(not IMAGE, reason="container tests: run them with `make test-container`")

# the demo, shrunk to seconds: every stage still runs
QUICK = ["--max-train-steps", "4", "--save-interval", "2", "--num-class-images", "2", "--class-inference-steps", "2",
         "--save-infer-steps", "2", "--n-save-sample", "1"]  # fmt: skip
STAGES = ("convert", "classes", "train", "export")


@pytest.fixture
def volumes(tmp_path) -> dict[str, Path]:
    """Host folders for the four volumes, owned by the container's user (1000:0) when we are root."""
    dirs = {name: tmp_path / name for name in ("models", "data", "output", "cache")}
    for path in dirs.values():
        path.mkdir()
        if os.getuid() == 0:
            os.chown(path, 1000, 0)
    return dirs


def user() -> str:
    """Never root: as root here, the image's own user; otherwise the host's uid (as `make` does)."""
    return "1000:0" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def docker_run(
    volumes: dict[str, Path], *args: str, env: dict | None = None, detach: bool = False, name=None, entrypoint=None
):
    # --shm-size as compose.yaml sets it (several training processes exchange gradients through /dev/shm)
    command = [DOCKER, "run", "--network", "none", "--user", user(), "--shm-size", "1g"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    command += ["-d"] if detach else ["--rm"]
    if name:
        command += ["--name", name]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    for name_, path in volumes.items():
        mode = ":ro" if name_ in ("models", "data") else ""
        command += ["-v", f"{path}:/{name_}{mode}"]
    return subprocess.run([*command, IMAGE, *args], capture_output=True, text=True, timeout=600)


def manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


def test_demo_runs_as_non_root_with_read_only_inputs_and_a_rerun_skips_every_stage(volumes):
    out = volumes["output"]
    first = docker_run(volumes, "run", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "built-in demo" in first.stderr

    data = manifest(out)
    assert data["status"] == "done"
    assert {s: data["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "done")
    assert data["image"]["version"] and data["image"]["revision"]  # the image's labels reach the manifest
    assert data["versions"]["torch"] == "2.10.0" and data["versions"]["xformers"]
    assert len(data["stages"]["convert"]["inputs"]["model"]["sha256"]) == 64
    exported = out / "export" / Path(data["outputs"]["export"]).name
    assert exported.is_file() and exported.stat().st_uid == (1000 if os.getuid() == 0 else os.getuid())
    assert (out / "samples" / "before_after.png").is_file()

    # the exported file loads: `dreambooth inspect` reads it back in a fresh container
    inspected = docker_run(volumes, "inspect", f"/output/export/{exported.name}", "--json")
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert json.loads(inspected.stdout)["family"] == "sd1"

    again = docker_run(volumes, "run", *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {s: manifest(out)["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "skipped")


def test_any_uid_can_write_the_images_own_directories(volumes):
    """`--user $(id -u):$(id -g)` with an arbitrary uid: HOME, /cache and /output fall back to group 0 dirs."""
    probe = "import os, tempfile; tempfile.NamedTemporaryFile(dir=os.environ['HOME']); print(os.environ['HOME'])"
    result = subprocess.run(
        [DOCKER, "run", "--rm", "--network", "none", "--user", "4321:0", IMAGE, "python", "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_docker_stop_mid_training_saves_and_the_next_run_resumes(volumes):
    out = volumes["output"]
    name = f"dreambooth-test-{uuid.uuid4().hex[:8]}"
    settings = ["--save-interval", "10000", "--num-class-images", "2", "--class-inference-steps", "2"]
    long_run = ["--log-format", "json", "run", "--max-train-steps", "5000", *settings]
    started = docker_run(volumes, *long_run, detach=True, name=name)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 300
        while '"train_step"' not in _logs(name):
            assert time.monotonic() < deadline, _logs(name)[-3000:]
            time.sleep(1)
        subprocess.run([DOCKER, "stop", "-t", "120", name], check=True, capture_output=True, timeout=180)
        code = subprocess.run([DOCKER, "wait", name], capture_output=True, text=True, timeout=60).stdout.strip()
        assert code == "130", _logs(name)[-3000:]
    finally:
        subprocess.run([DOCKER, "rm", "-f", "-v", name], capture_output=True, timeout=60)

    data = manifest(out)
    assert data["status"] == "interrupted" and data["stages"]["train"]["status"] == "interrupted"
    (saved,) = (out / "checkpoints").iterdir()  # the checkpoint written on SIGTERM
    step = int(saved.name.split("-")[1])
    assert 0 < step < 5000

    resumed = docker_run(volumes, "run", "--max-train-steps", str(step + 2), *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from /output/checkpoints/step-{step}" in resumed.stderr
    data = manifest(out)
    assert data["stages"]["convert"]["status"] == "skipped" and data["stages"]["train"]["status"] == "done"
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == step + 2 and report["steps_this_run"] == 2


def _logs(name: str) -> str:
    result = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def test_a_missing_gpu_is_a_friendly_error_not_a_traceback(volumes):
    result = docker_run(volumes, "run", env={"DREAMBOOTH_REQUIRE_GPU": "1"})
    assert result.returncode == 3
    assert "error: no GPU in the container" in result.stderr
    assert "--gpus all" in result.stderr and "NVIDIA Container Toolkit" in result.stderr
    assert "Traceback" not in result.stderr


def test_reading_an_unmounted_volume_is_a_friendly_error():
    result = subprocess.run(
        [DOCKER, "run", "--rm", "--network", "none", IMAGE, "run", "--config", "/data/run.toml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 3
    assert "/data is not mounted" in result.stderr and "-v" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_input_inside_the_container_exits_2_with_a_hint(volumes):
    (volumes["data"] / "run.toml").write_text('model = "/models/missing.safetensors"\n')
    result = docker_run(volumes, "run", "--config", "/data/run.toml")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1 and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_gpus_2_trains_the_demo_with_two_processes_as_make_train_does(volumes):
    """`make train GPUS=2`: the compose service's command (docker/train.sh) adds --num-processes 2; here on the CPU
    (gloo), where the GPU service would use two GPUs (NCCL). Only the first process writes."""
    out = volumes["output"]
    done = docker_run(volumes, *QUICK, env={"GPUS": "2"}, entrypoint="/opt/dreambooth/train.sh")
    assert done.returncode == 0, done.stderr[-3000:]
    assert manifest(out)["status"] == "done"
    report = json.loads((out / "train_report.json").read_text())
    assert (report["world_size"], report["distributed"]) == (2, "ddp")
    assert report["global_batch_size"] == 2 * report["per_device_batch_size"]
    bad = docker_run(volumes, env={"GPUS": "two"}, entrypoint="/opt/dreambooth/train.sh")
    assert bad.returncode == 2 and "GPUS=two" in bad.stderr
