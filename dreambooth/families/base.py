"""The family seam: the components a family loads, and the protocol the training loop calls it through."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

# One prompt's conditioning, by name: SD 1.x/2.x {"hidden": [B, 77, D]}; SDXL adds {"pooled": [B, D2]}. A dict of
# tensors caches, stacks and moves the same way for every family.
Conditioning = dict[str, torch.Tensor]


@dataclass
class Components:
    """A model's parts, as loaded for training. `text_encoders` and `tokenizers` are keyed by their folder names
    (text_encoder, text_encoder_2, …): those are the names checkpoints, LoRA files and exports use too."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, Any]
    scheduler: Any  # the training noise scheduler (DDPM)
    model_dir: Path
    vae_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """Everything an adapter may train, by name."""
        return {"unet": self.unet, **self.text_encoders}

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


class Family(Protocol):
    name: str  # "sd1" | "sd2" | "sdxl"
    title: str
    lora_prefixes: dict[str, str]  # component → kohya module prefix (lora_unet, lora_te, …)
    pipeline_class: str  # the diffusers pipeline of a folder of this family (samples, class images)
    pipeline_options: dict  # what its from_pretrained needs besides the folder

    def load(self, model_dir: Path, vae_dir: Path | None, dtypes: dict[str, torch.dtype]) -> Components: ...

    def encode(self, c: Components, prompts: list[str]) -> Conditioning: ...

    def predict(
        self, c: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, geometry=None
    ) -> torch.Tensor: ...

    def target(self, c: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor): ...

    def sampling_pipeline(self, c: Components, unet, text_encoders: dict, vae): ...
