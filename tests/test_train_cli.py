"""`dreambooth train` parsing: the classic command line, config files, and bad input caught before any work."""

import json
import os
import shlex
from pathlib import Path

import pytest

from dreambooth import train as training
from tests.train_helpers import RES, base_args, tiny_model, write_photos

CLASSIC = (
    "accelerate launch train_dreambooth.py --pretrained_model_name_or_path=models/diffusers_model "
    "--pretrained_vae_name_or_path=models/diffusers_model/vae --output_dir=models "
    '--concepts_list="concepts_list.json" --with_prior_preservation --prior_loss_weight=1.0 --seed=1337 '
    '--resolution=512 --mixed_precision="fp16" --lr_scheduler="constant" --use_8bit_adam '
    "--gradient_accumulation_steps=1 --train_batch_size=1 --max_train_steps=800 --save_interval=10000 "
    "--learning_rate=1e-6 --num_class_images=100 --lr_warmup_steps=0 --gradient_checkpointing"
)
KEBAB = (
    "dreambooth train --model models/diffusers_model --vae models/diffusers_model/vae --output models "
    "--concepts-list concepts_list.json --with-prior-preservation --prior-loss-weight 1.0 --seed 1337 "
    "--resolution 512 --mixed-precision fp16 --lr-scheduler constant --use-8bit-adam "
    "--gradient-accumulation-steps 1 --train-batch-size 1 --max-train-steps 800 --save-interval 10000 "
    "--learning-rate 1e-6 --num-class-images 100 --lr-warmup-steps 0 --gradient-checkpointing"
)


@pytest.fixture
def captured(monkeypatch):
    """Replace the training run by a recorder: these tests are about what the command line builds."""
    configs = []

    def record(cfg, *resolved):  # (what `run` resolved and checked already, passed on: none from `train`)
        configs.append(cfg)
        return {"steps": 0}

    monkeypatch.setattr(training, "train", record)
    return configs


@pytest.fixture
def classic_dir(tmp_path, monkeypatch):
    concepts = [
        {"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog",
         "instance_data_dir": "data/dog", "class_data_dir": "data/class_dog"},
        {"instance_prompt": "photo of qrt cat", "class_prompt": "photo of a cat",
         "instance_data_dir": "data/cat", "class_data_dir": "data/class_cat"},
    ]  # fmt: skip
    (tmp_path / "concepts_list.json").write_text(json.dumps(concepts))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_classic_command_line_parses_like_the_kebab_case_one(cli, captured, classic_dir):
    old = cli("train", *shlex.split(CLASSIC)[3:])  # `accelerate launch train_dreambooth.py` → `dreambooth train`
    new = cli(*shlex.split(KEBAB)[1:])
    assert old.exit_code == 0, old.stderr
    assert new.exit_code == 0, new.stderr
    assert captured[0] == captured[1]
    cfg = captured[0]
    assert cfg.model == Path("models/diffusers_model") and cfg.vae == Path("models/diffusers_model/vae")
    assert cfg.output == Path("models") and cfg.seed == 1337 and cfg.resolution == 512
    assert (cfg.max_train_steps, cfg.learning_rate, cfg.save_interval, cfg.num_class_images) == (800, 1e-6, 10000, 100)
    assert cfg.mixed_precision == "fp16" and cfg.use_8bit_adam and cfg.gradient_checkpointing
    assert cfg.with_prior_preservation and cfg.prior_loss_weight == 1.0
    assert [c.instance_prompt for c in cfg.concepts] == ["photo of zwx dog", "photo of qrt cat"]
    assert cfg.concepts[1].class_data_dir == Path("data/class_cat")


def test_snake_case_aliases_are_hidden_from_help(cli):
    result = cli("train", "--help")
    assert result.exit_code == 0
    assert "--max-train-steps" in result.stdout
    assert "--pretrained_model_name_or_path" not in result.stdout and "--learning_rate" not in result.stdout


def test_config_file_and_flags_merge_flags_win(cli, captured, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output, ./output, is created (the image's /src is read-only)
    (tmp_path / "run.toml").write_text(
        '[train]\nmodel = "base"\nmax_train_steps = 50\nlearning-rate = 2e-6\nresolution = 256\n'
        '[[train.concepts]]\ninstance_prompt = "sks dog"\ninstance_data_dir = "dog"\n'
    )
    assert cli("train", "--config", tmp_path / "run.toml", "--max-train-steps", "70").exit_code == 0
    cfg = captured[0]
    assert cfg.max_train_steps == 70 and cfg.learning_rate == 2e-6 and cfg.resolution == 256
    assert cfg.model == tmp_path / "base" and cfg.concepts[0].instance_data_dir == tmp_path / "dog"


def _bad(cli, *args):
    result = cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


def test_resolution_not_multiple_of_8(cli, model, tmp_path):
    line = _bad(cli, *base_args(model, write_photos(tmp_path / "p"), tmp_path / "o", "--resolution", 500))
    assert "--resolution 500" in line


def test_missing_and_empty_instance_dir(cli, model, tmp_path):
    assert "does not exist" in _bad(cli, *base_args(model, tmp_path / "nope", tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    assert "--instance-data-dir" in _bad(cli, *base_args(model, tmp_path / "empty", tmp_path / "o"))


def test_corrupt_and_odd_images_are_converted_or_skipped_by_name(cli, model, tmp_path):
    from PIL import Image

    from dreambooth.data import load_rgb, scan_images

    photos = write_photos(tmp_path / "p", count=1)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "truncated.png").write_bytes((photos / "photo-0.png").read_bytes()[:200])
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(photos / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(photos / "clear.png")
    Image.new("P", (40, 40), 3).save(photos / "palette.png")
    Image.new("I;16", (40, 40), 60000).save(photos / "deep.png")
    Image.new("RGB", (4, 4)).save(photos / "tiny.png")
    usable = {p.name for p in scan_images(photos, RES, "--instance-data-dir")}
    assert usable == {"photo-0.png", "cmyk.jpg", "clear.png", "palette.png", "deep.png"}
    assert load_rgb(photos / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparency → white
    assert load_rgb(photos / "deep.png").getpixel((0, 0))[0] == 233  # 16 bit scaled, not clipped
    # the warnings name each skipped file; a folder of only broken images is a clean error
    bad_only = tmp_path / "bad"
    bad_only.mkdir()
    (bad_only / "broken.jpg").write_bytes(b"nope")
    result = cli(*base_args(model, bad_only, tmp_path / "o"))
    assert result.exit_code == 2 and "broken.jpg" in result.stderr and "no usable images" in result.stderr


def test_malformed_concepts_list_names_entry_and_key(cli, model, tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{"instance_prompt": "a", "instance_data_dir": "x"}, {"instance_prompt": "b"}]))
    line = _bad(cli, "train", "--model", model, "--concepts-list", path)
    assert "entry 1" in line and "instance_data_dir" in line
    path.write_text("[{")
    assert "not valid JSON" in _bad(cli, "train", "--model", model, "--concepts-list", path)


def test_prior_preservation_needs_class_prompt_and_dir(cli, model, tmp_path):
    args = base_args(model, write_photos(tmp_path / "p"), tmp_path / "o", "--with-prior-preservation")
    assert "class prompt" in _bad(cli, *args)
    assert "class image folder" in _bad(cli, *args, "--class-prompt", "a thing")


def test_incomplete_model_folder(cli, tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    line = _bad(cli, *base_args(folder, write_photos(tmp_path / "p"), tmp_path / "o"))
    assert "unet/diffusion_pytorch_model.safetensors" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(cli, model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "--output" in _bad(cli, *base_args(model, write_photos(tmp_path / "p"), locked / "out"))


def test_not_enough_disk_is_refused_up_front(cli, model, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    result = cli(*base_args(model, write_photos(tmp_path / "p"), tmp_path / "o"))
    assert result.exit_code == 3 and "GiB" in result.stderr and "--keep-last" in result.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_output_that_cannot_be_created(cli, model, tmp_path):
    (tmp_path / "a-file").write_text("")
    line = _bad(cli, *base_args(model, write_photos(tmp_path / "p"), tmp_path / "a-file" / "out"))
    assert "--output" in line and "cannot be created" in line
