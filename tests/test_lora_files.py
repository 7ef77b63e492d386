"""LoRA files users get: the kohya/A1111 file and diffusers' format load in diffusers and reproduce our peft model;
a merged export equals base + (alpha/r)·up@down; key names match the published convention at full SD sizes."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel

from dreambooth.errors import UserError
from dreambooth.families.sd.components import build_model
from dreambooth.families.sd.spec import bundled_config
from dreambooth.formats import lora
from dreambooth.formats.convert import ConvertOptions, convert
from dreambooth.tiny_model import write_tiny_diffusers
from tests.conftest import write_original

GOLDEN = Path(__file__).parent / "golden"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK, ALPHA, CONV_RANK, CONV_ALPHA, TEXT_ALPHA = 4, 6.0, 2, 3.0, 2.0  # alpha != rank: the scale is exercised


def wrap(unet: torch.nn.Module, text: torch.nn.Module, *, rank: int = RANK) -> None:
    """As the trainer does: peft LoRA on the attention projections, and the resnets' 3×3 convs at another rank."""
    convs = ["conv1", "conv2"]
    unet_config = LoraConfig(
        r=rank,
        lora_alpha=ALPHA,
        target_modules=UNET_TARGETS + convs,
        rank_pattern=dict.fromkeys(convs, CONV_RANK),
        alpha_pattern=dict.fromkeys(convs, CONV_ALPHA),
        init_lora_weights=False,  # B != 0, so the LoRA changes the outputs
    )
    unet.add_adapter(unet_config)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS,
                                       init_lora_weights=False), text)  # fmt: skip


def unet_output(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs["sample"], inputs["t"], encoder_hidden_states=inputs["context"]).sample


def text_output(text, inputs) -> torch.Tensor:
    with torch.no_grad():
        return text(inputs["ids"]).last_hidden_state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base folder, peft-wrapped UNet + text encoder with random non-zero LoRA, their saved checkpoint, and
    reference outputs of the wrapped models."""
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_diffusers(root / "base", seed=0)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    g = torch.Generator().manual_seed(2)
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "t": torch.tensor([500]),
        "context": torch.randn(1, 77, 32, generator=g),
        "ids": torch.randint(0, text.config.vocab_size, (1, 77), generator=g),
    }
    plain = {"unet": unet_output(unet, inputs), "text": text_output(text, inputs)}
    wrap(unet, text)
    info = {
        "family": "sd1", "model_type": "sd1", "prediction_type": "epsilon", "base": str(base), "base_sha256": None,
        "step": 10, "seed": 7, "resolution": 32, "trigger": "a photo of sks thing", "output_name": "sks",
        "rank": RANK, "alpha": ALPHA, "conv_rank": CONV_RANK, "conv_alpha": CONV_ALPHA,
        "targets": UNET_TARGETS, "text_encoder_targets": TEXT_TARGETS,
    }  # fmt: skip
    ckpt = root / "checkpoints" / "step-10"
    lora.save_adapter(ckpt, {"unet": unet, "text_encoder": text}, info)
    ours = {"unet": unet_output(unet, inputs), "text": text_output(text, inputs)}
    # the LoRA must matter, or every equality below would hold for a LoRA that loaded nothing
    assert rel_err(ours["unet"], plain["unet"]) > 0.05 and rel_err(ours["text"], plain["text"]) > 0.05
    return {"root": root, "base": base, "ckpt": ckpt, "unet": unet, "text": text, "inputs": inputs, "ours": ours}


def load_into_pipeline(base: Path, source: Path, caplog) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)  # diffusers' loggers do not propagate to the root
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.load_lora_weights(source)
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    unloaded = [r.getMessage() for r in caplog.records if "key" in r.getMessage().lower()]
    assert not unloaded, unloaded[0][:500]
    return pipe


def assert_same_lora_modules(pipe, trained) -> None:
    """Every module we trained got diffusers' LoRA layer (with our rank), and no other module did."""
    (adapter,) = pipe.get_active_adapters()  # diffusers names it default_0
    for ours, theirs in ((trained["unet"], pipe.unet), (trained["text"], pipe.text_encoder)):
        expected = {m: layer.r["default"] for m, layer in lora.lora_layers(ours).items()}
        assert {m: layer.r[adapter] for m, layer in lora.lora_layers(theirs, adapter).items()} == expected


def assert_loads_like_ours(trained, source, caplog, tolerance: float) -> None:
    """diffusers' load_lora_weights puts the LoRA on the same modules, and the models compute what ours do."""
    pipe = load_into_pipeline(trained["base"], source, caplog)
    assert_same_lora_modules(pipe, trained)
    assert rel_err(unet_output(pipe.unet, trained["inputs"]), trained["ours"]["unet"]) < tolerance
    assert rel_err(text_output(pipe.text_encoder, trained["inputs"]), trained["ours"]["text"]) < tolerance


def test_checkpoint_layout_and_strict_reload(trained):
    folder = trained["ckpt"] / lora.ADAPTER_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["lora.json", "text_encoder.safetensors", "unet.safetensors"]
    assert lora.is_lora_checkpoint(trained["ckpt"]) and not lora.is_lora_checkpoint(trained["base"])
    info, states = lora.read_adapter(trained["ckpt"])
    unet_info = info["components"]["unet"]
    conv = "down_blocks.0.resnets.0.conv1"
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert (unet_info["ranks"][conv], unet_info["alphas"][conv]) == (CONV_RANK, CONV_ALPHA)
    assert (unet_info["ranks"][attn], unet_info["alphas"][attn]) == (RANK, ALPHA)
    assert info["components"]["text_encoder"]["alphas"]["encoder.layers.0.self_attn.q_proj"] == TEXT_ALPHA
    assert unet_info["peft_config"]["rank_pattern"] == {"conv1": CONV_RANK, "conv2": CONV_RANK}
    assert states["unet"][f"{conv}.lora_A.weight"].shape == (CONV_RANK, 32, 3, 3)
    assert all(v.dtype == torch.float32 for v in states["unet"].values())

    # a fresh model wrapped the same way takes the weights back and computes the same
    unet = UNet2DConditionModel.from_pretrained(trained["base"] / "unet").eval()
    text = CLIPTextModel.from_pretrained(trained["base"] / "text_encoder").eval()
    wrap(unet, text)
    lora.load_adapter(trained["ckpt"], {"unet": unet, "text_encoder": text})
    assert torch.equal(unet_output(unet, trained["inputs"]), trained["ours"]["unet"])
    assert torch.equal(text_output(text, trained["inputs"]), trained["ours"]["text"])

    # another rank does not fit: refused, naming the first weight
    unet = UNet2DConditionModel.from_pretrained(trained["base"] / "unet")
    text = CLIPTextModel.from_pretrained(trained["base"] / "text_encoder")
    wrap(unet, text, rank=8)
    with pytest.raises(UserError, match=r"lora_A\.weight is \(4, 32\), this run's is \(8, 32\)"):
        lora.load_adapter(trained["ckpt"], {"unet": unet, "text_encoder": text})
    with pytest.raises(UserError, match="text_encoder"):
        lora.load_adapter(trained["ckpt"], {"unet": unet})


def test_kohya_file_loads_in_diffusers_and_matches(trained, caplog):
    dest = trained["root"] / "export" / "sks.safetensors"
    summary = lora.export_lora(trained["ckpt"], dest)
    assert summary["file"] == str(dest) and summary["tensors"] == len(load_file(dest))
    state = load_file(dest)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # the published name, with text_model
    assert state[f"{name}.alpha"].item() == TEXT_ALPHA and state[f"{name}.alpha"].ndim == 0
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert state[f"{conv}.lora_down.weight"].shape == (CONV_RANK, 32, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (32, CONV_RANK, 1, 1)
    assert all(v.dtype == torch.float16 for v in state.values())

    assert_loads_like_ours(trained, dest, caplog, tolerance=3e-3)  # fp16 file


def test_kohya_metadata_and_hashes(trained):
    dest = trained["root"] / "export" / "meta.safetensors"
    lora.export_lora(trained["ckpt"], dest)
    with safe_open(str(dest), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6.0")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("False", "sd_v1")
    assert meta["ss_output_name"] == "sks" and meta["ss_resolution"] == "(32, 32)"
    assert (meta["ss_steps"], meta["ss_seed"]) == ("10", "7")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == meta["dreambooth.trigger"] == "a photo of sks thing"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "32x32"
    # the addnet hash is over the file's bytes after the header; with one dtype and sorted keys modelspec's
    # per-tensor hash covers the same bytes
    data = dest.read_bytes()
    header = int.from_bytes(data[:8], "little")
    digest = hashlib.sha256(data[8 + header :]).hexdigest()
    assert meta["sshs_model_hash"] == digest
    assert meta["modelspec.hash_sha256"] == f"0x{digest}"
    assert len(meta["sshs_legacy_hash"]) == 8


def test_kohya_metadata_of_sd2_v():
    info = {"family": "sd2", "model_type": "sd2-v", "prediction_type": "v_prediction", "resolution": 768,
            "rank": 8, "alpha": 8, "step": 5, "seed": 1, "trigger": "", "output_name": "x"}  # fmt: skip
    meta = lora.kohya_metadata(info)
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2_v")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("v", "768x768")
    assert "ss_network_args" not in meta and "modelspec.trigger_phrase" not in meta
    assert all(isinstance(v, str) for v in meta.values())


def test_diffusers_format_loads_and_matches(trained, caplog):
    dest = trained["root"] / "export" / "sks-diffusers"
    summary = lora.export_lora(trained["ckpt"], dest, fmt="diffusers", half=False)
    assert (dest / lora.DIFFUSERS_WEIGHTS).is_file() and summary["file"] == str(dest / lora.DIFFUSERS_WEIGHTS)
    keys = load_file(dest / lora.DIFFUSERS_WEIGHTS).keys()
    # text-encoder keys as published diffusers LoRAs have them (transformers 4's layout; diffusers maps them)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert_loads_like_ours(trained, dest, caplog, tolerance=1e-5)


def test_merge_bakes_the_lora_into_the_base(trained):
    dest = trained["root"] / "export" / "merged.safetensors"
    summary = lora.export_lora(trained["ckpt"], dest, merge=True, half=False)
    assert summary["file"] == str(dest) and summary["model_type"] == "sd1"
    back = trained["root"] / "merged-back"
    convert(dest, back, ConvertOptions())
    merged = {name: load_file(next((back / name).glob("*.safetensors"))) for name in ("unet", "text_encoder")}
    base = {name: load_file(next((trained["base"] / name).glob("*.safetensors"))) for name in ("unet", "text_encoder")}
    for name, model in (("unet", trained["unet"]), ("text_encoder", trained["text"])):
        layers = lora.lora_layers(model)
        assert layers
        for module, layer in layers.items():
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            scale = layer.lora_alpha["default"] / layer.r["default"]  # the alpha and rank we configured
            delta = (up.flatten(1) @ down.flatten(1)).reshape(base[name][f"{module}.weight"].shape)
            expected = base[name][f"{module}.weight"] + scale * delta
            torch.testing.assert_close(merged[name][f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)
    unet = UNet2DConditionModel.from_pretrained(back / "unet").eval()
    text = CLIPTextModel.from_pretrained(back / "text_encoder").eval()
    assert rel_err(unet_output(unet, trained["inputs"]), trained["ours"]["unet"]) < 1e-5
    assert rel_err(text_output(text, trained["inputs"]), trained["ours"]["text"]) < 1e-5


def golden(name: str) -> list[str]:
    lines = (GOLDEN / name).read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("model_type", ["sd1", "sd2"])
def test_kohya_names_match_the_published_convention_at_full_size(model_type):
    with torch.device("meta"):  # real SD shapes, nothing allocated
        unet = build_model("unet", bundled_config(model_type, "unet"))
        text = build_model("text_encoder", bundled_config(model_type, "text_encoder"))
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS), unet)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS), text)
    models = {"unet": unet, "text_encoder": text}
    info = {"family": model_type, "components": lora.describe_adapters(models)}
    states = {name: get_peft_model_state_dict(m) for name, m in models.items()}
    keys = lora.to_kohya(info, states)
    modules = sorted({k.split(".")[0] for k in keys})
    expected = golden(f"lora-{model_type}-kohya.txt")
    assert modules == expected
    assert len(modules) == 128 + 4 * text.config.num_hidden_layers
    assert len(keys) == 3 * len(modules)


def test_bad_input(trained, tmp_path):
    ckpt = trained["ckpt"]
    with pytest.raises(UserError, match="--format 'comfy'"):
        lora.export_lora(ckpt, tmp_path / "x.safetensors", fmt="comfy")
    kohya_file = lora.export_lora(ckpt, tmp_path / "sks.safetensors")["file"]
    with pytest.raises(UserError, match="exported LoRA file, not a training checkpoint"):
        lora.export_lora(Path(kohya_file), tmp_path / "y.safetensors")
    with pytest.raises(UserError, match="not a LoRA training checkpoint"):
        lora.export_lora(trained["base"], tmp_path / "y.safetensors")
    with pytest.raises(UserError, match=r"--base .* is a LoRA file"):
        lora.export_lora(ckpt, tmp_path / "m.safetensors", merge=True, base=Path(kohya_file))
    # a base of another family
    sd2 = tmp_path / "sd2"
    convert(write_original(tmp_path / "tiny-sd2.safetensors", "sd2"), sd2, ConvertOptions(model_type="sd2"))
    with pytest.raises(UserError, match="is sd2, the LoRA was trained on sd1"):
        lora.export_lora(ckpt, tmp_path / "m.safetensors", merge=True, base=sd2)
    # a base of another size: the first module that does not fit is named
    info, states = lora.read_adapter(ckpt)
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    base_states = {"unet": {f"{module}.weight": torch.zeros(64, 64)}}
    with pytest.raises(UserError, match=f"unet {module} is \\(64, 64\\), the LoRA expects \\(32, 32\\)"):
        lora.merged_states(info, {"unet": states["unet"]}, base_states, "other")
    with pytest.raises(UserError, match="has no unet module"):
        lora.merged_states(info, {"unet": states["unet"]}, {"unet": {}}, "other")
    assert not (tmp_path / "m.safetensors").exists()
