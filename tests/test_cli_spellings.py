"""The spellings users paste into `dreambooth train`: every boolean's snake_case forms and the forks' own names.

The lists come from the train command itself (its click parameters and `_TrainCommand.RENAMED`), so an option
added later is covered without touching this file.
"""

from enum import Enum

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
