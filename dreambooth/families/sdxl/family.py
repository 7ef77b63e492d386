"""Stable Diffusion XL: two CLIP text encoders (OpenAI ViT-L and OpenCLIP ViT-bigG), a UNet conditioned on both
encoders' penultimate hidden states side by side, on encoder 2's pooled (projected) output, and on six "time ids"
per image: its original size, the crop's top-left corner and the target size (SDXL's micro-conditioning, which is
what lets it train on crops and odd aspect ratios without learning to draw cut-off subjects)."""

from pathlib import Path

import torch

from dreambooth.errors import UserError
from dreambooth.families import stream
from dreambooth.families.base import Components, Conditioning, Dtypes, ResolvedModel
from dreambooth.families.sd import prompts as prompts_in_chunks
from dreambooth.families.sd.family import UNetFamily, tokenize
from dreambooth.families.sd.lora import PREFIXES
from dreambooth.families.sd.prompts import WINDOW

ENCODERS = ("text_encoder", "text_encoder_2")


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def time_ids(geometry: torch.Tensor | None, latents: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, 6]: (original h, w, crop top, left, target h, w) in pixels, as the data pipeline recorded them for each
    image; without a record (a square crop of an image of that very size) it is the latents' own size."""
    if geometry is not None:
        return geometry.to(latents.device, torch.float32)
    h, w = latents.shape[-2] * scale, latents.shape[-1] * scale
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=latents.device).expand(len(latents), 6)


def vae_dtype(vae_config: dict, wanted: torch.dtype) -> torch.dtype:
    """SDXL's released VAE overflows in fp16 (NaN latents, black images) and says so with `force_upcast`; it then
    runs in fp32. A VAE fixed for fp16 (e.g. madebyollin's sdxl-vae-fp16-fix, `force_upcast: false`) keeps the
    half precision asked for."""
    return torch.float32 if vae_config.get("force_upcast", True) and wanted == torch.float16 else wanted


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"

    def __init__(self) -> None:
        # kohya's sdxl_train_network names: lora_te1 (CLIP ViT-L), lora_te2 (OpenCLIP ViT-bigG); the UNet's
        # modules in the original (SGM) layout, see families/sd/lora.py
        self.lora_prefixes = PREFIXES["sdxl"]
        self.pipeline_class = "StableDiffusionXLPipeline"
        self.text_encoder_names = self.trainable_text = ENCODERS
        self.pipeline_options = {}

    def __repr__(self) -> str:
        return "StableDiffusionXL()"

    def load(self, model: ResolvedModel, dtypes: Dtypes, storage=None) -> Components:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        model_dir, vae_dir = model.folder, model.vae
        vae_folder = vae_dir or model_dir / "vae"
        vae_config = AutoencoderKL.load_config(vae_folder)
        # the release ships an Euler sampler's config; training noises with DDPM on the same beta schedule
        scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
        return Components(
            denoiser=stream.load_part(
                UNet2DConditionModel, model_dir / "unet", "unet", dtypes.denoiser, storage, self.blocks
            ),
            vae=AutoencoderKL.from_pretrained(vae_folder, dtype=vae_dtype(vae_config, dtypes.frozen)),
            text_encoders={
                name: stream.load_part(cls, model_dir / name, name, dtypes.trained_text, storage)
                for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
            },
            tokenizers={
                "text_encoder": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
                "text_encoder_2": CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
            },
            scheduler=scheduler,
            model_dir=model_dir,
            prediction_type=scheduler.config.prediction_type,
            vae_dir=vae_dir,
        )

    def encode_text(self, encoders: dict, tokenizers: dict, prompts: list[str], max_tokens: int) -> Conditioning:
        """Both encoders' penultimate hidden states, concatenated ([B, 77, 768 + 1280] at full size), and encoder
        2's projected pooled output ([B, 1280]) — what StableDiffusionXLPipeline.encode_prompt computes; prompts past
        75 tokens in chunks with --max-token-length, the pooled output the first chunk's (kohya's choice)."""
        hidden = []
        pooled = None
        for name in ENCODERS:
            encoder, tokenizer = encoders[name], tokenizers[name]
            if max_tokens > WINDOW:
                states, pooled_here = prompts_in_chunks.encode(
                    encoder, tokenizer, prompts, max_tokens, penultimate=True
                )
            else:
                ids = tokenize(tokenizer, prompts).to(next(encoder.parameters()).device)
                out = encoder(ids, output_hidden_states=True)
                states, pooled_here = out.hidden_states[-2], getattr(out, "text_embeds", None)
            hidden.append(states)
            if name == "text_encoder_2":
                pooled = pooled_here
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def pipeline_embeds(self, pipe, prompts: list[str], negative: list[str], max_tokens: int) -> dict:
        """A pipeline's prompt arguments as embeddings (for prompts read in chunks); an empty negative prompt is zeros,
        as the pipeline makes it (force_zeros_for_empty_prompt)."""
        encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2}
        with torch.no_grad():
            positive = self.encode_text(encoders, tokenizers, prompts, max_tokens)
            negative_cond = self.encode_text(encoders, tokenizers, negative, max_tokens)
        if not any(negative) and pipe.config.get("force_zeros_for_empty_prompt", True):
            negative_cond = {k: torch.zeros_like(v) for k, v in negative_cond.items()}
        return {
            "prompt_embeds": positive["hidden"],
            "pooled_prompt_embeds": positive["pooled"],
            "negative_prompt_embeds": negative_cond["hidden"],
            "negative_pooled_prompt_embeds": negative_cond["pooled"],
        }

    def conditioning_shapes(self, c: Components, batch: int) -> dict[str, tuple[int, ...]]:
        pooled = c.text_encoders["text_encoder_2"].config.projection_dim
        return {**super().conditioning_shapes(c, batch), "pooled": (batch, pooled)}

    def predict(self, c: Components, noisy, timesteps, cond: Conditioning, geometry=None) -> torch.Tensor:
        ids = time_ids(geometry, noisy, vae_scale_factor(c.vae)).to(cond["hidden"].dtype)
        added = {"text_embeds": cond["pooled"], "time_ids": ids}
        return c.denoiser(noisy, timesteps, cond["hidden"], added_cond_kwargs=added).sample

    def sampling_pipeline(self, c: Components, denoiser, text_encoders: dict, vae):
        """A pipeline over the models being trained (no copies), with the release's own Euler sampler."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoders["text_encoder"],
            text_encoder_2=text_encoders["text_encoder_2"],
            tokenizer=c.tokenizers["text_encoder"],
            tokenizer_2=c.tokenizers["text_encoder_2"],
            unet=denoiser,
            scheduler=EulerDiscreteScheduler.from_config(dict(c.scheduler.config)),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def refuse_refiner(folder: Path) -> None:
    raise UserError(
        f"{folder} is the SDXL refiner, which cannot be trained as a base (it has no CLIP ViT-L text encoder and "
        "only denoises the last steps)",
        "pass the SDXL base model (sd_xl_base_1.0.safetensors or a fine-tune of it); use the refiner at inference",
    )
