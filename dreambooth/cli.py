"""The `dreambooth` command: parse, build a config object, call one library function. Nothing else lives here."""

import json
import shlex
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, ClassVar

import typer

from dreambooth import __version__, events
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


class MixedPrecision(StrEnum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class LrScheduler(StrEnum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Attention(StrEnum):
    sdpa = "sdpa"
    xformers = "xformers"


class AdamImpl(StrEnum):
    auto = "auto"
    for_loop = "for-loop"
    foreach = "foreach"
    fused = "fused"


class ReportTo(StrEnum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"
    all = "all"


class Distributed(StrEnum):
    ddp = "ddp"
    deepspeed_zero2 = "deepspeed-zero2"
    deepspeed_zero3 = "deepspeed-zero3"


class AdapterKind(StrEnum):
    full = "full"
    lora = "lora"


class Loss(StrEnum):
    l2 = "l2"
    huber = "huber"
    smooth_l1 = "smooth-l1"
    smooth_l1_kohya = "smooth_l1"  # kohya's spelling (--loss_type smooth_l1): the same loss


class HuberSchedule(StrEnum):
    constant = "constant"
    exponential = "exponential"
    snr = "snr"


class EmaDevice(StrEnum):
    gpu = "gpu"
    cpu = "cpu"


class BasePrecision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp8 = "fp8"
    int8 = "int8"
    nf4 = "nf4"


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"


class TimestepSampling(StrEnum):
    uniform = "uniform"
    sigmoid = "sigmoid"
    logit_normal = "logit-normal"
    shift = "shift"
    flux_shift = "flux-shift"


class FlowWeighting(StrEnum):
    none = "none"
    sigma_sqrt = "sigma-sqrt"
    cosmap = "cosmap"


_DATA = "Data"
_PRIOR = "Prior preservation"
_OPT = "Optimisation"
_SAVE = "Saving"
_SPEED = "Speed and memory"
_SCALE = "Scaling out (several GPUs or machines)"
_ADAPTER = "What trains: the whole model or a LoRA"
_FLOW = "Flow matching (Flux.1)"


@app.command(cls=_TrainCommand, epilog="The classic script's snake_case flags (--max_train_steps, …) also work.")
def train(
    config: Annotated[Path | None, typer.Option("--config", help="TOML file with the settings; flags win.")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Base model: diffusers folder, or a .ckpt/.safetensors file.")
    ] = None,
    vae: Annotated[
        Path | None, typer.Option("--vae", help="Replacement VAE: a diffusers VAE folder or a .safetensors/.ckpt file.")
    ] = None,
    clip_l: Annotated[
        Path | None,
        typer.Option(
            "--clip-l", help="Flux given as its transformer's file: CLIP-L (clip_l.safetensors).", rich_help_panel=_FLOW
        ),
    ] = None,
    t5xxl: Annotated[
        Path | None,
        typer.Option(
            "--t5xxl",
            help="Flux given as its transformer's file: T5-XXL (t5xxl_fp16.safetensors).",
            rich_help_panel=_FLOW,
        ),
    ] = None,
    ae: Annotated[
        Path | None,
        typer.Option(
            "--ae", help="Flux given as its transformer's file: the VAE (ae.safetensors).", rich_help_panel=_FLOW
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Where checkpoints and reports go.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Converted models; default OUTPUT/cache.")
    ] = None,
    concepts_list: Annotated[
        Path | None, typer.Option("--concepts-list", help="JSON list of concepts.", rich_help_panel=_DATA)
    ] = None,
    instance_data_dir: Annotated[
        Path | None, typer.Option(help="Photos of the subject.", rich_help_panel=_DATA)
    ] = None,
    instance_prompt: Annotated[
        str | None, typer.Option(help="e.g. 'a photo of sks dog'.", rich_help_panel=_DATA)
    ] = None,
    class_data_dir: Annotated[Path | None, typer.Option(help="Class images folder.", rich_help_panel=_PRIOR)] = None,
    class_prompt: Annotated[str | None, typer.Option(help="e.g. 'a photo of dog'.", rich_help_panel=_PRIOR)] = None,
    with_prior_preservation: Annotated[bool | None, typer.Option(rich_help_panel=_PRIOR)] = None,
    prior_loss_weight: Annotated[float | None, typer.Option(rich_help_panel=_PRIOR)] = None,
    num_class_images: Annotated[int | None, typer.Option(rich_help_panel=_PRIOR)] = None,
    sample_batch_size: Annotated[int | None, typer.Option(rich_help_panel=_PRIOR)] = None,
    class_inference_steps: Annotated[int | None, typer.Option(rich_help_panel=_PRIOR)] = None,
    resolution: Annotated[int | None, typer.Option(rich_help_panel=_DATA)] = None,
    center_crop: Annotated[bool | None, typer.Option(rich_help_panel=_DATA)] = None,
    random_flip: Annotated[bool | None, typer.Option(rich_help_panel=_DATA)] = None,
    caption_extension: Annotated[
        str | None,
        typer.Option(
            help="Per-image captions: the first line of photo.txt beside photo.jpg for '.txt' (UTF-8); none or empty: "
            "the instance prompt. A caption without the instance prompt's identifier (its words that the class "
            "prompt lacks, e.g. 'sks') gets the instance prompt in front: '<instance prompt>, <caption>'. Class "
            "images: the class prompt, or their own caption files.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    max_token_length: Annotated[
        int | None,
        typer.Option(
            help="SD/SDXL: read prompts and captions up to 150 or 225 tokens, in CLIP's 75-token chunks (kohya's "
            "--max_token_length); default 75, CLIP's window, past which a prompt is cut (the run says so).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    caption_dropout: Annotated[
        float | None,
        typer.Option(help="Share of instance examples trained with an empty caption, e.g. 0.1.", rich_help_panel=_DATA),
    ] = None,
    buckets: Annotated[
        bool | None,
        typer.Option(
            help="Aspect-ratio buckets of about resolution² px (sides multiples of --bucket-step) instead of square "
            "crops; each batch from one bucket; small images are never upscaled.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    bucket_min_side: Annotated[
        int | None, typer.Option(help="Shortest bucket side (default 256, or --resolution).", rich_help_panel=_DATA)
    ] = None,
    bucket_max_side: Annotated[
        int | None, typer.Option(help="Longest bucket side (default 2 × --resolution).", rich_help_panel=_DATA)
    ] = None,
    bucket_step: Annotated[
        int | None, typer.Option(help="Bucket sides are multiples of it (default 64).", rich_help_panel=_DATA)
    ] = None,
    seed: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    train_batch_size: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    max_train_steps: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Default 5e-6 (full), 1e-4 (LoRA).", rich_help_panel=_OPT)
    ] = None,
    text_encoder_lr: Annotated[
        float | None, typer.Option(help="The text encoder's own rate (default: --learning-rate).", rich_help_panel=_OPT)
    ] = None,
    adapter: Annotated[
        AdapterKind | None,
        typer.Option(
            help="full: fine-tune the whole UNet; lora: train LoRA layers (kohya/A1111 file).", rich_help_panel=_ADAPTER
        ),
    ] = None,
    full_bf16: Annotated[
        bool | None,
        typer.Option(
            help="Full fine-tune: keep the trained weights in bf16, no fp32 master copy (kohya's --full_bf16; needs "
            "--mixed-precision bf16). Default: on for Flux with bf16.",
            rich_help_panel=_ADAPTER,
        ),
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="LoRA rank (network dim), default 16.", rich_help_panel=_ADAPTER)
    ] = None,
    lora_alpha: Annotated[
        float | None,
        typer.Option(help="LoRA alpha; scale = alpha / rank (default: the rank).", rich_help_panel=_ADAPTER),
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option(rich_help_panel=_ADAPTER)] = None,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: attention (default), feed-forward, projections, or module names.",
            rich_help_panel=_ADAPTER,
        ),
    ] = None,
    lora_conv_rank: Annotated[
        int | None, typer.Option(help="> 0: LoCon, the 3×3 convolutions at this rank.", rich_help_panel=_ADAPTER)
    ] = None,
    lora_conv_alpha: Annotated[
        float | None, typer.Option(help="Default: --lora-conv-rank.", rich_help_panel=_ADAPTER)
    ] = None,
    scale_lr: Annotated[bool | None, typer.Option(rich_help_panel=_OPT)] = None,
    lr_scheduler: Annotated[LrScheduler | None, typer.Option(rich_help_panel=_OPT)] = None,
    lr_warmup_steps: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    lr_num_cycles: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    lr_power: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    adam_beta1: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    adam_beta2: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    adam_weight_decay: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    adam_epsilon: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="adamw (default), adamw8bit, paged-adamw8bit, prodigy, adafactor, schedulefree-adamw, came, lion8bit "
            "(kohya's names too, any case).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    optimizer_args: Annotated[
        str | None,
        typer.Option(
            help="The optimizer's own settings, kohya's way: 'weight_decay=0.01 betas=0.9,0.99 decouple=True'.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    max_grad_norm: Annotated[float | None, typer.Option(rich_help_panel=_OPT)] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option(rich_help_panel=_OPT)] = None,
    use_8bit_adam: Annotated[
        bool | None,
        typer.Option("--use-8bit-adam/--no-use-8bit-adam", help="= --optimizer adamw8bit.", rich_help_panel=_OPT),
    ] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(rich_help_panel=_OPT)] = None,
    mixed_precision: Annotated[MixedPrecision | None, typer.Option(rich_help_panel=_OPT)] = None,
    attention: Annotated[Attention | None, typer.Option(rich_help_panel=_OPT)] = None,
    train_text_encoder: Annotated[bool | None, typer.Option(rich_help_panel=_OPT)] = None,
    text_encoder_steps: Annotated[
        int | None, typer.Option(help="Train the text encoder only for the first N steps.", rich_help_panel=_OPT)
    ] = None,
    cache_latents: Annotated[bool | None, typer.Option(rich_help_panel=_OPT)] = None,
    offset_noise: Annotated[float | None, typer.Option(help="e.g. 0.05.", rich_help_panel=_OPT)] = None,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR weighting, e.g. 5.", rich_help_panel=_OPT)] = None,
    loss: Annotated[
        Loss | None,
        typer.Option(
            help="l2 (default), or kohya's pseudo-Huber (huber) or smooth L1, robust to outlier pixels, with a "
            "threshold scheduled over the timesteps.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    huber_schedule: Annotated[
        HuberSchedule | None,
        typer.Option(
            help="The threshold over the timesteps (default: snr for SD/SDXL, exponential for Flux).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    huber_c: Annotated[
        float | None,
        typer.Option(help="The threshold (constant) or its end value, in (0, 1]; 0.1.", rich_help_panel=_OPT),
    ] = None,
    huber_scale: Annotated[float | None, typer.Option(help="Scales the threshold; 1.0.", rich_help_panel=_OPT)] = None,
    debiased_estimation: Annotated[
        bool | None,
        typer.Option(
            help="Weight each example by 1/√SNR (SD/SDXL; kohya's --debiased_estimation_loss).", rich_help_panel=_OPT
        ),
    ] = None,
    multires_noise_iterations: Annotated[
        int | None,
        typer.Option(help="Multi-resolution noise levels, e.g. 6 (SD/SDXL); 0: off.", rich_help_panel=_OPT),
    ] = None,
    multires_noise_discount: Annotated[
        float | None, typer.Option(help="Each coarser level's weight factor; 0.3.", rich_help_panel=_OPT)
    ] = None,
    zero_terminal_snr: Annotated[
        bool | None,
        typer.Option(
            help="Rescale the noise schedule to zero terminal SNR (Lin et al. 2023): true black/white and the full "
            "range at the last step. Needs a v-prediction model.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    timestep_sampling: Annotated[
        TimestepSampling | None,
        typer.Option(
            help="How σ is drawn: uniform, sigmoid/logit-normal (of --logit-mean/--logit-std), shift (sigmoid then "
            "--flow-shift), flux-shift (sigmoid then Flux-dev's resolution-dependent shift). Default: the model's.",
            rich_help_panel=_FLOW,
        ),
    ] = None,
    flow_shift: Annotated[
        float | None,
        typer.Option(help="--timestep-sampling shift: σ' = kσ/(1+(k−1)σ), default 3.", rich_help_panel=_FLOW),
    ] = None,
    logit_mean: Annotated[float | None, typer.Option(help="Default 0.", rich_help_panel=_FLOW)] = None,
    logit_std: Annotated[float | None, typer.Option(help="Default 1.", rich_help_panel=_FLOW)] = None,
    flow_weighting: Annotated[
        FlowWeighting | None, typer.Option(help="Loss weighting over σ (SD3's), default none.", rich_help_panel=_FLOW)
    ] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="FLUX.1-dev's guidance input while training (default 1.0).", rich_help_panel=_FLOW),
    ] = None,
    t5_max_length: Annotated[
        int | None, typer.Option(help="T5 tokens per prompt (default: dev 512, schnell 256).", rich_help_panel=_FLOW)
    ] = None,
    low_vram: Annotated[
        bool | None,
        typer.Option(
            help="Profile: 8-bit paged AdamW, checkpointing, cached latents, fp16, the step inside backward "
            "(each still overridable).",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    paged_adam: Annotated[
        bool | None,
        typer.Option(
            help="8-bit Adam's states in paged (spillable) memory (= --optimizer paged-adamw8bit).",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    base_precision: Annotated[
        BasePrecision | None,
        typer.Option(
            help="How the frozen base is stored: auto (as --mixed-precision), bf16, fp16, fp8 (1 byte a weight, "
            "computed in the run's precision; kohya's --fp8_base), int8 or nf4 (bitsandbytes; QLoRA). What trains "
            "keeps its own precision.",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    blocks_to_swap: Annotated[
        int | None,
        typer.Option(
            help="LoRA: keep the frozen weights of the denoiser's last N blocks in host memory, each block copied to "
            "the GPU just before it computes (overlapped with compute).",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    vram_budget: Annotated[
        str | None,
        typer.Option(
            help="Fit the run in this much GPU memory, e.g. 12GB: the levers you did not set (checkpointing, fp8/NF4 "
            "base, swapped blocks, 8-bit Adam, …) are chosen from the estimate `dreambooth plan` prints.",
            rich_help_panel=_SPEED,
        ),
    ] = None,
    fused_backward: Annotated[
        bool | None,
        typer.Option(help="Update each weight inside backward (no clipping/accumulation).", rich_help_panel=_SPEED),
    ] = None,
    adam_impl: Annotated[
        AdamImpl | None, typer.Option(help="torch AdamW's kernels (auto = torch's choice).", rich_help_panel=_SPEED)
    ] = None,
    torch_compile: Annotated[
        bool | None, typer.Option(help="Compile the UNet's blocks (regional torch.compile).", rich_help_panel=_SPEED)
    ] = None,
    channels_last: Annotated[bool | None, typer.Option(help="NHWC convolutions.", rich_help_panel=_SPEED)] = None,
    report_to: Annotated[
        ReportTo | None,
        typer.Option(help="Also log to TensorBoard / W&B (offline) under OUTPUT/logs.", rich_help_panel=_SAVE),
    ] = None,
    save_interval: Annotated[int | None, typer.Option(rich_help_panel=_SAVE)] = None,
    save_min_steps: Annotated[int | None, typer.Option(rich_help_panel=_SAVE)] = None,
    save_fp16: Annotated[bool | None, typer.Option(rich_help_panel=_SAVE)] = None,
    export_single_file: Annotated[
        bool | None, typer.Option(help="Also write an A1111 .safetensors per checkpoint.", rich_help_panel=_SAVE)
    ] = None,
    keep_last: Annotated[int | None, typer.Option(help="Keep only the last K checkpoints.", rich_help_panel=_SAVE)] = (
        None
    ),
    save_sample_prompt: Annotated[list[str] | None, typer.Option(rich_help_panel=_SAVE)] = None,
    save_sample_negative_prompt: Annotated[str | None, typer.Option(rich_help_panel=_SAVE)] = None,
    n_save_sample: Annotated[int | None, typer.Option(rich_help_panel=_SAVE)] = None,
    save_guidance_scale: Annotated[float | None, typer.Option(rich_help_panel=_SAVE)] = None,
    save_infer_steps: Annotated[int | None, typer.Option(rich_help_panel=_SAVE)] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Require a checkpoint to continue from (re-runs resume anyway).")
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option(help="Processes (GPUs) of all machines together.", rich_help_panel=_SCALE)
    ] = None,
    num_machines: Annotated[int | None, typer.Option(rich_help_panel=_SCALE)] = None,
    machine_rank: Annotated[
        int | None, typer.Option(help="This machine's number, 0 … num-machines − 1.", rich_help_panel=_SCALE)
    ] = None,
    main_process_ip: Annotated[
        str | None, typer.Option(help="Address of the machine with rank 0.", rich_help_panel=_SCALE)
    ] = None,
    main_process_port: Annotated[int | None, typer.Option(rich_help_panel=_SCALE)] = None,
    distributed: Annotated[Distributed | None, typer.Option(rich_help_panel=_SCALE)] = None,
    offload_optimizer: Annotated[
        Offload | None, typer.Option(help="DeepSpeed: keep the optimizer in CPU memory.", rich_help_panel=_SCALE)
    ] = None,
    accelerate_config: Annotated[
        Path | None, typer.Option(help="An `accelerate config` file for the launch.", rich_help_panel=_SCALE)
    ] = None,
    validation_split: Annotated[
        float | None,
        typer.Option(
            help="Hold out this share of the instance images (e.g. 0.1) and log their loss.", rich_help_panel=_DATA
        ),
    ] = None,
    validation_dir: Annotated[
        Path | None,
        typer.Option(help="Held-out images of their own (captions as for training).", rich_help_panel=_DATA),
    ] = None,
    validation_every: Annotated[
        int | None,
        typer.Option(help="Steps between validations (default: --save-interval).", rich_help_panel=_DATA),
    ] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(
            help="Keep an exponential moving average of the trained weights, e.g. 0.999.", rich_help_panel=_OPT
        ),
    ] = None,
    ema_device: Annotated[
        EmaDevice | None, typer.Option(help="Where the average lives (cpu: no GPU memory).", rich_help_panel=_OPT)
    ] = None,
    ema_start_step: Annotated[
        int | None, typer.Option(help="Before this step the average follows the weights.", rich_help_panel=_OPT)
    ] = None,
    export_ema: Annotated[
        bool | None,
        typer.Option(
            help="Checkpoints, exports and samples hold the average (default with --ema-decay).", rich_help_panel=_OPT
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Start from shipped settings (`--list-presets`): the classic SD 1.5 recipe, SD 1.5 LoRA, SDXL LoRA, "
            "SDXL full on ~24 GB, Flux LoRA. The config file and flags win.",
        ),
    ] = None,
    list_presets: Annotated[
        bool | None, typer.Option("--list-presets", help="List the presets and what each sets, and stop.")
    ] = None,
    dry_run: Annotated[
        bool | None,
        typer.Option(
            "--dry-run",
            help="Print the estimated peak GPU memory and host RAM of this run, part by part, and stop (nothing "
            "loads: `dreambooth plan`).",
        ),
    ] = None,
) -> None:
    """Fine-tune a model (SD 1.x/2.x/XL, FLUX.1) on your photos (DreamBooth): the whole model or a LoRA."""
    given = dict(locals())  # first line: every parameter, None where the flag was not given
    from dreambooth import launch
    from dreambooth.config import build_train_config

    if list_presets:
        _list_presets()
        return
    flags = {k: _flag_value(v) for k, v in given.items() if k not in ("config", "dry_run", "list_presets")}
    cfg = build_train_config(config, flags)
    if dry_run:
        _plan(cfg)
        return
    _training_done(launch.train(cfg))  # in this process, or in the processes it launches


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
