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


def test_scratch_of_a_killed_writer_goes_with_the_next_write_and_a_live_ones_stays(tmp_path):
    import subprocess
    import sys

    from dreambooth import fileio

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), fileio._HOST
    half_file = tmp_path / f".manifest.json.{dead_pid}@{host}.abc123.tmp"
    half_file.write_text('{"half": ')
    half_dir = tmp_path / f".step-4.{dead_pid}@{host}.xyz_9.tmp"
    (half_dir / "unet").mkdir(parents=True)
    # killed between the two renames of a replacement: the old folder is aside, none under its name
    aside = tmp_path / f".base.{dead_pid}@{host}.q1w2e3.old"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "model_index.json").write_text("{}")
    live = tmp_path / f".export.{os.getppid()}@{host}.zzz.tmp"  # a writer still at work
    live.write_text("")
    other_host = tmp_path / f".report.{dead_pid}@another-machine.zzz.tmp"
    other_host.write_text("")

    fileio.write_json(tmp_path / "manifest.json", {"ok": True})
    assert not half_file.exists() and not half_dir.exists() and not aside.exists()
    assert (tmp_path / "base" / "model_index.json").is_file()  # put back, not lost
    assert live.exists() and other_host.exists()


def test_a_deleted_folder_is_never_half_there(tmp_path):
    from dreambooth.fileio import remove_tree

    (tmp_path / "step-2" / "unet").mkdir(parents=True)
    (tmp_path / "step-2" / "training_state.pt").write_bytes(b"x")
    remove_tree(tmp_path / "step-2")
    assert list(tmp_path.iterdir()) == []
