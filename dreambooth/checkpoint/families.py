"""What we know about each model family: bundled configs, text-encoder layout, and config inference from shapes.

Configs ship in dreambooth/assets/configs/<model type>/ — nothing is fetched (sd1-v is sd1's, with a
v-prediction scheduler). Structural fields (channels, blocks,
layers) are then re-read from the checkpoint's tensor shapes, so a non-standard file (a tiny test model, a pruned
text encoder) gets a config that fits it; only what shapes cannot tell (heads, sample size) comes from the family.
"""

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

from dreambooth.checkpoint.keymap import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

MODEL_TYPES = ("sd1", "sd1-v", "sd2", "sd2-v")


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    text_kind: str  # "clip" (HF CLIPTextModel keys) | "openclip" (open_clip text tower keys)
    text_prefix: str


FAMILIES = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", "clip", CLIP_PREFIX),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "openclip", OPENCLIP_PREFIX),
}


def model_type_of(family: str, prediction_type: str) -> str:
    return f"{family}-v" if prediction_type == "v_prediction" else family


@cache
def _bundled(model_type: str, component: str) -> dict:
    if model_type == "sd1-v":  # SD 1.x fine-tuned for v-prediction: the same network, another target
        config = _bundled("sd1", component)
        return {**config, "prediction_type": "v_prediction"} if component == "scheduler" else config
    path = resources.files("dreambooth") / "assets" / "configs" / model_type / f"{component}.json"
    return json.loads(path.read_text())


def bundled_config(model_type: str, component: str) -> dict:
    return copy.deepcopy(_bundled(model_type, component))


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct integers fill the `(\\d+)` in `pattern` across `keys`."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def infer_unet_config(tensors: dict[str, torch.Tensor], model_type: str) -> dict:
    cfg = bundled_config(model_type, "unet")
    sd = {k.removeprefix(UNET_PREFIX): v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    keys = list(sd)
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    per = _count(keys, r"input_blocks\.(\d+)\.") // levels - 1
    channels = [sd[f"input_blocks.{1 + i * (per + 1)}.0.out_layers.3.weight"].shape[0] for i in range(levels)]
    attention = [f"input_blocks.{1 + i * (per + 1)}.1.norm.weight" in sd for i in range(levels)]
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    standard = channels == cfg["block_out_channels"]
    cfg.update(
        in_channels=sd["input_blocks.0.0.weight"].shape[1],
        out_channels=sd["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        cross_attention_dim=to_k.shape[1],
        use_linear_projection=proj_in.ndim == 2,
        transformer_layers_per_block=_count(keys, r"input_blocks\.1\.1\.transformer_blocks\.(\d+)\.") or 1,
        norm_num_groups=min(cfg["norm_num_groups"], channels[0]),
    )
    if not standard:  # heads cannot be read from weights: SD 1.x uses 8 heads, SD 2.x 64-channel heads
        if model_type.startswith("sd1"):
            cfg["attention_head_dim"] = 8 if channels[0] % 8 == 0 else 1
        else:
            cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]
    return cfg


def infer_vae_config(tensors: dict[str, torch.Tensor], model_type: str, prefix: str = VAE_PREFIX) -> dict:
    cfg = bundled_config(model_type, "vae")
    sd = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    keys = list(sd)
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    per = _count(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    channels = [sd[f"encoder.down.{i}.block.{per - 1}.conv2.weight"].shape[0] for i in range(levels)]
    cfg.update(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["post_quant_conv.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        norm_num_groups=min(cfg["norm_num_groups"], channels[0]),
    )
    return cfg


def infer_text_config(tensors: dict[str, torch.Tensor], model_type: str) -> dict:
    cfg = bundled_config(model_type, "text_encoder")
    family = FAMILIES[model_type.removesuffix("-v")]
    p = family.text_prefix
    keys = list(tensors)
    if family.text_kind == "clip":
        emb = tensors[p + "text_model.embeddings.token_embedding.weight"]
        positions = tensors[p + "text_model.embeddings.position_embedding.weight"].shape[0]
        layers = _count(keys, re.escape(p) + r"text_model\.encoder\.layers\.(\d+)\.")
        intermediate = tensors[p + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:
        emb = tensors[p + "token_embedding.weight"]
        positions = tensors[p + "positional_embedding"].shape[0]
        # SD 2.x conditions on the penultimate layer: the last resblock is stored but never used
        layers = _count(keys, re.escape(p) + r"transformer\.resblocks\.(\d+)\.") - 1
        intermediate = tensors[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    hidden = emb.shape[1]
    standard = hidden == cfg["hidden_size"]
    cfg.update(
        vocab_size=emb.shape[0],
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        max_position_embeddings=positions,
    )
    if not standard:
        cfg["num_attention_heads"] = max(1, hidden // 64)
        cfg["projection_dim"] = hidden
    return cfg


def scheduler_config(model_type: str) -> dict:
    return bundled_config(model_type, "scheduler")
