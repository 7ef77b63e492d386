"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer (double-stream then single-stream blocks) over 2×2
packed latents of a 16-channel VAE, conditioned on T5-XXL's hidden states and CLIP-L's pooled output.

Training follows diffusers' train_dreambooth_lora_flux.py and kohya's flux_train_network.py: the VAE sample shifted
and scaled, packed into tokens with their (0, row, column) ids, σ drawn per example (objectives.FlowMatching), the
transformer called with σ as its timestep (and, for dev, the distilled guidance as an input), the velocity ε − x
as the target, compared unpacked. T5 never trains; CLIP-L may (--train-text-encoder), which is what kohya's Flux
LoRAs call `lora_te1`.
"""

import tempfile
from pathlib import Path
from typing import ClassVar

import torch

from dreambooth import events
from dreambooth.errors import UserError
from dreambooth.families.base import Components, Conditioning, Dtypes, LatentFormat, LoraTargets, ResolvedModel
from dreambooth.families.flux import parts
from dreambooth.objectives import FlowMatching

VARIANTS = {
    # title, T5 tokens per prompt, samples' guidance and steps (the releases' own recommendations), σ sampling
    "flux-dev": ("FLUX.1 [dev]", 512, 3.5, 20, "flux-shift"),
    "flux-schnell": ("FLUX.1 [schnell]", 256, 0.0, 4, "sigmoid"),
}
# --lora-targets groups over the transformer's modules (suffixes of their diffusers names)
LORA_GROUPS = {
    # both streams' q, k, v and output of the double blocks; q, k, v of the single blocks
    "attention": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out"),
    # the double blocks' MLPs (image and text stream), the single blocks' MLP input
    "feed-forward": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
    # the single blocks' output (attention and MLP together: BFL's linear2)
    "projections": ("proj_out",),
    # the adaptive norms' modulation (BFL's img_mod/txt_mod/modulation): kohya trains them by default
    "modulation": ("norm1.linear", "norm1_context.linear", "norm.linear"),
}  # fmt: skip
LORA_GROUPS["all-linear"] = tuple(name for group in LORA_GROUPS.values() for name in group)
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_MLP = ("fc1", "fc2")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2 · W/2, 4C]: each 2×2 patch of latent pixels one token (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, for a latent of height × width."""
    b, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """[H/2 · W/2, 3]: each token's (0, row, column), the positions RoPE encodes."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux:
    denoiser_name = "transformer"
    side_multiple = 16  # the VAE's 8 × the 2×2 packing
    default_lora_targets = ("all-linear",)  # kohya's Flux LoRA: every linear layer of the blocks
    full_bf16 = True  # a full fine-tune with --mixed-precision bf16 keeps its weights in bf16 by default
    checkpoint_holds_base = False  # a full checkpoint holds what trained; T5-XXL alone is 9.5 GB
    half = torch.bfloat16  # --save-fp16 and exports: what the releases ship (fp16 overflows Flux's activations)
    # --low-vram adds to the shared profile (config.LOW_VRAM): the frozen 12 B transformer and T5 stored in fp8
    low_vram: ClassVar[dict] = {"base_precision": "fp8"}
    # kohya's names: the transformer's modules in BFL's layout as lora_unet_…, CLIP-L as lora_te1_
    lora_prefixes: ClassVar[dict] = {"transformer": "lora_unet", "text_encoder": "lora_te1"}
    pipeline_class = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trainable_text = ("text_encoder",)  # T5-XXL is never trained
    pipeline_options: ClassVar[dict] = {}

    def __init__(self, name: str) -> None:
        self.name = name
        self.title, self.t5_length, self.sample_guidance, self.sample_steps, self.sampling = VARIANTS[name]
        self.sample_kwargs = {"max_sequence_length": self.t5_length}

    def __repr__(self) -> str:
        return f"Flux({self.name!r})"

    @property
    def guidance(self) -> bool:
        return self.name == "flux-dev"

    def check(self, cfg) -> None:
        refused = {
            "snr_gamma": ("--snr-gamma (min-SNR) weights DDPM timesteps by their signal-to-noise ratio",
                          "drop it; --flow-weighting sigma-sqrt|cosmap weights flow-matching σ"),
            "zero_terminal_snr": ("--zero-terminal-snr rescales a DDPM beta schedule",
                                  "drop it: a flow path ends in pure noise already (σ = 1)"),
            "debiased_estimation": ("--debiased-estimation weights DDPM timesteps by 1/√SNR",
                                    "drop it; --flow-weighting sigma-sqrt|cosmap weights flow-matching σ"),
            "multires_noise_iterations": ("--multires-noise-iterations shapes the noise of a DDPM schedule",
                                          "drop it (kohya applies it to SD/SDXL only); --offset-noise works here"),
        }  # fmt: skip
        for name, (what, hint) in refused.items():
            if getattr(cfg, name):
                raise UserError(f"{what}, and {self.title} is trained by flow matching, where it has no meaning", hint)
        if cfg.huber_schedule == "snr":
            raise UserError(
                f"--huber-schedule snr follows a DDPM schedule's signal-to-noise ratio; {self.title} is trained by "
                "flow matching",
                "use --huber-schedule exponential (the default here) or constant",
            )
        if cfg.max_token_length != 75:
            raise UserError(
                f"--max-token-length {cfg.max_token_length} reads CLIP prompts in chunks; {self.title} reads them "
                "with T5 (up to 512 tokens), and CLIP-L gives only its pooled output",
                "drop it; --t5-max-length sets T5's tokens (dev 512, schnell 256)",
            )
        if cfg.resolution % self.side_multiple:
            multiple = self.side_multiple
            raise UserError(
                f"--resolution {cfg.resolution} is not a multiple of {multiple}: {self.title}'s VAE makes latents 8× "
                "smaller and the transformer packs them 2×2",
                f"try --resolution {max(multiple, cfg.resolution // multiple * multiple)}",
            )
        if cfg.buckets and cfg.bucket_step % self.side_multiple:
            raise UserError(
                f"--bucket-step {cfg.bucket_step} is not a multiple of {self.side_multiple} ({self.title})",
                "e.g. --bucket-step 64",
            )
        self.lora_targets(cfg.lora_targets or self.default_lora_targets)

    # ─────────────────────────── loading ───────────────────────────

    def load(self, model: ResolvedModel, dtypes: Dtypes, storage=None) -> Components:
        """The transformer, CLIP-L (which may train), T5-XXL (frozen), the VAE; from a diffusers folder or from the
        original files, each in the dtype the adapter asked for. The frozen layers --base-precision stores are
        stored as they are read (`storage`: a storage.BaseStorage)."""
        if model.folder is not None:
            models = parts.load_folder(model.folder, model.vae, dtypes, storage, self.blocks)
        else:

            def store(role, part):
                roots = self.blocks(part) if role == self.denoiser_name else [part]
                return (storage.layers(role, part, roots), storage.precision) if storage else ([], None)

            models = parts.load_files(model, dtypes, store)
        transformer, clip, t5, vae, scheduler = models
        c = Components(
            denoiser=transformer,
            vae=vae,
            text_encoders={"text_encoder": clip, "text_encoder_2": t5},
            tokenizers=self.tokenizers(model),
            scheduler=scheduler,
            model_dir=model.folder,
            prediction_type="flow",
            vae_dir=model.vae,
            denoiser_name=self.denoiser_name,
            extra={"trainable_text": self.trainable_text},  # T5-XXL never trains
        )
        return c

    def tokenizers(self, model: ResolvedModel) -> dict:
        from transformers import CLIPTokenizer, T5TokenizerFast

        if model.folder is not None and (model.folder / "tokenizer_2").is_dir():
            return {
                "text_encoder": CLIPTokenizer.from_pretrained(model.folder / "tokenizer"),
                "text_encoder_2": T5TokenizerFast.from_pretrained(model.folder / "tokenizer_2"),
            }
        with tempfile.TemporaryDirectory() as tmp:  # the bundled files, laid out as from_pretrained reads them
            parts.write_tokenizers(Path(tmp))
            return {
                "text_encoder": CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer"),
                "text_encoder_2": T5TokenizerFast.from_pretrained(Path(tmp) / "tokenizer_2"),
            }

    def objective(self, c: Components, cfg) -> FlowMatching:
        c.extra["guidance"] = cfg.guidance_scale  # dev's distilled-guidance input while training
        c.extra["t5_length"] = cfg.t5_max_length or self.t5_length
        return FlowMatching(
            sampling=cfg.timestep_sampling or self.sampling,
            shift=cfg.flow_shift,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            weighting=cfg.flow_weighting,
            offset_noise=cfg.offset_noise,
            pack=2,
        )

    def latent_format(self, c: Components) -> LatentFormat:
        return LatentFormat.of(c.vae.config)

    def prompt_windows(self, c: Components) -> list[tuple[str, object, int]]:
        """(encoder, tokenizer, tokens it reads): CLIP-L's pooled output reads 75, T5 its length less </s>."""
        t5 = c.extra.get("t5_length", self.t5_length)
        return [("CLIP-L", c.tokenizers["text_encoder"], 75), ("T5-XXL", c.tokenizers["text_encoder_2"], t5 - 1)]

    # ─────────────────────────── a step ───────────────────────────

    def encode(self, c: Components, prompts: list[str]) -> Conditioning:
        """T5-XXL's hidden states ([B, 512, 4096] for dev) and CLIP-L's pooled output ([B, 768]): what
        FluxPipeline.encode_prompt computes."""
        clip, t5 = c.text_encoders["text_encoder"], c.text_encoders["text_encoder_2"]
        clip_tokenizer, t5_tokenizer = c.tokenizers["text_encoder"], c.tokenizers["text_encoder_2"]
        ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        pooled = clip(ids.to(next(clip.parameters()).device), output_hidden_states=False).pooler_output
        length = c.extra.get("t5_length", self.t5_length)
        ids = t5_tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt").input_ids  # fmt: skip
        hidden = t5(ids.to(next(t5.parameters()).device), output_hidden_states=False)[0]
        return {"hidden": hidden, "pooled": pooled}

    def conditioning_shapes(self, c: Components, batch: int) -> dict[str, tuple[int, ...]]:
        """What `encode` gives for a batch (dreambooth plan runs a step on such shapes): T5's and CLIP-L's."""
        config = c.denoiser.config
        length = c.extra.get("t5_length", self.t5_length)
        return {"hidden": (batch, length, config.joint_attention_dim), "pooled": (batch, config.pooled_projection_dim)}

    def predict(self, c: Components, noisy, timesteps, cond: Conditioning, geometry=None) -> torch.Tensor:
        """The transformer on the packed noisy latents at σ (`timesteps`); its velocity unpacked to [B, C, H, W]."""
        b, _, height, width = noisy.shape
        hidden = cond["hidden"]
        guidance = None
        if self.guidance:  # dev (a DDP-wrapped transformer has no .config to ask)
            guidance = torch.full((b,), float(c.extra.get("guidance", 1.0)), device=noisy.device)
        out = c.denoiser(
            hidden_states=pack(noisy),
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(height, width, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack(out, height, width)

    def set_attention(self, c: Components, attention: str, device: torch.device) -> str:
        """Flux's attention already runs through PyTorch's SDPA; xformers has no processor for its joint
        attention with RoPE."""
        if attention == "xformers":
            events.notice(f"--attention xformers: {self.title} runs its joint attention with PyTorch SDPA")
        return "sdpa"

    def blocks(self, denoiser) -> list[torch.nn.Module]:
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    # ─────────────────────────── LoRA ───────────────────────────

    def lora_targets(self, tokens: tuple[str, ...]) -> LoraTargets:
        names = tuple(dict.fromkeys(n for group in LORA_GROUPS.values() for n in group))
        suffixes = []
        for token in tokens:
            if token not in LORA_GROUPS and not any(n == token or n.endswith("." + token) for n in names):
                raise UserError(
                    f"--lora-targets: unknown target {token!r} for {self.title}",
                    f"use groups ({', '.join(LORA_GROUPS)}) or modules ({', '.join(names)}), comma-separated",
                )
            suffixes += LORA_GROUPS.get(token, (token,))
        denoiser = tuple(dict.fromkeys(suffixes))
        mlp = any(s in denoiser for s in ("ff.net.0.proj", "proj_mlp"))
        return LoraTargets(denoiser, CLIP_ATTENTION + (CLIP_MLP if mlp else ()))

    def lora_modules(self, model, suffixes: tuple[str, ...], conv_rank: int) -> tuple[list[str], list[str]]:
        """The suffixes inside the double and single blocks (not the embedders or the final layer, which kohya's
        Flux LoRA leaves alone too); Flux has no convolutions for LoCon."""
        if conv_rank:
            raise UserError(f"--lora-conv-rank: {self.title}'s transformer has no convolutions", "drop it")
        linear = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and any(name.endswith("." + s) for s in suffixes)
        ]
        return linear, []

    def lora_info(self, denoiser, cfg) -> dict:
        """What the LoRA files need besides the weights: how BFL's layout names and fuses the modules, and the
        flow settings kohya's metadata records."""
        from dreambooth.families.flux.lora import transformer_layout

        return {
            "transformer_layout": transformer_layout(denoiser),
            "guidance_scale": cfg.guidance_scale,
            "timestep_sampling": cfg.timestep_sampling or self.sampling,
            "flow_shift": cfg.flow_shift,
        }

    # ─────────────────────────── samples ───────────────────────────

    def sampling_pipeline(self, c: Components, denoiser, text_encoders: dict, vae):
        """A FluxPipeline over the models being trained (no copies), with the release's own flow sampler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(dict(c.scheduler.config)),
            vae=vae,
            text_encoder=text_encoders["text_encoder"],
            tokenizer=c.tokenizers["text_encoder"],
            text_encoder_2=text_encoders["text_encoder_2"],
            tokenizer_2=c.tokenizers["text_encoder_2"],
            transformer=denoiser,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
