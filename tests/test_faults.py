"""Fault injection, the way storage systems test themselves: kill, starve and pull the floor from under a run.

Kills: `dreambooth run` (convert → class images → train → export, with checkpoints, samples, --keep-last and the
manifest) on a tiny model is SIGKILLed at seeded random moments; then the same command runs again. It must finish,
leave exactly the files an uninterrupted run leaves, byte for byte (weights, export, class images, samples, loss
curve), no scratch (`.*.tmp`, `.*.old`) and no half `step-N`, and a manifest that is valid JSON.

Where a kill lands is chosen from the outside, with no hook in the product: the uninterrupted reference run's JSON
events (`--log-format json`) mark the stages (convert, class images, training steps, checkpoint writes, export, and
the stage boundaries where the manifest is rewritten); trial i takes stage i mod 6, one of that stage's events at
random (seeded), and a random delay up to the time the reference took to its next event. The test waits for the
run to emit that event and sends SIGKILL after the delay. Random delays alone would land mostly in training; a
hook read from an environment variable would be code in the product that only tests use.

FAULT_TRIALS sets the number of kill trials (default 6, what CI runs; `make test-faults` runs 50).
A full disk and a read-only output need a small disk of their own: in the test container (`make test`) Docker
mounts them (compose.yaml's `test` service: a 64 MiB tmpfs and a read-only one under $DREAMBOOTH_FAULT_DISKS); on
a host, the tests mount a tmpfs themselves, which needs root (`make test-faults`), and are skipped without it.
"""

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import write_original
from tests.fault_harness import Job, Runner
from tests.train_helpers import write_photos

pytestmark = pytest.mark.faults

TRIALS = int(os.environ.get("FAULT_TRIALS", "6"))
THOROUGH = TRIALS >= 20  # make test-faults: after every full-disk failure, the same command must also finish
SEED = int(os.environ.get("FAULT_SEED", "16"))
STAGES = ("convert", "classes", "training", "checkpoint", "export", "manifest")

RUN_TOML = """
model = "{model}"
output = "{output}"
instance_data_dir = "{instances}"
instance_prompt = "a photo of sks thing"
class_prompt = "a photo of a thing"
resolution = 32
with_prior_preservation = true
num_class_images = 3
sample_batch_size = 2
class_inference_steps = 2
train_batch_size = 1
max_train_steps = 4
save_interval = 2
keep_last = 1
save_sample_prompt = ["a photo of sks thing"]
n_save_sample = 1
save_infer_steps = 2
seed = 0
{extra}
"""
# files whose bytes carry timings or this run's own paths; what they say is checked separately
VOLATILE = {"manifest.json", "dreambooth.json", "train_report.json", "training_state.pt", ".dreambooth.lock",
            "report.html"}  # fmt: skip
SCRATCH = re.compile(r"\..*\.(tmp|old)")


# ───────────────────────────── the world: a model, photos, a warm runner, the reference run ─────────────────────


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = write_original(root / "tiny-sd1.safetensors", "sd1")
    photos = write_photos(root / "photos", count=3)
    runner = Runner(root / "logs")
    reference = root / "reference"
    job = run_command(runner, reference, model, photos)
    assert job.status == 0, job.stderr[-3000:]
    yield {"root": root, "model": model, "photos": photos, "runner": runner, "reference": reference,
           "events": job.events, "results": results(reference / "out")}  # fmt: skip
    runner.close()


def write_config(folder: Path, model: Path, photos: Path, extra: str = "", output: Path | str = "out") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(RUN_TOML.format(model=model, output=output, instances=photos, extra=extra))
    return folder / "run.toml"


def command(folder: Path) -> list[str]:
    return ["--log-format", "json", "run", "--config", folder / "run.toml"]


def run_command(runner: Runner, folder: Path, model: Path, photos: Path, extra: str = "") -> Job:
    write_config(folder, model, photos, extra)
    return runner.run(command(folder), folder)


def sha256(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "config.json":  # diffusers writes where the model was loaded from: this run's own path
        config = json.loads(data)
        config.pop("_name_or_path", None)
        data = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def results(out: Path) -> dict:
    """What the user gets, as bytes: every file but the volatile ones, by hash; the report's losses; the step."""
    files = {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in VOLATILE}  # fmt: skip
    report = json.loads((out / "train_report.json").read_text())
    return {"files": files, "losses": report["losses"], "steps": report["steps"]}


def assert_same_results(out: Path, expected: dict, what: object) -> None:
    got = results(out)
    differ = sorted(k for k in {*got["files"], *expected["files"]} if got["files"].get(k) != expected["files"].get(k))
    assert not differ, (what, "files that differ from the uninterrupted run's:", differ)
    assert got == expected, what


def problems(out: Path) -> list[str]:
    """Scratch, half checkpoints, an unreadable manifest: what a kill must never leave behind."""
    found = [f"scratch {p}" for p in out.rglob("*") if SCRATCH.fullmatch(p.name)]
    for step in (out / "checkpoints").glob("step-*") if (out / "checkpoints").is_dir() else []:
        if not (step / "training_state.pt").is_file() or not (step / "model_index.json").is_file():
            found.append(f"half checkpoint {step}")
    if (out / "manifest.json").exists():
        try:
            json.loads((out / "manifest.json").read_text())
        except ValueError as exc:
            found.append(f"manifest.json is not JSON: {exc}")
    return found


def errors(job: Job) -> list[dict]:
    return [e for e in job.events if e.get("event") == "error"]


def assert_one_line_error(job: Job) -> str:
    assert "Traceback" not in job.stderr, job.stderr[-3000:]
    (error,) = errors(job)
    assert "\n" not in error["message"]
    return error["message"]


# ───────────────────────────── kills ─────────────────────────────


def kill_points(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per stage: (index of an event of the reference run, seconds until its next event) where a kill may land."""
    points: dict[str, list[tuple[int, float]]] = {s: [] for s in STAGES}
    for i, (event, after) in enumerate(itertools.pairwise(events)):
        kind, stage, gap = event.get("event"), str(event.get("stage", "")), after["time"] - event["time"]
        if kind == "stage_start" and stage.startswith("convert"):
            points["convert"].append((i, gap))  # reading, converting, writing base/
        elif (kind == "stage_end" and stage.startswith("convert")) or (kind == "progress" and stage == "class images"):
            points["classes"].append((i, gap))  # generating and writing class images
        elif kind in ("train_start", "train_step") or (kind == "stage_start" and stage.startswith("caching")):
            points["training"].append((i, gap))
        elif kind == "stage_start" and stage.startswith("saving checkpoint"):
            points["checkpoint"].append((i, gap))  # weights, state, samples, rename, prune
        elif kind == "stage_start" and stage.startswith("export"):
            points["export"].append((i, gap))
        if kind in ("stage_end", "checkpoint_saved"):
            points["manifest"].append((i, min(gap, 0.05)))  # a stage ends: the manifest (or report) is rewritten
    return points


def test_reference_run_is_reproducible_and_clean(world):
    """The yardstick: the uninterrupted run leaves no scratch, and a second uninterrupted run gives the same bytes
    (otherwise the kill trials could not tell a fault from noise)."""
    out = world["reference"] / "out"
    assert problems(out) == []
    again = run_command(world["runner"], world["root"] / "reference-again", world["model"], world["photos"])
    assert again.status == 0, again.stderr[-3000:]
    assert_same_results(world["root"] / "reference-again" / "out", world["results"], "reference again")
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_kill_at_any_moment_then_the_same_command_finishes_as_if_never_killed(world, trial):
    rng = random.Random(SEED * 1000 + trial)
    stage = STAGES[trial % len(STAGES)]
    index, gap = rng.choice(kill_points(world["events"])[stage])
    delay = rng.uniform(0, max(gap, 0.0))
    folder = world["root"] / f"trial-{trial}"
    write_config(folder, world["model"], world["photos"])
    runner = world["runner"]

    job = runner.start(command(folder), folder)
    reached = job.wait_for_events(index + 1)
    time.sleep(delay)
    job.kill()
    status = job.wait()
    anchor = world["events"][index]
    landed = job.events[-1] if job.events else {"event": "none"}
    seen = f"{landed.get('event')} {landed.get('stage', '')} {landed.get('step', '')}".strip()
    record = {"trial": trial, "stage": stage, "after_event": anchor.get("event"), "after": anchor.get("stage", ""),
              "step": anchor.get("step"), "delay_s": round(delay, 3), "status": status,
              "last_event_seen": seen}  # fmt: skip
    _log_trial(record)
    assert reached and status == -9, f"the run ended before the kill ({status}): {job.stderr[-2000:]}"
    out = folder / "out"
    # right after the kill: the manifest reads, and what looks finished is finished
    assert [p for p in problems(out) if not p.startswith("scratch")] == [], record

    again = runner.run(command(folder), folder)
    assert again.status == 0, (record, again.stderr[-3000:], errors(again))
    assert problems(out) == [], record
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    assert_same_results(out, world["results"], record)


def _log_trial(record: dict) -> None:
    """FAULT_LOG=path: one JSON line per trial (where the kill landed), for the closing note."""
    if os.environ.get("FAULT_LOG"):
        with open(os.environ["FAULT_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")


# ───────────────────────────── a full disk, a read-only output, a vanishing input ─────────────────────────────


# where Docker mounted the small disks (compose.yaml's `test` service): `disk` (64 MiB), `read-only`
FAULT_DISKS = os.environ.get("DREAMBOOTH_FAULT_DISKS")
PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size)`: the root of an empty disk (a tmpfs) with `size` bytes free, emptied again afterwards;
    `small_disk(size, read_only=True)`: of an empty read-only one. Docker's mounts under $DREAMBOOTH_FAULT_DISKS
    (a bigger one is cut to `size` with a ballast file beside what the test writes), else a tmpfs mounted here,
    which needs root; skipped with neither. One of each per test."""
    mounted: list[Path] = []
    lent: list[Path] = []

    def provide(size: int, read_only: bool = False) -> Path:
        if FAULT_DISKS:
            disk = Path(FAULT_DISKS) / ("read-only" if read_only else "disk")
            assert disk not in lent, f"{disk} is this test's already: one small disk of each kind per test"
            assert os.path.ismount(disk), f"DREAMBOOTH_FAULT_DISKS={FAULT_DISKS}, but {disk} is not a mount point"
            assert bool(os.statvfs(disk).f_flag & os.ST_RDONLY) == read_only, f"{disk} is not what its name says"
            lent.append(disk)
            if not read_only:
                empty(disk)  # a test that failed before its cleanup may have left it full
                leave_free(disk, size)
            return disk
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root, "
                        "or the test container's disks ($DREAMBOOTH_FAULT_DISKS, `make test-image`)")  # fmt: skip
        mounted.append(disk)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        return disk

    yield provide
    for disk in lent:
        if not os.statvfs(disk).f_flag & os.ST_RDONLY:
            empty(disk)
    for disk in reversed(mounted):
        subprocess.run(["umount", "-l", str(disk)], check=False)


def empty(disk: Path) -> None:
    for child in disk.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    assert shutil.disk_usage(disk).used < 1 << 20, f"{disk} is not empty after emptying it"


def leave_free(disk: Path, size: int) -> None:
    """Take all but `size` bytes (rounded up to a page, as a tmpfs of that size rounds) with a file `ballast`."""
    free = shutil.disk_usage(disk).free
    assert free >= size, f"{disk} has {free} bytes free, the test needs {size}: give it more in compose.yaml"
    ballast = (free - size) // PAGE * PAGE
    if ballast:
        fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, ballast)
        finally:
            os.close(fd)


def fill(folder: Path) -> Path:
    """Write zeros until the disk is full, to the last block (unbuffered: nothing left to flush at close)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 1 << 12, 1 << 9):
            try:
                while os.write(fd, bytes(chunk)) > 0:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def starve(job: Job, folder: Path) -> Path:
    """Fill the disk under `folder` while the run stands still (SIGSTOP … SIGCONT), so that its next write fails."""
    job.stop()
    try:
        return fill(folder)
    finally:
        job.cont()


def _is(kind: str, stage: str = "", step: int | None = None):
    return lambda e: (e.get("event") == kind and str(e.get("stage", "")).startswith(stage)
                      and (step is None or e.get("step") == step))  # fmt: skip


# where the disk fills: right after the reference run's event, with the run stopped (SIGSTOP) while it fills
DISK_FULL_AT = {
    "convert": _is("stage_start", "convert"),
    "classes": _is("progress", "class images"),
    "checkpoint": _is("train_step", step=3),  # step-2 is finished; step-4 cannot be written
    "export": _is("stage_start", "export"),
    "report": _is("checkpoint_saved", step=4),  # train_report.json, loss curve, manifest
}


@pytest.mark.parametrize("stage", list(DISK_FULL_AT))
def test_a_disk_that_fills_up_at_any_stage_is_exit_3_and_spoils_nothing(world, small_disk, stage):
    folder = world["root"] / f"full-{stage}"
    disk = small_disk(64 << 20)
    out = disk / "out"
    write_config(folder, world["model"], world["photos"], output=out)

    job = world["runner"].start(command(folder), folder)
    assert job.wait_for(DISK_FULL_AT[stage])
    filler = starve(job, disk)  # beside `out`, which may not be there yet
    assert job.wait() == 3, (job.stderr[-3000:], job.events[-5:])
    message = assert_one_line_error(job)
    assert f"the disk {disk} " in message and "is full: " in message and " free, and " in message, message
    if stage in ("convert", "checkpoint", "export"):  # the big writes know what they need
        assert "needs about" in message and "MiB" in message, message
    assert [p for p in problems(out) if not p.startswith("scratch")] == []
    assert not [p for p in out.rglob("*") if SCRATCH.fullmatch(p.name)]  # the failed write took its scratch along
    if stage in ("checkpoint", "export", "report"):
        from dreambooth.train import resume_point

        kept, state = resume_point(_train_config(folder), True)
        assert kept is not None and kept.name == ("step-2" if stage == "checkpoint" else "step-4")
        assert state["step"] == int(kept.name.split("-")[1])

    # space again: the same command finishes as if nothing had happened (CI: for the checkpoint case only)
    if not THOROUGH and stage != "checkpoint":
        return
    filler.unlink()
    again = world["runner"].run(command(folder), folder)
    assert again.status == 0, again.stderr[-3000:]
    assert problems(out) == []
    assert_same_results(out, world["results"], stage)


def _train_config(folder: Path):
    from dreambooth.pipeline import load_run_config

    return load_run_config(folder / "run.toml", {}, folder / "out").train


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(world, small_disk):
    reference = world["reference"] / "out"
    used = sum(p.stat().st_size for d in ("base", "class_images") for p in (reference / d).rglob("*") if p.is_file())
    folder = world["root"] / "small-disk"
    disk = small_disk(used + (2 << 20))
    out = disk / "out"
    write_config(folder, world["model"], world["photos"], output=out)
    job = world["runner"].run(command(folder), folder)
    assert job.status == 3, job.stderr[-3000:]
    message = assert_one_line_error(job)
    assert "the planned 2 checkpoints need about" in message and f"on the disk {disk}," in message, message
    assert "MiB is free" in message
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_read_only_output_is_one_line_and_exit_2_or_3(world, small_disk):
    folder = world["root"] / "read-only"
    out = small_disk(1 << 20, read_only=True)
    write_config(folder, world["model"], world["photos"], output=out)
    job = world["runner"].run(command(folder), folder)
    assert job.status in (2, 3), job.stderr[-3000:]
    message = assert_one_line_error(job)
    assert str(out) in message


@pytest.mark.parametrize("when", ["before hashing", "mid-training"])
def test_an_instance_folder_that_vanishes_mid_run_is_one_line_and_keeps_the_last_checkpoint(world, when):
    folder = world["root"] / f"vanish-{when.replace(' ', '-')}"
    photos = write_photos(folder / "photos", count=3)
    # mid-training: read from disk every step (no latent cache), so the folder is needed until the end
    write_config(folder, world["model"], photos, "cache_latents = false" if when == "mid-training" else "")
    # mid-training: while step-2 is being saved (a step reads its images in its first millisecond: too short a window)
    anchor = _is("stage_end", "convert") if when == "before hashing" else _is("stage_start", "saving checkpoint step-2")

    job = world["runner"].start(command(folder), folder)
    assert job.wait_for(anchor)
    job.stop()
    try:
        shutil.rmtree(photos)
    finally:
        job.cont()
    assert job.wait() not in (0, -9), job.stderr[-3000:]
    message = assert_one_line_error(job)
    assert str(photos) in message, message
    out = folder / "out"
    assert problems(out) == [] or all(p.startswith("scratch") for p in problems(out))
    if when == "mid-training":
        from dreambooth.train import resume_point

        kept, state = resume_point(_train_config(folder), True)
        assert kept is not None and kept.name == "step-2" and state["step"] == 2


# ───────────────────────────── a damaged latest checkpoint ─────────────────────────────


@pytest.mark.parametrize("damage", ["training_state.pt", "unet/diffusion_pytorch_model.safetensors"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(cli, model, photos, tmp_path, damage):
    from tests.train_helpers import base_args

    out = tmp_path / "out"
    args = base_args(model, photos, out, "--max-train-steps", 2, "--save-interval", 1)
    assert cli(*args).exit_code == 0
    latest = out / "checkpoints" / "step-2"
    weights = {p.relative_to(latest).as_posix(): sha256(p) for p in latest.rglob("*.safetensors")}
    victim = latest / damage
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a copy cut short, a disk that filled

    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert f"checkpoint {latest} is damaged" in text and "step-2.damaged" in text
    assert f"resuming from {out / 'checkpoints' / 'step-1'}" in text
    # it trained step 2 again, from step 1: the same weights as before the damage
    assert {p.relative_to(latest).as_posix(): sha256(p) for p in latest.rglob("*.safetensors")} == weights
    assert torch.load(latest / "training_state.pt", weights_only=False)["step"] == 2
    assert (out / "checkpoints" / "step-2.damaged" / damage).is_file()  # kept for a look, out of the way
