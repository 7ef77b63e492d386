"""What the denoiser learns: how a clean latent becomes the noisy input of a step, and what the prediction is
compared with. A family names its objective; the training loop calls `draw`, `target` and `weights` and knows
neither schedule.

- `DDPM` (SD 1.x/2.x, SDXL): an integer timestep t of the base's beta schedule, x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε; the
  UNet predicts ε (epsilon) or v = √ᾱ_t·ε − √(1−ᾱ_t)·x (v-prediction). Min-SNR weighting (Hang et al. 2023),
  debiased estimation, offset and multi-resolution noise live here; zero-terminal-SNR is a rescaled schedule the
  family builds. Both objectives give the pseudo-Huber threshold of `--loss huber|smooth-l1` per example.
- `FlowMatching` (Flux.1 and the rectified-flow transformers after it): a σ in (0, 1), x_σ = (1−σ)·x + σ·ε, and the
  transformer predicts the velocity ε − x. σ is drawn per example from the distribution `--timestep-sampling`
  names, as kohya's flux_train_network and diffusers' Flux scripts draw it (their formulas, our code):
    uniform       σ ~ U(0, 1)
    sigmoid       σ = sigmoid(m + s·n), n ~ N(0, 1)  (logit-normal: the same with diffusers' name; m, s: --logit-*)
    shift         σ from sigmoid, then σ' = k·σ / (1 + (k − 1)·σ) with k = --flow-shift (SD3's static shift)
    flux-shift    σ from sigmoid, then Flux.1-dev's own resolution-dependent shift: μ grows linearly from 0.5 at
                  256 image tokens to 1.15 at 4096, σ' = e^μ / (e^μ + 1/σ − 1) (what its sampler does at inference)

All randomness comes from `draws` (the run's generator through `distributed.Shard`: every process draws the whole
global batch and keeps its rows), in a fixed order, so a resumed run replays the same noise.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch

# Flux.1-dev's resolution-dependent shift (diffusers' FluxPipeline.calculate_shift, BFL's get_lin_function)
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


class Draws(Protocol):
    """Random numbers for this process's rows of the global batch (`distributed.Shard`)."""

    def randn(self, generator: torch.Generator, *shape: int) -> torch.Tensor: ...

    def randint(self, generator: torch.Generator, high: int) -> torch.Tensor: ...

    def rand(self, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class Noised:
    """One step's noisy input and what made it."""

    noise: torch.Tensor  # ε, the latents' shape
    timesteps: torch.Tensor  # [B]: what the denoiser is called with (DDPM: integer steps; flow matching: σ)
    input: torch.Tensor  # the noisy latents
    sigmas: torch.Tensor | None = None  # flow matching: σ per example [B]


class Objective(Protocol):
    name: str
    prediction_type: str  # epsilon | v_prediction | flow

    def draw(self, latents: torch.Tensor, draws: Draws, generator: torch.Generator) -> Noised: ...

    def target(self, latents: torch.Tensor, noised: Noised) -> torch.Tensor: ...

    def weights(self, noised: Noised) -> torch.Tensor | None: ...

    def huber_c(self, noised: Noised, schedule: str, c: float, scale: float) -> torch.Tensor: ...

    def at_levels(self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> Noised: ...


class DDPM:
    """Denoising diffusion on the base's own (diffusers DDPMScheduler) beta schedule."""

    name = "ddpm"

    def __init__(
        self,
        scheduler,
        *,
        offset_noise: float = 0.0,
        snr_gamma: float | None = None,
        debiased: bool = False,
        multires_iterations: int = 0,
        multires_discount: float = 0.3,
    ) -> None:
        self.scheduler = scheduler
        self.offset_noise = offset_noise
        self.snr_gamma = snr_gamma
        self.debiased = debiased  # --debiased-estimation
        self.multires_iterations = multires_iterations  # --multires-noise-iterations
        self.multires_discount = multires_discount

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def draw(self, latents: torch.Tensor, draws: Draws, generator: torch.Generator) -> Noised:
        # the order of the draws is part of a checkpoint's promise: noise, offset noise, (multires noise), timesteps
        device = latents.device
        noise = draws.randn(generator, *latents.shape[1:]).to(device)
        if self.offset_noise:  # lets the model learn overall brightness (very dark / very bright images)
            noise += self.offset_noise * draws.randn(generator, latents.shape[1], 1, 1).to(device)
        if self.multires_iterations:
            noise = multires_noise(noise, draws, generator, self.multires_iterations, self.multires_discount)
        timesteps = draws.randint(generator, self.scheduler.config.num_train_timesteps).to(device)
        return Noised(noise, timesteps, self.scheduler.add_noise(latents, noise, timesteps))

    def at_levels(self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> Noised:
        """`latents` noised with `noise` at fixed noise levels in (0, 1) (validation): timestep ⌊level · T⌋."""
        steps = (levels * self.scheduler.config.num_train_timesteps).long().to(latents.device)
        return Noised(noise, steps, self.scheduler.add_noise(latents, noise, steps))

    def target(self, latents: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The noise (SD 1.x, SD 2.x base, SDXL) or the velocity (SD 2.x 768-v, v fine-tunes)."""
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noised.noise, noised.timesteps)
        return noised.noise

    def weights(self, noised: Noised) -> torch.Tensor | None:
        """Per-example loss weights: min-SNR (--snr-gamma: easy, low-noise timesteps stop dominating the loss) and
        debiased estimation (--debiased-estimation: 1/√SNR, SNR capped at 1000, kohya's formula; v-prediction
        1/√(SNR + 1)), multiplied; None without either."""
        if self.snr_gamma is None and not self.debiased:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, noised.timesteps)
        v = self.prediction_type == "v_prediction"
        weights = torch.ones_like(snr)
        if self.snr_gamma is not None:
            clipped = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
            weights = weights * clipped / (snr + 1 if v else snr)
        if self.debiased:
            capped = torch.clamp(snr, max=1000.0)
            weights = weights / torch.sqrt(capped + 1 if v else capped)
        return weights

    def huber_c(self, noised: Noised, schedule: str, c: float, scale: float) -> torch.Tensor:
        """The pseudo-Huber threshold per example (kohya's schedules): constant c·scale; exponential from scale at
        t = 0 down to c·scale at the last step; snr (1 − c)/(1 + σ)² + c with σ = √((1 − ᾱ)/ᾱ)."""
        t = noised.timesteps
        if schedule == "constant":
            return torch.full(t.shape, c * scale, device=t.device)
        if schedule == "exponential":
            return torch.exp(math.log(c) * t.float() / self.scheduler.config.num_train_timesteps) * scale
        alphas = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1.0 - c) / (1.0 + sigmas) ** 2 + c


def multires_noise(noise: torch.Tensor, draws: Draws, generator: torch.Generator, iterations: int,
                   discount: float) -> torch.Tensor:  # fmt: skip
    """Multi-resolution ("pyramid") noise, as kohya's --multires_noise_iterations: noise drawn at the full size and
    at sizes halving each level, upsampled and added with weight discount^level, then scaled back to unit variance
    per example. kohya draws each level's factor from 2 to 4 and normalises over the batch; here it is 2 and per
    example, so that what a process draws does not depend on the batch or on how many processes share it."""
    import torch.nn.functional as F

    _, channels, height, width = noise.shape
    for level in range(iterations):
        h, w = max(1, height // 2**level), max(1, width // 2**level)
        coarse = draws.randn(generator, channels, h, w).to(noise.device, noise.dtype)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if h == 1 or w == 1:
            break
    return noise / noise.std(dim=tuple(range(1, noise.ndim)), keepdim=True)


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow: straight paths from the image (σ = 0) to pure noise (σ = 1)."""

    sampling: str = "sigmoid"
    shift: float = 3.0  # --flow-shift, for sampling "shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    weighting: str = "none"
    offset_noise: float = 0.0
    pack: int = 1  # latent pixels per image token along each side (Flux packs 2×2): the token count for flux-shift
    name: str = "flow-matching"

    prediction_type = "flow"

    def draw(self, latents: torch.Tensor, draws: Draws, generator: torch.Generator) -> Noised:
        device = latents.device
        noise = draws.randn(generator, *latents.shape[1:]).to(device)
        if self.offset_noise:
            noise += self.offset_noise * draws.randn(generator, latents.shape[1], 1, 1).to(device)
        sigmas = self.sigmas(draws, generator, latents.shape[-2:]).to(device)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return Noised(noise, sigmas, (1.0 - s) * latents + s * noise, sigmas)

    def sigmas(self, draws: Draws, generator: torch.Generator, latent_size) -> torch.Tensor:
        """σ per example, in (0, 1)."""
        if self.sampling == "uniform":
            return draws.rand(generator)
        sigma = torch.sigmoid(self.logit_mean + self.logit_std * draws.randn(generator))
        if self.sampling == "shift":
            return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
        if self.sampling == "flux-shift":
            mu = resolution_shift(latent_size[0] * latent_size[1] // (self.pack * self.pack))
            return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))
        return sigma

    def at_levels(self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> Noised:
        """`latents` noised with `noise` at fixed σ (validation)."""
        sigmas = levels.to(latents.device, latents.dtype)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        return Noised(noise, sigmas, (1.0 - s) * latents + s * noise, sigmas)

    def target(self, latents: torch.Tensor, noised: Noised) -> torch.Tensor:
        return noised.noise - latents

    def huber_c(self, noised: Noised, schedule: str, c: float, scale: float) -> torch.Tensor:
        """The pseudo-Huber threshold per example: constant c·scale, or exponential from scale at σ = 0 down to
        c·scale at σ = 1 (kohya's schedule on σ; "snr" is a DDPM schedule's and is refused for flow matching)."""
        sigmas = noised.sigmas.float()
        if schedule == "constant":
            return torch.full_like(sigmas, c * scale)
        return torch.exp(math.log(c) * sigmas) * scale

    def weights(self, noised: Noised) -> torch.Tensor | None:
        """SD3's loss weightings (diffusers' compute_loss_weighting_for_sd3); None for "none"."""
        if self.weighting == "sigma-sqrt":
            return noised.sigmas.float() ** -2.0
        if self.weighting == "cosmap":
            return 2.0 / (math.pi * (1.0 - 2.0 * noised.sigmas + 2.0 * noised.sigmas**2))
        return None


def resolution_shift(image_tokens: int) -> float:
    """μ of Flux.1-dev's sampler for an image of this many (packed) tokens: 0.5 at 256 tokens, 1.15 at 4096."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return image_tokens * slope + (BASE_SHIFT - slope * BASE_SEQ_LEN)
