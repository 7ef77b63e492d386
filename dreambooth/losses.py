"""The loss per element (--loss) and its pseudo-Huber threshold: what training and validation compare."""

import torch
import torch.nn.functional as F

from dreambooth.config import TrainConfig


def huber_threshold(cfg: TrainConfig, objective, noised) -> torch.Tensor | None:
    """--loss huber|smooth-l1: the threshold per example, on the schedule asked for (default: "snr" for DDPM,
    "exponential" for flow matching); None for L2."""
    if cfg.loss == "l2":
        return None
    schedule = cfg.huber_schedule or ("exponential" if objective.prediction_type == "flow" else "snr")
    return objective.huber_c(noised, schedule, cfg.huber_c, cfg.huber_scale)


def elementwise_loss(pred, target, kind: str, threshold: torch.Tensor | None) -> torch.Tensor:
    """The loss per element, in fp32: L2 (the squared error), or kohya's pseudo-Huber 2c(√(d² + c²) − c) ("huber":
    ~d² for small errors, ~2c|d| for large ones) and smooth L1 2(√(d² + c²) − c), with c per example."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target, reduction="none")
    c = threshold.float().view(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if kind == "huber" else 2 * root


def apply_masks(losses: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """--masked-loss: each element of the loss [B, C, h, w] times its latent pixel's weight [B, 1, h, w] (white 1,
    black 0), before the mean, as kohya does: not renormalised, so a photo half masked out weighs half as much.
    Flux's prediction arrives unpacked, in this same layout."""
    return losses if masks is None else losses * masks.to(losses.device, losses.dtype)
