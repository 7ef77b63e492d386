"""Converting without torch (issue 17, item 4): safetensors byte ranges, our writer, our reading of the key tables
backwards, and the bundled shape tables — each checked against the library it stands in for."""

import json

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig

from dreambooth.checkpoint import tensorfile
from dreambooth.checkpoint.load import open_checkpoint
from dreambooth.families.sd import components as comp
from dreambooth.families.sd import shapes
from dreambooth.families.sd.convert import component_config_file
from dreambooth.families.sd.spec import FAMILIES, bundled_config, infer_text_config, infer_unet_config, infer_vae_config
from tests.original_layouts import (
    SD1,
    SD2,
    SDXL,
    SDXL_REFINER,
    TINY_SD1,
    TINY_SD2,
    TINY_SDXL,
    TINY_SDXL_REFINER,
    original_shapes,
    original_state_dict,
)


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 4, generator=g).half(),
        "a": torch.randn(2, 2, generator=g),
        "c": torch.randn(6, 2, generator=g).bfloat16(),
        "ids": torch.arange(5).unsqueeze(0),
        "mask": torch.tensor([True, False]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, dtype=torch.float16),
        "scalar": torch.tensor(1.5),
        "ü-name": torch.ones(2, dtype=torch.int32),
    }


def test_the_writer_lays_files_out_as_safetensors_does(tmp_path):
    """The same bytes as `save_file`, from torch tensors and from the byte ranges of a file (header, order,
    padding): a converted model is the same file whichever path wrote it."""
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    tensorfile.write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == theirs
    stored = open_checkpoint(tmp_path / "theirs.safetensors").tensors
    assert all(isinstance(t, tensorfile.StoredTensor) for t in stored.values())
    tensorfile.write_safetensors(tmp_path / "copied.safetensors", stored, {"format": "pt"})
    assert (tmp_path / "copied.safetensors").read_bytes() == theirs


def test_stored_tensor_views_are_torchs(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "t.safetensors")
    stored = open_checkpoint(tmp_path / "t.safetensors").tensors
    for name, tensor in tensors.items():
        assert torch.equal(stored[name].to_torch(), tensor), name
        assert (stored[name].shape, stored[name].numel()) == (tuple(tensor.shape), tensor.numel())
        assert stored[name].element_size() == tensor.element_size()
        assert stored[name].is_floating_point() == tensor.is_floating_point()
    views = {
        "rows": (stored["c"][2:5], tensors["c"][2:5]),
        "transpose": (stored["b.weight"].T, tensors["b.weight"].T),
        "transpose twice": (stored["c"].T.T, tensors["c"]),
        "reshape": (stored["a"].reshape(4, 1, 1), tensors["a"].reshape(4, 1, 1)),
    }
    tensorfile.write_safetensors(tmp_path / "views.safetensors", {k: v for k, (v, _) in views.items()})
    written = load_file(tmp_path / "views.safetensors")
    for name, (view, expected) in views.items():
        assert torch.equal(view.to_torch(), expected), name
        assert torch.equal(written[name], expected), name
    with pytest.raises(ValueError):
        stored["a"].reshape(3)
    with pytest.raises(ValueError):
        stored["b.weight"].T[1:2]  # rows of a transposed view are not a byte range


def test_the_writer_falls_back_to_read_and_write(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files (another file system, an old kernel), the bytes still come."""
    save_file(mixed_tensors(), tmp_path / "t.safetensors")

    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tensorfile.os, "copy_file_range", refuse)
    tensorfile.write_safetensors(tmp_path / "copy.safetensors", open_checkpoint(tmp_path / "t.safetensors").tensors)
    assert (tmp_path / "copy.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()


# ────────── our key tables read backwards vs diffusers' single_file_utils, which convert used before ──────────

TINY = {"sd1": TINY_SD1, "sd2": TINY_SD2, "sdxl": TINY_SDXL, "sdxl-refiner": TINY_SDXL_REFINER}


def diffusers_components(tensors: dict, configs: dict, family: str, *, ema: bool) -> dict[str, dict]:
    """What diffusers' own single-file conversion makes of the same tensors."""
    out = {
        "unet": sfu.convert_ldm_unet_checkpoint(tensors, configs["unet"], extract_ema=ema),
        "vae": sfu.convert_ldm_vae_checkpoint(tensors, configs["vae"]),
    }
    for name, encoder in FAMILIES[family].text_encoders.items():
        if encoder.kind == "clip":
            state = sfu.convert_ldm_clip_checkpoint(tensors, remove_prefix=encoder.prefix)
        else:
            stand_in = type("M", (), {"config": type("C", (), {"hidden_size": configs[name]["hidden_size"]})})
            state = sfu.convert_open_clip_checkpoint(stand_in, tensors, prefix=encoder.prefix)
        expected = comp.expected_shapes(name, configs[name])
        if not any(k.startswith("text_model.") for k in expected):  # transformers 5 names keys without it
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        out[name] = {k: v for k, v in state.items() if k in expected}
    return out


def ours(tensors: dict, configs: dict, family: str, *, ema: bool) -> dict[str, dict]:
    out = {
        "unet": comp.unet_from_original(tensors, configs["unet"], ema=ema, source="f").state,
        "vae": comp.vae_from_original(tensors, configs["vae"], source="f").state,
    }
    for name in FAMILIES[family].text_encoders:
        out[name] = comp.text_from_original(tensors, configs[name], family, source="f", name=name).state
    return out


def inferred_configs(tensors: dict, model_type: str) -> dict[str, dict]:
    family = model_type.removesuffix("-v")
    configs = {"unet": infer_unet_config(tensors, model_type), "vae": infer_vae_config(tensors, model_type)}
    return configs | {name: infer_text_config(tensors, model_type, name) for name in FAMILIES[family].text_encoders}


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("ema", [False, True], ids=["weights", "ema"])
def test_our_key_map_gives_diffusers_tensors_bit_for_bit(family, ema):
    tensors = original_state_dict(TINY[family], ema=ema, seed=3)
    configs = inferred_configs(tensors, family)
    theirs, mine = diffusers_components(tensors, configs, family, ema=ema), ours(tensors, configs, family, ema=ema)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].keys() == theirs[name].keys(), name
        for key, tensor in mine[name].items():
            assert torch.equal(tensor, theirs[name][key]), (name, key)


FULL = {"sd1": SD1, "sd2": SD2, "sd2-v": SD2, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER}


def meta_tensors(layout) -> dict[str, torch.Tensor]:
    """A full-size file's tensors on the meta device: its keys and shapes, no memory."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in original_shapes(layout).items()}


@pytest.mark.parametrize("model_type", list(FULL))
def test_full_size_files_find_a_bundled_shape_table_and_map_as_diffusers_does(model_type):
    """The configs read off a released file's shapes each find a bundled table (so converting it builds no
    model), and our key map gives diffusers' keys and shapes on every full-size layout."""
    tensors = meta_tensors(FULL[model_type])
    configs = inferred_configs(tensors, model_type)
    for name, config in configs.items():
        assert shapes.bundled_shapes(name, config) is not None, f"{model_type} {name}: no bundled table fits"
    family = model_type.removesuffix("-v")
    theirs, mine = diffusers_components(tensors, configs, family, ema=False), ours(tensors, configs, family, ema=False)
    for name in mine:
        assert {k: tuple(v.shape) for k, v in mine[name].items()} == {
            k: tuple(v.shape) for k, v in theirs[name].items()
        }


@pytest.mark.parametrize("model_type", shapes.TABLES)
def test_bundled_shape_tables_are_the_models(model_type):
    """Made by the installed diffusers and transformers (else they would be ignored: a lock bump must rewrite
    them, `python -m dreambooth.families.sd.shapes`), and equal to the meta-built models' state dicts."""
    table = json.loads((shapes.resources.files("dreambooth") / "assets" / "shapes" / f"{model_type}.json").read_text())
    assert table["made_with"] == shapes.installed_versions(), "rewrite with `python -m dreambooth.families.sd.shapes`"
    assert table == shapes.make_table(model_type)


def test_a_config_no_table_fits_builds_the_model():
    config = bundled_config("sd1", "unet") | {"cross_attention_dim": 640}
    assert shapes.bundled_shapes("unet", config) is None
    assert shapes.expected_shapes("unet", config) == shapes.model_shapes("unet", config)
    assert shapes.expected_shapes("unet", config)[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    ] == (
        320,
        640,
    )


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_text_encoder_config_files_load_as_transformers_config(tmp_path, name):
    """The text encoders' config.json is written without transformers: loading it gives the same config."""
    config = bundled_config("sdxl", name)
    (tmp_path / "config.json").write_text(json.dumps(component_config_file(name, config)))
    assert CLIPTextConfig.from_pretrained(tmp_path).to_dict() == CLIPTextConfig(**config).to_dict()
