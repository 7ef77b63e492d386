"""Atomic writes land with the permissions of any new file, not the private ones of their scratch space."""

import os
import stat

from dreambooth.fileio import atomic_dir, atomic_path


def test_atomic_results_are_readable_like_any_new_file(tmp_path):
    mask = os.umask(0o022)  # the usual one, whatever the test runner has
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            tmp.write_bytes(b"weights")
        with atomic_dir(tmp_path / "step-1") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(mask)
    mode = stat.S_IMODE
    assert mode((tmp_path / "model.safetensors").stat().st_mode) == 0o644  # A1111 as another user can read it
    assert mode((tmp_path / "step-1").stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind
