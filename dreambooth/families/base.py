"""The family seam: the components a family loads, and the protocol the training loop calls it through.

A family declares (its objective, its latent format, its components by role, its LoRA target groups) and implements
the few things that really differ: loading, encoding a prompt, calling the denoiser, the sampling pipeline. The loop
(train.py) and the adapters (adapters.py) ask it; they never test which family they have.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dreambooth.objectives import Objective

# One prompt's conditioning, by name: SD 1.x/2.x {"hidden": [B, 77, D]}; SDXL adds {"pooled": [B, D2]}; Flux
# {"hidden": T5's [B, L, 4096], "pooled": CLIP-L's [B, 768]}. A dict of tensors caches, stacks and moves the same
# way for every family.
Conditioning = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Part:
    """One component in an original-layout file: its path, and where its keys start (an all-in-one checkpoint
    holds several parts under their own prefixes; a part's own file has none)."""

    path: Path
    prefix: str = ""


@dataclass(frozen=True)
class ResolvedModel:
    """The base model a run trains, resolved once at the start (`preflight.resolve_model`) and passed down.

    A diffusers folder (`folder`: SD, SDXL and Flux folders; SD/SDXL single files are converted into the cache
    first), or a family's original-layout files by role (`parts`: Flux's transformer, CLIP-L, T5-XXL and VAE as
    ComfyUI users keep them, or one all-in-one file). `vae`: a replacement VAE folder (--vae)."""

    family: str
    folder: Path | None = None
    parts: dict[str, Part] = field(default_factory=dict)
    vae: Path | None = None

    @classmethod
    def of_folder(cls, folder: Path, vae: Path | None = None) -> "ResolvedModel":
        from dreambooth.families.folders import folder_family

        return cls(folder_family(Path(folder)), folder=Path(folder), vae=vae)

    def describe(self) -> dict:
        """Where the model came from, for reports, checkpoints and LoRA records."""
        if self.folder is not None:
            return {"family": self.family, "folder": str(self.folder), "vae": str(self.vae) if self.vae else None}
        return {"family": self.family, "parts": {role: str(p.path) for role, p in self.parts.items()}}

    @property
    def name(self) -> str:
        """The base's name as LoRA files record it (kohya's ss_sd_model_name)."""
        return (self.folder or self.parts["transformer"].path).name


@dataclass(frozen=True)
class Dtypes:
    """What each part is loaded in (the adapter decides: what trains in full keeps fp32 master weights)."""

    denoiser: torch.dtype
    trained_text: torch.dtype  # text encoders that train (--train-text-encoder)
    frozen: torch.dtype  # everything else: the VAE, frozen text encoders

    def text(self, trains: bool) -> torch.dtype:
        return self.trained_text if trains else self.frozen


@dataclass(frozen=True)
class LatentFormat:
    """How a VAE sample becomes the denoiser's latent: (sample − shift) · scale (SD: no shift; Flux's VAE has one)."""

    scale: float
    shift: float = 0.0

    @classmethod
    def of(cls, vae_config) -> "LatentFormat":
        return cls(float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", None) or 0.0))


@dataclass(frozen=True)
class LoraTargets:
    """Module-name suffixes that get LoRA layers: the denoiser's, and the text encoders' (--train-text-encoder)."""

    denoiser: tuple[str, ...]
    text: tuple[str, ...]


@dataclass
class Components:
    """A model's parts, as loaded for training, by role. `text_encoders` and `tokenizers` are keyed by their folder
    names (text_encoder, text_encoder_2, …), and the denoiser by `denoiser_name` (unet, transformer): those are the
    names checkpoints, LoRA files and exports use too."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, Any]
    scheduler: Any  # the base's noise schedule as its folder has it (DDPM for SD; the flow sampler's for Flux)
    model_dir: Path | None
    prediction_type: str  # epsilon | v_prediction | flow
    vae_dir: Path | None = None
    denoiser_name: str = "unet"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """Everything an adapter may train, by name."""
        return {self.denoiser_name: self.denoiser, **self.text_encoders}

    def text_models(self, trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
        """The text encoders among `trained` (what is not the denoiser)."""
        return {n: m for n, m in trained.items() if n != self.denoiser_name}


class Family(Protocol):
    name: str  # "sd1" | "sd2" | "sdxl" | "flux"
    title: str
    denoiser_name: str  # the denoiser's folder: unet | transformer
    lora_prefixes: dict[str, str]  # component → kohya module prefix (lora_unet, lora_te, …)
    pipeline_class: str  # the diffusers pipeline of a folder of this family (samples, class images)
    pipeline_options: dict  # what its from_pretrained needs besides the folder
    text_encoder_names: tuple[str, ...]  # its text encoders' folders (roles), in order
    trainable_text: tuple[str, ...]  # those --train-text-encoder trains (not Flux's T5)
    side_multiple: int  # image sides are multiples of it (VAE downsampling × the denoiser's own)
    sample_guidance: float  # samples' default guidance scale (classifier-free; Flux-dev: its distilled guidance)
    sample_steps: int  # samples' default denoising steps
    sample_kwargs: dict  # what its pipeline's __call__ needs besides the prompt (Flux: T5's length)
    default_lora_targets: tuple[str, ...]  # --lora-targets when not given
    full_bf16: bool  # a full fine-tune with --mixed-precision bf16 keeps its weights in bf16 (no fp32 masters)
    checkpoint_holds_base: bool  # a full fine-tune's checkpoint carries the frozen parts (linked) or only a record
    half: torch.dtype  # the half precision of --save-fp16 and of exports
    low_vram: dict  # what --low-vram sets for this family besides config.LOW_VRAM (never what the user set)

    def check(self, cfg) -> None:
        """Refuse settings that mean nothing for this family (one UserError naming the flag)."""

    def load(self, model: ResolvedModel, dtypes: Dtypes, storage=None) -> Components:
        """The base's parts, each in the dtype asked for. `storage` (storage.BaseStorage): a family that reads
        weights one by one may store the frozen layers as it goes; adapters.load_trained stores the rest."""

    def objective(self, c: Components, cfg) -> Objective: ...

    def latent_format(self, c: Components) -> LatentFormat: ...

    def encode(self, c: Components, prompts: list[str]) -> Conditioning: ...

    def predict(
        self, c: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, geometry=None
    ) -> torch.Tensor: ...

    def conditioning_shapes(self, c: Components, batch: int) -> dict[str, tuple[int, ...]]:
        """The shapes `encode` gives for a batch: `dreambooth plan` runs a step on fake tensors of them."""

    def set_attention(self, c: Components, attention: str, device: torch.device) -> str: ...

    def blocks(self, denoiser: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's repeated blocks, in the order they compute: what --torch-compile compiles one by one,
        --blocks-to-swap swaps (the last N) and --base-precision stores (their Linear and Conv2d layers)."""

    def lora_targets(self, tokens: tuple[str, ...]) -> LoraTargets: ...

    def lora_modules(self, model: torch.nn.Module, suffixes: tuple[str, ...], conv_rank: int) -> tuple[list, list]:
        """(linear modules at --lora-rank, convolutions at --lora-conv-rank) of the denoiser, by full name."""

    def lora_info(self, denoiser: torch.nn.Module, cfg) -> dict:
        """What lora.json records for the LoRA files: how the original layout names the denoiser's modules."""

    def sampling_pipeline(self, c: Components, denoiser, text_encoders: dict, vae): ...
