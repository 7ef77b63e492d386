"""One run per output folder: a second holder is refused with who holds it; a killed holder leaves no lock."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreambooth import runlock
from dreambooth.errors import UserError
from tests.train_helpers import write_photos

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dreambooth import runlock
    with runlock.hold(Path(sys.argv[1]), "dreambooth train --output elsewhere"):
        print("held", flush=True)
        time.sleep(120)
""")

# a worker: takes the lock on the folder (inheriting, or not, the environment of the process that holds it)
WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dreambooth import runlock
    from dreambooth.errors import UserError
    try:
        with runlock.hold(Path(sys.argv[1]), "dreambooth train-worker", shared_with_parent=sys.argv[2] == "1"):
            print("shared")
    except UserError as exc:
        print(exc.message)
""")


def start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def run_worker(folder: Path, *, shared: bool = False, env: dict | None = None) -> str:
    args = [sys.executable, "-c", WORKER, str(folder), "1" if shared else "0"]
    return subprocess.run(args, capture_output=True, text=True, check=True, env=env, timeout=60).stdout.strip()


@pytest.fixture
def holder_process(tmp_path):
    proc = start_holder(tmp_path / "out")
    yield proc
    proc.kill()
    proc.wait()


def test_second_holder_is_told_who_holds_the_folder(tmp_path, holder_process):
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught, runlock.hold(out, "dreambooth run"):
        pass
    message = caught.value.message
    assert str(out) in message and f"pid {holder_process.pid}" in message
    assert socket.gethostname() in message and "started at 20" in message and "dreambooth train" in message
    assert caught.value.exit_code == 2
    assert runlock.holder(out)["pid"] == holder_process.pid


def test_kill_9_leaves_no_stale_lock(tmp_path, holder_process):
    out = tmp_path / "out"
    holder_process.send_signal(signal.SIGKILL)
    holder_process.wait()
    assert runlock.holder(out) is None
    with runlock.hold(out, "dreambooth run"):
        assert runlock.holder(out)["pid"] == os.getpid()
    assert runlock.holder(out) is None


def test_same_process_holds_it_again(tmp_path):
    with runlock.hold(tmp_path, "dreambooth run"), runlock.hold(tmp_path, "dreambooth train"):
        assert runlock.holder(tmp_path)["command"] == "dreambooth run"
    assert runlock.holder(tmp_path) is None
    assert runlock.ENV_VARIABLE not in os.environ


def test_workers_share_their_parents_lock_and_nobody_else_does(tmp_path):
    with runlock.hold(tmp_path, "dreambooth train --num-processes 2"):
        # what our launcher's workers get: the inherited environment names the folder
        assert run_worker(tmp_path) == "shared"
        without = {k: v for k, v in os.environ.items() if k != runlock.ENV_VARIABLE}
        assert "is in use by another run" in run_worker(tmp_path, env=without)
        assert run_worker(tmp_path, shared=True, env=without) == "shared"


def test_inherited_variable_does_not_let_an_unrelated_process_in(tmp_path, holder_process):
    # the variable claims an ancestor holds the folder, but the holder is a sibling: refused
    env = {**os.environ, runlock.ENV_VARIABLE: str((tmp_path / "out").resolve())}
    assert f"pid {holder_process.pid}" in run_worker(tmp_path / "out", env=env)


def test_second_run_on_a_folder_fails_fast_and_changes_nothing(tmp_path, cli, model, holder_process):
    out = tmp_path / "out"
    photos = write_photos(tmp_path / "photos", count=1)
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{model}"\noutput = "{out}"\ninstance_data_dir = "{photos}"\ninstance_prompt = "a sks dog"\n'
    )
    before = {p: p.read_bytes() for p in out.rglob("*")}
    result = cli("run", "--config", config)
    assert result.exit_code == 2
    assert f"output folder {out} is in use by another run: pid {holder_process.pid}" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*")} == before


def test_second_train_on_a_folder_is_refused(tmp_path, cli, model, holder_process):
    out = tmp_path / "out"
    photos = write_photos(tmp_path / "photos", count=1)
    result = cli("train", "--model", model, "--instance-data-dir", photos, "--instance-prompt", "a sks dog",
                 "--output", out, "--resolution", 32, "--max-train-steps", 1)  # fmt: skip
    assert result.exit_code == 2
    assert f"output folder {out} is in use by another run: pid {holder_process.pid}" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "train_report.json").exists()


@pytest.mark.parametrize("where", ["the folder it writes into", "the run folder it writes into"])
def test_an_export_to_a_destination_in_use_is_refused_and_changes_nothing(tmp_path, cli, model, where):
    # another export into the same folder, or a run on the output folder the file goes under (OUTPUT/export/…)
    held = tmp_path / "out"
    dest = held / "x.safetensors" if where == "the folder it writes into" else held / "export" / "x.safetensors"
    proc = start_holder(held)
    try:
        before = {p: p.read_bytes() for p in held.rglob("*")}
        result = cli("export", model, dest)
        assert result.exit_code == 2
        assert f"output folder {held} is in use by another run: pid {proc.pid}" in result.stderr
        assert socket.gethostname() in result.stderr and "started at 20" in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
        assert {p: p.read_bytes() for p in held.rglob("*")} == before and not dest.exists()
    finally:
        proc.kill()
        proc.wait()
    # once the other process is gone, the same export goes through and releases the lock
    result = cli("export", model, dest)
    assert result.exit_code == 0, result.stderr
    assert dest.is_file() and runlock.holder(held) is None


def test_an_export_holds_its_destination_while_it_writes(tmp_path, model, monkeypatch):
    from dreambooth.cli import main
    from dreambooth.formats import export as export_module

    dest = tmp_path / "models" / "x.safetensors"
    seen = {}
    real = export_module.export

    def export_and_look(src, path, options):
        seen["holder"] = runlock.holder(dest.parent)
        return real(src, path, options)

    monkeypatch.setattr(export_module, "export", export_and_look)
    with pytest.raises(SystemExit) as done:
        main(["export", str(model), str(dest)])
        raise SystemExit(0)
    assert done.value.code in (0, None)
    # held by this very process (its command line is pytest's here, whatever runs the tests)
    assert seen["holder"]["pid"] == os.getpid() and seen["holder"]["command"] == runlock.this_command()
    assert runlock.holder(dest.parent) is None
