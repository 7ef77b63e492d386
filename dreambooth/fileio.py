"""Atomic writes: a file or folder that matters is either complete or absent, never half-written."""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode(full: int) -> int:
    """What a new file (0o666) or folder (0o777) gets under the current umask. mkstemp/mkdtemp make private scratch
    (0600/0700); what lands under its final name gets the usual permissions instead (typically 0644/0755), so A1111
    or another user of a shared volume can read the results."""
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return full & ~mask


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success move it onto `dest` with one rename.

    Beside, not in /tmp: `os.replace` is only atomic within one filesystem (and /output is a volume).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it becomes `dest`.

    An existing `dest` is only replaced when `overwrite` is set, and only after the new one is complete;
    the old one is moved aside first so that no instant exists with neither in place under the name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))
        if dest.exists():
            if not overwrite:
                raise FileExistsError(dest)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def result(self) -> str:
        out, _ = self.proc.communicate()
        if self.proc.returncode == 0 and out.strip():
            return out.strip()
        return sha256_file(self.path)

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
