"""`dreambooth train`'s options are generated from TrainConfig (config.setting): one declaration per setting.

What every spelling parses to is pinned in tests/test_cli_spellings.py; here: that each setting is an option with
the setting's own help, choices and panel, and nothing else is.
"""

import re
from dataclasses import fields
from enum import Enum

import typer
from typer.testing import CliRunner

from dreambooth.cli import app
from dreambooth.config import PANELS, TrainConfig

COMMAND = typer.main.get_command(app).commands["train"]
OPTIONS = {p.name: p for p in COMMAND.params}
SETTINGS = [f for f in fields(TrainConfig) if f.metadata["panel"] is not None]
# the options that are not settings: the config file, the concept given by flags, and the two that stop early
OWN = {"config", "concepts_list", "instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt",
       "list_presets", "dry_run"}  # fmt: skip


def test_every_setting_is_an_option_and_every_option_a_setting():
    assert {f.name for f in SETTINGS} | OWN == set(OPTIONS)
    assert {f.name for f in fields(TrainConfig)} - {f.name for f in SETTINGS} == {"concepts", "explicit"}


def test_an_option_carries_its_settings_help_panel_and_choices():
    for setting in SETTINGS:
        option = OPTIONS[setting.name]
        info = option.type_descriptor.parameter_info
        assert setting.metadata["help"], f"{setting.name} has no help"
        assert info.help.startswith(setting.metadata["help"])
        assert info.rich_help_panel == setting.metadata["panel"] in PANELS
        annotation = option.type_descriptor.annotation
        if setting.metadata["choices"]:
            assert issubclass(annotation, Enum) and [m.value for m in annotation] == list(setting.metadata["choices"])
        assert option.default is None  # not given: the config file, a preset or a profile may fill it in


def test_the_help_shows_the_configs_defaults():
    info = {name: OPTIONS[name].type_descriptor.parameter_info.help for name in ("resolution", "cache_latents")}
    assert info["resolution"].endswith("Default: 512.") and info["cache_latents"].endswith("Default: on.")
    assert "Default" not in OPTIONS["seed"].type_descriptor.parameter_info.help  # None: "not set" says itself


def test_help_groups_the_options_in_panels():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    titles = re.findall(r"╭─ (.+?) ─", result.output)
    assert set(PANELS) <= set(titles), set(PANELS) - set(titles)


def test_a_choice_the_config_refuses_is_not_offered():
    """Each offered value builds a config (or fails only for an unrelated reason), so the CLI's list is the config's."""
    from dreambooth.config import Concept
    from dreambooth.errors import UserError

    base = {"model": "m", "concepts": (Concept("sks dog", "photos"),)}
    for setting in SETTINGS:
        for value in setting.metadata["choices"]:
            try:
                TrainConfig(**base, **{setting.name: value})
            except UserError as exc:
                assert f"{value!r} is unknown" not in str(exc), (setting.name, exc)


def test_every_path_setting_of_a_config_file_is_relative_to_the_file(tmp_path):
    """The path settings are read from TrainConfig's types, so a new one (--validation-dir was missed by the
    hand-kept list) is resolved like the others."""
    from pathlib import Path

    from dreambooth.config import PATH_SETTINGS, build_train_config

    run = tmp_path / "project" / "run.toml"
    run.parent.mkdir()
    lines = [f'{name} = "rel/{name}"' for name in sorted(PATH_SETTINGS)]
    run.write_text("\n".join([*lines, 'instance_data_dir = "photos"', 'instance_prompt = "sks dog"']) + "\n")
    cfg = build_train_config(run, {})
    for name in PATH_SETTINGS:
        assert getattr(cfg, name) == run.parent / "rel" / name, name
    assert cfg.concepts[0].instance_data_dir == run.parent / "photos"
    assert {"model", "output", "validation_dir"} <= PATH_SETTINGS and all(
        isinstance(getattr(cfg, n), Path) for n in PATH_SETTINGS
    )
