"""The spellings users paste into `dreambooth train`: every boolean's snake_case forms and the forks' own names.

The lists come from the train command itself (its click parameters and `_TrainCommand.RENAMED`), so an option
added later is covered without touching this file.
"""

import json
import shlex
from enum import Enum
from pathlib import Path

import pytest
import typer

from dreambooth.cli import _TrainCommand, app

COMMAND = typer.main.get_command(app).commands["train"]
# every `--x/--no-x` option: (parameter name, "--x", "--no-x")
BOOLEANS = [(p.name, p.opts[0], p.secondary_opts[0]) for p in COMMAND.params if getattr(p, "secondary_opts", None)]


def parse(*args: str) -> dict:
    """What `dreambooth train ARGS` hands on: the parameters the command line set (None: not given)."""
    with COMMAND.make_context("dreambooth train", list(args)) as ctx:
        return {name: value for name, value in ctx.params.items() if value not in (None, ())}


def snake(flag: str) -> str:
    return "--" + flag[2:].replace("-", "_")


def test_every_boolean_is_found():
    """The derived list is the whole list (17 when this was written; a new one only adds to it)."""
    names = {name for name, _, _ in BOOLEANS}
    assert len(BOOLEANS) >= 17
    assert {"gradient_checkpointing", "cache_latents", "random_flip", "with_prior_preservation"} <= names


@pytest.mark.parametrize(("name", "on", "off"), BOOLEANS, ids=[name for name, _, _ in BOOLEANS])
def test_snake_case_spellings_of_a_boolean_parse_like_the_kebab_ones(name, on, off):
    assert parse(on) == {name: True} and parse(off) == {name: False}
    assert parse(snake(on)) == parse(on)  # --gradient_checkpointing
    assert parse(snake(off)) == parse(off)  # --no_gradient_checkpointing
    assert parse(snake(on), snake(off)) == {name: False}  # the last one wins, as with the kebab ones


def test_the_forks_names_parse_like_ours():
    """ShivamShrirao's fork: `--hflip` is our `--random-flip`, `--not_cache_latents` our `--no-cache-latents`."""
    assert parse("--hflip") == parse("--random-flip") == {"random_flip": True}
    assert parse("--not_cache_latents") == parse("--no-cache-latents") == {"cache_latents": False}


@pytest.mark.parametrize(("old", "new"), sorted(_TrainCommand.RENAMED.items()))
def test_every_renamed_flag_parses_like_its_new_name(old, new):
    param = next((p for p in COMMAND.params if new in (*p.opts, *getattr(p, "secondary_opts", []))), None)
    assert param is not None, f"{old} is an alias of {new}, which `dreambooth train` does not have"
    if getattr(param, "is_flag", False):
        assert parse(old) == parse(new)
    else:
        # "3" is an int, a float, a path and a string: what every renamed option takes parses it (a choice: its first)
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        value = next(iter(annotation)).value if isinstance(annotation, type) and issubclass(annotation, Enum) else "3"
        assert parse(old, value) == parse(new, value) and list(parse(new, value)) == [param.name]
        assert parse(f"{old}={value}") == parse(f"{new}={value}")


def test_an_unknown_snake_case_flag_is_still_refused():
    with pytest.raises(Exception, match="No such option"):
        parse("--no_such_flag")


# --- every spelling of today's command, frozen --------------------------------------------------------------------
# tests/golden/train-flags.json holds every command line below as `dreambooth train` parsed it when the options were
# still written out by hand in cli.py (889abb3); the options are generated from TrainConfig since. Re-written only by
# `python tests/test_cli_spellings.py` — and then only when a spelling is meant to change.
GOLDEN = Path(__file__).parent / "golden" / "train-flags.json"
SAMPLE = {int: "3", float: "0.5", str: "abc", Path: "some/folder", list[str]: "abc"}


def plain(value):
    """A parsed value as JSON keeps it (an enum's value, a path's text, a list for a tuple)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def values_of(param) -> list[str]:
    """Values worth parsing for one option: every choice of a choice, one sample of anything else."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [member.value for member in annotation]
    if annotation not in SAMPLE:
        raise AssertionError(f"{param.name}: no sample value for {annotation!r}; add one to SAMPLE")
    return [SAMPLE[annotation]]


def command_lines(command) -> list[list[str]]:
    """Every spelling the command takes, each as a short command line: kebab and snake case, `--x v` and `--x=v`,
    both halves of each boolean, every renamed and value-carrying alias of the forks."""
    lines = []
    for param in command.params:
        if not param.opts[0].startswith("--"):
            continue
        names = [*param.opts, *[snake(o) for o in param.opts if "-" in o[2:]]]
        if getattr(param, "is_flag", False):
            off = list(getattr(param, "secondary_opts", []))
            lines += [[n] for n in [*names, *off, *[snake(o) for o in off]]]
            continue
        for name in names:
            for value in values_of(param):
                lines += [[name, value], [f"{name}={value}"]]
        if getattr(param, "multiple", False):
            lines.append([names[0], "first", names[0], "second"])
    for old, new in _TrainCommand.RENAMED.items():
        param = next(p for p in command.params if new in (*p.opts, *getattr(p, "secondary_opts", [])))
        lines += [[old]] if getattr(param, "is_flag", False) else [[old, v] for v in values_of(param)]
    lines += [[name] for name in _TrainCommand.FLAGS_WITH_VALUE]
    return lines


def parsed_lines(command) -> dict[str, dict]:
    out = {}
    for line in command_lines(command):
        with command.make_context("dreambooth train", list(line)) as ctx:
            out[" ".join(line)] = {k: plain(v) for k, v in ctx.params.items() if v not in (None, ())}
    return out


def test_every_spelling_of_the_hand_written_command_parses_as_it_did():
    golden = json.loads(GOLDEN.read_text())
    assert len(golden) > 500  # every option of the hand-written command, several spellings each
    for line, expected in golden.items():
        with COMMAND.make_context("dreambooth train", shlex.split(line)) as ctx:
            got = {k: plain(v) for k, v in ctx.params.items() if v not in (None, ())}
        assert got == expected, line


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(parsed_lines(COMMAND), indent=1, sort_keys=True) + "\n")
