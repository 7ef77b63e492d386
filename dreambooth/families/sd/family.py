"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet conditioned on its last (SD 2.x: penultimate,
already cut off at conversion) hidden states, epsilon or v-prediction on a DDPM schedule."""

import re
from typing import ClassVar

import torch

from dreambooth import events
from dreambooth.errors import UserError
from dreambooth.families import stream
from dreambooth.families.base import Components, Conditioning, Dtypes, LatentFormat, LoraTargets, ResolvedModel
from dreambooth.families.sd import prompts as prompts_in_chunks
from dreambooth.families.sd.lora import PREFIXES
from dreambooth.families.sd.prompts import WINDOW
from dreambooth.objectives import DDPM

TITLES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
# --lora-targets groups: modules of the UNet's transformer blocks (kohya's and diffusers' defaults: attention)
UNET_LORA_GROUPS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "feed-forward": ("ff.net.0.proj", "ff.net.2"),
    "projections": ("proj_in", "proj_out"),
}
DEFAULT_LORA_TARGETS = ("attention",)
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_MLP = ("fc1", "fc2")


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def ddpm_objective(c: Components, cfg) -> DDPM:
    """The base's own DDPM schedule; with --zero-terminal-snr rescaled so that its last step is pure noise."""
    if c.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"the model's scheduler has prediction_type {c.prediction_type!r}",
            "only epsilon and v_prediction models can be trained",
        )
    if cfg.zero_terminal_snr:
        c.scheduler = zero_terminal_snr(c)
    return DDPM(c.scheduler, offset_noise=cfg.offset_noise, snr_gamma=cfg.snr_gamma,
                debiased=cfg.debiased_estimation, multires_iterations=cfg.multires_noise_iterations,
                multires_discount=cfg.multires_noise_discount)  # fmt: skip


def zero_terminal_snr(c: Components):
    """The base's beta schedule rescaled so that its last step is pure noise (SNR 0): what v-prediction needs to
    learn the full range of brightness. An epsilon model has nothing to predict at SNR 0, so it is refused."""
    if c.prediction_type != "v_prediction":
        raise UserError(
            f"--zero-terminal-snr needs a v-prediction model, and {c.model_dir} predicts {c.prediction_type}",
            "drop --zero-terminal-snr, or train a v-prediction model (convert with --model-type sd2-v / sdxl-v)",
        )
    from diffusers import DDPMScheduler

    c.extra["zero_terminal_snr"] = True
    return DDPMScheduler.from_config(dict(c.scheduler.config), rescale_betas_zero_snr=True)


def set_unet_attention(unet, attention: str, device: torch.device) -> str:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if attention == "xformers":
        try:
            if device.type != "cuda":
                raise RuntimeError("xformers needs a CUDA GPU")
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as exc:
            events.notice(f"--attention xformers: not usable here ({exc}); using PyTorch SDPA")
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's transformer and ResNet blocks in the order they compute (each level's ResNet, then its
    attention's transformer blocks; the middle's attention between its two ResNets): blocks of one kind and size
    share their compiled code, and a swap prefetches the next one."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    order = []
    for level in [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]:
        resnets, attentions = list(level.resnets), list(getattr(level, "attentions", None) or [])
        if level is unet.mid_block:  # resnet, (attention, resnet)…
            parts = resnets[:1] + [m for pair in zip(attentions, resnets[1:], strict=False) for m in pair]
        else:  # (resnet, attention)…
            parts = [m for i, resnet in enumerate(resnets) for m in (resnet, *attentions[i : i + 1])]
        order += [m for part in parts for m in part.modules() if isinstance(m, BasicTransformerBlock | ResnetBlock2D)]
    return order


def expand_lora_targets(tokens: tuple[str, ...], groups: dict[str, tuple[str, ...]], what: str) -> tuple[str, ...]:
    """--lora-targets' groups and module names → module-name suffixes; an unknown one is one line naming it."""
    names = tuple(dict.fromkeys(n for group in groups.values() for n in group))
    suffixes = []
    for token in tokens:
        if token not in groups and token not in names:
            raise UserError(
                f"--lora-targets: unknown target {token!r} for {what}",
                f"use groups ({', '.join(groups)}) or modules ({', '.join(names)}), comma-separated",
            )
        suffixes += groups.get(token, (token,))
    return tuple(dict.fromkeys(suffixes))


def unet_lora_targets(tokens: tuple[str, ...], what: str) -> LoraTargets:
    """The UNet's modules; CLIP's attention projections, its MLP too when the UNet's feed-forward layers are asked
    for."""
    denoiser = expand_lora_targets(tokens, UNET_LORA_GROUPS, what)
    text = CLIP_ATTENTION + (CLIP_MLP if "ff.net.0.proj" in denoiser else ())
    return LoraTargets(denoiser, text)


def unet_lora_modules(unet, suffixes: tuple[str, ...], conv_rank: int) -> tuple[list[str], list[str]]:
    """The suffixes inside the UNet's transformer blocks (not its time embedding), and with --lora-conv-rank the
    ResNet and resampling 3×3 convolutions (LoCon)."""
    linear, convs = [], []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and any(
            name == s or name.endswith("." + s) for s in suffixes
        ):
            if ".attentions." in name:
                linear.append(name)
        elif (
            conv_rank
            and isinstance(module, torch.nn.Conv2d)
            and module.kernel_size != (1, 1)
            and re.search(r"\.(resnets\.\d+\.conv[12]|(down|up)samplers\.\d+\.conv)$", name)
        ):
            convs.append(name)
    return linear, convs


def unet_lora_info(unet) -> dict:
    """The UNet config fields that name its modules in the original layout (SDXL's kohya files use them);
    read off the unwrapped UNet (DDP's wrapper has no config)."""
    from dreambooth.families.sd.lora import UNET_LAYOUT

    return {"unet_layout": {k: _plain(unet.config[k]) for k in UNET_LAYOUT}}


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


class UNetFamily:
    """What SD 1.x/2.x and SDXL share: a UNet trained on the base's DDPM schedule, its attention processors, its
    transformer and ResNet blocks, its LoRA groups and original-layout names, the classic DreamBooth's defaults."""

    denoiser_name = "unet"
    side_multiple = 8  # the VAE's 8; the UNet pads odd latent sizes itself
    sample_guidance = 7.5
    sample_steps = 20
    sample_kwargs: ClassVar[dict] = {}
    default_lora_targets = DEFAULT_LORA_TARGETS
    full_bf16 = False  # a full fine-tune with --mixed-precision bf16 keeps fp32 masters unless --full-bf16
    checkpoint_holds_base = True  # a full checkpoint links the frozen parts in (a complete diffusers folder)
    half = torch.float16  # --save-fp16 and exports
    low_vram: ClassVar[dict] = {}  # --low-vram: the shared profile (config.LOW_VRAM) is all a UNet needs
    title: str

    def check(self, cfg) -> None:
        self.lora_targets(cfg.lora_targets or DEFAULT_LORA_TARGETS)

    def objective(self, c: Components, cfg) -> DDPM:
        return ddpm_objective(c, cfg)

    def latent_format(self, c: Components) -> LatentFormat:
        return LatentFormat.of(c.vae.config)

    def encode(self, c: Components, prompts: list[str]) -> Conditioning:
        return self.encode_text(c.text_encoders, c.tokenizers, prompts, c.extra.get("max_token_length", WINDOW))

    def encode_text(self, encoders: dict, tokenizers: dict, prompts: list[str], max_tokens: int) -> Conditioning:
        raise NotImplementedError

    def prompt_windows(self, c: Components) -> list[tuple[str, object, int]]:
        """(encoder, tokenizer, tokens it reads) for the long-prompt report (SDXL's two CLIPs share a vocabulary:
        one line says it for both)."""
        return [("CLIP", c.tokenizers["text_encoder"], c.extra.get("max_token_length", WINDOW))]

    def conditioning_shapes(self, c: Components, batch: int) -> dict[str, tuple[int, ...]]:
        """What `encode` gives for a batch of 75-token prompts (dreambooth plan runs a step on such shapes)."""
        return {"hidden": (batch, WINDOW + 2, c.denoiser.config.cross_attention_dim)}

    def set_attention(self, c: Components, attention: str, device: torch.device) -> str:
        return set_unet_attention(c.denoiser, attention, device)

    def blocks(self, denoiser) -> list[torch.nn.Module]:
        return unet_blocks(denoiser)

    def lora_targets(self, tokens: tuple[str, ...]) -> LoraTargets:
        return unet_lora_targets(tokens, self.title)

    def lora_modules(self, model, suffixes: tuple[str, ...], conv_rank: int) -> tuple[list[str], list[str]]:
        return unet_lora_modules(model, suffixes, conv_rank)

    def lora_info(self, denoiser, cfg) -> dict:
        return unet_lora_info(denoiser)


class StableDiffusion(UNetFamily):
    """SD 1.x and 2.x: one CLIP text encoder."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.title = TITLES[name]
        # the kohya/A1111 convention: SD 1.x and 2.x share the names (the text encoder in the Hugging Face CLIP layout)
        self.lora_prefixes = PREFIXES[name]
        self.pipeline_class = "StableDiffusionPipeline"  # what samples and class images come from
        self.text_encoder_names = self.trainable_text = ("text_encoder",)
        self.pipeline_options = {"safety_checker": None, "requires_safety_checker": False}

    def __repr__(self) -> str:
        return f"StableDiffusion({self.name!r})"

    def load(self, model: ResolvedModel, dtypes: Dtypes, storage=None) -> Components:
        """The base model's parts, each in the dtype the adapter asked for."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        model_dir, vae_dir = model.folder, model.vae
        scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
        return Components(
            # the parts --base-precision stores are read into stored layers tensor by tensor (families/stream.py)
            denoiser=stream.load_part(
                UNet2DConditionModel, model_dir / "unet", "unet", dtypes.denoiser, storage, self.blocks
            ),
            vae=AutoencoderKL.from_pretrained(vae_dir or model_dir / "vae", dtype=dtypes.frozen),
            text_encoders={
                "text_encoder": stream.load_part(
                    CLIPTextModel, model_dir / "text_encoder", "text_encoder", dtypes.trained_text, storage
                )
            },
            tokenizers={"text_encoder": CLIPTokenizer.from_pretrained(model_dir / "tokenizer")},
            scheduler=scheduler,
            model_dir=model_dir,
            prediction_type=scheduler.config.prediction_type,
            vae_dir=vae_dir,
        )

    def encode_text(self, encoders: dict, tokenizers: dict, prompts: list[str], max_tokens: int) -> Conditioning:
        """CLIP's last hidden states (SD 2.x: its penultimate layer's, the last is cut off at conversion); prompts
        past 75 tokens in chunks with --max-token-length (families/sd/prompts.py)."""
        encoder, tokenizer = encoders["text_encoder"], tokenizers["text_encoder"]
        if max_tokens > WINDOW:
            return {"hidden": prompts_in_chunks.encode(encoder, tokenizer, prompts, max_tokens)[0]}
        ids = tokenize(tokenizer, prompts).to(next(encoder.parameters()).device)
        return {"hidden": encoder(ids)[0]}

    def pipeline_embeds(self, pipe, prompts: list[str], negative: list[str], max_tokens: int) -> dict:
        """A pipeline's prompt arguments as embeddings (for prompts read in chunks)."""
        encoders, tokenizers = {"text_encoder": pipe.text_encoder}, {"text_encoder": pipe.tokenizer}
        with torch.no_grad():
            positive = self.encode_text(encoders, tokenizers, prompts, max_tokens)["hidden"]
            negative = self.encode_text(encoders, tokenizers, negative, max_tokens)["hidden"]
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def predict(self, c: Components, noisy, timesteps, cond: Conditioning, geometry=None) -> torch.Tensor:
        return c.denoiser(noisy, timesteps, cond["hidden"]).sample

    def sampling_pipeline(self, c: Components, denoiser, text_encoders: dict, vae):
        """A pipeline over the models being trained (no copies), sampling with DDIM like the classic script."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders["text_encoder"],
            tokenizer=c.tokenizers["text_encoder"],
            unet=denoiser,
            scheduler=DDIMScheduler.from_config(dict(c.scheduler.config)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
