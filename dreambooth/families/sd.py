"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet conditioned on its last (SD 2.x: penultimate,
already cut off at conversion) hidden states, epsilon or v-prediction."""

from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.families.base import Components, Conditioning

TITLES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (SD 1.x, SD 2.x base) or the velocity (SD 2.x 768-v)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    raise UserError(
        f"the model's scheduler has prediction_type {noise_scheduler.config.prediction_type!r}",
        "only epsilon and v_prediction models can be trained",
    )


class StableDiffusion:
    def __init__(self, name: str) -> None:
        self.name = name
        self.title = TITLES[name]
        # the kohya/A1111 convention: SD 1.x and 2.x share the names (the text encoder in the Hugging Face CLIP layout)
        self.lora_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
        self.pipeline_class = "StableDiffusionPipeline"  # what samples and class images come from
        self.pipeline_options = {"safety_checker": None, "requires_safety_checker": False}

    def __repr__(self) -> str:
        return f"StableDiffusion({self.name!r})"

    def load(self, model_dir: Path, vae_dir: Path | None, dtypes: dict[str, torch.dtype]) -> Components:
        """The base model's parts; `dtypes` per part (unet, text_encoder, vae), fp32 for what trains in full."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return Components(
            unet=UNet2DConditionModel.from_pretrained(model_dir / "unet", dtype=dtypes["unet"]),
            vae=AutoencoderKL.from_pretrained(vae_dir or model_dir / "vae", dtype=dtypes["vae"]),
            text_encoders={
                "text_encoder": CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtypes["text_encoder"])
            },
            tokenizers={"text_encoder": CLIPTokenizer.from_pretrained(model_dir / "tokenizer")},
            scheduler=DDPMScheduler.from_pretrained(model_dir / "scheduler"),
            model_dir=model_dir,
            vae_dir=vae_dir,
        )

    def encode(self, c: Components, prompts: list[str]) -> Conditioning:
        encoder = c.text_encoders["text_encoder"]
        ids = tokenize(c.tokenizers["text_encoder"], prompts).to(next(encoder.parameters()).device)
        return {"hidden": encoder(ids)[0]}

    def predict(self, c: Components, noisy, timesteps, cond: Conditioning, geometry=None) -> torch.Tensor:
        return c.unet(noisy, timesteps, cond["hidden"]).sample

    def target(self, c: Components, latents, noise, timesteps) -> torch.Tensor:
        return training_target(c.scheduler, latents, noise, timesteps)

    def sampling_pipeline(self, c: Components, unet, text_encoders: dict, vae):
        """A pipeline over the models being trained (no copies), sampling with DDIM like the classic script."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders["text_encoder"],
            tokenizer=c.tokenizers["text_encoder"],
            unet=unet,
            scheduler=DDIMScheduler.from_config(dict(c.scheduler.config)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
