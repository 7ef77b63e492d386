"""What README.md and DESIGN.md promise about the container, checked against the tree (`make test-container`).

The hardening (README "Security") is said in five places: the README's `docker run` lines, compose.yaml, the
Makefile's plain `docker run`s, the container tests' command line (tests/container/test_image.py, which also checks
the running containers) and DESIGN.md. A flag dropped from one of them, or a service added without it, fails here.
Runs on the host: it reads files and asks compose how it resolves compose.yaml; it starts no container.
"""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.container.test_image import HARDENED

REPO = Path(__file__).resolve().parents[2]
DESIGN = Path(os.environ.get("DREAMBOOTH_DESIGN", REPO.parent / "shared" / "DESIGN.md"))
COMPOSE = shlex.split(os.environ.get("COMPOSE", f"{os.environ.get('DOCKER', 'docker')} compose"))

# each hardening flag, and what the same thing looks like in compose.yaml's resolved form
FLAGS = {
    "--read-only": ("read_only", True),
    "--tmpfs /tmp:size=1g": ("tmpfs", ["/tmp:size=1g"]),
    "--cap-drop ALL": ("cap_drop", ["ALL"]),
    "--security-opt no-new-privileges": ("security_opt", ["no-new-privileges:true"]),
    "--network none": ("network_mode", "none"),
}
# where a service may write (besides /dev/shm), and what it may only read: what README "Security" names
WRITABLE = {"/output", "/cache", "/tmp", "/faults/disk"}
READ_ONLY = {"/models", "/data", "/faults/read-only"}
# the web page saves the captions edited on it beside the photos (README "Security" says so)
WRITABLE_BY = {"ui": {"/data"}}
# DESIGN.md's `docker run` lines that predate the hardening, word for word (issue 23's closing note proposes the
# new text). Remove a line here once DESIGN.md has changed it: a line listed here that DESIGN.md no longer has fails.
DESIGN_BEHIND = {
    "docker run --gpus all -v $PWD/models:/models:ro -v $PWD/data:/data:ro -v $PWD/output:/output "
    "dreambooth:VERSION run --config /data/run.toml",
}


def docker_runs(text: str) -> list[str]:
    """Every `docker run …` of our image in a text, continuation lines joined, up to the end of its code span."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        for match in re.finditer(r"docker run\b[^`\n]*", line):
            command = " ".join(re.sub(r"\s+#.*$", "", match.group(0)).split())  # without a trailing comment
            if re.search(r"dreambooth:|\$\(\w*IMAGE\)", command):  # not prose such as "so does `docker run --gpus`"
                found.append(command)
    return found


def missing_flags(command: str) -> list[str]:
    words = " ".join(shlex.split(command.replace("$(", "").replace(")", ""), posix=True))
    return [flag for flag in FLAGS if f" {flag} " not in f" {words} "]


def test_the_container_tests_and_the_makefile_use_the_same_flags_as_this_file():
    assert " ".join(HARDENED) == " ".join(FLAGS)
    (line,) = [line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("HARDENED :=")]
    assert line.removeprefix("HARDENED :=").split() == HARDENED


def test_every_docker_run_in_the_readme_is_hardened():
    commands = docker_runs((REPO / "README.md").read_text())
    assert len(commands) >= 2, commands  # the `run` example and the WSL2 GPU check, at least
    assert {c: missing_flags(c) for c in commands if missing_flags(c)} == {}


def test_every_docker_run_in_the_makefile_is_hardened():
    makefile = (REPO / "Makefile").read_text()
    commands = docker_runs(makefile.replace("$(HARDENED)", " ".join(HARDENED)).replace("$(DOCKER) run", "docker run"))
    assert commands, "no `$(DOCKER) run` in the Makefile: drop this test, or fix how it finds them"
    assert {c: missing_flags(c) for c in commands if missing_flags(c)} == {}


@pytest.fixture(scope="module")
def services() -> dict:
    """compose.yaml as compose resolves it (anchors merged), every profile."""
    command = [*COMPOSE, "-f", str(REPO / "compose.yaml"), "--profile", "*", "config", "--format", "json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_every_compose_service_is_hardened(services):
    for name, service in services.items():
        for flag, (key, value) in FLAGS.items():
            if key == "tmpfs" and "/tmp" in {v["target"] for v in service.get("volumes", [])}:
                continue  # the test service: /tmp on a disk (README "Security" says why)
            if key == "network_mode" and service.get("ports"):
                # a service that serves (the web UI) publishes its ports on this machine only
                assert all(p.get("host_ip") == "127.0.0.1" for p in service["ports"]), (name, service["ports"])
                continue
            assert service.get(key) == value, f"service {name}: {flag} ({key}: {value}) is missing"
        user = str(service.get("user", ""))
        assert user.split(":")[0] not in ("", "0", "root"), f"service {name} runs as {user!r}"


def test_compose_services_write_only_where_the_readme_says(services):
    for name, service in services.items():
        for volume in service.get("volumes", []):
            target, read_only = volume["target"], bool(volume.get("read_only"))
            allowed = READ_ONLY if read_only else WRITABLE | WRITABLE_BY.get(name, set())
            assert target in allowed, f"service {name}: {target} (read-only: {read_only}) is not among {allowed}"


def test_the_readme_states_every_exception_and_why(services):
    security = (REPO / "README.md").read_text().partition("## Security")[2].partition("\n## ")[0]
    assert security, "README.md has no `## Security` section"
    for flag in FLAGS:
        assert f"`{flag}`" in security, flag
    for path in WRITABLE | READ_ONLY | {"/dev/shm"}:
        assert f"`{path}`" in security, path
    if any(s.get("shm_size") for s in services.values()):
        assert "`--shm-size 8g`" in security and "`shm_size: 8gb`" in security
    if any(s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") for s in services.values()):
        assert "`--gpus all`" in security and "NVIDIA Container Toolkit" in security
    assert "127.0.0.1" in security  # where a web UI publishes its port
    assert "--network none" in security and "--num-machines" in security  # several machines need a network


@pytest.fixture(scope="module")
def design() -> str:
    if not DESIGN.is_file():
        pytest.skip(f"no {DESIGN} (CI has ../shared beside the clone; DREAMBOOTH_DESIGN=path names another)")
    return DESIGN.read_text()


def test_designs_docker_run_lines_are_hardened_or_listed_as_behind(design):
    commands = docker_runs(design)
    assert commands, "DESIGN.md shows no `docker run` any more: drop this test, or fix how it finds them"
    stale = DESIGN_BEHIND - set(commands)
    assert not stale, f"DESIGN.md no longer has these lines: remove them from DESIGN_BEHIND: {stale}"
    assert {c: missing_flags(c) for c in commands if missing_flags(c) and c not in DESIGN_BEHIND} == {}


# what DESIGN.md says about the container (a phrase of it, as a regex) → a check of the tree that makes it true
def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


DESIGN_PROMISES = {
    r"user 1000, group 0": lambda s: "\nUSER 1000:0\n" in _dockerfile(),
    r"Nothing in the container reaches a network at run time \(`HF_HUB_OFFLINE=1`\)": lambda s: (
        re.search(r"^\s+HF_HUB_OFFLINE=1\b", _dockerfile(), re.M)
        and all(v.get("network_mode") == "none" or v.get("ports") for v in s.values())
    ),
    r"\./models ─ro→ /models": lambda s: all(
        v["read_only"] for x in s.values() for v in x.get("volumes", []) if v["target"] == "/models"
    ),
    # every service but the web page's, which saves captions beside the photos (WRITABLE_BY; README "Security")
    r"\./data\s+─ro→ /data": lambda s: all(
        v.get("read_only")
        for n, x in s.items()
        for v in x.get("volumes", [])
        if v["target"] == "/data" and "/data" not in WRITABLE_BY.get(n, set())
    ),
    r"`HF_HOME=/cache`": lambda s: re.search(r"^\s+HF_HOME=/cache\b", _dockerfile(), re.M),
    r"`STOPSIGNAL SIGTERM` with a grace period": lambda s: (
        "\nSTOPSIGNAL SIGTERM\n" in _dockerfile()
        and all(x.get("stop_grace_period") for n, x in s.items() if "train" in n)
    ),
    r"writable dirs group-0 so any `--user` works": lambda s: "chmod 2775" in _dockerfile(),
}


@pytest.mark.parametrize("phrase", list(DESIGN_PROMISES))
def test_what_design_says_about_the_container_holds(design, services, phrase):
    assert re.search(phrase, design), f"DESIGN.md no longer says {phrase!r}: update DESIGN_PROMISES"
    assert DESIGN_PROMISES[phrase](services), f"DESIGN.md says {phrase!r}, the tree does not"
