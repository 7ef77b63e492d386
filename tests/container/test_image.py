"""The built image, driven with docker from the host, as users run it (`make test-container` runs these).

Each test starts real containers of DREAMBOOTH_TEST_IMAGE_RUNTIME (`make` sets it to the image it just built),
hardened as the README's `docker run` lines and compose.yaml run them, and checks that on the running container
(`docker inspect`): a read-only root filesystem with only /tmp as a tmpfs, no capabilities, no new privileges, no
network, not root; read-only /models and /data. Then: the built-in demo (full and LoRA) when nothing is configured,
`docker stop` in the middle of training and the resume, `doctor`, and what a missing GPU looks like.
"""

import json
import os
import shlex
import struct
import subprocess
import time
import uuid
import zlib
from pathlib import Path

import pytest

IMAGE = os.environ.get("DREAMBOOTH_TEST_IMAGE_RUNTIME")
DOCKER = os.environ.get("DOCKER", "docker")
COMPOSE = shlex.split(os.environ.get("COMPOSE", f"{DOCKER} compose"))
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not IMAGE, reason="container tests: run them with `make test-container`")

# The hardening of every container (README "Security"; compose.yaml's x-hardened says the same, the Makefile's
# HARDENED too: tests/container/test_promises.py checks that they agree)
HARDENED = ["--read-only", "--tmpfs", "/tmp:size=1g", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--network", "none"]  # fmt: skip

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
    volumes: dict[str, Path],
    *args: str,
    env: dict | None = None,
    detach: bool = False,
    name=None,
    entrypoint=None,
    as_user: str | None = None,
) -> subprocess.CompletedProcess:
    """`docker run` hardened, as the README writes it; the running container's settings are checked, then (unless
    `detach`) its exit code and output are returned and it is removed, as --rm would."""
    name = name or f"dreambooth-test-{uuid.uuid4().hex[:8]}"
    # --shm-size as compose.yaml sets it (several training processes exchange gradients through /dev/shm)
    command = [DOCKER, "run", "-d", "--name", name, *HARDENED, "--user", as_user or user(), "--shm-size", "1g"]
    if entrypoint:
        command += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    for name_, path in volumes.items():
        mode = ":ro" if name_ in ("models", "data") else ""
        command += ["-v", f"{path}:/{name_}{mode}"]
    started = subprocess.run([*command, IMAGE, *args], capture_output=True, text=True, timeout=120)
    if started.returncode != 0 or detach:
        return started
    return finish(name, [*command, IMAGE, *args])


def compose_run(project: Path, service: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`make train`/`make doctor`'s way: compose.yaml's service, with ./models, ./data, ./output and ./cache from
    `project`, checked and finished like docker_run."""
    name = f"dreambooth-test-{uuid.uuid4().hex[:8]}"
    command = [*COMPOSE, "-f", str(REPO / "compose.yaml"), "--project-directory", str(project),
               "--profile", "tools", "run", "-d", "--name", name, service, *args]  # fmt: skip
    environment = {**os.environ, "DREAMBOOTH_IMAGE": IMAGE, "DREAMBOOTH_USER": user(), **(env or {})}
    started = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    if started.returncode != 0:
        subprocess.run([DOCKER, "rm", "-f", "-v", name], capture_output=True, timeout=60)
        return started
    return finish(name, command)


def finish(name: str, command: list) -> subprocess.CompletedProcess:
    """Check the running container's hardening, wait for it, return its exit code and output, remove it."""
    try:
        assert_hardened(name)
        waited = subprocess.run([DOCKER, "wait", name], capture_output=True, text=True, timeout=600)
        logs = subprocess.run([DOCKER, "logs", name], capture_output=True, text=True, timeout=60)
        return subprocess.CompletedProcess(command, int(waited.stdout.strip()), logs.stdout, logs.stderr)
    finally:
        subprocess.run([DOCKER, "rm", "-f", "-v", name], capture_output=True, timeout=60)


def inspect(name: str) -> dict:
    result = subprocess.run([DOCKER, "inspect", name], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)[0]


def assert_hardened(name: str) -> None:
    """What the daemon made of the command line or compose file, read from the container itself."""
    container = inspect(name)
    host = container["HostConfig"]
    assert host["ReadonlyRootfs"] is True, "the root filesystem is writable"
    capabilities = ([c.upper() for c in host["CapDrop"] or []], host["CapAdd"])
    assert capabilities == (["ALL"], None) or capabilities == (["ALL"], []), capabilities
    assert {"no-new-privileges", "no-new-privileges:true"} & set(host["SecurityOpt"] or []), host["SecurityOpt"]
    assert host["NetworkMode"] == "none" and not host["PortBindings"], (host["NetworkMode"], host["PortBindings"])
    assert not host["Privileged"] and not host["Devices"], "privileged, or devices added"
    # writable besides the volumes: /tmp only (/dev/shm is Docker's own tmpfs)
    tmpfs = {*(host["Tmpfs"] or {}), *(m["Target"] for m in host.get("Mounts") or [] if m["Type"] == "tmpfs")}
    assert tmpfs == {"/tmp"}, tmpfs
    mounts = {m["Destination"]: m["RW"] for m in container["Mounts"] if m["Type"] == "bind"}
    assert not {mounts.get("/models"), mounts.get("/data")} & {True}, f"an input is writable: {mounts}"
    assert set(mounts) <= {"/models", "/data", "/output", "/cache"}, mounts
    owner = container["Config"]["User"].split(":")[0]
    assert owner not in ("", "0", "root"), f"runs as {container['Config']['User']!r}"


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


def test_any_uid_can_write_the_images_own_directories():
    """`--user $(id -u):$(id -g)` with an arbitrary uid: HOME (on /tmp: the root filesystem is read-only) and the
    volumes /cache and /output (group 0 dirs) are writable; nothing else is."""
    probe = ("import os, tempfile\n"
             "for d in (os.environ['HOME'], '/cache', '/output', '/tmp'): tempfile.NamedTemporaryFile(dir=d)\n"
             "for d in ('/workspace', '/home/dreambooth', '/opt/venv', '/usr/local/bin'):\n"
             "    try: tempfile.NamedTemporaryFile(dir=d)\n"
             "    except OSError as e: print(d, e.strerror)\n"
             "    else: print(d, 'WRITABLE')\n"
             "print('HOME', os.environ['HOME'])")  # fmt: skip
    result = docker_run({}, "python", "-c", probe, as_user="4321:0")
    assert result.returncode == 0, result.stderr
    assert "WRITABLE" not in result.stdout and result.stdout.count("Read-only file system") == 4, result.stdout
    assert "HOME /tmp/home-4321" in result.stdout


def test_docker_stop_mid_training_saves_and_the_next_run_resumes(volumes):
    out = volumes["output"]
    name = f"dreambooth-test-{uuid.uuid4().hex[:8]}"
    settings = ["--save-interval", "10000", "--num-class-images", "2", "--class-inference-steps", "2"]
    long_run = ["--log-format", "json", "run", "--max-train-steps", "5000", *settings]
    started = docker_run(volumes, *long_run, detach=True, name=name)
    assert started.returncode == 0, started.stderr
    try:
        assert_hardened(name)
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
    result = docker_run({}, "run", "--config", "/data/run.toml")
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


def test_make_train_adapter_lora_runs_the_demo_as_a_lora_through_compose(volumes):
    """`make train ADAPTER=lora` with nothing configured: compose.yaml's `train` service, hardened by compose."""
    out = volumes["output"]
    env = {"ADAPTER": "lora", "MODEL": "", "DATA": "", "CONFIG": "", "PROMPT": "", "GPUS": ""}
    done = compose_run(out.parent, "train", *QUICK, env=env)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    data = manifest(out)
    assert data["status"] == "done" and data["stages"]["train"]["status"] == "done"
    assert json.loads((out / "train_report.json").read_text())["adapter"] == "lora"
    assert list((out / "checkpoints" / "step-4" / "lora").glob("*.safetensors"))
    exported = out / "export" / Path(data["outputs"]["export"]).name
    assert exported.is_file() and exported.stat().st_size < 2 << 20  # the LoRA, not a whole model (15 MB)


def test_doctor_is_content_in_the_hardened_container(volumes):
    """`make doctor`: compose.yaml's `doctor` service; a read-only root filesystem is no problem for it."""
    done = compose_run(volumes["output"].parent, "doctor", "--json")
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-2000:])
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert [c for c in checks.values() if c["status"] == "fail"] == []
    assert checks["volume:/output"]["detail"].startswith("rw") and checks["volume:/cache"]["detail"].startswith("rw")
    assert checks["volume:/models"]["detail"].startswith("ro") and checks["volume:/data"]["detail"].startswith("ro")


def png_bytes(width: int, height: int) -> bytes:
    """A small RGB PNG written by hand (these tests run without Pillow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = b"".join(b"\0" + bytes([200, 90, 40]) * width for _ in range(height))  # filter byte 0, then pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_make_ui_serves_the_runs_list_to_this_machine_only_and_asks_for_its_token(volumes):
    """`make ui`: compose.yaml's `ui` service from the built image; the page answers on 127.0.0.1 with the runs
    under /output, refuses a request without the token, saves an uploaded photo in ./data, and its network has no
    route out."""
    import socket
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    project = volumes["output"].parent
    (volumes["output"] / "alice").mkdir()
    (volumes["output"] / "alice" / "manifest.json").write_text(json.dumps({"status": "done"}))
    env = {**os.environ, "DREAMBOOTH_IMAGE": IMAGE, "DREAMBOOTH_USER": user(), "UI_PORT": str(port),
           "DREAMBOOTH_UI_TOKEN": "container-test-token"}  # fmt: skip
    name = f"dreambooth-ui-{uuid.uuid4().hex[:8]}"
    compose = [*COMPOSE, "-f", str(REPO / "compose.yaml"), "--project-directory", str(project), "-p", name,
               "--profile", "ui"]  # fmt: skip
    started = subprocess.run([*compose, "up", "-d", "ui"], capture_output=True, text=True, timeout=180, env=env)
    try:
        assert started.returncode == 0, started.stderr
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/runs", timeout=5)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # up, and without the token: refused
                break
            except OSError:
                assert time.time() < deadline, "the page did not answer in 90 s"
                time.sleep(1)
        asked = urllib.request.Request(f"{base}/api/runs", headers={"Authorization": "Bearer container-test-token"})
        runs = json.loads(urllib.request.urlopen(asked, timeout=10).read())["runs"]
        assert [(r["name"], r["status"]) for r in runs] == [("alice", "done")]
        # a photo uploaded from the page lands in ./data (the one volume the page writes besides /output)
        token = {"Authorization": "Bearer container-test-token"}
        page = urllib.request.urlopen(urllib.request.Request(f"{base}/new", headers=token), timeout=10).read()
        csrf = page.decode().split('<meta name="csrf" content="')[1].split('"')[0]
        photo = png_bytes(4, 3)
        upload = urllib.request.Request(f"{base}/api/photos?folder=bob&name=b0.png", data=photo,
                                        headers={**token, "X-Dreambooth-Csrf": csrf}, method="POST")  # fmt: skip
        assert urllib.request.urlopen(upload, timeout=30).status == 201
        assert (volumes["data"] / "bob" / "b0.png").read_bytes() == photo
        (container,) = subprocess.run([*compose, "ps", "-q", "ui"], capture_output=True, text=True, env=env,
                                      timeout=60).stdout.split()  # fmt: skip
        host = inspect(container)["HostConfig"]
        assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["Privileged"] is False
        bindings = [b for ports in host["PortBindings"].values() for b in ports]
        assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}  # this machine only
        (network,) = inspect(container)["NetworkSettings"]["Networks"]
        options = json.loads(
            subprocess.run([DOCKER, "network", "inspect", network], capture_output=True, text=True, timeout=60).stdout
        )[0]["Options"]
        assert options.get("com.docker.network.bridge.enable_ip_masquerade") == "false"  # no route out
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], capture_output=True, timeout=120, env=env)
