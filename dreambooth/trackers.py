"""`--report-to tensorboard | wandb | all`: loss, learning rate and sample images, through accelerate's trackers.

Everything stays on this machine and under the output folder: TensorBoard writes OUTPUT/logs/dreambooth/, and
W&B runs offline (unless the user set WANDB_MODE) into OUTPUT/logs/wandb/, from where `wandb sync` can upload
it later. Only the first process reports (accelerate's trackers live on the main process).
"""

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dreambooth.config import TrainConfig
from dreambooth.errors import EnvironmentProblem

PROJECT = "dreambooth"
NAMES = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """What `Accelerator(...)` needs for the trackers asked for; checked before any heavy work."""
    names = NAMES[cfg.report_to]
    if not names:
        return {}
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise EnvironmentProblem(
                f"--report-to {cfg.report_to} needs the {name} package, which is not installed",
                "pip install 'dreambooth[trackers]', or pass --report-to none",
            )
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network: the run syncs later if wanted
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would land in our stdout (JSON events)
    from accelerate.utils import ProjectConfiguration

    logs = cfg.output / "logs"
    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(cfg.output), logging_dir=logs)}


def _hyperparameters(cfg: TrainConfig) -> dict:
    """TensorBoard's hparams take scalars and strings only: lists and paths become strings, None "none"."""
    out = {}
    for key, value in cfg.to_dict().items():
        if value is None:
            value = "none"
        elif not isinstance(value, bool | int | float | str):
            value = str(value)
        out[key] = value
    return out


@contextmanager
def session(accelerator, cfg: TrainConfig) -> Iterator[None]:
    """The trackers' lifetime: opened with the run's settings, closed (flushed) however the loop ends."""
    if not NAMES[cfg.report_to]:
        yield
        return
    (cfg.output / "logs").mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        PROJECT, config=_hyperparameters(cfg), init_kwargs={"wandb": {"dir": str(cfg.output / "logs")}}
    )
    try:
        yield
    finally:
        accelerator.end_training()


def log_step(accelerator, cfg: TrainConfig, step: int, values: dict) -> None:
    if NAMES[cfg.report_to]:
        accelerator.log({f"train/{k}": v for k, v in values.items() if isinstance(v, int | float)}, step=step)


def log_samples(accelerator, cfg: TrainConfig, step: int, folder) -> None:
    """A checkpoint's sample grids (samples/promptN-grid.png), one image per prompt, under `samples/promptN`."""
    if not NAMES[cfg.report_to] or not accelerator.is_main_process or not folder.is_dir():
        return
    import numpy as np
    from PIL import Image

    for grid in sorted(folder.glob("*-grid.png")):
        name = f"samples/{grid.name.removesuffix('-grid.png')}"
        with Image.open(grid) as image:
            picture = image.convert("RGB")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: np.asarray(picture)[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [picture]}, step=step)
