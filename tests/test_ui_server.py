"""`dreambooth serve`'s HTTP side: every route, the token, the same-origin check, paths that lead outside the
volumes, bad input (one clear message, nothing written), and runs found again from disk."""

import io
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from dreambooth import runlock
from dreambooth.ui import jobs, runs
from dreambooth.ui.server import MAX_BODY, MAX_PHOTO, create_app
from dreambooth.ui.volumes import Volumes

HOST = "http://testserver"


@pytest.fixture
def volumes(tmp_path):
    for name in ("models", "data", "output", "cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "models" / "tiny.safetensors").write_bytes(b"not really a model")
    photos = tmp_path / "data" / "alice"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 120)).save(photos / f"p{i}.png")
    (photos / "p0.txt").write_text("sks woman on a bench\n")
    (tmp_path / "secret.txt").write_text("outside every volume\n")
    return Volumes.at(*(tmp_path / n for n in ("models", "data", "output", "cache")))


def client_for(volumes, token=None) -> TestClient:
    return TestClient(create_app(volumes, token=token), base_url=HOST)


def csrf_of(client: TestClient) -> str:
    page = client.get("/").text
    return page.split('<meta name="csrf" content="')[1].split('"')[0]


def post(client, path, body, **headers):
    return client.post(path, json=body, headers={"X-Dreambooth-Csrf": csrf_of(client), **headers})


def finished_run(folder: Path, *, steps=4, status="done", stopped=None) -> Path:
    """A run folder as `dreambooth run` leaves it: manifest, report, a checkpoint with a sample, an export."""
    (folder / "checkpoints" / f"step-{steps}" / "samples").mkdir(parents=True)
    (folder / "checkpoints" / f"step-{steps}" / "dreambooth.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(folder / "checkpoints" / f"step-{steps}" / "samples" / "prompt0-0.png")
    (folder / "export").mkdir()
    (folder / "export" / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "manifest.json").write_text(json.dumps({"status": status, "seconds": 12.5,
                                                      "started_at": "2026-12-07T10:00:00+00:00"}))  # fmt: skip
    report = {"family": "sd1", "adapter": "lora", "steps": steps, "final_loss": 0.25, "first_step": 1,
              "losses": {"instance": [0.5, 0.4, 0.3, 0.25], "class": [], "lr": [1e-4] * 4},
              "settings": {"max_train_steps": steps}}  # fmt: skip
    if stopped:
        report["stopped"] = stopped
    (folder / "train_report.json").write_text(json.dumps(report))
    return folder


# ------------------------------------------------------------------------------------------------ reading runs


def test_the_runs_list_shows_every_run_newest_first_with_its_status(volumes):
    output = volumes.output
    finished_run(output / "alice")
    time.sleep(0.01)
    finished_run(output / "bob", status="interrupted")
    finished_run(output / "carol", stopped={"reason": "diverged", "step": 3, "message": "training diverged at step 3"})
    (output / "carol" / "manifest.json").write_text(json.dumps({"status": "failed", "started_at": "2026-12-07T11"}))
    (output / "not-a-run").mkdir()
    client = client_for(volumes)
    listed = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert set(listed) == {"alice", "bob", "carol"}
    assert listed["alice"]["status"] == "done" and listed["alice"]["step"] == 4 and listed["alice"]["total"] == 4
    assert listed["alice"]["family"] == "sd1" and listed["alice"]["adapter"] == "lora"
    assert listed["bob"]["status"] == "stopped" and listed["bob"]["checkpoint"] == "step-4"
    assert listed["carol"]["status"] == "diverged" and "diverged at step 3" in listed["carol"]["message"]
    assert next(r["name"] for r in client.get("/api/runs").json()["runs"]) == "carol"  # started last
    page = client.get("/")
    assert page.status_code == 200 and "alice" in page.text and 'class="status diverged"' in page.text


def test_a_running_run_is_the_one_holding_its_lock_with_progress_and_eta(volumes):
    folder = volumes.output / "live"
    folder.mkdir()
    now = time.time()
    lines = [{"event": "train_start", "time": now - 10, "max_train_steps": 100, "family": "flux", "adapter": "lora"}]
    lines += [{"event": "train_step", "time": now - 10 + s, "step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (1, 2, 3)]
    lines += [{"event": "stage_start", "time": now, "stage": "saving checkpoint step-3"}]
    (folder / runs.EVENTS).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"event": "train_st')
    with runlock.hold(folder, "dreambooth run"):
        summary = client_for(volumes).get("/api/run", params={"run": "live"}).json()["summary"]
    assert summary["status"] == "running" and summary["pid"] == os.getpid()
    assert (summary["step"], summary["total"], summary["family"]) == (3, 100, "flux")
    assert summary["eta"] == pytest.approx(97.0)  # one step a second, 97 to go
    assert summary["doing"] == "saving checkpoint step-3"
    # the lock released, the same folder reads as stopped (it said nothing more): what it saved is kept
    assert client_for(volumes).get("/api/run", params={"run": "live"}).json()["summary"]["status"] == "stopped"


def test_a_runs_page_and_its_detail_losses_samples_exports_log(volumes):
    folder = finished_run(volumes.output / "alice")
    (folder / runs.CONSOLE).write_text("warning: something the run said\n")
    client = client_for(volumes)
    assert client.get("/run", params={"run": "alice"}).status_code == 200
    detail = client.get("/api/run", params={"run": "alice"}).json()
    assert detail["losses"]["step"] == [1, 2, 3, 4] and detail["losses"]["loss"][-1] == 0.25
    assert [s["path"] for s in detail["samples"]] == ["alice/checkpoints/step-4/samples/prompt0-0.png"]
    (export,) = detail["exports"]
    assert export["size"] == 1000 and export["sha256"] == __import__("hashlib").sha256(b"x" * 1000).hexdigest()
    assert detail["log"][-1] == "warning: something the run said"
    got = client.get(f"/files/output/{export['path']}", params={"download": "1"})
    assert got.content == b"x" * 1000 and "attachment" in got.headers["content-disposition"]
    assert client.get("/api/run", params={"run": "nobody"}).status_code == 404


def test_a_stage_under_way_is_shown_with_its_count(volumes):
    folder = volumes.output / "classes"
    folder.mkdir()
    lines = [{"event": "stage_start", "time": 1.0, "stage": "class images"},
             {"event": "progress", "time": 2.0, "stage": "class images", "done": 16, "total": 32}]  # fmt: skip
    (folder / runs.EVENTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    with runlock.hold(folder, "dreambooth run"):
        assert runs.summarize(volumes.output, folder).doing == "class images 16/32"
    assert runs.summarize(volumes.output, folder).doing is None  # not running: nothing under way


def test_server_sent_events_replay_the_runs_stream_and_then_its_summary(volumes):
    folder = finished_run(volumes.output / "alice")
    events = [{"event": "train_step", "time": 1.0, "step": s, "loss": 0.1} for s in (1, 2)]
    (folder / runs.EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))
    received = []
    first_line = len(json.dumps(events[0]) + "\n")  # bytes
    assert client_for(volumes).get("/api/run", params={"run": "alice"}).json()["offset"] == 2 * first_line
    with client_for(volumes).stream("GET", "/api/run/events", params={"run": "alice", "from": first_line}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                received.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "summary":
                    break
    assert received[0] == ("line", events[1])  # from the first line's end: what the page does not have yet
    assert received[-1][0] == "summary" and received[-1][1]["name"] == "alice"


# ------------------------------------------------------------------------------------------------ security


def test_a_token_is_required_on_every_request_and_kept_in_a_cookie(volumes):
    finished_run(volumes.output / "alice")
    client = client_for(volumes, token="s3cret")
    for path in ("/", "/api/runs", "/new", "/static/app.js", "/files/output/alice/export/model.safetensors"):
        assert client.get(path).status_code == 401, path
    assert client.get("/api/runs", params={"token": "wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = client.get("/", params={"token": "s3cret"}, follow_redirects=False)
    assert first.status_code == 303 and "token" not in first.headers["location"]
    assert (
        "httponly" in first.headers["set-cookie"].lower() and "samesite=strict" in first.headers["set-cookie"].lower()
    )
    assert client.get("/api/runs").status_code == 200  # the cookie now


def test_a_post_needs_the_pages_secret_and_its_own_origin(volumes):
    finished_run(volumes.output / "alice", status="interrupted")
    client = client_for(volumes)
    assert client.post("/api/run/stop", params={"run": "alice"}).status_code == 403
    bad = {"X-Dreambooth-Csrf": "guess"}
    assert client.post("/api/run/stop", params={"run": "alice"}, headers=bad).status_code == 403
    other_site = {"X-Dreambooth-Csrf": csrf_of(client), "Origin": "http://evil.example"}
    assert client.post("/api/run/stop", params={"run": "alice"}, headers=other_site).status_code == 403
    same = client.post("/api/run/stop", params={"run": "alice"}, headers={"X-Dreambooth-Csrf": csrf_of(client),
                                                                           "Origin": HOST})  # fmt: skip
    assert same.status_code == 409 and "no run is going" in same.json()["error"]  # past the guard: nothing to stop


@pytest.mark.parametrize(
    "path",
    [
        "/files/output/../secret.txt",
        "/files/output/%2e%2e/secret.txt",
        "/files/data/alice/../../secret.txt",
        "/files/output//etc/passwd",
        "/files/models/tiny.safetensors",
        "/files/output/escape/secret.txt",
        "/files/data/outside.txt",
    ],
)
def test_no_file_outside_the_volumes_is_served(volumes, path):
    (volumes.output / "escape").symlink_to(volumes.output.parent)  # a symlink out of /output
    (volumes.data / "outside.txt").symlink_to(volumes.output.parent / "secret.txt")
    response = client_for(volumes).get(path)
    assert response.status_code == 404 and b"outside every volume" not in response.content


def test_browsing_lists_only_what_lies_inside(volumes):
    (volumes.data / "escape").symlink_to(volumes.output.parent)
    client = client_for(volumes)
    listed = client.get("/api/browse/data").json()["entries"]
    assert [e["name"] for e in listed] == ["alice"]
    photos = client.get("/api/browse/data", params={"path": "alice"}).json()["entries"]
    assert {e["name"]: e.get("caption") for e in photos if not e["folder"]} == {
        "p0.png": "sks woman on a bench", "p0.txt": None, "p1.png": None}  # fmt: skip
    for where in ("../", "/etc", "escape", "alice/../.."):
        assert client.get("/api/browse/data", params={"path": where}).status_code == 404, where
    assert client.get("/api/browse/output").status_code == 404  # only models and data are browsed
    assert [e["name"] for e in client.get("/api/browse/models").json()["entries"]] == ["tiny.safetensors"]


def test_a_caption_is_written_atomically_and_bad_ones_write_nothing(volumes):
    client = client_for(volumes)
    ok = post(client, "/api/caption", {"path": "alice/p1.png", "caption": "sks woman, smiling"})
    assert ok.status_code == 200 and (volumes.data / "alice" / "p1.txt").read_text() == "sks woman, smiling\n"
    before = sorted(p.name for p in (volumes.data / "alice").iterdir())
    refused = [
        post(client, "/api/caption", {"path": "../secret.txt", "caption": "x"}),
        post(client, "/api/caption", {"path": "alice/p0.txt", "caption": "x"}),
        post(client, "/api/caption", {"path": "alice/p0.png", "caption": "x" * 5000}),
        post(client, "/api/caption", {"path": "alice/p0.png"}),
    ]
    assert [r.status_code for r in refused] == [404, 422, 422, 422]
    assert all(r.json()["error"] for r in refused)
    assert sorted(p.name for p in (volumes.data / "alice").iterdir()) == before  # no temporary left behind
    assert (volumes.data / "alice" / "p0.txt").read_text() == "sks woman on a bench\n"
    assert (volumes.output.parent / "secret.txt").read_text() == "outside every volume\n"


def test_a_folder_the_page_may_not_write_is_one_message(volumes, monkeypatch):
    """A read-only /data (compose's other services mount it so) or a folder of another user: a caption or an upload
    is refused in one line (the write fails as the operating system would fail it, whoever runs the test)."""
    from dreambooth.ui import server

    def refused(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(server, "atomic_path", refused)
    monkeypatch.setattr(server, "write_new_file", refused)
    client = client_for(volumes)
    caption = post(client, "/api/caption", {"path": "alice/p1.png", "caption": "x"})
    photo = upload(client, "alice", "p9.png", image_bytes())
    assert [caption.status_code, photo.status_code] == [507, 507]
    assert caption.json()["error"] == "could not write the caption of alice/p1.png in /data: Permission denied"
    assert photo.json()["error"] == "could not write alice/p9.png in /data: Permission denied"


def test_a_body_over_the_limit_is_refused_before_anything_is_written(volumes):
    client = client_for(volumes)
    big = {"path": "alice/p1.png", "caption": "x" * (MAX_BODY + 10)}
    response = post(client, "/api/caption", big)
    assert response.status_code == 413 and not (volumes.data / "alice" / "p1.txt").exists()


# ------------------------------------------------------------------------------------------------ photo uploads


def image_bytes(size=(64, 48), fmt="PNG", noise=False) -> bytes:
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def upload(client, folder, name, data, *, secret=True):
    headers = {"X-Dreambooth-Csrf": csrf_of(client)} if secret else {}
    return client.post("/api/photos", params={"folder": folder, "name": name}, content=data, headers=headers)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_photos_upload_into_a_new_folder_whole_and_never_over_another_file(volumes):
    client = client_for(volumes)
    photo = image_bytes((1200, 800), noise=True)  # 2.9 MB: bigger than any other request may be
    assert len(photo) > MAX_BODY
    first = upload(client, "bob", "b0.png", photo)
    assert first.status_code == 201 and first.json() == {"path": "bob/b0.png", "name": "b0.png", "size": len(photo)}
    assert upload(client, "bob", "b0.mask.png", image_bytes((1200, 800))).status_code == 201  # its loss mask
    assert upload(client, "people/carol", "c 1.jpg", image_bytes(fmt="JPEG")).status_code == 201
    assert tree(volumes.data / "bob") == {"b0.png": photo, "b0.mask.png": tree(volumes.data / "bob")["b0.mask.png"]}
    assert (volumes.data / "people" / "carol" / "c 1.jpg").is_file()
    # it is a photo of the folder like any other: its bucket, no caption yet; the mask is not a photo
    listed = {e["name"]: e for e in client.get("/api/browse/data", params={"path": "bob"}).json()["entries"]}
    assert listed["b0.png"]["bucket"] == "640x384" and listed["b0.png"]["caption"] is None
    assert "bucket" not in listed["b0.mask.png"]
    # the same name again is refused, and the first file stays as it was
    again = upload(client, "bob", "b0.png", image_bytes())
    assert again.status_code == 409 and "bob/b0.png already exists" in again.json()["error"]
    assert (volumes.data / "bob" / "b0.png").read_bytes() == photo
    assert sorted(p.name for p in (volumes.data / "bob").iterdir()) == ["b0.mask.png", "b0.png"]  # no part file


@pytest.mark.parametrize(
    ("folder", "name", "data", "status", "says"),
    [
        ("../elsewhere", "p.png", "png", 422, "no hidden or '..' parts"),
        ("/tmp", "p.png", "png", 422, "name a folder of /data"),
        ("", "p.png", "png", 422, "name a folder of /data"),
        ("escape", "p.png", "png", 404, "leads outside"),
        ("alice", "../p.png", "png", 422, "a photo's file name ends in"),
        ("alice", ".hidden.png", "png", 422, "a photo's file name ends in"),
        ("alice", "notes.txt", "png", 422, "a photo's file name ends in"),
        ("alice", "p9.png", "text", 422, "not an image Pillow can read"),
        ("alice", "p9.png", "empty", 422, "not an image Pillow can read"),
        ("alice", "p9.png", "cut", 422, "not an image Pillow can read"),
        ("alice", "p9.jpg", "cut-jpeg", 422, "not an image Pillow can read"),
        ("alice/p0.png", "x.png", "png", 422, "is a file, not a folder"),
    ],
)
def test_a_bad_upload_is_one_message_and_writes_nothing(volumes, folder, name, data, status, says):
    (volumes.data / "escape").symlink_to(volumes.output.parent)  # a symlink out of /data
    body = {"png": image_bytes(), "text": b"not an image", "empty": b"", "cut": image_bytes()[:60],
            "cut-jpeg": image_bytes((256, 256), "JPEG", noise=True)[:-2000]}[data]  # fmt: skip
    root = volumes.output.parent
    before = tree(root)
    response = upload(client_for(volumes), folder, name, body)
    assert response.status_code == status and says in response.json()["error"]
    assert tree(root) == before


def test_an_upload_needs_the_pages_secret_and_has_its_own_bound(volumes):
    client = client_for(volumes)
    before = tree(volumes.data)
    assert upload(client, "bob", "b0.png", image_bytes(), secret=False).status_code == 403
    too_big = upload(client, "bob", "b0.png", b"\0" * (MAX_PHOTO + 1))
    assert too_big.status_code == 413 and str(MAX_PHOTO) in too_big.json()["error"]
    assert tree(volumes.data) == before and not (volumes.data / "bob").exists()


# ------------------------------------------------------------------------------------------------ a new run


FORM = {"run_name": "alice-lora", "model": "tiny.safetensors", "instance_data_dir": "alice",
        "instance_prompt": "a photo of sks woman", "preset": "sd15-lora", "max_train_steps": "20",
        "gradient_checkpointing": "on", "save_sample_prompt": "a photo of sks woman\nsks woman in a hat"}  # fmt: skip


def test_the_form_is_generated_from_the_settings_with_the_clis_help(volumes):
    from dataclasses import fields

    from dreambooth.config import TrainConfig

    page = client_for(volumes).get("/new").text
    for setting in fields(TrainConfig):
        if setting.metadata["panel"] is not None and setting.name not in ("model", "output", "preset"):
            assert f'name="{setting.name}"' in page, setting.name
    assert "--lora-rank" in page and "LoRA rank (kohya&#39;s network dim)." in page
    assert "sd15-lora" in page  # the presets


def test_a_preview_is_the_run_toml_that_dreambooth_run_reads_back(volumes):
    from dreambooth.pipeline import load_run_config

    response = post(client_for(volumes), "/api/new/preview", FORM)
    assert response.status_code == 200, response.text
    text = response.json()["toml"]
    assert tomllib.loads(text)["train"]["save_sample_prompt"] == ["a photo of sks woman", "sks woman in a hat"]
    run_toml = volumes.output.parent / "run.toml"
    run_toml.write_text(text)
    cfg = load_run_config(run_toml, {}, volumes.output).train
    assert cfg.model == volumes.models / "tiny.safetensors" and cfg.output == volumes.output / "alice-lora"
    assert cfg.adapter == "lora" and cfg.max_train_steps == 20 and cfg.gradient_checkpointing  # preset + form
    assert cfg.concepts[0].instance_data_dir == volumes.data / "alice"
    assert not (volumes.output / "alice-lora").exists()  # a preview writes nothing


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"resolution": "big"}, "resolution", "--resolution"),
        ({"learning_rate": "-1"}, "learning_rate", "--learning-rate"),
        ({"lr_scheduler": "sometimes"}, "lr_scheduler", "choose one of"),
        ({"vae": "/etc/passwd"}, "vae", "outside the folders"),
        ({"model": "../secret.txt"}, "model", "without '..'"),
        ({"instance_data_dir": ""}, "instance_data_dir", "pick one from /data"),
        ({"run_name": "../up"}, "run_name", "letters, digits"),
        ({"preset": "nope"}, "preset", "unknown preset"),
    ],
)
def test_a_bad_setting_is_the_clis_message_beside_its_field_and_nothing_is_written(volumes, change, field, says):
    before = sorted(volumes.output.iterdir())
    response = post(client_for(volumes), "/api/new/start", {**FORM, **change})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert field in errors and says in errors[field], errors
    assert sorted(volumes.output.iterdir()) == before


def test_start_writes_run_toml_and_runs_it_as_its_own_process_whose_failure_is_shown(volumes):
    """The photos are too small to train on: the run fails at once with the CLI's own message, shown by the page."""
    client = client_for(volumes)
    response = post(client, "/api/new/start", FORM)
    assert response.status_code == 200 and response.json() == {"run": "alice-lora"}
    folder = volumes.output / "alice-lora"
    assert tomllib.loads((folder / "run.toml").read_text())["train"]["instance_prompt"] == "a photo of sks woman"
    assert json.loads((folder / runs.COMMAND).read_text())["args"] == ["run", "--config", str(folder / "run.toml")]
    deadline = time.time() + 120
    while time.time() < deadline and client.get("/api/run", params={"run": "alice-lora"}).json()["summary"][
        "status"
    ] in ("running", "stopped"):
        time.sleep(0.5)
    summary = client.get("/api/run", params={"run": "alice-lora"}).json()["summary"]
    assert summary["status"] == "failed" and "--instance-data-dir" in summary["message"]
    again = post(client, "/api/new/start", FORM)  # the name is taken now
    assert again.status_code == 409 and "already holds a run" in again.json()["errors"]["run_name"]


# ------------------------------------------------------------------------------------------------ stop, resume


HOLDER = """
import signal, sys, time
from dreambooth import runlock
def stop(*_):
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
with runlock.hold(sys.argv[1], "dreambooth run"):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_stop_sends_sigterm_to_the_runs_process_and_resume_starts_its_command_again(volumes):
    folder = volumes.output / "held"
    folder.mkdir()
    (folder / runs.COMMAND).write_text(json.dumps({"args": ["--version"]}))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    client = client_for(volumes)
    busy = post(client, "/api/run/resume?run=held", {})
    assert busy.status_code == 409 and "already going" in busy.json()["error"]
    stopped = post(client, "/api/run/stop?run=held", {})
    assert stopped.status_code == 200 and stopped.json()["stopping"] == holder.pid
    assert holder.wait(timeout=30) == 130  # the run's own SIGTERM path
    assert client.get("/api/run", params={"run": "held"}).json()["summary"]["status"] == "stopped"
    resumed = post(client, "/api/run/resume?run=held", {})
    assert resumed.status_code == 200
    deadline = time.time() + 60
    while time.time() < deadline and "dreambooth" not in (folder / runs.EVENTS).read_text() + (
        folder / runs.CONSOLE
    ).read_text(errors="replace"):
        time.sleep(0.2)
    assert "dreambooth" in (folder / runs.EVENTS).read_text()  # `dreambooth --version` ran, its output kept


def test_two_starts_at_once_start_one_run(volumes, monkeypatch):
    folder = volumes.output / "race"
    started = []

    class SlowProcess:
        def __init__(self, *args, **kwargs):
            time.sleep(0.2)  # a run takes its lock a moment after it starts
            started.append(args)
            self.pid = 4242

        def poll(self):
            return None

    monkeypatch.setattr(jobs.subprocess, "Popen", SlowProcess)
    monkeypatch.setattr(jobs, "_children", {})
    results = []
    threads = [threading.Thread(target=lambda: results.append(_try_start(folder))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "started"] and len(started) == 1


def _try_start(folder):
    try:
        jobs.start(folder, ["demo"])
        return "started"
    except jobs.JobError:
        return "refused"


def test_each_photo_shows_the_bucket_it_would_train_in(volumes):
    Image.new("RGB", (1200, 800)).save(volumes.data / "alice" / "wide.png")
    Image.new("L", (1200, 800)).save(volumes.data / "alice" / "wide.mask.png")  # a loss mask: not a photo
    client = client_for(volumes)
    entries = {e["name"]: e for e in client.get("/api/browse/data", params={"path": "alice"}).json()["entries"]}
    assert entries["wide.png"]["bucket"] == "640x384"  # 3:2 → the 5:3 bucket of about 512² pixels, never upscaled
    assert "bucket" not in entries["wide.mask.png"] and "caption" not in entries["wide.mask.png"]
    at_1024 = client.get("/api/browse/data", params={"path": "alice", "resolution": "1024"}).json()["entries"]
    assert next(e["bucket"] for e in at_1024 if e["name"] == "wide.png") == "1152x768"  # a 3:2 bucket ≤ the photo
    bad = client.get("/api/browse/data", params={"path": "alice", "resolution": "-5"})
    assert bad.status_code == 400 and "resolution" in bad.json()["error"]


def test_the_page_imports_no_training_code():
    """It reads folders and starts processes: torch and the model libraries stay out of the server."""
    probe = "import sys, dreambooth.ui.server; print(sorted(m for m in ('torch', 'diffusers', 'transformers', " \
            "'accelerate', 'peft', 'numpy') if m in sys.modules))"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_model_info_is_what_dreambooth_inspect_says_and_a_bad_file_is_one_line(volumes):
    from tests.conftest import write_original

    write_original(volumes.models / "sd1.safetensors", "sd1")
    client = client_for(volumes)
    info = client.get("/api/model-info", params={"path": "sd1.safetensors"})
    assert info.status_code == 200 and info.json()["family"] == "sd1" and info.json()["prediction_type"] == "epsilon"
    bad = client.get("/api/model-info", params={"path": "tiny.safetensors"})  # 18 bytes of text
    assert bad.status_code == 422 and "tiny.safetensors" in bad.json()["error"] and "\n" not in bad.json()["error"]
    assert client.get("/api/model-info", params={"path": "../secret.txt"}).status_code == 404


def test_the_demo_needs_a_plain_name_and_a_free_folder(volumes):
    client = client_for(volumes)
    bad = post(client, "/api/demo/start", {"run_name": "../../tmp/x"})
    assert bad.status_code == 422 and "letters, digits" in bad.json()["errors"]["run_name"]
    finished_run(volumes.output / "taken")
    taken = post(client, "/api/demo/start", {"run_name": "taken"})
    assert taken.status_code == 409 and "already holds a run" in taken.json()["errors"]["run_name"]
    assert sorted(p.name for p in volumes.output.iterdir()) == ["taken"]


def test_a_run_of_your_own_model_from_the_form_trains_to_its_export(volumes, model):
    """Start to finish through the page's own requests: pick a model folder and photos, start, watch it end done
    with its exported file listed — what `make train CONFIG=run.toml` would have done with the same file."""
    import shutil

    from tests.train_helpers import RES, write_photos

    shutil.copytree(model, volumes.models / "tiny")  # a copy: a symlink out of /models is refused, rightly
    write_photos(volumes.data / "sks", count=3)
    client = client_for(volumes)
    form = {"run_name": "mine", "model": "tiny", "instance_data_dir": "sks", "instance_prompt": "a photo of sks thing",
            "adapter": "lora", "resolution": str(RES), "max_train_steps": "2", "save_interval": "2",
            "seed": "7"}  # fmt: skip
    started = post(client, "/api/new/start", form)
    assert started.status_code == 200, started.text
    deadline = time.time() + 300
    while time.time() < deadline:
        summary = client.get("/api/run", params={"run": "mine"}).json()["summary"]
        if summary["status"] != "running":
            break
        time.sleep(1)
    detail = client.get("/api/run", params={"run": "mine"}).json()
    assert detail["summary"]["status"] == "done", detail["log"]
    assert (detail["summary"]["step"], detail["summary"]["adapter"]) == (2, "lora")
    (export,) = detail["exports"]
    assert export["name"].endswith(".safetensors") and len(export["sha256"]) == 64
    assert detail["losses"]["step"] == [1, 2]
