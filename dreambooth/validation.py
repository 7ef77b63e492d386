"""Validation (`--validation-split 0.1` or `--validation-dir DIR`): every `--validation-every` steps, the mean loss
on held-out images, each noised at fixed levels (DDPM: t = 0.1 … 0.9 of the schedule; flow matching: σ = 0.1 …
0.9) with noise drawn once from the run's seed. Nothing random is drawn while validating and the trained models
run in eval mode, so the training's own random streams never move: a run with validation trains exactly as one
without, resumes bit-identically, and a resumed run's validation losses are the same numbers.
"""

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth.config import TrainConfig
from dreambooth.data import Example, instance_examples, latent_mask, load_mask, load_rgb, scan_images, to_tensor
from dreambooth.errors import UserError
from dreambooth.losses import apply_masks, elementwise_loss, huber_threshold

LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # noise levels in (0, 1): DDPM timesteps ⌊level·T⌋, or σ


@dataclass
class ValidationSet:
    examples: list[Example]
    means: torch.Tensor  # [n, C, h, w]: the VAE's mean latents (CPU), before scale and shift
    noise: torch.Tensor  # [n, len(LEVELS), C, h, w] (CPU)
    masks: torch.Tensor | None = None  # --masked-loss: [n, 1, h, w] on the latent grid, ones where an image has none


def split(cfg: TrainConfig, instances: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples). --validation-split holds out that share of the instance images
    (at least one, never all), chosen by a hash of the file name: the same images every run and every resume."""
    if cfg.validation_dir is not None:
        paths = scan_images(cfg.validation_dir, cfg.resolution, "--validation-dir")
        if not paths:
            raise UserError(f"--validation-dir {cfg.validation_dir} has no images", "put a few held-out photos there")
        return instances, instance_examples({0: paths}, cfg.concepts, cfg.caption_extension, masks=cfg.masked_loss)
    if not cfg.validation_split:
        return instances, []
    count = max(1, round(len(instances) * cfg.validation_split))
    if count >= len(instances):
        raise UserError(
            f"--validation-split {cfg.validation_split} of {len(instances)} instance images leaves none to train on",
            "add photos, or use --validation-dir with images of their own",
        )
    order = sorted(instances, key=lambda e: hashlib.sha256(str(e.path).encode()).hexdigest())
    held = {e.path for e in order[:count]}
    return [e for e in instances if e.path not in held], [e for e in instances if e.path in held]


@torch.no_grad()
def prepare(cfg: TrainConfig, examples: list[Example], vae, device, seed: int) -> ValidationSet | None:
    """Encode the held-out images once (centre crops at --resolution, the VAE's mean) and draw their noise."""
    if not examples:
        return None
    dtype = next(vae.parameters()).dtype
    means, masks = [], []
    for example in examples:
        path = Path(example.path)
        weights = load_mask(example.mask, path) if example.mask is not None else None
        pixels, _, weights = to_tensor(load_rgb(path), (cfg.resolution, cfg.resolution), True, random.Random(0),
                                       False, weights)  # fmt: skip
        params = vae.encode(pixels[None].to(device, dtype)).latent_dist.parameters.float()
        means.append(params.chunk(2, dim=1)[0].cpu())
        grid = params.shape[2:]
        masks.append(latent_mask(weights, grid) if weights is not None else torch.ones(1, *grid))
    means = torch.cat(means)
    generator = torch.Generator().manual_seed(seed + 7919)  # its own stream: the training's never moves
    noise = torch.randn((len(examples), len(LEVELS), *means.shape[1:]), generator=generator)
    return ValidationSet(examples, means, noise, torch.stack(masks) if cfg.masked_loss else None)


@torch.no_grad()
def validation_loss(run, vset: ValidationSet) -> float:
    """The mean loss (--loss, unweighted) over the held-out images and the fixed levels, the models in eval mode."""
    cfg, c, family, objective = run.cfg, run.c, run.family, run.objective
    device = run.accelerator.device
    fmt = run.latent_format
    levels = torch.tensor(LEVELS)
    modes = {m: m.training for m in run.trained.values()}
    for m in modes:
        m.eval()
    total = 0.0
    try:
        with run.accelerator.autocast():
            for i, example in enumerate(vset.examples):
                mean = vset.means[i : i + 1].to(device)
                latents = ((mean - fmt.shift) * fmt.scale).expand(len(LEVELS), *mean.shape[1:])
                noised = objective.at_levels(latents, vset.noise[i].to(device), levels)
                target = objective.target(latents, noised)
                cond = run.prompts([example.prompt] * len(LEVELS))
                pred = family.predict(c, noised.input, noised.timesteps, cond, None)
                losses = elementwise_loss(pred, target, cfg.loss, huber_threshold(cfg, objective, noised))
                mask = vset.masks[i : i + 1] if vset.masks is not None else None  # one image, at every level
                total += apply_masks(losses, mask).mean().item()
    finally:
        for m, training in modes.items():
            m.train(training)
    return total / len(vset.examples)
