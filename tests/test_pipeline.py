"""`dreambooth run` / `dreambooth demo`: the four stages, the manifest, skipping, continuing, interrupting."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.train_helpers import RES, write_photos

# the demo, shrunk: a handful of steps is enough to exercise every stage
QUICK = ("--max-train-steps", 4, "--save-interval", 2, "--num-class-images", 2, "--class-inference-steps", 2,
         "--save-infer-steps", 2, "--n-save-sample", 1)  # fmt: skip


def manifest(output: Path) -> dict:
    return json.loads((output / "manifest.json").read_text())


def statuses(output: Path) -> dict[str, str]:
    return {name: record["status"] for name, record in manifest(output)["stages"].items()}


def test_run_without_config_is_the_demo_and_leaves_every_output(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--output", out, *QUICK)
    assert result.exit_code == 0, result.stderr
    assert "built-in demo" in result.stderr

    data = manifest(out)
    assert data["status"] == "done"
    assert statuses(out) == {"convert": "done", "classes": "done", "train": "done", "export": "done"}
    # inputs are recorded with hashes: the model file, every instance and class image
    convert = data["stages"]["convert"]["inputs"]["model"]
    assert len(convert["sha256"]) == 64 and convert["path"].endswith(".safetensors")
    train_inputs = data["stages"]["train"]["inputs"]
    (instance,) = train_inputs["instance_images"].values()
    assert len(instance) == 5 and all(len(h) == 64 for h in instance.values())
    (classes,) = train_inputs["class_images"].values()
    assert len(classes) == 2
    assert train_inputs["max_train_steps"] == 4 and train_inputs["with_prior_preservation"] is True
    assert all(data["stages"][s]["seconds"] >= 0 for s in ("convert", "classes", "train", "export"))
    assert data["versions"]["torch"] and data["versions"]["diffusers"] and data["versions"]["dreambooth"]
    assert data["config"]["train"]["max_train_steps"] == 4

    # the exported file is the original single-file layout, fp16, with its recorded hash
    exported = Path(data["outputs"]["export"])
    assert exported.name == "tiny-sd1-dreambooth-step-4.safetensors"
    with safe_open(convert["path"], "pt") as f:
        source_keys = set(f.keys())
    with safe_open(exported, "pt") as f:
        assert set(f.keys()) == source_keys  # the layout the model came in
        assert str(f.get_slice("model.diffusion_model.out.2.weight").get_dtype()) == "F16"
        assert json.loads(f.metadata()["dreambooth.training"])["steps"] == 4
    assert data["stages"]["export"]["outputs"]["sha256"] == _sha256(exported)
    assert (out / "checkpoints" / "step-4" / "unet").is_dir()
    assert (out / "samples" / "before_after.png").is_file()
    assert (out / "loss_curve.png").is_file()


def test_rerun_skips_finished_stages_and_continues_when_only_the_length_changes(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("demo", "--output", out, *QUICK).exit_code == 0
    first = manifest(out)

    result = cli("demo", "--output", out, *QUICK)
    assert result.exit_code == 0, result.stderr
    assert statuses(out) == {"convert": "skipped", "classes": "skipped", "train": "skipped", "export": "skipped"}
    assert manifest(out)["stages"]["export"]["outputs"] == first["stages"]["export"]["outputs"]

    # more steps: the same model goes on from its last checkpoint (no new conversion or class images)
    longer = [str(a) for a in QUICK]
    longer[1] = "6"
    result = cli("demo", "--output", out, *longer)
    assert result.exit_code == 0, result.stderr
    assert statuses(out) == {"convert": "skipped", "classes": "skipped", "train": "done", "export": "done"}
    assert "resuming from" in result.stderr and "step-4" in result.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 6 and report["steps_this_run"] == 2
    assert Path(manifest(out)["outputs"]["export"]).name.endswith("-step-6.safetensors")


def test_a_changed_setting_starts_afresh_and_keeps_the_old_checkpoints(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("demo", "--output", out, *QUICK).exit_code == 0
    result = cli("demo", "--output", out, *QUICK, "--learning-rate", "1e-4")  # not the demo's 3e-4
    assert result.exit_code == 0, result.stderr
    assert statuses(out)["train"] == "done" and "starts afresh" in result.stderr
    (aside,) = (out / "previous").iterdir()
    assert (aside / "step-4" / "unet").is_dir()  # nothing finished is ever deleted
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps_this_run"] == 4


def write_run_toml(tmp_path: Path, model: Path, body: str = "") -> Path:
    photos = write_photos(tmp_path / "photos", count=3)
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{model}"\n'
        f'output = "out"\n'
        "[train]\n"
        f'instance_data_dir = "{photos}"\n'
        'instance_prompt = "a photo of sks thing"\n'
        'class_prompt = "a photo of thing"\n'
        "with_prior_preservation = true\n"
        f"resolution = {RES}\nseed = 3\nmax_train_steps = 3\nsave_interval = 100\n"
        "num_class_images = 2\nclass_inference_steps = 2\n" + body
    )
    return config


def test_run_toml_with_convert_and_export_tables(cli, tmp_path, tiny_sd1):
    tables = '[convert]\nmodel_type = "sd1"\n[export]\nhalf = false\nname = "alice"\n'
    config = write_run_toml(tmp_path, tiny_sd1, tables)
    result = cli("run", "--config", config, "--max-train-steps", 2)  # a flag overrides the file
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"  # relative paths in run.toml are relative to the file
    data = manifest(out)
    assert data["status"] == "done" and data["config"]["config_file"] == str(config)
    assert Path(data["outputs"]["export"]) == out / "export" / "alice-step-2.safetensors"
    with safe_open(out / "export" / "alice-step-2.safetensors", "pt") as f:
        assert str(f.get_slice("model.diffusion_model.out.2.weight").get_dtype()) == "F32"
    # class images defaulted to OUTPUT/class_images/<class prompt>
    assert len(list((out / "class_images" / "a-photo-of-thing").glob("*.png"))) == 2
    # the model was hashed once, for the manifest, and the conversion's provenance records that digest
    provenance = json.loads((out / "base" / "dreambooth.json").read_text())
    assert provenance["sha256"] == data["stages"]["convert"]["inputs"]["model"]["sha256"] == _sha256(tiny_sd1)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[convert]\nema_weights = true\n", "unknown setting 'ema_weights'"),
        ('[export]\nformat = "zip"\n', "format 'zip' is unknown"),
        ("learning_rate = -1\n", "--learning-rate must be positive"),  # still in [train]
        ("train_batch_size = 0\n", "--train-batch-size must be at least 1"),
    ],
)
def test_run_toml_mistakes_are_one_line_errors(cli, tmp_path, tiny_sd1, body, expected):
    config = write_run_toml(tmp_path, tiny_sd1, body)
    result = cli("run", "--config", config)
    assert result.exit_code == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "base").exists()  # caught before any heavy work


def test_missing_model_in_run_toml(cli, tmp_path):
    config = write_run_toml(tmp_path, tmp_path / "nope.safetensors")
    result = cli("run", "--config", config)
    assert result.exit_code == 2 and "nope.safetensors does not exist" in result.stderr


def test_sigterm_during_training_saves_and_the_next_run_resumes(tmp_path, tiny_sd1):
    """What `docker stop` does: SIGTERM mid-training → a checkpoint, exit 130, manifest says interrupted."""
    config = write_run_toml(tmp_path, tiny_sd1, '[convert]\nmodel_type = "sd1"\n')
    command = [sys.executable, "-m", "dreambooth", "--log-format", "json", "run", "--config", str(config),
               "--max-train-steps", "400"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if '"train_step"' in line and '"step": 3' in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "training never started"
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130, rest
    out = tmp_path / "out"
    data = manifest(out)
    assert data["status"] == "interrupted" and data["stages"]["train"]["status"] == "interrupted"
    saved = sorted((out / "checkpoints").iterdir())
    assert saved and saved[-1].name.startswith("step-")
    step = int(saved[-1].name.split("-")[1])

    done = subprocess.run([*command[:-2], "--max-train-steps", str(step + 2)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert statuses(out) == {"convert": "skipped", "classes": "skipped", "train": "done", "export": "done"}
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == step + 2 and report["steps_this_run"] == 2


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_lora_run_records_its_settings_exports_the_lora_and_restarts_when_they_change(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("demo", "--output", out, *QUICK, "--adapter", "lora", "--lora-rank", 4)
    assert result.exit_code == 0, result.stderr
    data = manifest(out)
    assert data["config"]["train"]["adapter"] == "lora" and data["config"]["train"]["lora_rank"] == 4
    assert data["stages"]["train"]["inputs"]["adapter"] == "lora"
    exported = Path(data["outputs"]["export"])
    assert exported.name == "tiny-sd1-dreambooth-lora-step-4.safetensors"
    with safe_open(exported, "pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())  # noqa: SIM118
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["modelspec.architecture"].endswith("/lora")
    assert (out / "checkpoints" / "step-4" / "lora" / "unet.safetensors").is_file()
    assert json.loads((out / "fidelity.json").read_text())["subject_fidelity_after"] >= 0

    # a LoRA setting is a learning setting: changing it moves the old checkpoints aside and trains afresh
    again = cli("demo", "--output", out, *QUICK, "--adapter", "lora", "--lora-rank", 8)
    assert again.exit_code == 0, again.stderr
    assert "starts afresh" in again.stderr
    assert list((out / "previous").glob("*/step-4/lora"))
    with safe_open(Path(manifest(out)["outputs"]["export"]), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "8"
