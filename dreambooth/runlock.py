"""One run per output folder: an advisory lock on `FOLDER/.dreambooth.lock`, held for as long as the run lives.

`hold(folder, command)` takes `flock(LOCK_EX | LOCK_NB)` on the lock file and writes who holds it (pid, host, the
command, when it started) into it. The kernel drops the lock when the process ends, however it ends: a `kill -9`
or a power cut leaves no stale lock to clean up, only the text of the last holder, which the next holder replaces.
A second run on the same folder is refused at once with a `UserError` (exit 2) that names the folder and the
process that holds it; it has changed nothing (the file is opened, never truncated, before the lock is ours).
The file is never deleted: deleting a lock file lets two processes lock two different files of the same name.

Who shares a lock — the rule:
- The same process: `hold` is re-entrant (a `run` that trains holds the folder once, however many stages ask).
- Processes our launcher starts (`dreambooth train` → accelerate → `train-worker` ranks): while a lock is held,
  its folder is listed in the environment variable `DREAMBOOTH_RUN_LOCK`, which child processes inherit. A process
  that finds its folder there, finds the lock taken, and finds the holder's pid among its ancestors, shares the
  lock without taking it. `hold(..., shared_with_parent=True)` asks for the ancestor check without the variable.
  Any other holder — an unrelated run, a parent that is not the holder — is refused as usual.
- Ranks that a foreign launcher started (`torchrun`, `accelerate launch`, DeepSpeed's) have no dreambooth parent:
  the caller takes the lock in the process of global rank 0 only (the others write nothing it protects).
- `export` holds the lock of the folder it writes into (`destination_folder`): the run folder the file lands in, or
  the file's own folder; so two exports to one place, or an export into a folder a run is writing, are refused.
- Several machines on a shared filesystem: the lock is taken on machine rank 0; Linux NFS maps `flock` to NFS
  locks, so it also keeps out a second run from another machine. A filesystem without locks (some FUSE mounts)
  gets a warning and no lock, rather than no run.

Forked children (e.g. DataLoader workers) inherit the open file and with it the lock: they end with the run.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dreambooth import events
from dreambooth.errors import UserError

LOCK_FILE = ".dreambooth.lock"
ENV_VARIABLE = "DREAMBOOTH_RUN_LOCK"  # os.pathsep-separated folders whose lock an ancestor holds


@dataclass
class _Held:
    fd: int | None  # None: shared with an ancestor, or no lock on this filesystem
    depth: int = 1


_held: dict[Path, _Held] = {}


def this_command() -> str:
    """The command line of this process, short enough to show in a message."""
    args = [Path(sys.argv[0]).name if sys.argv else "dreambooth", *sys.argv[1:]]
    text = " ".join(args)
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def hold(folder: Path, command: str, *, shared_with_parent: bool = False) -> Iterator[Path]:
    """Hold the run lock of `folder` (created if missing) for the duration of the `with` block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:
        _held[key].depth += 1
        try:
            yield folder
        finally:
            _held[key].depth -= 1
        return
    _held[key] = _acquire(folder, key, command, shared_with_parent or key in _inherited())
    listed = _inherited()
    os.environ[ENV_VARIABLE] = os.pathsep.join(str(p) for p in sorted({*listed, key}))
    try:
        yield folder
    finally:
        held = _held.pop(key)
        _set_inherited(listed)
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(held.fd, 0)  # the holder's text goes with the lock
            os.close(held.fd)  # closing the last descriptor releases the lock


def destination_folder(dest: Path) -> Path:
    """The folder whose lock a command that writes `dest` (a file, or a folder it replaces) holds: the run folder
    `dest` lies in, where a run writes its exports (OUTPUT/ or OUTPUT/export/: a folder with a run lock file), so
    that an export there and a run on OUTPUT keep out of each other; else the folder `dest` goes into. Two levels
    only: a stray lock file high above (in /tmp, say) must not tie every export below it together."""
    parent = Path(dest).absolute().parent
    for folder in (parent, parent.parent):
        if (folder / LOCK_FILE).is_file():
            return folder
    return parent


def holder(folder: Path) -> dict | None:
    """Who holds the lock of `folder` now, as written in the lock file, or None when nobody does."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(folder: Path, key: Path, command: str, may_share: bool) -> _Held:
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as exc:
        raise UserError(
            f"cannot create the run lock {path}: {exc.strerror}",
            "make the output folder writable, or choose another --output",
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_holder(fd, wait=True)
        os.close(fd)
        if may_share and other.get("pid") in _ancestors():
            return _Held(None)
        raise UserError(
            f"output folder {folder} is in use by another run: {_describe(other)}",
            "wait for that run to finish or stop it, or choose another --output",
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        events.warn(f"{folder}: this filesystem has no file locks; nothing stops a second run on this folder")
        return _Held(None)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return _Held(fd)


def _read_holder(fd: int, *, wait: bool = False) -> dict:
    """The holder's record; it may not be written yet in the microseconds after it took the lock."""
    deadline = time.monotonic() + (0.5 if wait else 0)
    while True:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(os.pread(fd, 4096, 0).decode())
            if isinstance(record, dict):
                return record
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


def _describe(record: dict) -> str:
    if not record:
        return "a process that has not said who it is yet"
    where = f"pid {record.get('pid', '?')} on {record.get('host', '?')}"
    return f"{where}, `{record.get('command', '?')}`, started at {record.get('started_at', '?')}"


def _ancestors() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().parents()}


def _inherited() -> set[Path]:
    return {Path(p) for p in os.environ.get(ENV_VARIABLE, "").split(os.pathsep) if p}


def _set_inherited(folders: set[Path]) -> None:
    if folders:
        os.environ[ENV_VARIABLE] = os.pathsep.join(str(p) for p in sorted(folders))
    else:
        os.environ.pop(ENV_VARIABLE, None)
