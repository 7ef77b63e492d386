"""`--preset NAME`: shipped settings a run starts from (the config file and the flags win), listed by
`dreambooth train --list-presets`."""

import json

import pytest

from dreambooth import families
from dreambooth.adapters import with_family_defaults
from dreambooth.config import build_train_config, presets
from dreambooth.tiny_model import write_tiny_diffusers, write_tiny_flux
from tests.train_helpers import base_args

FAMILY_OF = {"classic-sd15": "sd1", "sd15-lora": "sd1", "sdxl-lora": "sdxl", "sdxl-full-low-vram": "sdxl",
             "flux-lora": "flux-dev"}  # fmt: skip


def test_the_presets_the_issue_names_are_shipped():
    assert set(presets()) == set(FAMILY_OF)
    assert all(p["description"] for p in presets().values())


@pytest.mark.parametrize("name", sorted(FAMILY_OF))
def test_every_preset_is_a_valid_run_of_its_family(name, photos, tmp_path):
    kind = FAMILY_OF[name]
    model = write_tiny_flux(tmp_path / "m", 0) if kind == "flux-dev" else write_tiny_diffusers(tmp_path / "m", 0, kind)
    flags = {"model": str(model), "instance_data_dir": str(photos), "instance_prompt": "a photo of sks thing",
             "output": str(tmp_path / "out"), "preset": name}  # fmt: skip
    if name == "classic-sd15":
        flags |= {"class_prompt": "a photo of thing", "class_data_dir": str(tmp_path / "class")}  # prior preservation
    cfg = build_train_config(None, flags)
    family = families.get(kind)
    family.check(cfg)
    cfg = with_family_defaults(cfg, family)
    settings = {k: v for k, v in presets()[name].items() if k != "description"}
    for key, value in settings.items():
        if key == "lora_targets":  # expanded into module names by the family
            assert cfg.lora_targets, key
        else:
            assert getattr(cfg, key) == value, key
    assert cfg.preset == name and "preset" not in cfg.explicit and "learning_rate" not in cfg.explicit


def test_the_config_file_and_the_flags_win(photos, tmp_path, model):
    config = tmp_path / "run.toml"
    config.write_text('preset = "sd15-lora"\nlora_rank = 8\nmax_train_steps = 10\n')
    flags = {"model": str(model), "instance_data_dir": str(photos), "instance_prompt": "a", "output": str(tmp_path),
             "max_train_steps": 20}  # fmt: skip
    cfg = build_train_config(config, flags)
    assert (cfg.lora_rank, cfg.max_train_steps, cfg.learning_rate, cfg.adapter) == (8, 20, 1e-4, "lora")
    assert {"lora_rank", "max_train_steps"} <= set(cfg.explicit) and "adapter" not in cfg.explicit


def test_a_preset_trains_and_the_report_names_it(cli, model, photos, tmp_path):
    flags = ("--preset", "sd15-lora", "--max-train-steps", 1, "--mixed-precision", "no", "--resolution", 32)
    result = cli(*base_args(model, photos, tmp_path / "out", *flags))
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["adapter"] == "lora" and report["lora_rank"] == 16
    assert report["learning_rate"] == 1e-4 and report["learning_rate_from"] == "--preset sd15-lora"


def test_list_presets_needs_nothing_else_and_an_unknown_name_is_one_line(cli, model, photos, tmp_path):
    listed = cli("train", "--list-presets")
    assert listed.exit_code == 0 and all(f"{name}:" in listed.stdout for name in FAMILY_OF)
    unknown = cli(*base_args(model, photos, tmp_path / "out", "--preset", "sd99"))
    assert unknown.exit_code == 2 and "--preset 'sd99' is unknown" in unknown.stderr
    assert "classic-sd15" in unknown.stderr and "Traceback" not in unknown.stderr
