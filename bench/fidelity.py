"""What DreamBooth's knobs do, measured on the built-in tiny model: learning rate × steps × prior preservation ×
text-encoder training, scored by dreambooth/demo/fidelity.py (subject fidelity, prompt fidelity, prior drift).

    nice -n 10 .venv/bin/python bench/fidelity.py --threads 1

One fine-tune per (learning rate, prior on/off, text encoder on/off), saving a checkpoint at every step count
of `--steps`; each checkpoint is scored on `--samples` samples per prompt. Writes bench/results/fidelity.json
(every figure, with the command and machine), bench/results/fidelity.md (the table) and one PNG chart per score
(bench/results/fidelity-<score>.png: score against steps, a line per setting). The tiny model is not SD: its
learning rates are larger than the classic recipe's 1e-6/5e-6 (fewer, smaller weights; batch 4), but the
shape of the trade-off — more steps or a larger rate learn the subject and then overwrite the class — is the
one the recipe's choices are about.
"""

import argparse
import itertools
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth.demo import fidelity  # noqa: E402

SCORES = ("subject_fidelity", "prompt_fidelity", "prior_drift", "prior_subject_likeness", "prior_diversity")


def numbers(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def switches(text: str) -> list[bool]:
    return [{"on": True, "off": False}[v.strip()] for v in text.split(",")]


def run_sweep(args, work: Path) -> list[dict]:
    base = fidelity.base_model(work)
    before, base_samples = fidelity.score_model(base, args.samples)
    rows = [{"lr": 0.0, "prior": None, "text_encoder": None, "steps": 0, "seconds": 0.0, **asdict(before)}]
    print(json.dumps(rows[0]), flush=True)
    last = max(args.steps)
    interval = math.gcd(*args.steps)
    for lr, prior, text_encoder in itertools.product(args.lrs, args.prior, args.text_encoder):
        name = f"lr{lr:g}-prior{int(prior)}-te{int(text_encoder)}"
        started = time.perf_counter()
        fidelity.fine_tune(
            base, work / name, work,
            learning_rate=lr, with_prior_preservation=prior, train_text_encoder=text_encoder,
            max_train_steps=last, save_interval=interval,
        )  # fmt: skip
        seconds = round(time.perf_counter() - started, 1)
        for steps in args.steps:
            checkpoint = work / name / "checkpoints" / f"step-{steps}"
            scores, _ = fidelity.score_model(checkpoint, args.samples, 0, base_samples[fidelity.CLASS_PROMPT])
            row = {"lr": lr, "prior": prior, "text_encoder": text_encoder, "steps": steps, "seconds": seconds}
            rows.append({**row, **asdict(scores)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| lr | prior | text encoder | steps | subject fidelity ↑ | prompt fidelity ↑ | prior drift ↓ "
        "| prior subject likeness ↓ | prior diversity ↑ |",
        "| ---: | :---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["steps"] == 0:
            setting = "base model | – | – | 0"
        else:
            prior, te = ("on" if r[k] else "off" for k in ("prior", "text_encoder"))
            setting = f"{r['lr']:g} | {prior} | {te} | {r['steps']}"
        scores = " | ".join(f"{r[k]:.2f}" for k in SCORES)
        lines.append(f"| {setting} | {scores} |")
    return "\n".join(lines)


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def chart(rows: list[dict], score: str, dest: Path, size: tuple[int, int] = (900, 500)) -> None:
    """Score against steps, one line per (lr, text encoder) colour; solid = prior on, dashed = prior off."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 260, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = sorted({r["steps"] for r in rows})
    base = next(r for r in rows if r["steps"] == 0)

    # the y axis reaches the next tenth above the largest value (prior drift stays well under 1)
    high = min(1.0, math.ceil(max(r[score] for r in rows) * 10 + 1e-9) / 10) or 1.0

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (w - left - right) * step / max(steps)
        return x, top + (h - top - bottom) * (1 - value / high)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((10, xy(0, frac * high)[1] - 6), f"{frac * high:.2f}", fill="black")
    for s in steps:
        draw.text((xy(s, 0)[0] - 10, h - bottom + 6), str(s), fill="black")
    draw.text((left, 8), f"{score.replace('_', ' ')} against fine-tuning steps (step 0 = base model)", fill="black")
    groups = sorted({(r["lr"], r["text_encoder"]) for r in rows if r["steps"]})
    for g, (lr, te) in enumerate(groups):
        colour = COLOURS[g % len(COLOURS)]
        for prior in (True, False):
            line = [r for r in rows if r["steps"] and (r["lr"], r["text_encoder"], r["prior"]) == (lr, te, prior)]
            if not line:
                continue
            points = [xy(0, base[score])] + [xy(r["steps"], r[score]) for r in sorted(line, key=lambda r: r["steps"])]
            for a, b in itertools.pairwise(points):
                if prior:
                    draw.line([a, b], fill=colour, width=3)
                else:  # dashed: ten dashes per segment
                    for i in range(0, 10, 2):
                        p = [(a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10) for t in (i, i + 1)]
                        draw.line(p, fill=colour, width=3)
            for p in points[1:]:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        legend_y = top + 20 * g
        draw.line([w - right + 15, legend_y + 6, w - right + 45, legend_y + 6], fill=colour, width=3)
        draw.text((w - right + 52, legend_y), f"lr {lr:g}, text encoder {'on' if te else 'off'}", fill="black")
    y = top + 20 * len(groups) + 10
    draw.text((w - right + 15, y), "solid: prior preservation on", fill="black")
    draw.text((w - right + 15, y + 16), "dashed: prior preservation off", fill="black")
    image.save(dest, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=numbers, default=numbers("5e-5,2e-4,5e-4"))
    parser.add_argument("--steps", type=lambda t: numbers(t, int), default=numbers("50,100,200", int))
    parser.add_argument("--prior", type=switches, default=switches("on,off"))
    parser.add_argument("--text-encoder", type=switches, default=switches("off"))
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt for each score")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=None, help="keep the fine-tunes here (default: temp)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_sweep(args, args.work or Path(tmp))
    command = " ".join(["bench/fidelity.py", *sys.argv[1:]])
    record = {
        "command": command,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "judged": f"{args.samples} samples/prompt, {fidelity.SAMPLE_STEPS} DDIM steps, guidance {fidelity.GUIDANCE}",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(record, indent=2) + "\n")
    for score in SCORES:
        chart(rows, score, args.out / f"fidelity-{score}.png")
    print(table(rows))
    print(f"wrote {args.out}/fidelity.json and fidelity-*.png in {record['seconds']} s")


if __name__ == "__main__":
    main()
