"""`dreambooth demo --output_dir DIR` (the classic script's spelling) writes every file under DIR (issue 16, item 3).

Before, DIR received the training run while class images, samples and fidelity.json went to the default
output/demo/ under the working directory.
"""

from pathlib import Path

import pytest

# the demo, shrunk (as in test_pipeline.py), in the classic snake_case spelling
QUICK = ("--max_train_steps", 2, "--save_interval", 2, "--num_class_images", 2, "--class_inference_steps", 2,
         "--save_infer_steps", 2, "--n_save_sample", 1)  # fmt: skip


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# `demo` declares the classic spelling itself; `run` without --config (the demo too) gets it among the train flags
@pytest.mark.parametrize("command", ["demo", "run"])
def test_demo_output_dir_holds_every_file_it_writes(cli, tmp_path, monkeypatch, command):
    cwd = tmp_path / "cwd"  # where the default output/demo/ (`run`: output/) would appear
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "mine"

    result = cli(command, "--output_dir", out, *QUICK)

    assert result.exit_code == 0, result.stderr
    assert not (cwd / "output").exists()
    assert files_under(tmp_path) == files_under(out)  # nothing written beside it
    for name in ("manifest.json", "fidelity.json", "samples/before_after.png"):
        assert (out / name).is_file(), name
    assert any((out / "class_images").rglob("*.png"))
    assert (out / "checkpoints" / "step-2").is_dir()
