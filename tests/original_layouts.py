"""State dicts laid out exactly like the ORIGINAL Stable Diffusion single-file checkpoints.

"Original" means the CompVis / Stability-AI LDM layout of the released files (`sd-v1-5.ckpt`,
`v1-5-pruned.safetensors`, `v2-1_512-ema-pruned`, `v2-1_768-ema-pruned`): one flat dict whose keys are the
`state_dict()` names of `ldm.models.diffusion.ddpm.LatentDiffusion`.

Everything here is derived by hand from the original model definitions, NOT from diffusers' conversion code or
key maps, so that our converter is tested against an independent reading of the layout. Sources read:

* UNet: Stability-AI/stablediffusion `ldm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock,
  Downsample, Upsample) and `ldm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock,
  CrossAttention, FeedForward/GEGLU); CompVis/stable-diffusion for the SD1 variant (identical keys).
* VAE: `ldm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock, Down/Upsample) and
  `ldm/models/autoencoder.py` (AutoencoderKL: quant_conv, post_quant_conv; the loss is torch.nn.Identity).
* Text: `ldm/modules/encoders/modules.py` FrozenCLIPEmbedder (Hugging Face CLIPTextModel under
  `cond_stage_model.transformer.`) and FrozenOpenCLIPEmbedder (open_clip CLIP with `visual` deleted, under
  `cond_stage_model.model.`; open_clip v2.7 `model.py` / `transformer.py`).
* `ldm/models/diffusion/ddpm.py` register_schedule buffers and `ldm/modules/ema.py` LitEma.
* Hyper-parameters: configs/stable-diffusion/v1-inference.yaml (CompVis), v2-inference(-v).yaml (Stability).
* SDXL: Stability-AI/generative-models (sgm) `sgm/modules/diffusionmodules/openaimodel.py` (UNetModel with
  `adm_in_channels` and `num_classes: sequential` → `label_emb`, per-level `transformer_depth`),
  `sgm/modules/encoders/modules.py` (GeneralConditioner.embedders: FrozenCLIPEmbedder → `.transformer`,
  FrozenOpenCLIPEmbedder2 → `.model`), `configs/inference/sd_xl_base.yaml` and `sd_xl_refiner.yaml`. The
  DiffusionEngine registers model, conditioner, then first_stage_model, and has no schedule buffers.

Keys are emitted in the order `nn.Module.state_dict()` would produce them (a module's own parameters, then its
own buffers, then its children in registration order), so a dict built here iterates like the real file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

Shape = tuple[int, ...]
ShapeTable = dict[str, tuple[Shape, torch.dtype]]

# Float tensors are tagged with this placeholder dtype in the shape table; `original_state_dict` replaces it
# with the requested dtype (fp16 releases cast every floating tensor, buffers included).
FLOAT = torch.float32


# --------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class UNetSpec:
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    # Level indices (0 = full resolution) whose blocks carry a SpatialTransformer. The original config gives
    # `attention_resolutions` as downsample factors ds = 2**level: SD's [4, 2, 1] is levels (0, 1, 2).
    attention_levels: tuple[int, ...]
    context_dim: int
    # SD2 (`use_linear_in_transformer: True`) projects in/out with nn.Linear [C, C]; SD1 with 1x1 convs.
    use_linear: bool
    # one int for every level (SD), or one per level (SDXL base: 1, 2, 10); the middle block takes the last one
    transformer_depth: int | tuple[int, ...] = 1
    in_channels: int = 4
    out_channels: int = 4
    adm_in_channels: int = 0  # SDXL: label_emb = Sequential(Sequential(Linear(adm, 4C), SiLU, Linear(4C, 4C)))

    def depth(self, level: int | None) -> int:
        """Transformer blocks at a level (None: the middle block)."""
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]


@dataclass(frozen=True)
class VAESpec:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int = 4
    in_channels: int = 3  # also the decoder's out_ch


@dataclass(frozen=True)
class TextSpec:
    kind: str  # "clip" (HF CLIPTextModel, SD1) | "openclip" (open_clip text tower, SD2)
    width: int
    layers: int
    heads: int  # does not change any shape; kept so a spec reads like the model config
    intermediate: int
    vocab: int = 49408
    positions: int = 77
    embed_dim: int | None = None  # open_clip text_projection's output width (None: the width)


@dataclass(frozen=True)
class Layout:
    unet: UNetSpec
    vae: VAESpec
    text: TextSpec | None  # SD 1.x/2.x: cond_stage_model
    conditioner: tuple[TextSpec, ...] = ()  # SDXL: conditioner.embedders.<i>, in order


# Both families share the KL-f8 autoencoder (embed_dim == z_channels == 4, attn_resolutions: []).
_SD_VAE = VAESpec(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)

SD1 = Layout(
    # v1-inference.yaml: num_heads 8, context_dim 768, use_linear_in_transformer default False.
    unet=UNetSpec(320, (1, 2, 4, 4), 2, attention_levels=(0, 1, 2), context_dim=768, use_linear=False),
    vae=_SD_VAE,
    # openai/clip-vit-large-patch14 text model.
    text=TextSpec("clip", width=768, layers=12, heads=12, intermediate=3072),
)

SD2 = Layout(  # v2-inference.yaml (512 base) and v2-inference-v.yaml (768-v) have identical shapes
    # num_head_channels 64 (heads = C // 64: head count changes, inner_dim = C does not), context_dim 1024.
    unet=UNetSpec(320, (1, 2, 4, 4), 2, attention_levels=(0, 1, 2), context_dim=1024, use_linear=True),
    vae=_SD_VAE,
    # open_clip ViT-H-14 text_cfg: width 1024, heads 16, layers 24, mlp_ratio 4.
    text=TextSpec("openclip", width=1024, layers=24, heads=16, intermediate=4096),
)

# sd_xl_base.yaml: model_channels 320, channel_mult [1, 2, 4], attention_resolutions [4, 2] (levels 1 and 2),
# transformer_depth [1, 2, 10], context_dim 2048 (768 + 1280), num_head_channels 64, adm_in_channels 2816
# (6 size/crop numbers × 256 + the 1280-wide pooled bigG output). Embedders: CLIP ViT-L (HF), OpenCLIP ViT-bigG-14
# (width 1280, heads 20, layers 32, mlp 5120, embed_dim 1280; all 32 layers stored and used, penultimate output).
_BIG_G = TextSpec("openclip", width=1280, layers=32, heads=20, intermediate=5120)
SDXL = Layout(
    unet=UNetSpec(
        320,
        (1, 2, 4),
        2,
        attention_levels=(1, 2),
        context_dim=2048,
        use_linear=True,
        transformer_depth=(1, 2, 10),
        adm_in_channels=2816,
    ),
    vae=_SD_VAE,
    text=None,
    conditioner=(TextSpec("clip", width=768, layers=12, heads=12, intermediate=3072), _BIG_G),
)
# sd_xl_refiner.yaml: model_channels 384, channel_mult [1, 2, 4, 4], attention_resolutions [4, 2], depth 4,
# context_dim 1280, adm_in_channels 2560 (5 numbers × 256: an aesthetic score instead of the target size).
SDXL_REFINER = Layout(
    unet=UNetSpec(
        384,
        (1, 2, 4, 4),
        2,
        attention_levels=(1, 2),
        context_dim=1280,
        use_linear=True,
        transformer_depth=4,
        adm_in_channels=2560,
    ),
    vae=_SD_VAE,
    text=None,
    conditioner=(_BIG_G,),
)

# Tiny variants for fast tests. 32 channels is the smallest width GroupNorm(32 groups) accepts.
_TINY_UNET = UNetSpec(32, (1, 2), 1, attention_levels=(0,), context_dim=32, use_linear=False)
_TINY_VAE = VAESpec(ch=32, ch_mult=(1, 2), num_res_blocks=1)

TINY_SD1 = Layout(
    unet=_TINY_UNET,
    vae=_TINY_VAE,
    text=TextSpec("clip", width=32, layers=2, heads=2, intermediate=37),
)
TINY_SD2 = Layout(
    unet=UNetSpec(32, (1, 2), 1, attention_levels=(0,), context_dim=32, use_linear=True),
    vae=_TINY_VAE,
    text=TextSpec("openclip", width=32, layers=3, heads=2, intermediate=37),
)
# SDXL's shape at toy size: attention only on the lower level, 2 transformer blocks there, two encoders of different
# widths (32 + 64; loaders tell them apart by width, as 768 and 1280), bigG projecting to 48, adm = 6 × 8 (time ids)
# + 48 (pooled); the refiner: the second encoder alone and 5 time ids.
_TINY_BIG_G = TextSpec("openclip", width=64, layers=2, heads=2, intermediate=37, embed_dim=48)
TINY_SDXL = Layout(
    unet=UNetSpec(
        32,
        (1, 2),
        1,
        attention_levels=(1,),
        context_dim=32 + 64,
        use_linear=True,
        transformer_depth=(1, 2),
        adm_in_channels=6 * 8 + 48,
    ),
    vae=_TINY_VAE,
    text=None,
    conditioner=(TextSpec("clip", width=32, layers=2, heads=2, intermediate=37), _TINY_BIG_G),
)
TINY_SDXL_REFINER = Layout(
    unet=UNetSpec(
        32,
        (1, 2),
        1,
        attention_levels=(1,),
        context_dim=64,
        use_linear=True,
        transformer_depth=2,
        adm_in_channels=5 * 8 + 48,
    ),
    vae=_TINY_VAE,
    text=None,
    conditioner=(_TINY_BIG_G,),
)


# ----------------------------------------------------------------------------------------- layer helpers
# Each helper yields (suffix, shape) pairs for one torch layer, in that layer's parameter order
# (weight before bias). Dtype is FLOAT unless stated.

Entries = Iterator[tuple[str, Shape]]


def _conv(name: str, cin: int, cout: int, k: int) -> Entries:
    yield f"{name}.weight", (cout, cin, k, k)
    yield f"{name}.bias", (cout,)


def _linear(name: str, fin: int, fout: int, *, bias: bool = True) -> Entries:
    yield f"{name}.weight", (fout, fin)
    if bias:
        yield f"{name}.bias", (fout,)


def _norm(name: str, c: int) -> Entries:  # GroupNorm and LayerNorm (affine) look the same
    yield f"{name}.weight", (c,)
    yield f"{name}.bias", (c,)


# ---------------------------------------------------------------------------------------------------- UNet


def _resblock(p: str, cin: int, cout: int, emb: int) -> Entries:
    # openaimodel.ResBlock: in_layers = (GroupNorm, SiLU, conv3x3), emb_layers = (SiLU, Linear),
    # out_layers = (GroupNorm, SiLU, Dropout, conv3x3); use_scale_shift_norm is False for SD, so emb_layers
    # outputs cout (not 2*cout). skip_connection is Identity when channels match, else a 1x1 conv
    # (use_conv=False), so it only has weights when cin != cout.
    yield from _norm(f"{p}.in_layers.0", cin)
    yield from _conv(f"{p}.in_layers.2", cin, cout, 3)
    yield from _linear(f"{p}.emb_layers.1", emb, cout)
    yield from _norm(f"{p}.out_layers.0", cout)
    yield from _conv(f"{p}.out_layers.3", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}.skip_connection", cin, cout, 1)


def _cross_attention(p: str, dim: int, context: int) -> Entries:
    # attention.CrossAttention: to_q/k/v are bias-free Linears (inner_dim = heads * dim_head = dim for SD),
    # to_out = (Linear with bias, Dropout).
    yield from _linear(f"{p}.to_q", dim, dim, bias=False)
    yield from _linear(f"{p}.to_k", context, dim, bias=False)
    yield from _linear(f"{p}.to_v", context, dim, bias=False)
    yield from _linear(f"{p}.to_out.0", dim, dim)


def _spatial_transformer(p: str, c: int, u: UNetSpec, level: int | None) -> Entries:
    # attention.SpatialTransformer: norm (GroupNorm), proj_in, transformer_blocks, proj_out.
    # use_linear: proj_in/proj_out are Linear [C, C]; otherwise 1x1 Conv2d [C, C, 1, 1].
    def proj(name: str) -> Entries:
        return _linear(name, c, c) if u.use_linear else _conv(name, c, c, 1)

    yield from _norm(f"{p}.norm", c)
    yield from proj(f"{p}.proj_in")
    for d in range(u.depth(level)):
        # BasicTransformerBlock registers attn1, ff, attn2, norm1, norm2, norm3 in that order.
        # attn1 is self-attention (context_dim None -> dim), attn2 cross-attends to the text context.
        # The original indexes context_dim[d] per block; SD passes one value, used for every block here.
        b = f"{p}.transformer_blocks.{d}"
        yield from _cross_attention(f"{b}.attn1", c, c)
        # FeedForward(glu=True): net = (GEGLU(dim, 4*dim) whose proj is Linear(dim, 2*4*dim), Dropout,
        # Linear(4*dim, dim)).
        yield from _linear(f"{b}.ff.net.0.proj", c, 2 * 4 * c)
        yield from _linear(f"{b}.ff.net.2", 4 * c, c)
        yield from _cross_attention(f"{b}.attn2", c, u.context_dim)
        for n in ("norm1", "norm2", "norm3"):
            yield from _norm(f"{b}.{n}", c)
    yield from proj(f"{p}.proj_out")


def _unet(p: str, u: UNetSpec) -> Entries:
    """openaimodel.UNetModel with use_spatial_transformer, conv_resample, resblock_updown False."""
    mc = u.model_channels
    emb = 4 * mc  # time_embed_dim
    last = len(u.channel_mult) - 1

    # time_embed = (Linear, SiLU, Linear)
    yield from _linear(f"{p}.time_embed.0", mc, emb)
    yield from _linear(f"{p}.time_embed.2", emb, emb)
    if u.adm_in_channels:  # sgm registers label_emb right after time_embed
        yield from _linear(f"{p}.label_emb.0.0", u.adm_in_channels, emb)
        yield from _linear(f"{p}.label_emb.0.2", emb, emb)

    # Encoder path. input_blocks[0] is the stem conv; each later block is a TimestepEmbedSequential:
    # (ResBlock[, SpatialTransformer]) or (Downsample,). `skip_chans` records each block's output channels,
    # which the decoder pops to size its concatenated inputs.
    yield from _conv(f"{p}.input_blocks.0.0", u.in_channels, mc, 3)
    skip_chans = [mc]
    ch = mc
    idx = 1
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            yield from _resblock(f"{p}.input_blocks.{idx}.0", ch, mult * mc, emb)
            ch = mult * mc
            if level in u.attention_levels:
                yield from _spatial_transformer(f"{p}.input_blocks.{idx}.1", ch, u, level)
            skip_chans.append(ch)
            idx += 1
        if level != last:
            # Downsample(use_conv=True): a stride-2 3x3 conv named `op`, channels unchanged.
            yield from _conv(f"{p}.input_blocks.{idx}.0.op", ch, ch, 3)
            skip_chans.append(ch)
            idx += 1

    # middle_block = (ResBlock, SpatialTransformer, ResBlock); it always has attention.
    yield from _resblock(f"{p}.middle_block.0", ch, ch, emb)
    yield from _spatial_transformer(f"{p}.middle_block.1", ch, u, None)
    yield from _resblock(f"{p}.middle_block.2", ch, ch, emb)

    # Decoder path: num_res_blocks + 1 blocks per level, deepest level first. Each block is
    # (ResBlock(ch + skip -> mult*mc)[, SpatialTransformer][, Upsample]); the Upsample (3x3 conv named `conv`)
    # closes every level but the top one, so it sits at sub-index 2 with attention and 1 without.
    idx = 0
    for level in reversed(range(len(u.channel_mult))):
        mult = u.channel_mult[level]
        for i in range(u.num_res_blocks + 1):
            yield from _resblock(f"{p}.output_blocks.{idx}.0", ch + skip_chans.pop(), mult * mc, emb)
            ch = mult * mc
            sub = 1
            if level in u.attention_levels:
                yield from _spatial_transformer(f"{p}.output_blocks.{idx}.1", ch, u, level)
                sub = 2
            if level != 0 and i == u.num_res_blocks:
                yield from _conv(f"{p}.output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    assert not skip_chans

    # out = (GroupNorm, SiLU, conv3x3)
    yield from _norm(f"{p}.out.0", ch)
    yield from _conv(f"{p}.out.2", mc, u.out_channels, 3)


# ----------------------------------------------------------------------------------------------------- VAE


def _vae_resnet(p: str, cin: int, cout: int) -> Entries:
    # model.ResnetBlock with temb_channels=0 (so no temb_proj); nin_shortcut (1x1) only when channels change.
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv(f"{p}.conv1", cin, cout, 3)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}.nin_shortcut", cin, cout, 1)


def _vae_attn(p: str, c: int) -> Entries:
    # model.AttnBlock: single-head attention with q/k/v/proj_out as 1x1 Conv2d -> weights [C, C, 1, 1].
    yield from _norm(f"{p}.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.{n}", c, c, 1)


def _vae_mid(p: str, c: int) -> Entries:
    yield from _vae_resnet(f"{p}.mid.block_1", c, c)
    yield from _vae_attn(f"{p}.mid.attn_1", c)
    yield from _vae_resnet(f"{p}.mid.block_2", c, c)


def _vae(p: str, v: VAESpec) -> Entries:
    """autoencoder.AutoencoderKL (double_z, embed_dim == z_channels, attn_resolutions [] -> no level attn)."""
    last = len(v.ch_mult) - 1

    # Encoder: conv_in, down[i].block[j] (num_res_blocks each), down[i].downsample.conv except the last level,
    # mid, norm_out, conv_out -> 2*z_channels (mean and logvar).
    e = f"{p}.encoder"
    yield from _conv(f"{e}.conv_in", v.in_channels, v.ch, 3)
    cin = v.ch
    for i, mult in enumerate(v.ch_mult):
        for j in range(v.num_res_blocks):
            yield from _vae_resnet(f"{e}.down.{i}.block.{j}", cin, v.ch * mult)
            cin = v.ch * mult
        if i != last:
            yield from _conv(f"{e}.down.{i}.downsample.conv", cin, cin, 3)
    yield from _vae_mid(e, cin)
    yield from _norm(f"{e}.norm_out", cin)
    yield from _conv(f"{e}.conv_out", cin, 2 * v.z_channels, 3)

    # Decoder: built deepest level first but stored with up.insert(0, ...), so `up.{i}` is level i. Each level
    # has num_res_blocks + 1 blocks and, except level 0, an upsample conv. Channels are computed in build
    # order, then emitted in index order (which is what state_dict iterates).
    d = f"{p}.decoder"
    cin = v.ch * v.ch_mult[last]
    yield from _conv(f"{d}.conv_in", v.z_channels, cin, 3)
    yield from _vae_mid(d, cin)
    levels: dict[int, list[tuple[str, Shape]]] = {}
    for i in reversed(range(len(v.ch_mult))):
        entries: list[tuple[str, Shape]] = []
        for j in range(v.num_res_blocks + 1):
            entries += _vae_resnet(f"{d}.up.{i}.block.{j}", cin, v.ch * v.ch_mult[i])
            cin = v.ch * v.ch_mult[i]
        if i != 0:
            entries += _conv(f"{d}.up.{i}.upsample.conv", cin, cin, 3)
        levels[i] = entries
    for i in range(len(v.ch_mult)):
        yield from levels[i]
    yield from _norm(f"{d}.norm_out", cin)
    yield from _conv(f"{d}.conv_out", cin, v.in_channels, 3)

    # `loss` is torch.nn.Identity in the inference configs: no keys.
    yield from _conv(f"{p}.quant_conv", 2 * v.z_channels, 2 * v.z_channels, 1)
    yield from _conv(f"{p}.post_quant_conv", v.z_channels, v.z_channels, 1)


# ---------------------------------------------------------------------------------------------------- text


def _clip_text(p: str, t: TextSpec, table: ShapeTable) -> None:
    """HF transformers CLIPTextModel as saved by the SD1 releases (transformers 4.x of 2022)."""
    m = f"{p}.text_model"
    # CLIPTextEmbeddings: its own buffer position_ids (int64 [1, positions]) precedes its child layers.
    # Later transformers made it non-persistent, but the released SD1 files carry it.
    table[f"{m}.embeddings.position_ids"] = ((1, t.positions), torch.int64)
    _put(table, _embedding(f"{m}.embeddings.token_embedding", t.vocab, t.width))
    _put(table, _embedding(f"{m}.embeddings.position_embedding", t.positions, t.width))
    for n in range(t.layers):
        layer = f"{m}.encoder.layers.{n}"
        # CLIPAttention registers k_proj, v_proj, q_proj, out_proj (all with bias).
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _put(table, _linear(f"{layer}.self_attn.{proj}", t.width, t.width))
        _put(table, _norm(f"{layer}.layer_norm1", t.width))
        _put(table, _linear(f"{layer}.mlp.fc1", t.width, t.intermediate))
        _put(table, _linear(f"{layer}.mlp.fc2", t.intermediate, t.width))
        _put(table, _norm(f"{layer}.layer_norm2", t.width))
    _put(table, _norm(f"{m}.final_layer_norm", t.width))


def _openclip_text(p: str, t: TextSpec, table: ShapeTable) -> None:
    """open_clip CLIP (v2.x) with `visual` deleted by FrozenOpenCLIPEmbedder."""
    # CLIP's own parameters come first in state_dict order: positional_embedding [ctx, width],
    # text_projection [width, embed_dim] (embed_dim == width for ViT-H-14: 1024), logit_scale (0-dim).
    # attn_mask is a non-persistent buffer: not saved.
    table[f"{p}.positional_embedding"] = ((t.positions, t.width), FLOAT)
    table[f"{p}.text_projection"] = ((t.width, t.embed_dim or t.width), FLOAT)
    table[f"{p}.logit_scale"] = ((), FLOAT)
    for n in range(t.layers):
        # ResidualAttentionBlock: ln_1, attn (nn.MultiheadAttention: packed in_proj [3W, W] + out_proj),
        # ls_1 (Identity: no layer scale), ln_2, mlp (c_fc, gelu, c_proj), ls_2 (Identity).
        r = f"{p}.transformer.resblocks.{n}"
        _put(table, _norm(f"{r}.ln_1", t.width))
        table[f"{r}.attn.in_proj_weight"] = ((3 * t.width, t.width), FLOAT)
        table[f"{r}.attn.in_proj_bias"] = ((3 * t.width,), FLOAT)
        _put(table, _linear(f"{r}.attn.out_proj", t.width, t.width))
        _put(table, _norm(f"{r}.ln_2", t.width))
        _put(table, _linear(f"{r}.mlp.c_fc", t.width, t.intermediate))
        _put(table, _linear(f"{r}.mlp.c_proj", t.intermediate, t.width))
    _put(table, _embedding(f"{p}.token_embedding", t.vocab, t.width))
    _put(table, _norm(f"{p}.ln_final", t.width))


def _embedding(name: str, num: int, dim: int) -> Entries:  # nn.Embedding: weight only
    yield f"{name}.weight", (num, dim)


def _put(table: ShapeTable, entries: Entries) -> None:
    for key, shape in entries:
        assert key not in table, key
        table[key] = (shape, FLOAT)


# ------------------------------------------------------------------------------------------- DDPM schedule

# ddpm.DDPM.register_schedule buffers, in registration order. All float32 (`to_torch` = torch.tensor(...,
# dtype=torch.float32)), 1000 entries each. lvlb_weights is registered persistent=False: not saved.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.0120  # both v1 and v2 configs


def schedule_values() -> dict[str, torch.Tensor]:
    """The buffers exactly as register_schedule computes them (float64 numpy, then cast to float32)."""
    # make_beta_schedule("linear"): linspace of the square roots, squared ("scaled linear").
    betas = np.linspace(LINEAR_START**0.5, LINEAR_END**0.5, TIMESTEPS, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    assert tuple(values) == SCHEDULE_BUFFERS
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


# ------------------------------------------------------------------------------------------- whole model

UNET_PREFIX = "model.diffusion_model"  # DDPM.model is a DiffusionWrapper whose child is `diffusion_model`
VAE_PREFIX = "first_stage_model"
CLIP_PREFIX = "cond_stage_model.transformer"  # FrozenCLIPEmbedder.transformer = CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model"  # FrozenOpenCLIPEmbedder.model = open_clip CLIP
CONDITIONER_PREFIX = "conditioner.embedders"  # SDXL: GeneralConditioner.embedders (an nn.ModuleList)
EMA_PREFIX = "model_ema"


def ema_key(unet_key: str) -> str:
    """LitEma buffer name for a `model.*` parameter: the name under `model` with the dots removed."""
    assert unet_key.startswith("model.")
    return f"{EMA_PREFIX}." + unet_key.removeprefix("model.").replace(".", "")


def original_shapes(layout: Layout, *, ema: bool = False, schedule_buffers: bool = True) -> ShapeTable:
    """Key -> (shape, dtype) for the original checkpoint of `layout`, in state_dict order.

    Floating entries carry torch.float32 (the dtype of the fp32 releases); `original_state_dict(dtype=...)`
    casts them all. `ema=True` adds LitEma's `model_ema.*` buffers (as in the non-"emaonly" v1 releases).
    """
    table: ShapeTable = {}
    # LatentDiffusion: its own (schedule) buffers first, then children model, model_ema, first_stage_model,
    # cond_stage_model. `scale_factor` is a plain float (scale_by_std False) and `logvar` a plain tensor.
    if schedule_buffers:
        for name in SCHEDULE_BUFFERS:
            table[name] = ((TIMESTEPS,), FLOAT)
    _put(table, _unet(UNET_PREFIX, layout.unet))
    if ema:
        unet_keys = [k for k in table if k.startswith(f"{UNET_PREFIX}.")]
        table[f"{EMA_PREFIX}.decay"] = ((), FLOAT)
        table[f"{EMA_PREFIX}.num_updates"] = ((), torch.int32)  # torch.tensor(0, dtype=torch.int)
        for k in unet_keys:  # every UNet parameter requires grad during training, so each has a shadow
            table[ema_key(k)] = table[k]
    for i, embedder in enumerate(layout.conditioner):  # SDXL: before first_stage_model
        if embedder.kind == "clip":
            _clip_text(f"{CONDITIONER_PREFIX}.{i}.transformer", embedder, table)
        else:
            _openclip_text(f"{CONDITIONER_PREFIX}.{i}.model", embedder, table)
    _put(table, _vae(VAE_PREFIX, layout.vae))
    if layout.text is None:
        return table
    if layout.text.kind == "clip":
        _clip_text(CLIP_PREFIX, layout.text, table)
    elif layout.text.kind == "openclip":
        _openclip_text(OPENCLIP_PREFIX, layout.text, table)
    else:
        raise ValueError(f"unknown text encoder kind {layout.text.kind!r}")
    return table


def original_state_dict(
    layout: Layout,
    *,
    ema: bool = False,
    schedule_buffers: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A state dict with the original keys, shapes and dtypes, filled with seeded random values.

    Every floating tensor owns its storage and is drawn from one torch.Generator in key order, so tensors are
    distinct from each other (EMA shadows differ from the live weights, q/k/v differ, ...) and the same seed
    always gives the same dict. Values are N(0, 0.02²), of the order of trained weights, to keep the
    activations of a model built from them modest (not checked for any particular forward pass).
    Exceptions that must hold meaningful values: position_ids (int64 arange),
    schedule buffers (the real schedule), model_ema.decay (0.9999) and model_ema.num_updates (int32).
    All floating tensors, buffers included, use `dtype` (fp16 releases cast the whole dict).
    """
    return dict(original_tensors(layout, ema=ema, schedule_buffers=schedule_buffers, dtype=dtype, seed=seed))


def original_tensors(
    layout: Layout, *, ema: bool, schedule_buffers: bool, dtype: torch.dtype, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """`original_state_dict`'s (key, tensor) pairs one at a time, in key order (see write_original_file)."""
    gen = torch.Generator().manual_seed(seed)
    sched = schedule_values() if schedule_buffers else {}
    for key, (shape, kind) in original_shapes(layout, ema=ema, schedule_buffers=schedule_buffers).items():
        if key in sched:
            yield key, sched[key].to(dtype)
        elif key.endswith("embeddings.position_ids"):
            yield key, torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
        elif key == f"{EMA_PREFIX}.decay":
            yield key, torch.tensor(0.9999, dtype=dtype)
        elif key == f"{EMA_PREFIX}.num_updates":
            yield key, torch.tensor(0, dtype=kind)
        else:
            assert kind.is_floating_point, key
            # Drawn in fp32 and cast: CPU normal_ on fp16/bf16 is ~7x slower, and the extra memory is one tensor.
            yield key, torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                      torch.int32: "I32"}  # fmt: skip


def write_original_file(
    path, layout: Layout, *, ema: bool = False, schedule_buffers: bool = True, dtype=torch.float32, seed: int = 0
) -> None:
    """`original_state_dict` written as a .safetensors file one tensor at a time: a full-size SDXL (7 GB in fp16)
    is made with the memory of its largest tensor. Same bytes as `save_file(original_state_dict(...))` would hold,
    in key order (the format lets tensors lie in any order)."""
    import json
    import struct

    shapes = original_shapes(layout, ema=ema, schedule_buffers=schedule_buffers)
    header, offset = {}, 0
    for key, (shape, kind) in shapes.items():
        kind = dtype if kind.is_floating_point else kind
        size = math.prod(shape) * kind.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, tensor in original_tensors(layout, ema=ema, schedule_buffers=schedule_buffers, dtype=dtype, seed=seed):
            assert SAFETENSORS_DTYPES[tensor.dtype] == header[key]["dtype"], key
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # its bytes, not a copy


# ------------------------------------------------------------------------------------------------ self-test


def count_params(table: ShapeTable, prefix: str, *, skip: tuple[str, ...] = ()) -> int:
    return sum(math.prod(shape) for k, (shape, _) in table.items() if k.startswith(prefix) and k not in skip)


if __name__ == "__main__":
    import time

    for name, layout, ema in (("SD1", SD1, False), ("SD1 +ema", SD1, True), ("SD2", SD2, False)):
        t = original_shapes(layout, ema=ema)
        print(f"{name}: {len(t)} keys")
        for prefix in (f"{UNET_PREFIX}.", f"{EMA_PREFIX}.", f"{VAE_PREFIX}.", "cond_stage_model."):
            print(f"  {prefix:24} {sum(k.startswith(prefix) for k in t):5} keys {count_params(t, prefix):>14,} numel")

    sd1, sd2 = original_shapes(SD1), original_shapes(SD2)
    pos_ids = f"{CLIP_PREFIX}.text_model.embeddings.position_ids"
    assert count_params(sd1, f"{UNET_PREFIX}.") == 859_520_964
    assert count_params(sd1, f"{VAE_PREFIX}.") == 83_653_863
    assert count_params(sd1, f"{CLIP_PREFIX}.", skip=(pos_ids,)) == 123_060_480
    assert count_params(sd2, f"{UNET_PREFIX}.") == 865_910_724
    assert count_params(sd2, f"{VAE_PREFIX}.") == 83_653_863
    assert count_params(sd2, f"{OPENCLIP_PREFIX}.") == 354_032_641
    # Keys: UNet 686 + VAE 248 + CLIP 197 (incl. position_ids) + 12 schedule buffers = 1143 for SD1; the
    # often-quoted 1131 is the same file without the schedule buffers. SD2: 686 + 248 + 294 + 12 = 1240.
    assert (len(sd1), len(sd2)) == (1143, 1240), (len(sd1), len(sd2))
    assert len(original_shapes(SD1, schedule_buffers=False)) == 1131
    assert len(original_shapes(SD1, ema=True)) == 1143 + 2 + 686  # + model_ema.decay/num_updates + shadows

    start = time.perf_counter()
    full = original_state_dict(SD1)
    elapsed = time.perf_counter() - start
    assert {k: (tuple(v.shape), v.dtype) for k, v in full.items()} == sd1
    print(f"built full-size SD1 fp32 state dict in {elapsed:.1f}s ({sum(v.numel() for v in full.values()):,} numel)")

    # SDXL base 1.0: 2515 keys = UNet 1680 + CLIP-L 197 + bigG 390 + VAE 248; 2.57 B UNet parameters
    xl = original_shapes(SDXL, schedule_buffers=False)
    print(f"SDXL: {len(xl)} keys, UNet {count_params(xl, f'{UNET_PREFIX}.'):,} numel")
    assert len(xl) == 2515, len(xl)
    assert sum(k.startswith(f"{UNET_PREFIX}.") for k in xl) == 1680
    assert count_params(xl, f"{UNET_PREFIX}.") == 2_567_463_684
    xl_pos_ids = f"{CONDITIONER_PREFIX}.0.transformer.text_model.embeddings.position_ids"
    assert count_params(xl, f"{CONDITIONER_PREFIX}.0.", skip=(xl_pos_ids,)) == 123_060_480  # as SD 1.x's CLIP
    print(f"SDXL refiner: {len(original_shapes(SDXL_REFINER, schedule_buffers=False))} keys")
    print("ok")
