"""What we know about each model family: bundled configs, text-encoder layout, and config inference from shapes.

Configs ship in dreambooth/assets/configs/<model type>/ — nothing is fetched (a `-v` type without a folder of its
own, like sd1-v or sdxl-v, is its family's with a v-prediction scheduler). Structural fields (channels, blocks,
layers) are then re-read from the checkpoint's tensor shapes, so a non-standard file (a tiny test model, a pruned
text encoder) gets a config that fits it; only what shapes cannot tell (heads, sample size) comes from the family.
"""

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from dreambooth.families.sd.layout import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    SDXL_REFINER_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

MODEL_TYPES = ("sd1", "sd1-v", "sd2", "sd2-v", "sdxl", "sdxl-v", "sdxl-refiner")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder as the single file stores it."""

    kind: str  # "clip" (HF CLIPTextModel keys) | "openclip" (open_clip text tower keys)
    prefix: str
    # SD 2.x conditions on the penultimate layer and diffusers drops the last one; SDXL keeps all (it picks the
    # penultimate hidden state at run time) and uses the final layer's pooled output through text_projection
    drops_last_layer: bool = False
    projection: bool = False  # a CLIPTextModelWithProjection (text_projection kept, SDXL's pooled embedding)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    text_encoders: dict[str, TextEncoder]  # diffusers folder name → how the single file stores it
    tokenizers: dict[str, str]  # diffusers folder name → bundled tokenizer config (assets/tokenizer/…<name>.json)
    pipeline: str  # diffusers pipeline class named in model_index.json
    time_ids: int = 0  # SDXL: how many size/crop/score numbers the UNet's add_embedding takes besides pooled text

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *self.text_encoders)


FAMILIES = {
    "sd1": Family(
        "sd1",
        "Stable Diffusion 1.x",
        {"text_encoder": TextEncoder("clip", CLIP_PREFIX)},
        {"tokenizer": "sd1"},
        "StableDiffusionPipeline",
    ),
    "sd2": Family(
        "sd2",
        "Stable Diffusion 2.x",
        {"text_encoder": TextEncoder("openclip", OPENCLIP_PREFIX, drops_last_layer=True)},
        {"tokenizer": "sd2"},
        "StableDiffusionPipeline",
    ),
    # SDXL base 1.0: CLIP ViT-L (HF layout) + OpenCLIP ViT-bigG; tokenizer 2 pads with "!" as open_clip does
    "sdxl": Family(
        "sdxl",
        "Stable Diffusion XL",
        {
            "text_encoder": TextEncoder("clip", SDXL_CLIP_PREFIX),
            "text_encoder_2": TextEncoder("openclip", SDXL_OPENCLIP_PREFIX, projection=True),
        },
        {"tokenizer": "sd1", "tokenizer_2": "sd2"},
        "StableDiffusionXLPipeline",
        time_ids=6,  # original size, crop corner, target size
    ),
    # the refiner: bigG only, and an aesthetic score in place of the target size
    "sdxl-refiner": Family(
        "sdxl-refiner",
        "Stable Diffusion XL refiner",
        {"text_encoder_2": TextEncoder("openclip", SDXL_REFINER_OPENCLIP_PREFIX, projection=True)},
        {"tokenizer_2": "sd2"},
        "StableDiffusionXLImg2ImgPipeline",
        time_ids=5,  # original size, crop corner, aesthetic score
    ),
}


def family_of(model_type: str) -> str:
    return model_type.removesuffix("-v")


def model_type_of(family: str, prediction_type: str) -> str:
    return f"{family}-v" if prediction_type == "v_prediction" else family


@cache
def _bundled(model_type: str, component: str) -> dict:
    folder = resources.files("dreambooth") / "assets" / "configs" / model_type
    if model_type.endswith("-v") and not folder.is_dir():
        # fine-tuned for v-prediction (sd1-v, sdxl-v): the family's network, another target
        config = _bundled(family_of(model_type), component)
        return {**config, "prediction_type": "v_prediction"} if component == "scheduler" else config
    return json.loads((folder / f"{component}.json").read_text())


def bundled_config(model_type: str, component: str) -> dict:
    return copy.deepcopy(_bundled(model_type, component))


def _count(keys: list[str], pattern: str) -> int:
    """How many distinct integers fill the `(\\d+)` in `pattern` across `keys`."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def infer_unet_config(tensors: dict[str, Any], model_type: str) -> dict:
    cfg = bundled_config(model_type, "unet")
    sd = {k.removeprefix(UNET_PREFIX): v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    keys = list(sd)
    levels = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight") + 1
    per = _count(keys, r"input_blocks\.(\d+)\.") // levels - 1
    first = [1 + i * (per + 1) for i in range(levels)]  # each level's first input block
    channels = [sd[f"input_blocks.{b}.0.out_layers.3.weight"].shape[0] for b in first]
    attention = [f"input_blocks.{b}.1.norm.weight" in sd for b in first]
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    depths = [_count(keys, rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.") for b in first]
    middle = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
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
        transformer_layers_per_block=_transformer_depths(depths, attention, middle, cfg),
        norm_num_groups=min(cfg["norm_num_groups"], channels[0]),
    )
    time_ids = FAMILIES[family_of(model_type)].time_ids
    if time_ids:  # SDXL: label_emb takes [time ids (sinusoidal, addition_time_embed_dim each) + pooled text]
        adm_in = sd["label_emb.0.0.weight"].shape[1]
        pooled = _pooled_width(tensors, model_type)
        cfg.update(
            projection_class_embeddings_input_dim=adm_in,
            addition_time_embed_dim=(adm_in - pooled) // time_ids,
        )
    if not standard:  # heads cannot be read from weights: SD 1.x uses 8 heads, SD 2.x and SDXL 64-channel heads
        if model_type.startswith("sd1"):
            cfg["attention_head_dim"] = 8 if channels[0] % 8 == 0 else 1
        else:
            cfg["attention_head_dim"] = [max(1, c // 64) for c in channels]
    return cfg


def _transformer_depths(depths: list[int], attention: list[bool], middle: int, cfg: dict) -> int | list[int]:
    """Transformer blocks per level, as diffusers spells it: an int when every attention level and the middle block
    agree (SD, the refiner), else a list whose last entry is also the middle block's (SDXL base: [1, 2, 10])."""
    wanted = [d for d, a in zip(depths, attention, strict=True) if a] + [middle or 1]
    bundled = cfg.get("transformer_layers_per_block", 1)
    as_list = bundled if isinstance(bundled, list) else [bundled] * len(depths)
    fits = (
        len(as_list) == len(depths)
        and [d for d, a in zip(as_list, attention, strict=True) if a] + [as_list[-1]] == wanted
    )
    if fits:
        return bundled
    if len(set(wanted)) == 1:
        return wanted[0]
    if not attention[-1]:  # diffusers reads the middle block's depth from the last level's entry
        depths = [*depths[:-1], middle]
    return [d if a or i == len(depths) - 1 else 1 for i, (d, a) in enumerate(zip(depths, attention, strict=True))]


def _pooled_width(tensors: dict[str, Any], model_type: str) -> int:
    """Width of the pooled text embedding SDXL's UNet takes: the OpenCLIP encoder's projection."""
    encoder = FAMILIES[family_of(model_type)].text_encoders["text_encoder_2"]
    projection = tensors.get(encoder.prefix + "text_projection")
    if projection is None:  # a partial file: the text encoder's check names the missing weight
        return bundled_config(model_type, "text_encoder_2")["projection_dim"]
    return projection.shape[1]


def infer_vae_config(tensors: dict[str, Any], model_type: str, prefix: str = VAE_PREFIX) -> dict:
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


def infer_text_config(tensors: dict[str, Any], model_type: str, name: str = "text_encoder") -> dict:
    cfg = bundled_config(model_type, name)
    encoder = FAMILIES[family_of(model_type)].text_encoders[name]
    p = encoder.prefix
    keys = list(tensors)
    if encoder.kind == "clip":
        emb = tensors[p + "text_model.embeddings.token_embedding.weight"]
        positions = tensors[p + "text_model.embeddings.position_embedding.weight"].shape[0]
        layers = _count(keys, re.escape(p) + r"text_model\.encoder\.layers\.(\d+)\.")
        intermediate = tensors[p + "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:
        emb = tensors[p + "token_embedding.weight"]
        positions = tensors[p + "positional_embedding"].shape[0]
        layers = _count(keys, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        # SD 2.x conditions on the penultimate layer: the last resblock is stored but never used
        layers -= 1 if encoder.drops_last_layer else 0
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
    if encoder.projection:  # open_clip's text_projection is [hidden, projection] (used as x @ P)
        cfg["projection_dim"] = tensors[p + "text_projection"].shape[1]
    return cfg


def scheduler_config(model_type: str) -> dict:
    return bundled_config(model_type, "scheduler")
