"""Random tiny models: SD 1.x/2.x and SDXL architectures at toy sizes, made in code from a seed (no download).

Used by the tests: they exercise every file format and code path of the real thing in seconds, but draw noise.
The demo uses the pretrained tiny model instead (dreambooth/assets/tiny/, made by tools/pretrain_tiny.py).
"""

from pathlib import Path

import torch

from dreambooth.checkpoint.folders import PROVENANCE_FILE
from dreambooth.families.sd import components as comp
from dreambooth.families.sd.convert import write_diffusers_folder
from dreambooth.families.sd.spec import bundled_config, family_of
from dreambooth.fileio import write_json

TINY_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=8,
)
TINY_VAE = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=16,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
# SDXL's layout at toy size: a plain first level, attention with 2 transformer blocks below it; the UNet takes the
# two encoders' hidden states side by side (32 + 32) and an add_embedding of 6 time ids × 8 + the pooled 32
TINY_SDXL_UNET = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    transformer_layers_per_block=[1, 2],
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    cross_attention_dim=64,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    sample_size=8,
)
# the refiner: bigG only (cross-attention 32), 5 time ids (an aesthetic score in place of the target size)
TINY_REFINER_UNET = {**TINY_SDXL_UNET, "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 5 * 8 + 32}
TINY_OVERRIDES = {
    "sdxl": {"unet": TINY_SDXL_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT, "text_encoder_2": TINY_TEXT},
    "sdxl-refiner": {"unet": TINY_REFINER_UNET, "vae": TINY_VAE, "text_encoder_2": TINY_TEXT},
}


# Flux.1 at toy size: 2 double + 2 single blocks of width 32 (2 heads of 16, RoPE axes 2 + 6 + 8), a 16-channel VAE
# with 2 levels (latents 2× smaller), CLIP-L and T5 of width 32 (T5 keeps the real vocabulary: the bundled tokenizer)
TINY_FLUX = {
    "transformer": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 6, 8]),
    "vae": dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32),
    "text_encoder": TINY_TEXT,
    "text_encoder_2": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4),
}  # fmt: skip


def tiny_configs(model_type: str = "sd1") -> dict[str, dict]:
    default = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT}
    overrides = TINY_OVERRIDES.get(family_of(model_type), default)
    configs = {}
    for name, extra in overrides.items():
        cfg = {k: v for k, v in bundled_config(model_type, name).items() if not k.startswith("_")}
        configs[name] = {**cfg, **extra}
    return configs


def tiny_components(seed: int = 0, model_type: str = "sd1") -> dict[str, comp.Component]:
    torch.manual_seed(seed)
    out = {}
    for name, config in tiny_configs(model_type).items():
        model = comp.build_model(name, config)
        out[name] = comp.Component(name, config, {k: v.contiguous() for k, v in model.state_dict().items()})
    return out


def write_tiny_diffusers(folder: Path, seed: int = 0, model_type: str = "sd1") -> Path:
    """A complete tiny diffusers folder, as `dreambooth convert` would write it (with its dreambooth.json)."""
    folder = Path(folder)
    family = family_of(model_type)
    write_diffusers_folder(folder, tiny_components(seed, model_type), family, model_type)
    if family != "sd1":  # SD 1.x folders stay as they always were: the family is told by the text encoder
        write_json(folder / PROVENANCE_FILE, {"family": family, "model_type": model_type, "tiny_seed": seed})
    return folder


def tiny_flux(seed: int = 0, model_type: str = "flux-dev") -> dict[str, tuple[dict, dict]]:
    """A random tiny Flux.1 in diffusers' names: role → (config, state dict)."""
    from dreambooth.families.flux import parts

    torch.manual_seed(seed)
    out = {}
    for role, extra in TINY_FLUX.items():
        config = {**parts.bundled_config(model_type, role), **extra}
        model = parts.build(role, config)
        out[role] = (config, {k: v.contiguous() for k, v in model.state_dict().items()})
    return out


def write_tiny_flux(folder: Path, seed: int = 0, model_type: str = "flux-dev") -> Path:
    """A complete tiny Flux diffusers folder (FluxPipeline.from_pretrained loads it)."""
    from dreambooth.families.flux import parts

    folder = Path(folder)
    parts.write_folder(folder, tiny_flux(seed, model_type), model_type)
    write_json(folder / PROVENANCE_FILE, {"family": model_type, "model_type": model_type, "tiny_seed": seed})
    return folder
