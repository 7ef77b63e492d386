"""The original single-file layout of the Stable Diffusion lineage (CompVis/Stability's LDM for SD 1.x/2.x, SGM
for SDXL, which keeps the same UNet and VAE modules): each diffusers key's place in it, as tables.

Each table is built from the component's config (block counts, layers per block), not hard-coded for SD's sizes, so
tiny test models use the same code; checkpoint/keymap.py does the renaming. Convert used diffusers'
`single_file_utils` until importing it (diffusers' models, and with them torch, accelerate, peft) cost more than
converting; tests check that both give the same tensors, key for key and bit for bit, for every family, and a
round trip (original → convert → export) gives the file back. Flux's autoencoder is this VAE, without quant convs
and without the prefix (families/flux/parts.py).
"""

from dreambooth.checkpoint.keymap import Source, as_conv1x1, concat_rows, copy, rename, renamed, transpose

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


def unet_sources(keys: list[str], config: dict) -> dict[str, Source]:
    return {UNET_PREFIX + orig: Source((key,), copy) for key, orig, _ in renamed(keys, unet_prefixes(config), "UNet")}


def vae_sources(keys: list[str], config: dict, prefix: str = VAE_PREFIX) -> dict[str, Source]:
    """The LDM autoencoder's keys (SD's under `first_stage_model.`; Flux's own file has them bare, no quant convs)."""
    out = {}
    for key, original, inner in renamed(keys, vae_prefixes(config), "VAE"):
        is_attention_weight = inner is VAE_ATTENTION and not original.endswith((".norm.weight", ".norm.bias"))
        out[prefix + original] = Source((key,), as_conv1x1 if is_attention_weight else copy)
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
            out[prefix + "text_projection"] = Source((key,), transpose)
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


def ema_key(original: str) -> str:
    """Where LitEma keeps a UNet weight: `model.diffusion_model.a.b.weight` → `model_ema.diffusion_modelabweight`."""
    return EMA_PREFIX + "".join(original.split(".")[1:])


def unet_original_key(key: str, config: dict) -> str:
    """One diffusers UNet key's name in the original layout (no UNET_PREFIX), e.g. for SDXL LoRA module names."""
    found = rename(key, unet_prefixes(config))
    if found is None:
        raise KeyError(f"UNet key {key} has no place in the original layout")
    return found[0]
