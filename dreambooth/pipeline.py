"""`dreambooth run`: convert → class images → train → export, in order, on one output folder.

Every stage is idempotent. Before a stage runs, its inputs (files by sha256, settings) are reduced to one
fingerprint; a stage whose fingerprint matches the one recorded in OUTPUT/manifest.json, and whose outputs
are still there, is skipped. An interrupted training resumes from its last checkpoint (the trainer does that
by itself on the same output folder); a training whose *lineage* changed (the model, the images, or a setting
that changes what is learned) starts afresh, after moving the old checkpoints aside — never deleting them.

    OUTPUT/base/                     the converted base model (stage convert; skipped for a diffusers folder)
    OUTPUT/class_images/<class>/     class images for prior preservation (stage classes)
    OUTPUT/checkpoints/step-N/       training checkpoints, samples, train_report.json (stage train)
    OUTPUT/export/<name>-step-N.safetensors   the A1111 / ComfyUI file (stage export)
    OUTPUT/manifest.json             per stage: inputs with hashes, fingerprint, outputs, status, timings;
                                     the config, the image's version and the package versions
"""

import hashlib
import json
import os
import re
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from dreambooth import __version__, events, runlock
from dreambooth.config import TrainConfig, build_train_config
from dreambooth.doctor import STACK
from dreambooth.errors import EnvironmentProblem, UserError
from dreambooth.families.base import ResolvedModel
from dreambooth.fileio import sha256_file, write_json
from dreambooth.formats.convert import ConvertOptions
from dreambooth.report import PAGE, write_report_page

MANIFEST = "manifest.json"
STAGES = ("convert", "classes", "train", "export")
EXPORT_FORMATS = ("safetensors", "ckpt")
# Settings that do not change what a step learns: a change re-runs training, which continues from its last
# checkpoint, instead of starting over (e.g. raising --max-train-steps from 800 to 1200 trains 400 more steps).
CONTINUABLE = frozenset({
    "max_train_steps", "save_interval", "save_min_steps", "save_fp16", "export_single_file", "keep_last",
    "save_sample_prompt", "save_sample_negative_prompt", "n_save_sample", "save_guidance_scale", "save_infer_steps",
    "resume", "output", "cache_dir", "model", "sample_batch_size", "class_inference_steps",
    # where and how it runs: a checkpoint resumes with another number of processes (train.py), and logging or
    # compiling does not change what a step computes
    "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port", "accelerate_config",
    "report_to", "torch_compile",
    # how the settings were arrived at (given or from a preset or a budget), and where frozen weights are kept:
    # the settings themselves decide the lineage (a swapped block computes what a resident one does)
    "explicit", "preset", "vram_budget", "blocks_to_swap",
})  # fmt: skip
PACKAGES = (*STACK, "numpy")


# ───────────────────────────── configuration ─────────────────────────────


@dataclass(frozen=True)
class ExportSettings:
    """[export] in run.toml: the single file A1111 / ComfyUI load."""

    enabled: bool = True
    half: bool = True  # fp16, like the classic `convert_diffusers_to_original_stable_diffusion.py --half`
    format: str = "safetensors"
    name: str | None = None  # default: the base model's name + "-dreambooth"
    merge: bool = False  # a LoRA run: bake the LoRA into the base and write a full file instead of the LoRA file

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise UserError(f"[export] format {self.format!r} is unknown", f"use {' or '.join(EXPORT_FORMATS)}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise UserError(f"[export] name {self.name!r} is not a plain file name", "use letters, digits, . _ -")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: where the model comes from, how to convert it, how to train, what to export."""

    train: TrainConfig  # .model is the user's model (file or folder), .output the run's folder
    convert: ConvertOptions = field(default_factory=lambda: ConvertOptions(overwrite=True))
    export: ExportSettings = field(default_factory=ExportSettings)
    config_file: Path | None = None

    @property
    def output(self) -> Path:
        return self.train.output

    @property
    def export_name(self) -> str:
        if self.export.name:
            return self.export.name
        stem = self.train.model.name if self.train.model.is_dir() else self.train.model.stem
        return f"{slug(stem) or 'model'}-dreambooth"

    def to_dict(self) -> dict:
        convert = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.convert).items()}
        convert.pop("overwrite")
        return {
            "config_file": str(self.config_file) if self.config_file else None,
            "convert": convert,
            "train": self.train.to_dict(),
            "export": dict(vars(self.export)),
        }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def _tables(config_file: Path | None) -> dict[str, dict]:
    """The [convert] and [export] tables of run.toml (the rest is training settings, read by config.py)."""
    if config_file is None:
        return {}
    with Path(config_file).open("rb") as f:  # config.read_toml has already reported a missing or broken file
        data = tomllib.load(f)
    out = {}
    for name in ("convert", "export"):
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise UserError(f"--config {config_file}: {name} must be a table", f"write the settings under [{name}]")
        out[name] = {k.replace("-", "_"): v for k, v in table.items()}
    return out


def load_run_config(config_file: Path | None, flags: dict, default_output: Path) -> RunConfig:
    """run.toml + flags (flags win) → a checked RunConfig.

    run.toml holds `model` and `output` at the top level, training settings at the top level or under
    [train] (the same names as `dreambooth train`'s flags), and optional [convert] and [export] tables.
    Prior preservation needs no class folder here: missing ones default to OUTPUT/class_images/<class prompt>.
    """
    from dreambooth.config import read_toml

    settings = read_toml(config_file) if config_file is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    output = Path(given.get("output") or settings.get("output") or default_output)
    flags = {**flags, "output": output}
    train = build_train_config(config_file, flags, class_images_root=output / "class_images")
    tables = _tables(config_file)
    convert_table = tables.get("convert", {})
    known = {"model_type", "original_config", "ema", "vae"}
    for table, names in ((convert_table, known), (tables.get("export", {}), set(vars(ExportSettings())))):
        unknown = sorted(set(table) - names)
        if unknown:
            raise UserError(f"--config {config_file}: unknown setting {unknown[0]!r}", f"the names are {sorted(names)}")
    if isinstance(convert_table.get("original_config"), str):
        convert_table["original_config"] = Path(config_file).parent / convert_table["original_config"]
    if isinstance(convert_table.get("vae"), str):
        convert_table["vae"] = Path(config_file).parent / convert_table["vae"]
    try:
        return RunConfig(
            train=train,
            convert=ConvertOptions(overwrite=True, **convert_table),
            export=ExportSettings(**tables.get("export", {})),
            config_file=Path(config_file) if config_file else None,
        )
    except TypeError as exc:
        raise UserError(f"a setting has the wrong type: {exc}", "check the values in your config file") from None


# ───────────────────────────── fingerprints and the manifest ─────────────────────────────


def fingerprint(inputs: object) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Hasher:
    """sha256 of files, remembered across runs by (path, size, mtime) so a multi-GB model is read once."""

    def __init__(self, known: dict[str, dict]) -> None:
        self.known = known
        self.records: dict[str, dict] = {}

    def file(self, path: Path) -> str:
        path = Path(path)
        try:
            st = path.stat()
            key = str(path.resolve())
            before = self.known.get(key) or self.records.get(key)
            if before and before["size"] == st.st_size and before["mtime_ns"] == st.st_mtime_ns:
                digest = before["sha256"]
            else:
                digest = sha256_file(path)
        except FileNotFoundError:  # found a moment ago (the input was checked): deleted or unmounted since
            raise UserError(
                f"{path} disappeared while the run was reading its inputs",
                "put the file (or its folder or volume) back, and run the same command again",
            ) from None
        self.records[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def folder(self, folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
        """Relative path → sha256 for every file under `folder` (hidden temporary files excluded)."""
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
        return {p.relative_to(folder).as_posix(): self.file(p) for p in files if not skip(p.relative_to(folder))}


def versions() -> dict[str, str | None]:
    out = {"dreambooth": __version__, "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest:
    """OUTPUT/manifest.json, rewritten atomically after every change so it is right even after a kill."""

    def __init__(self, output: Path, config: RunConfig) -> None:
        self.path = output / MANIFEST
        self.previous = self._read(self.path)
        self.data = {
            "schema": 1,
            "status": "running",
            "started_at": _now(),
            "finished_at": None,
            "seconds": None,
            "config": config.to_dict(),
            "image": {
                "version": os.environ.get("DREAMBOOTH_IMAGE_VERSION"),
                "revision": os.environ.get("DREAMBOOTH_IMAGE_REVISION"),
            },
            "versions": versions(),
            "stages": {},
            "outputs": {},
            "file_hashes": {},
        }
        self.hasher = Hasher(self.previous.get("file_hashes", {}))

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("schema") == 1 else {}

    def previous_stage(self, name: str) -> dict:
        return self.previous.get("stages", {}).get(name) or {}

    def set_stage(self, name: str, record: dict) -> None:
        self.data["stages"][name] = record
        self.save()

    def save(self) -> None:
        self.data["file_hashes"] = {**self.hasher.known, **self.hasher.records}
        write_json(self.path, self.data)

    def save_after_failure(self) -> None:
        """Record a failure if the disk lets us: the error that stopped the run (a full disk, say) is the one to
        report, not a second one from writing the manifest; the previous manifest stays whole either way."""
        try:
            self.save()
        except EnvironmentProblem as exc:
            events.warn(f"{self.path} could not record the failure: {exc.message}")


def run_stage(
    manifest: Manifest,
    name: str,
    inputs: dict,
    body: Callable[[], dict],
    outputs_exist: Callable[[dict], bool],
) -> dict:
    """Run `body` unless the last run finished this stage with the same inputs and its outputs are there."""
    digest = fingerprint(inputs)
    before = manifest.previous_stage(name)
    if (
        before.get("status") in ("done", "skipped")
        and before.get("fingerprint") == digest
        and outputs_exist(before.get("outputs", {}))
    ):
        events.notice(f"{name}: inputs unchanged since {before.get('finished_at')}: skipped")
        manifest.set_stage(name, {**before, "status": "skipped", "seconds": 0.0})
        events.emit("stage_skipped", stage=name)
        return before["outputs"]
    record = {"status": "running", "fingerprint": digest, "inputs": inputs, "started_at": _now()}
    manifest.set_stage(name, record)
    started = time.perf_counter()
    try:
        outputs = body()
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        record.update(
            status="interrupted" if interrupted else "failed", seconds=round(time.perf_counter() - started, 2)
        )
        if not interrupted:
            record["error"] = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        manifest.data["stages"][name] = record
        manifest.save_after_failure()
        raise
    record.update(status="done", outputs=outputs, finished_at=_now(), seconds=round(time.perf_counter() - started, 2))
    manifest.set_stage(name, record)
    return outputs


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`docker stop` sends SIGTERM: outside the training loop (which saves first) stop like Ctrl-C, so the
    manifest records the stage as interrupted and the exit code is 130."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ───────────────────────────── the four stages ─────────────────────────────


def stage_convert(cfg: RunConfig, manifest: Manifest) -> ResolvedModel:
    """The base model, resolved once for the stages after it: a single SD/SDXL file becomes OUTPUT/base; a
    diffusers folder is used where it is, and so are Flux's original files (33 GB are not copied)."""
    from dreambooth.families.flux.parts import is_flux_file
    from dreambooth.formats.convert import convert
    from dreambooth.preflight import check_model_folder, resolve_model

    model = cfg.train.model
    if model.is_dir():
        check_model_folder(model, "--model")
        manifest.set_stage("convert", {"status": "not needed", "reason": f"{model} is a diffusers folder"})
        return resolve_model(cfg.train)
    if not model.is_file():
        raise UserError(f"model {model} does not exist", "set `model` in run.toml (or --model) to your .safetensors")
    if model.suffix.lower() == ".safetensors" and is_flux_file(model):
        resolved = resolve_model(cfg.train)
        reason = f"{model} is a Flux.1 file: its parts are read where they are"
        manifest.set_stage("convert", {"status": "not needed", "reason": reason})
        return resolved
    dest = cfg.output / "base"
    inputs = {"model": {"path": str(model), "sha256": manifest.hasher.file(model)}, **cfg.to_dict()["convert"]}

    def body() -> dict:
        with events.stage(f"convert {model.name} → {dest}"):
            summary = convert(model, dest, cfg.convert, sha256=inputs["model"]["sha256"])  # hashed once, not twice
        return {"folder": str(dest), "family": summary.get("family"), "model_type": summary.get("model_type")}

    def still_there(outputs: dict) -> bool:
        return (dest / "model_index.json").is_file()

    run_stage(manifest, "convert", inputs, body, still_there)
    return resolve_model(replace(cfg.train, model=dest))  # the folder checked, a --vae file converted


def base_digest(model: ResolvedModel, manifest: Manifest) -> dict:
    """What the base is, by content: every file of its folder, or each of its parts' files, by sha256."""
    if model.folder is not None:
        return {"path": str(model.folder), "files": manifest.hasher.folder(model.folder)}
    parts = {role: str(part.path) for role, part in model.parts.items()}
    files = {role: manifest.hasher.file(part.path) for role, part in model.parts.items()}
    return {"path": parts["transformer"], "parts": parts, "files": files}


def stage_classes(cfg: RunConfig, manifest: Manifest, model: ResolvedModel, base_digest: dict) -> dict:
    """Class images for prior preservation, made by the base model before training changes it."""
    train = cfg.train
    if not train.with_prior_preservation:
        manifest.set_stage("classes", {"status": "not needed", "reason": "prior preservation is off"})
        return {}
    inputs = {
        "base": base_digest,
        "concepts": [{"class_prompt": c.class_prompt, "class_data_dir": str(c.class_data_dir)} for c in train.concepts],
        **{k: getattr(train, k) for k in ("num_class_images", "resolution", "seed", "class_inference_steps")},
    }

    def body() -> dict:
        import torch

        from dreambooth.prior import generate_class_images
        from dreambooth.train import stop_on_signals

        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train.mixed_precision if cuda else "no")
        seed = train.seed if train.seed is not None else 0
        with stop_on_signals() as should_stop:
            made = generate_class_images(train, model, seed, device, dtype or torch.float32, should_stop)
        return {"generated": made, "images": _class_image_digests(train, manifest)}

    def still_there(outputs: dict) -> bool:
        return outputs.get("images") == _class_image_digests(train, manifest)

    return run_stage(manifest, "classes", inputs, body, still_there)


def _class_image_digests(train: TrainConfig, manifest: Manifest) -> dict[str, dict[str, str]]:
    from dreambooth.data import scan_images

    out = {}
    for c in train.concepts:
        if c.class_data_dir is None or not c.class_data_dir.is_dir():
            continue
        paths = scan_images(c.class_data_dir, train.resolution, "--class-data-dir", warn=False)
        # exactly the images training uses: the first --num-class-images by name
        out[str(c.class_data_dir)] = {p.name: manifest.hasher.file(p) for p in paths[: train.num_class_images]}
    return out


def _caption_digests(train: TrainConfig, manifest: Manifest, instance_images: dict[int, list[Path]]) -> dict:
    """The caption file of every instance and class image training uses: its sha256, or None where it has none."""
    from dreambooth.data import caption_path, scan_images

    images = [p for paths in instance_images.values() for p in paths]
    for c in train.concepts:
        if c.class_data_dir is not None and c.class_data_dir.is_dir():
            images += scan_images(c.class_data_dir, train.resolution, "--class-data-dir", warn=False)[
                : train.num_class_images
            ]
    captions = [caption_path(p, train.caption_extension) for p in images]
    return {str(path): manifest.hasher.file(path) if path.is_file() else None for path in captions}


def mask_digests(hasher: Hasher, instance_images: dict[int, list[Path]]) -> dict:
    """--masked-loss: the mask file of every instance image: its sha256, or None where it has none (an alpha
    channel is part of its image's own digest)."""
    from dreambooth.data import mask_path

    masks = [mask_path(p) for paths in instance_images.values() for p in paths]
    return {str(path): hasher.file(path) if path.is_file() else None for path in masks}


def stage_train(
    cfg: RunConfig,
    manifest: Manifest,
    model: ResolvedModel,
    base_digest: dict,
    instance_images: dict[int, list[Path]],
    classes: dict,
) -> dict:
    from dreambooth.checkpoints import CHECKPOINTS, latest_checkpoint
    from dreambooth.launch import train  # in this process, or in the processes --num-processes asks for

    base = Path(base_digest["path"])
    settings = {k: v for k, v in cfg.train.to_dict().items() if k not in ("model", "output", "cache_dir", "resume")}
    instances = {
        str(cfg.train.concepts[i].instance_data_dir): {p.name: manifest.hasher.file(p) for p in paths}
        for i, paths in instance_images.items()
    }
    inputs = {"base": base_digest, "instance_images": instances, "class_images": classes.get("images"), **settings}
    if cfg.train.caption_extension:  # a caption's words are as much a training input as its image's pixels
        inputs["captions"] = _caption_digests(cfg.train, manifest, instance_images)
    if cfg.train.masked_loss:  # so is a mask's: a changed mask is another training, never a stale one
        inputs["masks"] = mask_digests(manifest.hasher, instance_images)
    # what decides the weights a step produces; a change there means the old checkpoints are another model
    inputs["lineage"] = fingerprint({k: v for k, v in inputs.items() if k not in CONTINUABLE})
    checkpoints = cfg.output / CHECKPOINTS
    before = manifest.previous_stage("train")
    old_lineage = before.get("inputs", {}).get("lineage")
    if checkpoints.is_dir() and any(checkpoints.iterdir()) and old_lineage not in (None, inputs["lineage"]):
        aside = cfg.output / "previous" / f"checkpoints-{before.get('started_at', 'unknown').replace(':', '')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(checkpoints, aside)
        events.notice(f"training inputs changed: the old checkpoints were moved to {aside}; training starts afresh")
    elif checkpoints.is_dir() and any(checkpoints.iterdir()) and not before:
        events.notice(f"{checkpoints} holds checkpoints from an earlier run: training continues from the last one")

    def body() -> dict:
        report = train(replace(cfg.train, model=base, resume=False), model, instance_images)
        return {
            "final_checkpoint": report["final_checkpoint"],
            "steps": report["steps"],
            "report": report["report"],
            "final_loss": report["final_loss"],
        }

    def still_there(outputs: dict) -> bool:
        final = outputs.get("final_checkpoint")
        return bool(final) and Path(final).is_dir() and latest_checkpoint(cfg.output) == Path(final)

    return run_stage(manifest, "train", inputs, body, still_there)


def stage_export(cfg: RunConfig, manifest: Manifest, trained: dict) -> dict:
    from dreambooth.checkpoints import STATE_FILE
    from dreambooth.formats.export import ExportOptions, export
    from dreambooth.formats.lora import export_lora, is_lora_checkpoint

    if not cfg.export.enabled:
        manifest.set_stage("export", {"status": "not needed", "reason": "[export] enabled = false"})
        return {}
    checkpoint = Path(trained["final_checkpoint"])
    lora = is_lora_checkpoint(checkpoint)
    kind = "lora-" if lora and not cfg.export.merge else ""  # export/<name>-lora-step-N.safetensors
    dest = cfg.output / "export" / f"{cfg.export_name}-{kind}step-{trained['steps']}.{cfg.export.format}"
    weights = manifest.hasher.folder(checkpoint, skip=lambda rel: rel.name == STATE_FILE or rel.parts[0] == "samples")
    inputs = {"checkpoint": {"path": str(checkpoint), "files": weights}, "half": cfg.export.half, "file": str(dest),
              "merge": cfg.export.merge}  # fmt: skip

    def body() -> dict:
        report = json.loads(Path(trained["report"]).read_text()) if Path(trained["report"]).is_file() else {}
        training = {k: report[k] for k in ("steps", "final_loss", "seed") if k in report}
        with events.stage(f"export {checkpoint.name} → {dest}"):
            if lora:
                export_lora(checkpoint, dest, merge=cfg.export.merge, half=cfg.export.half)
            else:
                export(checkpoint, dest, ExportOptions(half=cfg.export.half, training=training))
        return {"file": str(dest), "sha256": manifest.hasher.file(dest), "bytes": dest.stat().st_size}

    def still_there(outputs: dict) -> bool:
        return dest.is_file() and manifest.hasher.file(dest) == outputs.get("sha256")

    return run_stage(manifest, "export", inputs, body, still_there)


# ───────────────────────────── the run ─────────────────────────────


def run_pipeline(cfg: RunConfig) -> dict:
    """The four stages in order; returns the manifest (also at OUTPUT/manifest.json)."""
    from dreambooth.preflight import check_output

    check_output(cfg.output)
    # before anything is written: a second run on this folder is refused and changes nothing
    with runlock.hold(cfg.output, runlock.this_command()):
        return _run_stages(cfg)


def _run_stages(cfg: RunConfig) -> dict:
    from dreambooth.preflight import preflight

    started = time.perf_counter()
    manifest = Manifest(cfg.output, cfg)
    manifest.save()
    with sigterm_as_interrupt():
        try:
            # bad images, folders and settings are reported before the (slow) conversion
            instance_images = preflight(cfg.train)
            model = stage_convert(cfg, manifest)
            base = base_digest(model, manifest)
            classes = stage_classes(cfg, manifest, model, base)
            trained = stage_train(cfg, manifest, model, base, instance_images, classes)
            exported = stage_export(cfg, manifest, trained)
        except BaseException as exc:
            manifest.data.update(
                status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                finished_at=_now(),
                seconds=round(time.perf_counter() - started, 2),
            )
            manifest.save_after_failure()
            page_after_failure(cfg.output)
            raise
    manifest.data["outputs"] = {
        "base": base["path"],
        "final_checkpoint": trained["final_checkpoint"],
        "export": exported.get("file"),
        "train_report": trained["report"],
        "report_page": str(cfg.output / PAGE),
    }
    manifest.data.update(status="done", finished_at=_now(), seconds=round(time.perf_counter() - started, 2))
    manifest.save()
    write_report_page(cfg.output)
    return manifest.data


def page_after_failure(output: Path) -> None:
    """report.html for a run that stopped: what it did get to is worth a look. Best effort: the error that stopped
    the run is the one to report, not a second one from writing the page (e.g. on a full disk)."""
    from dreambooth.report import is_run

    if not is_run(output):
        return
    try:
        write_report_page(output)
    except Exception as exc:
        events.warn(f"{output / PAGE} was not written: {exc}")
