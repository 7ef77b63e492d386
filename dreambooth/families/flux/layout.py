"""Flux.1's original (Black Forest Labs) single-file layout ⇄ diffusers' FluxTransformer2DModel, as tables.

One table of modules serves the weights, the conversion in both directions and the LoRA names: each original
module is made of one or more diffusers modules, in order. Where there are several, the original fuses them along
its output rows — q, k and v of a double block's attention (`img_attn.qkv`), and q, k, v and the MLP's input of a
single block (`linear1`) — so its weight is the parts' weights stacked, and a LoRA on the parts is written as one
LoRA on the fused module (dreambooth/families/flux/lora.py). Two things are not a plain rename: the final layer's
modulation holds (shift, scale) where diffusers holds (scale, shift), and QK-norms call their weight `scale`.

The architecture is read from the file, as ComfyUI's model detection does: the number of double and single blocks,
the width, the head size, the text and pooled widths, whether a guidance embedding exists (FLUX.1-dev has one,
schnell has none). So pruned variants (Flux.1-lite 8B, Flex.1 with 8 double blocks) and tiny test models load as
the released ones do.
"""

import re
from typing import Any

from dreambooth.checkpoint.keymap import Source, concat_rows, copy, swap_halves
from dreambooth.errors import UserError

# a ComfyUI diffusion-model file may keep the transformer under this prefix (BFL's release has none)
COMFY_PREFIX = "model.diffusion_model."
# original module → the diffusers modules it is made of, in row order (one: a rename; several: fused)
DOUBLE_BLOCK = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
DOUBLE_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE_BLOCK = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
EMBEDDERS = {
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "img_in": ("x_embedder",),
    "final_layer.linear": ("proj_out",),
}
GUIDANCE = {
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
}
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}  # (shift, scale) ⇄ (scale, shift)


def linear_modules(config: dict) -> dict[str, tuple[str, ...]]:
    """Every original linear module of a transformer with this config → its diffusers modules (row order)."""
    table = dict(EMBEDDERS)
    if config.get("guidance_embeds"):
        table |= GUIDANCE
    for i in range(config["num_layers"]):
        table |= {f"double_blocks.{i}.{o}": tuple(f"transformer_blocks.{i}.{d}" for d in parts)
                  for o, parts in DOUBLE_BLOCK.items()}  # fmt: skip
    for i in range(config["num_single_layers"]):
        table |= {f"single_blocks.{i}.{o}": tuple(f"single_transformer_blocks.{i}.{d}" for d in parts)
                  for o, parts in SINGLE_BLOCK.items()}  # fmt: skip
    return table


def norms(config: dict) -> dict[str, str]:
    """Original QK-norm module → diffusers module (RMSNorm weights: `.scale` there, `.weight` here)."""
    table = {}
    for i in range(config["num_layers"]):
        table |= {f"double_blocks.{i}.{o}": f"transformer_blocks.{i}.{d}" for o, d in DOUBLE_NORMS.items()}
    for i in range(config["num_single_layers"]):
        table |= {f"single_blocks.{i}.{o}": f"single_transformer_blocks.{i}.{d}" for o, d in SINGLE_NORMS.items()}
    return table


def transformer_sources(config: dict) -> dict[str, Source]:
    """Original key → how it is made from diffusers keys (export); read backwards, how to cut them out (convert)."""
    sources: dict[str, Source] = {}
    for original, parts in linear_modules(config).items():
        for param in ("weight", "bias"):
            keys = tuple(f"{part}.{param}" for part in parts)
            sources[f"{original}.{param}"] = Source(keys, concat_rows if len(keys) > 1 else copy)
    for original, module in norms(config).items():
        sources[f"{original}.scale"] = Source((f"{module}.weight",), copy)
    for original, module in SWAPPED.items():
        for param in ("weight", "bias"):
            sources[f"{original}.{param}"] = Source((f"{module}.{param}",), swap_halves)
    return sources


# ───────────────────────────── the architecture, read from the file ─────────────────────────────


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def rope_axes(head_dim: int) -> list[int]:
    """RoPE's split of a head over (text index, row, column): Flux.1's (16, 56, 56) for its 128-wide heads. No
    weight records it; for other head sizes the same proportions, each part even (RoPE rotates pairs)."""
    if head_dim == 128:
        return [16, 56, 56]
    first = max(2, head_dim // 8 // 2 * 2)
    second = (head_dim - first) // 2 // 2 * 2
    return [first, second, head_dim - first - second]


def infer_transformer_config(tensors: dict[str, Any], bundled: dict, source: str) -> dict:
    """The FluxTransformer2DModel config of an original-layout transformer (keys without a prefix)."""
    keys = list(tensors)
    try:
        hidden, in_channels = tensors["img_in.weight"].shape
        head_dim = tensors["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        config = {
            **bundled,
            "in_channels": in_channels,
            "out_channels": None,
            "num_layers": _count(keys, r"double_blocks\.(\d+)\."),
            "num_single_layers": _count(keys, r"single_blocks\.(\d+)\."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden // head_dim,
            "joint_attention_dim": tensors["txt_in.weight"].shape[1],
            "pooled_projection_dim": tensors["vector_in.in_layer.weight"].shape[1],
            "guidance_embeds": "guidance_in.in_layer.weight" in tensors,
            "axes_dims_rope": rope_axes(head_dim),
        }
    except KeyError as exc:
        raise UserError(
            f"{source} lacks Flux transformer weights this architecture needs (first missing: {exc.args[0]})",
            "the file is incomplete (a partial download?) or not a Flux.1 transformer",
        ) from None
    if tensors["final_layer.linear.weight"].shape[0] != in_channels:
        config["out_channels"] = tensors["final_layer.linear.weight"].shape[0]
    return config


def variant(config: dict) -> str:
    """dev (guidance-distilled: a guidance embedding) or schnell (timestep-distilled: none)."""
    return "flux-dev" if config.get("guidance_embeds") else "flux-schnell"
