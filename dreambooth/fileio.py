"""Atomic writes: a file or folder that matters is either complete or absent, never half-written.

The scratch file or folder sits beside its destination under a hidden name that says who made it:
`.NAME.PID@HOST.RANDOM.tmp` (`.old` for a replaced folder on its way out). A process killed with `kill -9` cannot
clean up after itself, so the next atomic write into the same folder removes the scratch of processes of this host
that no longer live (`remove_stale_temporaries`); a live writer's scratch, or another machine's, is left alone.

A disk that fills up during a write is an `EnvironmentProblem` (exit 3) naming the disk, what is free and what the
write needs, and the scratch is removed; the destination keeps what it had.
"""

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dreambooth.errors import EnvironmentProblem

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
# .NAME.PID@HOST.RANDOM.tmp|old — RANDOM is mkstemp's/mkdtemp's (letters, digits, underscore)
_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)")
# below this, a failed write is taken for a full disk even when the library's error does not say so (torch.save
# reports ENOSPC as "file write failed")
_NEARLY_FULL = 1 << 20


def _default_mode(full: int) -> int:
    """What a new file (0o666) or folder (0o777) gets under the current umask. mkstemp/mkdtemp make private scratch
    (0600/0700); what lands under its final name gets the usual permissions instead (typically 0644/0755), so A1111
    or another user of a shared volume can read the results."""
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return full & ~mask


def _scratch_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}@{_HOST}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the scratch that killed processes of this host left in `folder` (not below it); returns what went.

    A replaced folder caught between its two renames (`.NAME….old/x` exists, NAME does not) is put back first."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _SCRATCH.fullmatch(entry.name)
        if not match or match["host"] != _HOST or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        dest = folder / match["name"]
        if match["kind"] == "old" and (entry / "x").exists() and not dest.exists():
            os.replace(entry / "x", dest)  # killed after moving the old one aside, before the new one arrived
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_full(folder: Path, what: str, need: int | None = None, written: int = 0) -> EnvironmentProblem:
    """The one message for a full disk: which disk, what is free, what the write needs."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need:
        needs = f"writing {what} needs about {human_bytes(need)}"
    elif written:
        needs = f"writing {what} needs more than the {human_bytes(written)} it wrote"
    else:
        needs = f"{what} cannot be written"
    mount = mount_point(folder)
    holding = "" if mount == Path(folder).absolute() else f" (holding {folder})"
    return EnvironmentProblem(
        f"the disk {mount}{holding} is full: {human_bytes(free)} free, and {needs}",
        "free space on that disk, or write to another one (--output, --cache-dir)",
    )


def human_bytes(n: int | float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain, or a failed write with next to nothing left on the disk."""
    seen: BaseException | None = exc
    chain: set[int] = set()
    while seen is not None and id(seen) not in chain:
        chain.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(exc, OSError | RuntimeError) or isinstance(exc, NotImplementedError | RecursionError):
        return False
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


@contextmanager
def atomic_path(dest: Path, *, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success move it onto `dest` with one rename.

    Beside, not in /tmp: `os.replace` is only atomic within one filesystem (and /output is a volume). `need`: the
    bytes the file will take, for the message if the disk fills up.
    """
    dest = Path(dest)
    _make_parent(dest, need)
    remove_stale_temporaries(dest.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_scratch_prefix(dest), suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        if is_disk_full(exc, dest.parent):
            raise disk_full(dest.parent, dest.name, need) from None
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, dest)
    except Exception as exc:
        if is_disk_full(exc, dest.parent):
            raise disk_full(dest.parent, dest.name, need, _size(tmp) if tmp.exists() else 0) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False, need: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it becomes `dest`.

    An existing `dest` is only replaced when `overwrite` is set, and only after the new one is complete;
    the old one is moved aside first so that no instant exists with neither in place under the name (a kill in
    between leaves it aside, and the next write into the folder puts it back).
    """
    dest = Path(dest)
    _make_parent(dest, need)
    remove_stale_temporaries(dest.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(dest), suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        if is_disk_full(exc, dest.parent):
            raise disk_full(dest.parent, f"{dest.name}/", need) from None
        raise
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))
        if dest.exists():
            if not overwrite:
                raise FileExistsError(dest)
            old = Path(tempfile.mkdtemp(prefix=_scratch_prefix(dest), suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except Exception as exc:
        if is_disk_full(exc, dest.parent):
            raise disk_full(dest.parent, f"{dest.name}/", need, _size(tmp) if tmp.exists() else 0) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(folder: Path) -> None:
    """Delete a folder so that no half of it stays under its name: renamed to scratch first (one rename), then
    removed; a kill in between leaves scratch that the next atomic write beside it removes."""
    folder = Path(folder)
    aside = Path(tempfile.mkdtemp(prefix=_scratch_prefix(folder), suffix=".tmp", dir=folder.parent))
    os.replace(folder, aside / "x")
    shutil.rmtree(aside, ignore_errors=True)


def _make_parent(dest: Path, need: int | None) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(mount_point(dest.parent), dest.name, need) from None
        raise


def write_json(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path) -> dict:
    """A JSON object from a file, or {} where the file is missing, unreadable or not an object: for what is only
    worth knowing when it is there (a run's reports, a folder's provenance)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    """Full-file SHA-256 (A1111 shows its first 10 hex digits as the model hash)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# hashlib (OpenSSL, SHA extensions) runs ~4x faster here than coreutils' sha256sum
_HASH_CHILD = "import hashlib, sys; print(hashlib.file_digest(open(sys.argv[1], 'rb'), 'sha256').hexdigest())"


def _die_with_parent() -> None:
    """In the hashing child (Linux): a parent killed with `kill -9` takes the child with it, instead of leaving it
    reading a multi-GB file for nobody."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class BackgroundSha256:
    """Hash a (multi-GB) file in the background; `result()` waits for the hex digest, `cancel()` stops it.

    A child process, not a thread: writing safetensors holds the GIL for whole tensors, which would serialise a
    hashing thread behind the conversion it is meant to overlap.
    """

    def __init__(self, path: Path) -> None:
        import subprocess
        import sys

        self.path = Path(path)
        cmd = [sys.executable, "-c", _HASH_CHILD, str(self.path)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=_die_with_parent
        )

    def result(self) -> str:
        out, _ = self.proc.communicate()
        if self.proc.returncode == 0 and out.strip():
            return out.strip()
        return sha256_file(self.path)

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
