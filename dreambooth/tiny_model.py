"""Random tiny models: SD 1.x architecture at toy sizes, made in code from a seed (no download).

Used by the tests: they exercise every file format and code path of the real thing in seconds, but draw noise.
The demo uses the pretrained tiny model instead (dreambooth/assets/tiny/, made by tools/pretrain_tiny.py).
"""

from pathlib import Path

import torch

from dreambooth.checkpoint import components as comp
from dreambooth.checkpoint.convert import write_diffusers_folder
from dreambooth.checkpoint.families import bundled_config

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


def tiny_configs(model_type: str = "sd1") -> dict[str, dict]:
    overrides = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_TEXT}
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


def write_tiny_diffusers(folder: Path, seed: int = 0) -> Path:
    """A complete tiny diffusers folder, as `dreambooth convert` would write it."""
    write_diffusers_folder(folder, tiny_components(seed), "sd1", "sd1")
    return folder
