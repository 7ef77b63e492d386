"""The four folders the page may read or write (/models, /data, /output, /cache) and the paths inside them.

Every path a request names is relative to one of them and resolved here: absolute paths, `..` and symlinks that
lead outside are refused before anything is opened, so no request reads or writes outside the volumes.
"""

import os
import secrets
from dataclasses import dataclass
from pathlib import Path


def is_plain_name(name: str) -> bool:
    """One visible file or folder name: no separators, not hidden, no control characters."""
    return (
        bool(name)
        and name == name.strip()
        and not name.startswith(".")
        and not any(c in name for c in "/\\")
        and all(c.isprintable() for c in name)
    )


def write_new_file(dest: Path, data: bytes) -> None:
    """DEST with these bytes, whole or not at all, and never over a file already there: written beside it under a
    hidden name, then linked into place (unlike a rename, a link fails when DEST exists, so of two uploads of one
    name exactly one lands). FileExistsError when DEST is taken."""
    part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        part.write_bytes(data)
        os.link(part, dest)
    finally:
        part.unlink(missing_ok=True)


class OutsideVolume(ValueError):
    """A request named a path outside the volume it is about (or one that does not exist)."""


@dataclass(frozen=True)
class Volumes:
    models: Path
    data: Path
    output: Path
    cache: Path

    @classmethod
    def at(cls, models: Path, data: Path, output: Path, cache: Path) -> "Volumes":
        return cls(*(Path(p).resolve() for p in (models, data, output, cache)))

    def root(self, name: str) -> Path:
        if name not in ("models", "data", "output", "cache"):
            raise OutsideVolume(f"unknown volume {name!r}")
        return getattr(self, name)


def inside(root: Path, relative: str, *, must_exist: bool = True) -> Path:
    """ROOT/RELATIVE, refused unless it stays inside ROOT once every symlink is followed.

    A path that need not exist yet (a new run folder) must still have its parent inside ROOT."""
    if not isinstance(relative, str) or "\x00" in relative:
        raise OutsideVolume("not a path")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise OutsideVolume(f"{relative!r}: only paths inside the folder, without '..', are allowed")
    root = root.resolve()
    candidate = root.joinpath(*parts)
    resolved = candidate.resolve()  # follows every symlink on the way
    if resolved != root and not resolved.is_relative_to(root):
        raise OutsideVolume(f"{relative!r} leads outside {root}")
    if must_exist and not resolved.exists():
        raise OutsideVolume(f"{relative!r} does not exist")
    return resolved


def listing(root: Path, relative: str = "", *, suffixes: tuple[str, ...] | None = None) -> list[dict]:
    """The entries of a folder inside ROOT (sorted, hidden ones left out): name, relative path, folder or file,
    size; only files with one of `suffixes` when given. Symlinks leading outside ROOT are left out."""
    folder = inside(root, relative) if relative else root.resolve()
    entries = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith("."):
            continue
        path = entry.relative_to(root.resolve()).as_posix()
        try:
            resolved = inside(root, path)
        except OutsideVolume:
            continue
        if resolved.is_file() and suffixes is not None and resolved.suffix.lower() not in suffixes:
            continue
        entries.append(
            {
                "name": entry.name,
                "path": path,
                "folder": resolved.is_dir(),
                "size": resolved.stat().st_size if resolved.is_file() else None,
            }
        )
    return entries
