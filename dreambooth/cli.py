"""The `dreambooth` command: parse, build a config object, call one library function. Nothing else lives here."""

import json
import shlex
import sys
import types
import typing
from dataclasses import MISSING, Field, fields
from enum import StrEnum
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer

from dreambooth import __version__, events
from dreambooth.config import DATA, MODEL, PRIOR, TrainConfig
from dreambooth.errors import UserError

app = typer.Typer(
    name="dreambooth",
    help="DreamBooth for Stable Diffusion 1.x/2.x/XL and FLUX.1: convert → class images → train → export, offline.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
)
_debug = False


class ModelType(StrEnum):
    auto = "auto"
    sd1 = "sd1"
    sd1_v = "sd1-v"  # an SD 1.x fine-tune trained for v-prediction
    sd2 = "sd2"
    sd2_v = "sd2-v"
    sdxl = "sdxl"  # SDXL base 1.0 and its fine-tunes
    sdxl_v = "sdxl-v"  # an SDXL fine-tune trained for v-prediction
    sdxl_refiner = "sdxl-refiner"


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
    clip_l: Annotated[Path | None, typer.Option("--clip-l", help="Flux: CLIP-L (clip_l.safetensors).")] = None,
    t5xxl: Annotated[Path | None, typer.Option("--t5xxl", help="Flux: T5-XXL (t5xxl_fp16.safetensors).")] = None,
    ae: Annotated[Path | None, typer.Option("--ae", help="Flux: the VAE (ae.safetensors).")] = None,
) -> None:
    """Convert a single-file checkpoint into a diffusers folder (no network): Stable Diffusion 1.x/2.x/XL, or a
    Flux.1 transformer with --clip-l, --t5xxl and --ae (or ComfyUI's all-in-one Flux checkpoint)."""
    from dreambooth.formats.convert import ConvertOptions
    from dreambooth.formats.convert import convert as convert_checkpoint

    options = ConvertOptions(model_type.value, original_config, ema, vae, overwrite, clip_l, t5xxl, ae)
    with events.stage(f"converting {src.name}"):
        summary = convert_checkpoint(src, dest, options)
    events.emit("converted", **summary)
    _report(summary, f"wrote {dest}")


class LoraFormat(StrEnum):
    kohya = "kohya"
    diffusers = "diffusers"


@app.command()
def export(
    src: Annotated[Path, typer.Argument(help="Model folder from convert or training, or a LoRA checkpoint.")],
    dest: Annotated[Path, typer.Argument(help="Output file (.safetensors, .ckpt); a folder for --format diffusers.")],
    half: Annotated[
        bool | None, typer.Option("--half/--no-half", help="fp16 weights (default: on for a LoRA, off otherwise).")
    ] = None,
    format: Annotated[
        LoraFormat | None,
        typer.Option("--format", help="LoRA checkpoints: kohya (A1111/ComfyUI, default) or diffusers."),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="LoRA checkpoints: bake the LoRA into the base, write a full file.")
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="LoRA checkpoints: the base model folder (default: the one trained on)."),
    ] = None,
) -> None:
    """Export a model as one A1111/ComfyUI-loadable file: a full checkpoint in the original SD layout, or a
    LoRA checkpoint as the kohya LoRA file (or merged into its base)."""
    from dreambooth import runlock
    from dreambooth.formats.lora import export_lora, is_lora_checkpoint

    # one writer per destination: a second export, or a run, writing there is refused and changes nothing
    with runlock.hold(runlock.destination_folder(dest), runlock.this_command()):
        if is_lora_checkpoint(src):
            with events.stage(f"exporting the LoRA {src}"):
                summary = export_lora(
                    src, dest, fmt=(format or LoraFormat.kohya).value, merge=merge, half=half is not False, base=base
                )
        else:
            from dreambooth.formats.export import ExportOptions
            from dreambooth.formats.export import export as export_model

            for given, name in ((format, "--format"), (merge, "--merge"), (base, "--base")):
                if given:
                    raise UserError(
                        f"{name} applies to LoRA checkpoints, and {src} is a full model folder",
                        f"drop {name}, or pass a checkpoint of a `--adapter lora` run (checkpoints/step-N)",
                    )
            with events.stage(f"exporting {src}"):
                summary = export_model(src, dest, ExportOptions(half=bool(half)))
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
    from dreambooth.formats.inspect import inspect_file

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


_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_EXTRA_ARGS)
def run(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", help="run.toml; without it, the built-in demo runs.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Output folder; default: run.toml's, else $DREAMBOOTH_OUTPUT.")
    ] = None,
) -> None:
    """convert → class images → train → export; finished stages with unchanged inputs are skipped.

    Any `dreambooth train` flag may follow and overrides run.toml (e.g. --max-train-steps 400).
    """
    import os

    from dreambooth.pipeline import load_run_config, run_pipeline

    flags = _train_flags(ctx.args)
    default_output = Path(os.environ.get("DREAMBOOTH_OUTPUT", "output"))
    if config is None:
        events.notice("no --config: running the built-in demo (tiny model, example images)")
        _run_demo(output or default_output, flags)
        return
    manifest = run_pipeline(load_run_config(config, {**flags, "output": output}, default_output))
    _finished(manifest)


@app.command(context_settings=_EXTRA_ARGS)
def demo(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "--output-dir", "--output_dir", help="Where the demo writes all its files.")
    ] = Path("output/demo"),
) -> None:
    """The built-in tiny model through convert → class images → train → export, offline, on a CPU.

    Any `dreambooth train` flag may follow and overrides the demo's settings (e.g. --max-train-steps 20).
    """
    _run_demo(output, _train_flags(ctx.args))


def _run_demo(output: Path, flags: dict) -> None:
    """The demo with every file under one folder: an output folder among the train flags is that folder."""
    from dreambooth.demo.run import run_demo

    flags = dict(flags)
    output = flags.pop("output", None) or output
    _finished(run_demo(output, flags))


def _finished(manifest: dict) -> None:
    stages = {name: record.get("status") for name, record in manifest["stages"].items()}
    events.emit(
        "run_finished", status=manifest["status"], seconds=manifest["seconds"], stages=stages, **manifest["outputs"]
    )
    _report({"stages": stages, **manifest["outputs"], "seconds": manifest["seconds"]}, "run finished")


def _train_flags(args: list[str]) -> dict:
    """Extra arguments of `run` / `demo`, parsed exactly as `dreambooth train` parses them (aliases included)."""
    if not args:
        return {}
    command = typer.main.get_command(app).commands["train"]
    with command.make_context("dreambooth train", list(args)) as ctx:
        params = dict(ctx.params)
    params.pop("config", None)
    params.pop("list_presets", None)
    if params.pop("dry_run", False):
        raise UserError("--dry-run is a `dreambooth train` flag", "run `dreambooth plan` with the same flags instead")
    return {k: _flag_value(v) for k, v in params.items()}


def _flag_value(value):
    """A parsed flag as the config takes it: an enum's value; None for a repeatable flag not given (click gives
    an empty tuple, which would otherwise wipe run.toml's or the demo's list, e.g. its --save-sample-prompt)."""
    if isinstance(value, StrEnum):
        return value.value
    return None if value == () else value


class _TrainCommand(typer.core.TyperCommand):
    """Accepts the classic script's snake_case flags as hidden aliases (`--max_train_steps=800`)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "--pretrained_model_name_or_path": "--model",
        "--pretrained_vae_name_or_path": "--vae",
        "--output_dir": "--output",
        "--hflip": "--random-flip",
        "--not_cache_latents": "--no-cache-latents",
        "--stop_text_encoder_training": "--text-encoder-steps",
        "--save_half": "--save-fp16",
        # kohya sd-scripts' names
        "--caption_dropout_rate": "--caption-dropout",
        "--t5xxl_max_token_length": "--t5-max-length",
        "--discrete_flow_shift": "--flow-shift",
        "--enable_bucket": "--buckets",
        "--min_bucket_reso": "--bucket-min-side",
        "--max_bucket_reso": "--bucket-max-side",
        "--bucket_reso_steps": "--bucket-step",
        "--loss_type": "--loss",
        "--debiased_estimation_loss": "--debiased-estimation",
        "--alpha_mask": "--masked-loss",  # kohya's: the alpha channel as the loss mask (ours reads it too)
        "--optimizer_type": "--optimizer",
    }
    # kohya's flags that take several values (argparse nargs="*"): the values joined into one
    MANY_VALUES: ClassVar[tuple[str, ...]] = ("--optimizer_args", "--optimizer-args")
    FLAGS_WITH_VALUE: ClassVar[dict[str, list[str]]] = {
        "--enable_xformers_memory_efficient_attention": ["--attention", "xformers"],
        "--fp8_base": ["--base-precision", "fp8"],  # kohya's
    }

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        # every spelling the command takes, the `--no-…` halves of `--x/--no-x` booleans included
        known = {
            name
            for param in self.params
            for name in (*getattr(param, "opts", []), *getattr(param, "secondary_opts", []))
        }
        rewritten: list[str] = []
        args = self._join_values(list(args))
        for arg in args:
            name, eq, value = arg.partition("=")
            if name in self.FLAGS_WITH_VALUE and not eq:
                rewritten += self.FLAGS_WITH_VALUE[name]
                continue
            if name in self.RENAMED or (name.startswith("--") and "_" in name):  # `--hflip` has no underscore
                new = self.RENAMED.get(name, name.replace("_", "-"))
                if new in known:
                    arg = new + eq + value
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)

    def _join_values(self, args: list[str]) -> list[str]:
        """`--optimizer_args a=1 b=2` (kohya: one value per word) as `--optimizer-args 'a=1 b=2'`; our own flag's
        one string stays as it is."""
        out: list[str] = []
        i = 0
        while i < len(args):
            out.append(args[i])
            if args[i] in self.MANY_VALUES:
                values = []
                while i + 1 < len(args) and not args[i + 1].startswith("-"):
                    values.append(args[i + 1])
                    i += 1
                if args[i - len(values)] == "--optimizer-args" and len(values) == 1:
                    out.append(values[0])
                else:  # each word one value, which may hold spaces: "betas=(0.9, 0.99)"
                    out.append(" ".join(shlex.quote(v) for v in values))
            i += 1
        return out


def _choice_type(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """The option's choices as Typer wants them: an enum whose members are the setting's values."""
    return StrEnum("".join(part.title() for part in name.split("_")), [(value, value) for value in values])


def _with_default(help_text: str, default) -> str:
    """The help with the config's default after it; nothing for "not set" (the help says what that means)."""
    if default in (None, (), MISSING):
        return help_text
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{help_text} Default: {shown}."


def _train_option(setting: Field) -> Parameter:
    """One `dreambooth train` option, generated from a TrainConfig field (its `config.setting` declaration).

    The option's value is None when the flag is not given, so that the config file, a preset or a profile can fill
    it in; the help shows the config's default instead."""
    meta = setting.metadata
    kind = meta["option_type"] or setting.type
    if isinstance(kind, types.UnionType):  # `int | None`: the option reads an int
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    if typing.get_origin(kind) is tuple:  # repeatable: --save-sample-prompt A --save-sample-prompt B
        kind = list[str]
    if meta["choices"]:
        kind = _choice_type(setting.name, meta["choices"])
    decls = (meta["option"],) if meta["option"] else ()
    option = typer.Option(*decls, help=_with_default(meta["help"], setting.default), rich_help_panel=meta["panel"])
    return Parameter(setting.name, Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option])


def _train_own_options(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file with the settings (run.toml); flags win.", rich_help_panel=MODEL),
    ] = None,
    concepts_list: Annotated[
        Path | None, typer.Option("--concepts-list", help="JSON list of concepts.", rich_help_panel=DATA)
    ] = None,
    instance_data_dir: Annotated[Path | None, typer.Option(help="Photos of the subject.", rich_help_panel=DATA)] = None,
    instance_prompt: Annotated[
        str | None, typer.Option(help="e.g. 'a photo of sks dog'.", rich_help_panel=DATA)
    ] = None,
    class_data_dir: Annotated[Path | None, typer.Option(help="Class images folder.", rich_help_panel=PRIOR)] = None,
    class_prompt: Annotated[str | None, typer.Option(help="e.g. 'a photo of dog'.", rich_help_panel=PRIOR)] = None,
    list_presets: Annotated[
        bool | None,
        typer.Option("--list-presets", help="List the presets and what each sets, and stop.", rich_help_panel=MODEL),
    ] = None,
    dry_run: Annotated[
        bool | None,
        typer.Option(
            "--dry-run",
            help="Print the estimated peak GPU memory and host RAM of this run, part by part, and stop (nothing "
            "loads: `dreambooth plan`).",
            rich_help_panel=MODEL,
        ),
    ] = None,
) -> None:
    """The options of `dreambooth train` that are not TrainConfig settings: the config file, the concept given by
    flags (the config holds it as `concepts`), and the two that stop before training."""


def _train_signature() -> Signature:
    """`dreambooth train`'s options: its own, then one per TrainConfig setting, in the config's order."""
    own = [
        p.replace(kind=Parameter.KEYWORD_ONLY) for p in signature(_train_own_options, eval_str=True).parameters.values()
    ]
    settings = [_train_option(f) for f in fields(TrainConfig) if f.metadata["panel"] is not None]
    return Signature(own + settings, return_annotation=None)


def train(**given: Any) -> None:
    """Fine-tune a model (SD 1.x/2.x/XL, FLUX.1) on your photos (DreamBooth): the whole model or a LoRA."""
    from dreambooth import launch
    from dreambooth.config import build_train_config

    if given["list_presets"]:
        _list_presets()
        return
    flags = {k: _flag_value(v) for k, v in given.items() if k not in ("config", "dry_run", "list_presets")}
    cfg = build_train_config(given["config"], flags)
    if given["dry_run"]:
        _plan(cfg)
        return
    _training_done(launch.train(cfg))  # in this process, or in the processes it launches


train.__signature__ = _train_signature()
app.command(cls=_TrainCommand, epilog="The classic script's snake_case flags (--max_train_steps, …) also work.")(train)


def _list_presets() -> None:
    from dreambooth.config import presets

    for name, settings in presets().items():
        shown = ", ".join(f"{k} = {v!r}" for k, v in settings.items() if k != "description")
        print(f"{name}: {settings.get('description', '')}\n    {shown}")


@app.command(context_settings=_EXTRA_ARGS)
def plan(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with the settings; flags win.")] = None,
) -> None:
    """Estimate a training run's peak GPU memory and host RAM, part by part, before anything loads.

    Takes `dreambooth train`'s flags (it is `train --dry-run`); with --vram-budget it shows the levers it would pick.
    """
    from dreambooth.config import build_train_config

    _plan(build_train_config(config, _train_flags(ctx.args)))


def _plan(cfg) -> None:
    from dreambooth.plan import plan_run

    plan = plan_run(cfg)
    events.emit("plan", **plan.to_dict())
    if not events._json_mode and not events.silenced():
        print(plan.render())


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but loopback needs the token (0.0.0.0: every network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page.")] = 7860,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="DREAMBOOTH_UI_TOKEN",
            help="The token every request must carry (generated and printed when --host is not loopback).",
        ),
    ] = None,
    models: Annotated[Path, typer.Option(envvar="DREAMBOOTH_MODELS", help="Base models (read).")] = Path("/models"),
    data: Annotated[Path, typer.Option(envvar="DREAMBOOTH_DATA", help="Photo folders (read; captions written).")] = (
        Path("/data")
    ),
    output: Annotated[Path, typer.Option(envvar="DREAMBOOTH_OUTPUT", help="Run folders (read and written).")] = Path(
        "/output"
    ),
    cache: Annotated[Path, typer.Option(envvar="DREAMBOOTH_CACHE", help="Caches (read and written).")] = Path("/cache"),
) -> None:
    """A local web page to prepare, start, watch, stop and resume runs (http://127.0.0.1:7860)."""
    from dreambooth.ui.server import serve as serve_page
    from dreambooth.ui.volumes import Volumes

    for name, folder in (("--models", models), ("--data", data)):
        if not folder.is_dir():
            raise UserError(f"{name} {folder}: no such folder", f"mount or create it, or pass {name} PATH")
    for folder in (output, cache):
        folder.mkdir(parents=True, exist_ok=True)
    if not 0 < port < 65536:
        raise UserError(f"--port {port} is not a port", "use 1–65535, e.g. 7860")
    serve_page(Volumes.at(models, data, output, cache), host=host, port=port, token=token or None)


@app.command("train-worker", hidden=True)
def train_worker(settings: Path) -> None:
    """One of the processes `dreambooth train --num-processes N` launches, with the settings it checked.
    The launching process reports when all are done."""
    from dreambooth import launch
    from dreambooth import train as training

    training.train(launch.read_settings(settings))


def _training_done(report: dict) -> None:
    events.emit("train_finished", **{k: v for k, v in report.items() if k not in ("losses", "settings")})
    _report({k: report[k] for k in ("steps", "seconds", "final_checkpoint", "report") if k in report}, "training done")


@app.command()
def sample(
    model: Annotated[
        Path,
        typer.Argument(
            help="A model: diffusers folder, single file (SD, or a Flux transformer with --clip-l/--t5xxl/--ae), or "
            "a training checkpoint, full or LoRA (OUTPUT/checkpoints/step-N: the base it names + what trained)."
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="What to draw.")],
    num_images: Annotated[int, typer.Option("--num-images", min=1)] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Image i comes from seed + i.")] = 0,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Default: the model's (20; schnell 4).")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option("--guidance-scale", help="Default: the model's (7.5; Flux dev 3.5).")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt")] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Default: a checkpoint's training size, else the model's.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="A LoRA file on top, FILE or FILE:SCALE (repeatable): kohya/A1111 or diffusers."),
    ] = None,
    max_token_length: Annotated[
        int | None,
        typer.Option("--max-token-length", help="SD/SDXL: prompts up to 150 or 225 tokens (a checkpoint: its own)."),
    ] = None,
    vae: Annotated[Path | None, typer.Option("--vae", help="Replacement VAE (folder or file).")] = None,
    clip_l: Annotated[Path | None, typer.Option("--clip-l", help="Flux: CLIP-L.")] = None,
    t5xxl: Annotated[Path | None, typer.Option("--t5xxl", help="Flux: T5-XXL.")] = None,
    ae: Annotated[Path | None, typer.Option("--ae", help="Flux: the VAE.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Folder for the PNGs; default MODEL/samples (a file's: ./samples).")
    ] = None,
) -> None:
    """Draw images from a model, a checkpoint as it is, or a base with LoRA files, with fixed seeds, plus a grid."""
    from dreambooth.sample import SampleOptions, sample_model

    options = SampleOptions(
        prompt, num_images, seed, steps, guidance_scale, negative_prompt, resolution, tuple(lora or ()),
        max_token_length, vae, clip_l, t5xxl, ae,
    )  # fmt: skip
    dest = output or (model / "samples" if model.is_dir() else Path("samples"))
    with events.stage(f"sampling {num_images} images"):
        paths = sample_model(model, options, dest)
    events.emit("sampled", files=[str(p) for p in paths])
    _report({"files": [str(p) for p in paths]}, f"wrote {dest}")


@app.command()
def report(
    output: Annotated[Path, typer.Argument(help="A run's output folder (what --output named), finished or not.")],
) -> None:
    """Write OUTPUT/report.html: samples per checkpoint, before/after, loss, exported files, stages, settings."""
    from dreambooth.report import write_report_page

    page = write_report_page(output)
    events.emit("report_written", path=str(page))
    _report({"open": page.resolve().as_uri()}, f"wrote {page}")


def _report(data: dict, title: str) -> None:
    """Human summary on stdout (text mode); in JSON mode the event already carried it."""
    if events._json_mode or events.silenced():
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
        code = app(args=argv, prog_name="dreambooth", standalone_mode=False)
        if isinstance(code, int) and code:  # typer turns KeyboardInterrupt into a returned 130 in this mode
            sys.exit(code)
    except UserError as exc:
        if _debug:
            raise
        events.error(exc.message, exc.hint)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors (an unknown flag, a bad value): typer's own copy of click's
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        if not events.silenced():  # several processes: the first one says it
            events.error("interrupted", None)
        sys.exit(130)
