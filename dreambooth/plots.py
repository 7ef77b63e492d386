"""The training plot (OUTPUT/loss_curve.png): instance and class loss, learning rate, skipped fp16 steps.

matplotlib's object API on its Agg canvas: no pyplot, no global state, no display needed (a container has none).
"""

import math
from pathlib import Path

from dreambooth.fileio import atomic_path

INSTANCE_COLOR, CLASS_COLOR, LR_COLOR, SKIP_COLOR = "#1f5fbf", "#d9730d", "#2e8b57", "#c62828"
VALIDATION_COLOR = "#7b1fa2"


def smoothed(values: list[float], span: int | None = None) -> list[float]:
    """An exponential moving average that skips non-finite values and is debiased at the start (as TensorBoard's
    smoothing is), so the first steps are not pulled towards zero. The span grows with the run: a DreamBooth loss
    jumps with the random timestep of each step, and only an average over ~5 % of the run shows its trend."""
    span = span or max(5, len(values) // 20)
    alpha = 2 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else math.nan)
    return out


def loss_plot(losses: dict, dest: Path, checkpoints: list[int] = (), title: str | None = None) -> Path:
    """Draw `losses` (train_report.json's: per step `instance`, `class`, `lr`, `skipped` step numbers and
    `validation` [step, loss] pairs) to
    `dest` (PNG). Checkpoint steps are marked, so the curve says which checkpoint was saved where."""
    from matplotlib.figure import Figure

    instance = [float(v) for v in losses.get("instance") or losses.get("loss") or []]
    classes = [float(v) for v in losses.get("class") or []]
    lrs = [float(v) for v in losses.get("lr") or []]
    skipped = [int(s) for s in losses.get("skipped") or []]
    with_classes = any(v != 0 for v in classes if math.isfinite(v))
    steps = list(range(1, len(instance) + 1))

    figure = Figure(figsize=(10, 5.8), dpi=110, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    loss_axes.plot(steps, instance, color=INSTANCE_COLOR, alpha=0.25, linewidth=0.8, label="instance loss (raw)")
    loss_axes.plot(steps, smoothed(instance), color=INSTANCE_COLOR, linewidth=2, label="instance loss (smoothed)")
    if with_classes:
        class_steps = steps[: len(classes)]
        loss_axes.plot(class_steps, classes, color=CLASS_COLOR, alpha=0.25, linewidth=0.8, label="class loss (raw)")
        loss_axes.plot(class_steps, smoothed(classes), color=CLASS_COLOR, linewidth=2, label="class loss (smoothed)")
    for number, step in enumerate(checkpoints):
        loss_axes.axvline(step, color="0.55", linestyle=":", linewidth=1, label="checkpoint" if number == 0 else None)
        lr_axes.axvline(step, color="0.55", linestyle=":", linewidth=1)
        loss_axes.annotate(f"step-{step}", (step, 0), xycoords=("data", "axes fraction"), xytext=(-2, 3),
                           textcoords="offset points", fontsize=8, color="0.35", ha="right")  # fmt: skip
    if skipped:  # fp16: the gradient scaler threw these steps away (inf/NaN gradients); their loss is still drawn
        finite = [v for v in instance if math.isfinite(v)] or [0.0]
        loss_axes.plot(skipped, [max(finite)] * len(skipped), linestyle="none", marker="v", color=SKIP_COLOR,
                       label=f"skipped fp16 step ({len(skipped)})")  # fmt: skip
    validation = [(int(step), float(v)) for step, v in losses.get("validation") or []]
    if validation:  # the held-out images' loss at fixed noise (--validation-split / --validation-dir)
        loss_axes.plot([s for s, _ in validation], [v for _, v in validation], color=VALIDATION_COLOR, marker="o",
                       linewidth=1.5, label="validation loss (held out)")  # fmt: skip
    loss_axes.set_ylabel("loss (MSE)")
    loss_axes.grid(alpha=0.3)
    lr_axes.plot(steps[: len(lrs)], lrs, color=LR_COLOR, linewidth=1.5, label="learning rate")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_axes.grid(alpha=0.3)
    lr_axes.set_ylim(bottom=0)
    figure.legend(loc="outside upper center", ncols=4, fontsize=8, frameon=False, title=title or "training loss")
    if steps:
        lr_axes.set_xlim(0.5, len(steps) + 0.5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        figure.savefig(tmp, format="png")
    return dest
