"""OUTPUT/report.html: one page to judge a run, for a person rather than a program.

What someone checking a fine-tune looks for, top to bottom: did it finish, the samples of every saved checkpoint
side by side (same prompt, same seeds: what changed is what training did), before/after and the fidelity scores
when the run has them, the loss, the exported files (size, sha256), how long each stage took, and the settings and
versions it ran with. Everything comes from the files the run left (manifest.json, train_report.json, the
checkpoints' samples, fidelity.json), so `dreambooth report OUTPUT` rebuilds the page for any run, finished or not.

The page is one HTML file with no script and no network: images are the run's own PNGs, linked by relative paths
from the output folder the page lives in (nothing is copied; a multi-checkpoint run's samples stay where they are).
"""

import html
import json
import math
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from dreambooth.checkpoints import REPORT_FILE, STATE_FILE, finished_checkpoints
from dreambooth.errors import UserError
from dreambooth.fileio import atomic_path, human_bytes, read_json_object, sha256_file
from dreambooth.grids import READABLE_SIDE
from dreambooth.plots import loss_plot, smoothed

PAGE = "report.html"
MANIFEST = "manifest.json"  # pipeline.MANIFEST (the pipeline is a layer above this module)
LOSS_PLOT = "loss_curve.png"
BEFORE_AFTER = Path("samples") / "before_after.png"
FIDELITY = "fidelity.json"
STAGE_ORDER = ("convert", "classes", "train", "export")  # pipeline.STAGES, in the order they run
# the settings a reader checks first; the rest are in a folded table below them
KEY_SETTINGS = (
    "model", "adapter", "max_train_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "train_batch_size",
    "gradient_accumulation_steps", "resolution", "with_prior_preservation", "prior_loss_weight", "num_class_images",
    "train_text_encoder", "mixed_precision", "seed", "save_interval", "lora_rank", "lora_alpha",
)  # fmt: skip
FIDELITY_ROWS = (
    ("subject_fidelity", "subject fidelity", "how often “a sks …” shows the subject (higher is better)"),
    ("prompt_fidelity", "prompt fidelity", "the subject in a new context follows the prompt (higher is better)"),
    ("prior_subject_likeness", "class → subject", "the plain class prompt drawing the subject (lower is better)"),
    ("prior_diversity", "class diversity", "variety of the plain class prompt's images (keep it near before)"),
)


def is_run(output: Path) -> bool:
    """A folder a run wrote: its manifest, its training report, or a finished checkpoint."""
    return (output / MANIFEST).is_file() or (output / REPORT_FILE).is_file() or bool(finished_checkpoints(output))


def write_report_page(output: Path) -> Path:
    """Write OUTPUT/report.html (and the loss plot when it is missing or older than the losses); returns its path."""
    output = Path(output)
    if not output.is_dir():
        raise UserError(f"{output} is not a folder", "pass a run's output folder (what --output named)")
    if not is_run(output):
        raise UserError(
            f"{output} is not a run's output folder: it has no {MANIFEST}, {REPORT_FILE} or checkpoints/step-N",
            "pass the folder given to `dreambooth run/train/demo` as --output (e.g. output/demo)",
        )
    run = read_run(output)
    if run["losses"].get("instance") or run["losses"].get("loss"):
        plot = output / LOSS_PLOT
        if not plot.is_file() or plot.stat().st_mtime < run["losses_mtime"]:
            loss_plot(run["losses"], plot, [step for step, _ in run["checkpoints"]], f"training loss, {output.name}")
    page = render(output, run)
    with atomic_path(output / PAGE) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return output / PAGE


# ───────────────────────────── what the run left ─────────────────────────────


def _history_of(checkpoint: Path) -> tuple[dict, dict]:
    """(losses, config) from a checkpoint's training state: an interrupted run wrote no train_report.json, and its
    last checkpoint holds the loss history up to there. Memory-mapped, so a multi-GB optimizer state is not read.
    The file is this run's own (the same trust `dreambooth train` gives it when it resumes from it)."""
    import torch

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", mmap=True, weights_only=False)
    history = state.get("history", {})
    losses = {
        "loss": history.get("losses", []),
        "instance": history.get("instance_losses", []),
        "class": history.get("class_losses", []),
        "lr": history.get("lrs", []),
        "skipped": history.get("skipped_steps", []),
        "validation": history.get("validation", []),
    }
    return losses, {"steps": state.get("step"), "seed": state.get("seed"), "settings": state.get("config", {})}


def read_run(output: Path) -> dict:
    manifest = read_json_object(output / MANIFEST)
    train_report = read_json_object(output / REPORT_FILE)
    checkpoints = finished_checkpoints(output)
    losses, losses_mtime = train_report.get("losses", {}), 0.0
    if train_report:
        losses_mtime = (output / REPORT_FILE).stat().st_mtime
    if checkpoints and checkpoints[-1][0] > train_report.get("steps", -1):  # interrupted after its last report
        losses, from_state = _history_of(checkpoints[-1][1])
        train_report = {**train_report, **from_state, "interrupted_at_checkpoint": checkpoints[-1][0]}
        losses_mtime = (checkpoints[-1][1] / STATE_FILE).stat().st_mtime
    settings = manifest.get("config", {}).get("train") or train_report.get("settings", {})
    return {
        "manifest": manifest,
        "train": train_report,
        "settings": settings,
        "losses": losses,
        "losses_mtime": losses_mtime,
        "checkpoints": checkpoints,
        "fidelity": read_json_object(output / FIDELITY),
    }


def status_of(run: dict) -> tuple[str, str]:
    """(status word, one sentence) for the top of the page."""
    manifest, train = run["manifest"], run["train"]
    steps, target = train.get("steps"), run["settings"].get("max_train_steps")
    done = f"{steps} of {target} steps" if steps is not None and target else "no training step recorded"
    status = manifest.get("status") or ("done" if steps and target and steps >= target else "interrupted")
    if train.get("stopped", {}).get("reason") == "diverged":
        return "failed", f"training diverged at step {train['stopped'].get('step')}: {train['stopped'].get('message')}"
    if status == "done":
        return "done", f"finished: {done}"
    if status == "running":
        return "running", f"still running, or stopped without a word (killed): {done} so far"
    return status, f"{status} after {done}; run the same command again to continue from the last checkpoint"


# ───────────────────────────── the page ─────────────────────────────

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 26px; margin: 24px 0 4px; } h2 { font-size: 20px; margin: 36px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 20px 0 6px; }
.status { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff; font-weight: 600; }
.done { background: #2e7d32; } .interrupted, .running { background: #b26a00; } .failed { background: #c62828; }
table { border-collapse: collapse; margin: 6px 0 12px; background: #fff; }
th, td { border: 1px solid #e0e0e0; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .hash { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
.samples td { border: none; padding: 4px 6px; } .samples th { background: none; border: none; white-space: nowrap; }
figure { margin: 0; } figcaption { font-size: 13px; color: #555; }
img.sample { image-rendering: pixelated; background: #fff; border: 1px solid #ccc; display: block; }
img.plot, img.grid { max-width: 100%; border: 1px solid #ddd; background: #fff; }
.prompt { font-size: 16px; margin: 8px 0; } .note { color: #555; } .missing { color: #b26a00; font-weight: 600; }
details { margin: 8px 0; } summary { cursor: pointer; color: #1f5fbf; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _rel(output: Path, path: Path) -> str:
    """A path relative to the page, written as a URL (quoted: prompts make folder names with spaces)."""
    from urllib.parse import quote

    return quote(Path(path).resolve().relative_to(output.resolve()).as_posix())


def _table(rows: list[tuple], head: tuple | None = None, numeric: set[int] = frozenset()) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        cells = (f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join([*out, "</table>"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:  # reads the header only
        return image.size


def _sample_img(output: Path, path: Path, alt: str) -> str:
    """An <img> shown at least READABLE_SIDE wide, small samples enlarged by a whole factor (pixelated, as the
    grids are), so a 32 px tiny-model sample is as inspectable as a 512 px one."""
    width, height = _image_size(path)
    factor = max(1, math.ceil(READABLE_SIDE / min(width, height)))
    return (f'<img class="sample" src="{_rel(output, path)}" width="{width * factor}" height="{height * factor}" '
            f'alt="{_e(alt)}" title="{_e(path.name)} ({width}×{height} px)">')  # fmt: skip


def section_summary(output: Path, run: dict) -> str:
    status, sentence = status_of(run)
    manifest, train, settings = run["manifest"], run["train"], run["settings"]
    concepts = settings.get("concepts") or []
    rows = [
        ("status", f'<span class="status {_e(status)}">{_e(status)}</span> {_e(sentence)}'),
        ("output folder", f"<code>{_e(output.resolve())}</code>"),
        ("base model", f"<code>{_e(settings.get('model', '—'))}</code>"),
    ]
    for concept in concepts:
        rows.append(("instance prompt", f"{_e(concept.get('instance_prompt'))} — "
                     f"<code>{_e(concept.get('instance_data_dir'))}</code>"))  # fmt: skip
        if settings.get("with_prior_preservation"):
            rows.append(("class prompt", _e(concept.get("class_prompt"))))
    for encoder, counts in (train.get("long_prompts") or {}).items():
        if counts.get("over"):
            rows.append(("prompts cut off", _e(
                f"{counts['over']} of {counts['prompts']} prompts and captions are longer than the {counts['window']} "
                f"tokens {encoder} reads (the longest {counts['longest']}; {counts['tokens_dropped']} tokens cut off)"
            )))  # fmt: skip
    if train.get("final_loss") is not None:
        rows.append(("final loss", f"{train['final_loss']:.4f}"))
    if manifest.get("started_at"):
        rows.append(("started / finished", f"{_e(manifest['started_at'])} / {_e(manifest.get('finished_at') or '—')}"))
    total = manifest.get("seconds") or train.get("seconds")
    rows.append(("total time", _duration(total)))
    final = train.get("final_checkpoint") or (str(run["checkpoints"][-1][1]) if run["checkpoints"] else None)
    if final:
        rows.append(("last checkpoint", f"<code>{_e(final)}</code>"))
    return "<h2>Run</h2>\n" + _table(rows)


def section_samples(output: Path, run: dict) -> str:
    """Per prompt, one row per checkpoint: the same seeds down a column, so a column shows one image evolve."""
    out = ["<h2>Samples per checkpoint</h2>"]
    checkpoints = run["checkpoints"]
    seed = run["train"].get("seed", run["settings"].get("seed"))

    def seed_of(i: int) -> str:  # train_report.json records the seed; a folder without one says only the number
        return f"seed {seed + i}" if isinstance(seed, int) else f"image {i}"

    losses = smoothed([float(v) for v in run["losses"].get("instance") or run["losses"].get("loss") or []])
    by_prompt: dict[str, list[tuple[int, list[Path]]]] = {}
    for step, folder in checkpoints:
        samples = folder / "samples"
        prompts_file = samples / "prompts.txt"
        prompts = prompts_file.read_text().splitlines() if prompts_file.is_file() else []
        for i, prompt in enumerate(prompts):
            images = sorted(p for p in samples.glob(f"prompt{i}-*.png") if not p.name.endswith("-grid.png"))
            by_prompt.setdefault(prompt, []).append((step, images))
    if not checkpoints:
        out.append('<p class="missing">No finished checkpoint yet: there are no samples to show.</p>')
        return "\n".join(out)
    if not by_prompt:
        out.append(f'<p class="missing">No samples: none of the {len(checkpoints)} checkpoints has a samples/ folder. '
                   "Pass --save-sample-prompt \"a photo of sks …\" (and --n-save-sample N) to draw some at every "
                   "checkpoint.</p>")  # fmt: skip
        return "\n".join(out)
    out.append(f'<p class="note">Each image i is drawn from seed {_e(seed)} + i at every checkpoint, so a column '
               "shows the same starting noise as training goes on. Loss: the smoothed instance loss at that step."
               "</p>")  # fmt: skip
    steps_with = {step for rows in by_prompt.values() for step, _ in rows}
    for prompt, rows in by_prompt.items():
        out.append(f'<p class="prompt">Prompt: <b>{_e(prompt)}</b></p>\n<table class="samples">')
        for step, images in rows:
            loss = (
                f"<br>loss {losses[step - 1]:.4f}"
                if 0 < step <= len(losses) and math.isfinite(losses[step - 1])
                else ""
            )
            cells = (
                "".join(
                    f"<td><figure>{_sample_img(output, p, f'{prompt}, step {step}, {seed_of(i)}')}"
                    f"<figcaption>step {step} · {_e(seed_of(i))}</figcaption></figure></td>"
                    for i, p in enumerate(images)
                )
                or '<td class="missing">the samples of this checkpoint are missing</td>'
            )
            out.append(f"<tr><th>step-{step}{loss}</th>{cells}</tr>")
        out.append("</table>")
    missing = [step for step, _ in checkpoints if step not in steps_with]
    if missing:
        out.append(f'<p class="missing">No samples in checkpoint(s) {", ".join(f"step-{s}" for s in missing)}.</p>')
    return "\n".join(out)


def section_before_after(output: Path, run: dict) -> str:
    grid, fidelity = output / BEFORE_AFTER, run["fidelity"]
    if not grid.is_file() and not fidelity:
        return ""
    out = ["<h2>Before and after</h2>"]
    if fidelity:
        judged = fidelity.get("judged", {})
        rows = [
            (label, f"{fidelity.get(f'{key}_before', math.nan):.2f}", f"{fidelity.get(f'{key}_after', math.nan):.2f}",
             _e(meaning))
            for key, label, meaning in FIDELITY_ROWS
            if f"{key}_after" in fidelity
        ]  # fmt: skip
        if "prior_drift" in fidelity:
            drift = "how far the class prompt's images moved from the base model's (lower is better)"
            rows.append(("prior drift", "0.00", f"{fidelity['prior_drift']:.2f}", drift))
        out.append(_table(rows, ("score", "before", "after", "what it measures"), numeric={1, 2}))
        if judged:
            out.append(f'<p class="note">Judged on {_e(judged.get("samples_per_prompt"))} samples per prompt from '
                       f"seed {_e(judged.get('seed'))}, {_e(judged.get('sampler'))}.</p>")  # fmt: skip
    if grid.is_file():
        out.append(f'<figure><img class="grid" src="{_rel(output, grid)}" alt="before and after, labelled">'
                   "<figcaption>Rows: the base model (before) and the fine-tune (after), on the same prompts and "
                   "seeds.</figcaption></figure>")  # fmt: skip
    else:
        out.append('<p class="missing">The before/after grid (samples/before_after.png) is missing.</p>')
    return "\n".join(out)


def section_loss(output: Path, run: dict) -> str:
    plot = output / LOSS_PLOT
    if not plot.is_file():
        return '<h2>Loss</h2>\n<p class="missing">No loss recorded yet (no training step finished).</p>'
    skipped = run["losses"].get("skipped") or []
    note = f" {len(skipped)} fp16 steps were skipped by the gradient scaler (marked ▼)." if skipped else ""
    return (f'<h2>Loss</h2>\n<img class="plot" src="{_rel(output, plot)}" alt="training loss and learning rate">\n'
            f'<p class="note">Instance and class (prior preservation) loss per step, raw and smoothed; the learning '
            f"rate below; dotted lines are the saved checkpoints.{note}</p>")  # fmt: skip


def _sha256(path: Path, known: dict) -> str:
    """The manifest already hashed the files it recorded (by path, size, mtime): those are not read again."""
    st, record = path.stat(), known.get(str(path.resolve())) or {}
    if record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns:
        return record["sha256"]
    return sha256_file(path)


def section_files(output: Path, run: dict) -> str:
    exports = sorted(p for p in (output / "export").rglob("*") if p.is_file()) if (output / "export").is_dir() else []
    out = ["<h2>Exported files</h2>"]
    if not exports:
        out.append('<p class="note">No exported file (export is off, or the run did not get that far).</p>')
        return "\n".join(out)
    known = run["manifest"].get("file_hashes", {})
    rows = [(f'<a href="{_rel(output, p)}"><code>{_e(p.relative_to(output))}</code></a>', human_bytes(p.stat().st_size),
             f'<span class="hash">{_sha256(p, known)}</span>') for p in exports]  # fmt: skip
    out.append(_table(rows, ("file", "size", "sha256"), numeric={1}))
    out.append('<p class="note">Load the .safetensors file in AUTOMATIC1111 / ComfyUI (a LoRA file goes in their '
               "lora folder).</p>")  # fmt: skip
    return "\n".join(out)


def section_stages(output: Path, run: dict) -> str:
    stages, train = run["manifest"].get("stages", {}), run["train"]
    rows = [
        (_e(name), _e(record.get("status", "—")), _duration(record.get("seconds")), _e(record.get("reason", "")))
        for name, record in sorted(
            stages.items(), key=lambda item: STAGE_ORDER.index(item[0]) if item[0] in STAGE_ORDER else len(STAGE_ORDER)
        )
    ]
    if not rows and train:
        rows = [("train", "done" if train.get("final_checkpoint") else "—", _duration(train.get("seconds")), "")]
    if train.get("training_seconds") and train.get("steps_this_run"):
        rate = train["steps_this_run"] / train["training_seconds"]
        rows.append(("of which the training loop", "", _duration(train["training_seconds"]), f"{rate:.2f} steps/s"))
    if not rows:
        return ""
    return "<h2>Stages</h2>\n" + _table(rows, ("stage", "status", "time", "note"), numeric={2})


def _value(value: object) -> str:
    if isinstance(value, list | tuple | dict):
        return f"<code>{_e(json.dumps(value))}</code>"
    return _e(value)


def section_settings(run: dict) -> str:
    settings, train, manifest = run["settings"], run["train"], run["manifest"]
    lora = settings.get("adapter") == "lora"
    key = [(n, _value(settings[n])) for n in KEY_SETTINGS if n in settings and (lora or not n.startswith("lora_"))]
    for name in ("family", "prediction_type", "device", "world_size", "optimizer", "trainable_parameters",
                 "base_storage", "block_swap", "masked_loss"):  # fmt: skip
        # the stored base, the swapped blocks and the loss masks: only when the run had them
        if name in train and (train[name] or name not in ("base_storage", "block_swap", "masked_loss")):
            key.append((name, _value(train[name])))
    others = [(name, _value(v)) for name, v in sorted(settings.items()) if name not in KEY_SETTINGS]
    versions = manifest.get("versions")
    when = "as recorded by the run"
    if not versions:  # a bare `dreambooth train` records none: the versions installed now
        when = "installed when this page was written (the run recorded none)"
        versions = {}
        for name in ("dreambooth", "torch", "diffusers", "transformers", "accelerate", "peft"):
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    image = manifest.get("image") or {}
    if image.get("version"):
        versions = {"image": f"{image['version']} ({image.get('revision')})", **versions}
    return (
        "<h2>Settings</h2>\n" + _table(key) + "\n<details><summary>All settings</summary>\n" + _table(others)
        + f"\n</details>\n<h3>Versions</h3>\n<p class=\"note\">{_e(when)}</p>\n"
        + _table([(_e(k), _e(v if v is not None else "not installed")) for k, v in versions.items()])
    )  # fmt: skip


def render(output: Path, run: dict) -> str:
    output = Path(output)
    title = f"DreamBooth run {output.resolve().name}"
    written = datetime.now(UTC).isoformat(timespec="seconds")
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="note">Written {_e(written)} from the files in this folder; '
        f"<code>dreambooth report {_e(output)}</code> writes it again.</p>",
        section_summary(output, run),
        section_samples(output, run),
        section_before_after(output, run),
        section_loss(output, run),
        section_files(output, run),
        section_stages(output, run),
        section_settings(run),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # no request leaves the page: nothing but this folder's own files (images) may load
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )
