"""Diffusers component state dicts ↔ the original single-file layout (LDM, as the SD releases), table-driven.

Each table is built from the component's config (block counts, layers per block), not hard-coded for SD's
sizes, so tiny test models and future families use the same code. One table serves both directions: export
builds each original tensor from its `Source`, and convert (`from_original`) cuts the component's tensors back
out of the original ones. Convert used diffusers' `single_file_utils` until importing it (diffusers' models, and
with them torch, accelerate, peft) cost more than converting; tests check that both give the same tensors, key
for key and bit for bit, for every family, and a round trip (original → convert → export) gives the file back.

Nothing here imports torch: the tensors are torch's or `tensorfile.StoredTensor` (byte ranges of a file), and
only indexing, `reshape` and `.T` are used on them, except to concatenate (export, which has torch loaded).
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: an HF CLIPTextModel inside FrozenCLIPEmbedder
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: open_clip's text tower inside FrozenOpenCLIPEmbedder
EMA_PREFIX = "model_ema."
# SDXL keeps its text encoders in sgm's GeneralConditioner: base 1.0 has CLIP ViT-L (an HF CLIPTextModel, as SD 1.x)
# then OpenCLIP ViT-bigG (open_clip's text tower, as SD 2.x, plus text_projection); the refiner has bigG only
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class Source:
    """Where one original tensor comes from: diffusers keys of one component, and how they combine."""

    keys: tuple[str, ...]
    combine: Callable[..., Any]


def copy(t: Any) -> Any:
    return t


def _as_conv1x1(t: Any) -> Any:
    # The LDM VAE's attention uses 1x1 convolutions where diffusers uses linear layers: same numbers, 2 more dims.
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def _transpose(t: Any) -> Any:
    # open_clip applies text_projection as x @ P ([hidden, proj]); HF stores a Linear weight ([proj, hidden])
    return t.T


def concat_rows(*parts: Any) -> Any:
    # open_clip keeps q, k, v as one fused in_proj (nn.MultiheadAttention), Flux its qkv and linear1; diffusers/HF
    # split them. The inverse (from_original) cuts the rows back out by the parts' shapes.
    import torch

    return torch.cat(parts, dim=0)


def swap_halves(t: Any) -> Any:
    # Flux's final modulation: (shift, scale) in the original, (scale, shift) in diffusers; its own inverse
    import torch

    if not isinstance(t, torch.Tensor):  # a StoredTensor: the two halves change places, so the bytes are read
        t = t.to_torch()
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module prefix → (original module prefix, renames of the sub-modules inside it)."""
    n = len(config["down_block_types"])
    per = config["layers_per_block"]  # resnets per down block; up blocks have one more
    table: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET),
    }
    if config.get("addition_embed_type") == "text_time":
        # SDXL: the size/crop (refiner: score) embedding plus pooled text; sgm's label_emb is Sequential(lin, SiLU, lin)
        table["add_embedding.linear_1"] = ("label_emb.0.0", {})
        table["add_embedding.linear_2"] = ("label_emb.0.2", {})
    for i in range(n):
        for j in range(per):
            index = 1 + i * (per + 1) + j  # input_blocks.0 is conv_in; each level ends with its downsampler
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", UNET_RESNET)
            table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * (per + 1)}.0.op", {})
    for i in range(n):
        for j in range(per + 1):
            index = i * (per + 1) + j
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", UNET_RESNET)
            table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
        if i < n - 1:
            # the upsampler sits after the attention in the level's last output block, when there is one
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * (per + 1) + per}.{slot}.conv", {})
    return table


def vae_prefixes(config: dict) -> dict[str, tuple[str, dict[str, str]]]:
    n = len(config["block_out_channels"])
    per = config["layers_per_block"]
    table: dict[str, tuple[str, dict[str, str]]] = {"quant_conv": ("quant_conv", {})}
    table["post_quant_conv"] = ("post_quant_conv", {})
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        table[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        table[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        table[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", VAE_RESNET)
        table[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", VAE_RESNET)
        table[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(n):
        for j in range(per):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    for i in range(n):
        level = n - 1 - i  # the LDM decoder numbers its levels from the bottom (highest resolution = 0)
        for j in range(per + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return table


def _rename(key: str, table: dict[str, tuple[str, dict[str, str]]]) -> tuple[str, dict[str, str]] | None:
    """Find the table's module prefix of `key`; return (original key, inner renames that applied)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            original, inner = table[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    return f"{original}.{new}{rest[len(old) :]}", inner
            return f"{original}.{rest}", inner
    return None


def _renamed(keys: list[str], table: dict, what: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    for key in keys:
        found = _rename(key, table)
        if found is None:
            raise KeyError(f"{what} key {key} has no place in the original layout")
        yield key, *found


def unet_sources(keys: list[str], config: dict) -> dict[str, Source]:
    return {UNET_PREFIX + orig: Source((key,), copy) for key, orig, _ in _renamed(keys, unet_prefixes(config), "UNet")}


def vae_sources(keys: list[str], config: dict, prefix: str = VAE_PREFIX) -> dict[str, Source]:
    """The LDM autoencoder's keys (SD's under `first_stage_model.`; Flux's own file has them bare, no quant convs)."""
    out = {}
    for key, original, inner in _renamed(keys, vae_prefixes(config), "VAE"):
        is_attention_weight = inner is VAE_ATTENTION and not original.endswith((".norm.weight", ".norm.bias"))
        out[prefix + original] = Source((key,), _as_conv1x1 if is_attention_weight else copy)
    return out


def _text_model_key(key: str) -> str:
    """transformers 5 saves CLIPTextModel without the `text_model.` level that 4.x (and SD files) have."""
    return "text_model." + key.removeprefix("text_model.")


def clip_sources(keys: list[str], config: dict, prefix: str = CLIP_PREFIX) -> dict[str, Source]:
    """SD 1.x (and SDXL's first encoder) stored the HF CLIPTextModel (4.x layout) as is, under one prefix."""
    return {prefix + _text_model_key(key): Source((key,), copy) for key in keys}


def clip_position_ids_key(prefix: str) -> str:
    return prefix + "text_model.embeddings.position_ids"


CLIP_POSITION_IDS = clip_position_ids_key(CLIP_PREFIX)

OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_sources(keys: list[str], config: dict, prefix: str = OPENCLIP_PREFIX) -> dict[str, Source]:
    """SD 2.x and SDXL stored open_clip's text tower: other names, fused q/k/v, a bare positional embedding."""
    out: dict[str, Source] = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key in keys:
        if key == "text_projection.weight":  # CLIPTextModelWithProjection (SDXL's bigG)
            out[prefix + "text_projection"] = Source((key,), _transpose)
            continue
        canon = _text_model_key(key)
        if canon in fixed:
            out[prefix + fixed[canon]] = Source((key,), copy)
            continue
        head, sep, rest = key.partition(".self_attn.")
        if sep and rest.split(".")[0] in ("q_proj", "k_proj", "v_proj"):
            kind = rest.split(".")[1]  # weight | bias
            layer = _text_model_key(head).removeprefix("text_model.encoder.layers.")
            fused = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
            parts = tuple(f"{head}.self_attn.{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj"))
            out[fused] = Source(parts, concat_rows)
            continue
        layer, _, inner = canon.removeprefix("text_model.encoder.layers.").partition(".")
        module, _, param = inner.rpartition(".")
        if canon.startswith("text_model.encoder.layers.") and module in OPENCLIP_LAYER:
            out[f"{prefix}transformer.resblocks.{layer}.{OPENCLIP_LAYER[module]}.{param}"] = Source((key,), copy)
            continue
        raise KeyError(f"text encoder key {key} has no place in the open_clip layout")
    return out


TEXT_SOURCES = {"clip": clip_sources, "openclip": openclip_sources}


def text_sources(keys: list[str], config: dict, kind: str, prefix: str) -> dict[str, Source]:
    return TEXT_SOURCES[kind](keys, config, prefix)


def build_original(sources: dict[str, Source], state: dict[str, Any]) -> dict[str, Any]:
    return {name: src.combine(*(state[k] for k in src.keys)) for name, src in sources.items()}


def from_original(
    sources: dict[str, Source], tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[str]]:
    """The inverse of `build_original`: each component key's tensor cut out of the original tensors, and the
    original keys that are missing. `shapes` (the component's own) says where a fused q/k/v splits and what a
    1x1 convolution's weight is as a linear one; every other tensor is taken as it is (its shape checked later)."""
    state: dict[str, Any] = {}
    missing = []
    for original, src in sources.items():
        t = tensors.get(original)
        if t is None:
            missing.append(original)
        elif src.combine is concat_rows:  # rows of the fused tensor, in order
            start = 0
            for key in src.keys:
                state[key], start = t[start : start + shapes[key][0]], start + shapes[key][0]
        elif src.combine is _transpose:
            state[src.keys[0]] = t.T
        elif src.combine is swap_halves:
            state[src.keys[0]] = swap_halves(t)
        elif src.combine is _as_conv1x1 and t.ndim == 4 and len(shapes[src.keys[0]]) == 2:
            state[src.keys[0]] = t.reshape(*shapes[src.keys[0]])
        else:
            state[src.keys[0]] = t
    return state, missing


def ema_key(original: str) -> str:
    """Where LitEma keeps a UNet weight: `model.diffusion_model.a.b.weight` → `model_ema.diffusion_modelabweight`."""
    return EMA_PREFIX + "".join(original.split(".")[1:])


def unet_original_key(key: str, config: dict) -> str:
    """One diffusers UNet key's name in the original layout (no UNET_PREFIX), e.g. for SDXL LoRA module names."""
    found = _rename(key, unet_prefixes(config))
    if found is None:
        raise KeyError(f"UNet key {key} has no place in the original layout")
    return found[0]


# transformers 5 dropped CLIPTextModel's `text_model.` level from module paths; the published names keep it
TEXT_MODEL = "text_model."


def kohya_module_name(prefix: str, component: str, module: str) -> str:
    """kohya's (and the WebUI's, ComfyUI's) LoRA module name: the prefix and the module path with "." as "_";
    a text encoder's path in transformers 4's layout (`lora_te1_text_model_encoder_layers_0_…`)."""
    if component.startswith("text_encoder") and not module.startswith(TEXT_MODEL):
        module = TEXT_MODEL + module
    return f"{prefix}_{module.replace('.', '_')}"
