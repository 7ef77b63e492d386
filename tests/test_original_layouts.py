"""Checks of the hand-derived original-checkpoint layouts in tests/original_layouts.py.

Full-size layouts are checked through `original_shapes` only (no allocation); values are built for tiny layouts.
The reference numbers are the published parameter counts of the released models, so a wrong shape anywhere
in a sub-model shows up as a count mismatch.
"""

import math

import pytest
import torch

from tests.original_layouts import (
    CLIP_PREFIX,
    EMA_PREFIX,
    OPENCLIP_PREFIX,
    SCHEDULE_BUFFERS,
    SD1,
    SD2,
    TINY_SD1,
    TINY_SD2,
    UNET_PREFIX,
    VAE_PREFIX,
    ema_key,
    original_shapes,
    original_state_dict,
)

U = f"{UNET_PREFIX}."
POSITION_IDS = f"{CLIP_PREFIX}.text_model.embeddings.position_ids"


def numel(table, prefix: str) -> int:
    return sum(math.prod(shape) for k, (shape, _) in table.items() if k.startswith(prefix) and k != POSITION_IDS)


def count(table, prefix: str) -> int:
    return sum(k.startswith(prefix) for k in table)


# ------------------------------------------------------------------------------------------ full-size counts


def test_sd1_parameter_counts():
    t = original_shapes(SD1)
    assert numel(t, U) == 859_520_964
    assert numel(t, f"{VAE_PREFIX}.") == 83_653_863
    assert numel(t, f"{CLIP_PREFIX}.") == 123_060_480  # CLIP ViT-L/14 text model, position_ids excluded


def test_sd2_parameter_counts():
    t = original_shapes(SD2)
    assert numel(t, U) == 865_910_724
    assert numel(t, f"{VAE_PREFIX}.") == 83_653_863
    # OpenCLIP ViT-H-14 text tower, 24 resblocks, text_projection and logit_scale included.
    assert numel(t, f"{OPENCLIP_PREFIX}.") == 354_032_641


@pytest.mark.parametrize(
    ("layout", "ema", "schedule", "keys"),
    [
        # 686 UNet + 248 VAE + 197 CLIP (with position_ids) + 12 schedule buffers
        (SD1, False, True, 1143),
        (SD1, False, False, 1131),
        (SD1, True, True, 1143 + 2 + 686),  # LitEma: decay, num_updates, one shadow per UNet parameter
        (SD2, False, True, 1240),  # 294 OpenCLIP keys instead of 197
        (TINY_SD1, False, True, 381),
        (TINY_SD2, False, True, 386),
    ],
)
def test_key_counts(layout, ema, schedule, keys):
    assert len(original_shapes(layout, ema=ema, schedule_buffers=schedule)) == keys


def test_sub_model_key_counts():
    t1, t2 = original_shapes(SD1), original_shapes(SD2)
    assert (count(t1, U), count(t1, f"{VAE_PREFIX}."), count(t1, "cond_stage_model.")) == (686, 248, 197)
    assert (count(t2, U), count(t2, f"{VAE_PREFIX}."), count(t2, "cond_stage_model.")) == (686, 248, 294)


# ------------------------------------------------------------------------------------------------ spot checks

F32 = torch.float32

SD1_SPOTS = {
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.time_embed.2.bias": (1280,),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),  # 1x1 conv in SD1
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),  # GEGLU
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),  # Downsample
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.bias": (1280,),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # no attention at level 3
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),  # after the transformer
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.out.0.weight": (320,),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),  # up.N is level N: deepest
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),  # num_res_blocks + 1 blocks
    "first_stage_model.decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.decoder.norm_out.weight": (128,),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.bias": (768,),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    "betas": (1000,),
    "posterior_mean_coef2": (1000,),
}

SD2_SPOTS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),  # Linear in SD2
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias": (3072,),
    "cond_stage_model.model.transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
    "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
    "cond_stage_model.model.transformer.resblocks.23.ln_2.bias": (1024,),
    "cond_stage_model.model.ln_final.weight": (1024,),
    "cond_stage_model.model.text_projection": (1024, 1024),
    "cond_stage_model.model.logit_scale": (),
}

ABSENT = [  # keys a plausible-but-wrong derivation would produce
    "model.diffusion_model.input_blocks.1.0.skip_connection.weight",  # channels unchanged -> Identity
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias",  # q/k/v have no bias
    "model.diffusion_model.output_blocks.11.2.conv.weight",  # no upsampler at the top level
    "model.diffusion_model.input_blocks.12.0.op.weight",  # no downsampler at the bottom level
    "first_stage_model.decoder.up.0.upsample.conv.weight",
    "first_stage_model.encoder.down.3.downsample.conv.weight",
    "first_stage_model.encoder.down.0.attn.0.q.weight",  # attn_resolutions: []
    "first_stage_model.encoder.down.0.block.0.temb_proj.weight",  # temb_ch = 0
    "lvlb_weights",  # persistent=False
    "scale_factor",  # a plain float unless scale_by_std
]


def test_sd1_spot_checks():
    t = original_shapes(SD1)
    for key, shape in SD1_SPOTS.items():
        assert t[key] == (shape, F32), key
    assert t[POSITION_IDS] == ((1, 77), torch.int64)
    for key in ABSENT:
        assert key not in t, key
    assert not any(k.startswith(EMA_PREFIX) for k in t)


def test_sd2_spot_checks():
    t = original_shapes(SD2)
    for key, shape in SD2_SPOTS.items():
        assert t[key] == (shape, F32), key
    assert "cond_stage_model.model.transformer.resblocks.24.ln_1.weight" not in t
    assert not any(".visual." in k or k.endswith("attn_mask") for k in t)  # visual deleted, mask non-persistent
    assert not any(k.startswith(f"{CLIP_PREFIX}.") for k in t)


def test_ema_layout():
    t = original_shapes(SD1, ema=True)
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert t["model_ema.diffusion_modelinput_blocks00weight"] == ((320, 4, 3, 3), F32)
    assert t["model_ema.decay"] == ((), F32)
    assert t["model_ema.num_updates"] == ((), torch.int32)
    unet_keys = [k for k in t if k.startswith(U)]
    assert [k for k in t if k.startswith("model_ema.diffusion_model")] == [ema_key(k) for k in unet_keys]
    assert all(t[ema_key(k)] == t[k] for k in unet_keys)


# --------------------------------------------------------------------------------------------- tiny values


@pytest.mark.parametrize("layout", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_matches_shapes(layout, dtype):
    sd = original_state_dict(layout, ema=True, dtype=dtype)
    table = original_shapes(layout, ema=True)
    assert list(sd) == list(table)
    for key, (shape, kind) in table.items():
        want = dtype if kind.is_floating_point else kind
        assert (tuple(sd[key].shape), sd[key].dtype) == (shape, want), key


def test_tensors_own_distinct_storage():
    sd = original_state_dict(TINY_SD2, ema=True)
    ptrs = [v.untyped_storage().data_ptr() for v in sd.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())
    # EMA shadows differ from the live weights, so a converter that picks the wrong set is caught.
    w = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(sd[w], sd[ema_key(w)])
    assert not torch.equal(sd[w], sd[w.replace("to_q", "to_k")])


def test_seeded_and_deterministic():
    a, b = original_state_dict(TINY_SD1), original_state_dict(TINY_SD1)
    c = original_state_dict(TINY_SD1, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = "model.diffusion_model.out.2.weight"
    assert not torch.equal(a[w], c[w])


def test_special_values():
    sd = original_state_dict(TINY_SD1, ema=True)
    assert torch.equal(sd[POSITION_IDS], torch.arange(77).unsqueeze(0))
    assert sd["model_ema.decay"].item() == pytest.approx(0.9999)
    assert sd["model_ema.num_updates"].dtype == torch.int32
    assert sd["betas"][0].item() == pytest.approx(0.00085)
    assert sd["betas"][-1].item() == pytest.approx(0.012)
    assert sd["alphas_cumprod_prev"][0].item() == 1.0
    assert torch.allclose(sd["alphas_cumprod"], torch.cumprod(1 - sd["betas"].double(), 0).float())
    assert all(sd[k].dtype == torch.float32 and sd[k].shape == (1000,) for k in SCHEDULE_BUFFERS)
    assert original_state_dict(TINY_SD2)["cond_stage_model.model.logit_scale"].dim() == 0
    assert not any(k in original_state_dict(TINY_SD1, schedule_buffers=False) for k in SCHEDULE_BUFFERS)


def test_clip_keys_load_into_hf_clip_text_model():
    """The SD1 text keys are CLIPTextModel's own (modulo the 2022 `text_model.` nesting and position_ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = TINY_SD1.text
    config = CLIPTextConfig(
        hidden_size=t.width,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        intermediate_size=t.intermediate,
        vocab_size=t.vocab,
        max_position_embeddings=t.positions,
    )
    model = CLIPTextModel(config)
    sd = original_state_dict(TINY_SD1)
    ours = {k.removeprefix(f"{CLIP_PREFIX}."): v for k, v in sd.items() if k.startswith(f"{CLIP_PREFIX}.")}
    theirs = model.state_dict()
    if not any(k.startswith("text_model.") for k in theirs):  # transformers 5 dropped the nesting
        ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
    ours = {k: v for k, v in ours.items() if k in theirs or not k.endswith("position_ids")}
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)
