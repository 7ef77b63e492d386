"""Start, stop and resume runs as processes of their own.

A run the page starts is `python -m dreambooth --log-format json run --config FOLDER/run.toml` (or `demo --output
FOLDER`) in a new session, its events appended to FOLDER/events.jsonl and its stderr to FOLDER/console.log; the
command is kept in FOLDER/ui-command.json so that Resume starts the same one (a re-run resumes from the last
checkpoint). The run takes FOLDER's lock itself; the page checks the lock first and serialises its own starts, so
two Start presses, from two browsers or one, start one run. Stop sends SIGTERM to the lock's holder: the path that
saves a checkpoint and exits 130, as `docker stop` does.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from dreambooth import runlock
from dreambooth.fileio import atomic_path
from dreambooth.ui.runs import COMMAND, CONSOLE, EVENTS


class JobError(Exception):
    """A start or stop the page refuses (a run already holds the folder, nothing to stop); its text is shown."""


_starting = threading.Lock()
_children: dict[Path, subprocess.Popen] = {}  # this server's runs: reaped so they leave no zombie


def start(folder: Path, args: list[str]) -> int:
    """Start `dreambooth --log-format json ARGS` for FOLDER; its pid. Refused while a run holds FOLDER."""
    folder = Path(folder)
    with _starting:
        _reap()
        running = _children.get(folder)
        if (running is not None and running.poll() is None) or runlock.holder(folder) is not None:
            raise JobError(f"a run is already going in {folder.name}: stop it first, or wait for it to end")
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / COMMAND) as tmp:
            tmp.write_text(json.dumps({"args": args}), encoding="utf-8")
        command = [sys.executable, "-m", "dreambooth", "--log-format", "json", *args]
        with (folder / EVENTS).open("ab") as out, (folder / CONSOLE).open("ab") as err:
            process = subprocess.Popen(
                command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder, start_new_session=True
            )
        _children[folder] = process
        return process.pid


def resume(folder: Path) -> int:
    """Start FOLDER's run again with the command it was started with (it resumes from its last checkpoint)."""
    try:
        args = json.loads((Path(folder) / COMMAND).read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise JobError(f"{Path(folder).name} was not started from this page: resume it with its own command") from None
    return start(folder, args)


def stop(folder: Path) -> int:
    """SIGTERM to the process holding FOLDER's lock (it saves a checkpoint and exits 130); its pid."""
    holder = runlock.holder(folder)
    pid = (holder or {}).get("pid")
    if holder is None or not isinstance(pid, int):
        raise JobError(f"no run is going in {Path(folder).name}")
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise JobError(f"the run in {Path(folder).name} has just ended") from None
    return pid


def alive(folder: Path) -> bool:
    """Whether a run this server started for FOLDER is still a process (it may already have let go of the lock
    while it finishes: until it exits, it is still running)."""
    process = _children.get(Path(folder))
    return process is not None and process.poll() is None


def _reap() -> None:
    for folder, process in list(_children.items()):
        if process.poll() is not None:
            del _children[folder]
