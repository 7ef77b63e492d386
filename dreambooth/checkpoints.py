"""Training checkpoints on disk: where they live, which is the latest finished one, which to prune.

A checkpoint folder is written under a temporary name and renamed when complete (fileio.atomic_dir), so a folder
under its final name with its training state in it is a finished checkpoint, whatever was killed when.
"""

import os
import re
import shutil
from pathlib import Path

from dreambooth.fileio import remove_stale_temporaries, remove_tree

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
REPORT_FILE = "train_report.json"


def finished_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint, oldest first."""
    found = []
    for path in (output / CHECKPOINTS).glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    """The newest finished checkpoint."""
    found = finished_checkpoints(output)
    return found[-1][1] if found else None


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step}"


def prune(output: Path, keep_last: int) -> None:
    """--keep-last N: the N newest finished checkpoints stay. Each goes with one rename first: a kill while it is
    being deleted leaves hidden scratch, never a half checkpoint under its name."""
    for _, old in finished_checkpoints(output)[:-keep_last]:
        remove_tree(old)


def remove_scratch(output: Path) -> None:
    """What killed runs left half-written in the output and checkpoint folders (the run lock is held)."""
    remove_stale_temporaries(output)
    remove_stale_temporaries(output / CHECKPOINTS)


def link_or_copy(src: str, dst: str) -> None:
    """Frozen parts are identical in every checkpoint: hard-link them where the filesystem allows."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
