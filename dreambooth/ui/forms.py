"""The new-run form, generated from TrainConfig's settings (the same names, defaults, choices and help as
`dreambooth train --help`), and the run.toml it becomes.

A form's values are strings; an empty one means "not given" (the preset, then the config's default, apply). They are
checked by building the TrainConfig exactly as `dreambooth run --config run.toml` will, so an error is the CLI's own
one-line message, shown beside the setting it names.
"""

import json
import math
import re
import tomllib
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from dreambooth.config import PANELS, PATH_SETTINGS, TrainConfig, build_train_config, flag, presets
from dreambooth.errors import UserError
from dreambooth.ui.volumes import OutsideVolume, Volumes, inside

# chosen on the page itself (the model and photo pickers, the run's name), not in the settings' panels
PICKED = ("model", "output", "instance_data_dir", "instance_prompt", "class_prompt", "preset")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def form_fields() -> list[dict]:
    """Every setting the form shows, in the --help panels' order: name, flag, panel, help, kind, choices, default."""
    out = []
    for setting in fields(TrainConfig):
        meta = setting.metadata
        if meta["panel"] is None or setting.name in PICKED:
            continue
        out.append(
            {
                "name": setting.name,
                "flag": flag(setting.name),
                "panel": meta["panel"],
                "help": meta["help"],
                "kind": _kind(setting),
                "choices": list(meta["choices"]),
                "default": _shown(setting.default),
            }
        )
    return sorted(out, key=lambda f: PANELS.index(f["panel"]))


def _kind(setting) -> str:
    if setting.metadata["choices"]:
        return "choice"
    kind = setting.metadata["option_type"] or setting.type
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    kind = args[0] if isinstance(kind, typing.types.UnionType) else kind
    if typing.get_origin(kind) is tuple:
        return "lines"
    return {bool: "bool", int: "int", float: "float", Path: "path"}.get(kind, "text")


def _shown(default) -> str:
    if default is MISSING or default is None or default == ():
        return ""
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def parse_settings(form: dict[str, str], volumes: Volumes) -> tuple[dict, dict[str, str]]:
    """Form strings → settings (only those given), and an error per field that cannot be read."""
    settings, errors = {}, {}
    for spec in form_fields():
        raw = (form.get(spec["name"]) or "").strip()
        if not raw:
            continue
        try:
            settings[spec["name"]] = _value(spec, raw, volumes)
        except (ValueError, OutsideVolume) as exc:
            errors[spec["name"]] = f"{spec['flag']}: {exc}"
    return settings, errors


def _value(spec: dict, raw: str, volumes: Volumes):
    kind = spec["kind"]
    if kind == "bool":
        if raw not in ("on", "off"):
            raise ValueError("choose on or off")
        return raw == "on"
    if kind == "int":
        return int(raw)
    if kind == "float":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if kind == "choice":
        if raw not in spec["choices"]:
            raise ValueError(f"choose one of {', '.join(spec['choices'])}")
        return raw
    if kind == "lines":
        return [line.strip() for line in raw.splitlines() if line.strip()]
    if kind == "path" or spec["name"] in PATH_SETTINGS:
        return str(volume_path(raw, volumes))
    return raw


def volume_path(raw: str, volumes: Volumes) -> Path:
    """An absolute path the user typed, accepted only inside one of the four volumes."""
    path = Path(raw)
    if not path.is_absolute():
        raise OutsideVolume(f"{raw!r}: give the full path, e.g. /models/… or /data/…")
    for name in ("models", "data", "output", "cache"):
        root = volumes.root(name)
        if path == root or path.is_relative_to(root):
            return inside(root, path.relative_to(root).as_posix() or ".", must_exist=False)
    raise OutsideVolume(f"{raw!r} is outside the folders this page may use (/models, /data, /output, /cache)")


def run_settings(form: dict[str, str], volumes: Volumes) -> tuple[str, dict, dict[str, str]]:
    """The run's name and every setting of its run.toml (model, output, the concept, the preset, the panels'
    settings), with an error per field; the settings are checked as `dreambooth run` checks them."""
    errors: dict[str, str] = {}
    name = (form.get("run_name") or "").strip()
    if not RUN_NAME.match(name):
        errors["run_name"] = "a name of letters, digits, '.', '_' or '-' (at most 64), e.g. alice-lora"
    settings: dict = {}
    for key, volume in (("model", "models"), ("instance_data_dir", "data")):
        raw = (form.get(key) or "").strip()
        try:
            settings[key] = str(inside(volumes.root(volume), raw)) if raw else None
        except OutsideVolume as exc:
            errors[key] = str(exc)
        if not raw:
            errors[key] = f"pick one from /{volume}"
    for key in ("instance_prompt", "class_prompt", "preset"):
        if (form.get(key) or "").strip():
            settings[key] = form[key].strip()
    if settings.get("preset") and settings["preset"] not in presets():
        errors["preset"] = f"unknown preset {settings['preset']!r}"
    panel_settings, panel_errors = parse_settings(form, volumes)
    settings.update(panel_settings)
    errors.update(panel_errors)
    if not errors.get("run_name"):
        settings["output"] = str(volumes.output / name)
    settings = {k: v for k, v in settings.items() if v is not None}
    if not errors:
        errors.update(check(settings))
    return name, settings, errors


def check(settings: dict) -> dict[str, str]:
    """The CLI's own check of the settings: {} or the one-line error beside the setting it names."""
    flags = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        build_train_config(None, flags)
    except UserError as exc:
        text = f"{exc.message}" + (f" — {exc.hint}" if getattr(exc, "hint", None) else "")
        return {_named_field(exc.message): text}
    return {}


def _named_field(message: str) -> str:
    """The setting a CLI message is about: the first --flag it names (else the whole form)."""
    for match in re.finditer(r"--([a-z0-9-]+)", message):
        name = match.group(1).replace("-", "_")
        if name in {f.name for f in fields(TrainConfig)} or name in ("instance_data_dir", "instance_prompt"):
            return name
    return "form"


def to_toml(settings: dict) -> str:
    """run.toml: model and output at the top, every other setting under [train] (what `make train CONFIG=…` reads)."""
    top = {k: settings[k] for k in ("model", "output") if k in settings}
    train = {k: v for k, v in settings.items() if k not in top}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    lines += ["", "[train]", *(f"{k} = {_toml_value(v)}" for k, v in train.items())]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != {**top, "train": train}:  # what we write must read back as the same settings
        raise ValueError("a setting did not survive TOML")
    return text


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # a TOML basic string: JSON's escapes are TOML's, but TOML also forbids a raw DEL
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
