"""The `dreambooth` command: parse, build a config object, call one library function. Nothing else lives here."""

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer

from dreambooth import __version__, events
from dreambooth.errors import UserError

app = typer.Typer(
    name="dreambooth",
    help="DreamBooth for Stable Diffusion: convert → class images → train → export, offline.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)
_debug = False


class ModelType(StrEnum):
    auto = "auto"
    sd1 = "sd1"
    sd2 = "sd2"
    sd2_v = "sd2-v"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


ModelTypeOption = Annotated[
    ModelType,
    typer.Option(
        "--model-type",
        help="Model family; auto reads it from the file (v-prediction: flag, yaml, metadata, sidecar, probe).",
    ),
]
OriginalConfigOption = Annotated[
    Path | None,
    typer.Option("--original-config", help="LDM yaml (e.g. v2-inference-v.yaml); its `parameterization` decides."),
]


def _version(value: bool) -> None:
    if value:
        print(f"dreambooth {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    log_format: Annotated[LogFormat, typer.Option("--log-format", help="text, or json lines for machines.")] = (
        LogFormat.text
    ),
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    global _debug
    _debug = debug
    events.set_log_format(log_format.value)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Single-file checkpoint (.ckpt or .safetensors).")],
    dest: Annotated[Path, typer.Argument(help="Diffusers folder to create.")],
    model_type: ModelTypeOption = ModelType.auto,
    original_config: OriginalConfigOption = None,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA UNet weights when present.")] = False,
    vae: Annotated[Path | None, typer.Option("--vae", help="Replacement VAE: a single file or diffusers folder.")] = (
        None
    ),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty DEST_DIR.")] = False,
) -> None:
    """Convert a single-file Stable Diffusion checkpoint into a diffusers folder (no network)."""
    from dreambooth.checkpoint.convert import ConvertOptions
    from dreambooth.checkpoint.convert import convert as convert_checkpoint

    options = ConvertOptions(model_type.value, original_config, ema, vae, overwrite)
    with events.stage(f"converting {src.name}"):
        summary = convert_checkpoint(src, dest, options)
    events.emit("converted", **summary)
    _report(summary, f"wrote {dest}")


@app.command()
def export(
    src: Annotated[Path, typer.Argument(help="Diffusers model folder (from convert or training).")],
    dest: Annotated[Path, typer.Argument(help="Output file: .safetensors, or .ckpt for old tools.")],
    half: Annotated[bool, typer.Option("--half", help="Store floating-point weights as fp16 (half the size).")] = (
        False
    ),
) -> None:
    """Export a diffusers folder as one A1111/ComfyUI-loadable file in the original SD layout."""
    from dreambooth.checkpoint.export import ExportOptions
    from dreambooth.checkpoint.export import export as export_model

    with events.stage(f"exporting {src}"):
        summary = export_model(src, dest, ExportOptions(half=half))
    events.emit("exported", **summary)
    _report(summary, f"wrote {dest}")


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Single-file checkpoint (.ckpt or .safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    model_type: ModelTypeOption = ModelType.auto,
    original_config: OriginalConfigOption = None,
) -> None:
    """Tell what a checkpoint is: family, prediction type, EMA, dtype, size, parameters, and the evidence."""
    from dreambooth.checkpoint.inspect import inspect_file

    report = inspect_file(file, model_type.value, original_config)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _report(report, str(file))


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
    """Report GPU, driver, versions, and whether 8-bit Adam, xformers and SDPA actually run here."""
    from dreambooth.doctor import run_doctor
    from dreambooth.errors import EnvironmentProblem

    report = run_doctor()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"dreambooth {report['versions']['dreambooth']} on {report['platform']} (WSL: {report['wsl']})")
        print("  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "dreambooth"))
        for check in report["checks"]:
            print(f"  {check['status'].upper():<4} {check['name']}: {check['detail']}")
    if not report["ok"]:
        failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
        raise EnvironmentProblem(f"doctor found problems: {', '.join(failed)}", "see the lines marked FAIL above")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", help="Where the demo writes its files.")] = Path("output/demo"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Run the built-in tiny model through convert → export (and a sample), offline, in seconds."""
    from dreambooth.demo import run_demo

    report = run_demo(output, seed)
    events.emit("demo_finished", **report)
    _report({k: v for k, v in report.items() if not isinstance(v, dict)}, f"demo finished: {output}")
    if not report["round_trip_identical"]:
        raise UserError("the demo's round trip was not exact", "please report this with output/demo/demo_report.json")


def _report(data: dict, title: str) -> None:
    """Human summary on stdout (text mode); in JSON mode the event already carried it."""
    if events._json_mode:
        return
    print(title)
    for key, value in data.items():
        if isinstance(value, list):
            print(f"  {key}:")
            for item in value:
                print(f"    - {item}")
        elif isinstance(value, dict):
            print(
                f"  {key}: " + ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in value.items())
            )
        else:
            print(f"  {key}: {value}")


def _quiet_libraries() -> None:
    """Our own progress and report are what the user reads; the libraries' chatter and bars would bury them."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    # bitsandbytes warns at import, on every CPU-only run, about an optional kernel hub package
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per user error (exit 2, or 3 for the environment), 130 on Ctrl-C."""
    _quiet_libraries()
    try:
        app(args=argv, prog_name="dreambooth", standalone_mode=False)
    except UserError as exc:
        if _debug:
            raise
        events.error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        events.error("interrupted", None)
        sys.exit(130)
