"""LoHa, LoKr and DoRA files users get: the kohya/LyCORIS file applied to the base weights by ComfyUI's arithmetic
(written out below from comfy/weight_adapter/{lora,loha,lokr,base}.py) gives peft's own merged weights; the merged
export gives them too; DoRA's diffusers folder reloads in diffusers; diffusers' format of LoHa/LoKr is refused."""

import copy
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import CLIPTextModel

from dreambooth.checkpoint.keymap import kohya_module_name
from dreambooth.errors import UserError
from dreambooth.formats import lora
from dreambooth.formats.convert import ConvertOptions, convert
from dreambooth.tiny_model import write_tiny_diffusers

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONVS = ["conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 2, 3.0, 4, 6.0  # alpha != rank: the scale is exercised
KINDS = ("loha", "lokr", "dora")


def peft_config(kind: str, targets: list[str], convs: list[str]):
    """Non-zero adapters (as after training), convolutions at their own rank and alpha."""
    patterns = {"rank_pattern": dict.fromkeys(convs, CONV_RANK), "alpha_pattern": dict.fromkeys(convs, CONV_ALPHA)}
    if kind == "loha":
        return LoHaConfig(r=RANK, alpha=ALPHA, target_modules=targets + convs, init_weights=False, **patterns)
    if kind == "lokr":
        return LoKrConfig(r=RANK, alpha=ALPHA, target_modules=targets + convs, init_weights=False, **patterns)
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets + convs, use_dora=True,
                      init_lora_weights=False, **patterns)  # fmt: skip


def wrap(kind: str, unet, text) -> None:
    inject_adapter_in_model(peft_config(kind, UNET_TARGETS, CONVS), unet)
    inject_adapter_in_model(peft_config(kind, TEXT_TARGETS, []), text)
    if kind == "dora":  # peft starts m at ‖W‖: move it, so that the magnitude is exercised too
        g = torch.Generator().manual_seed(3)
        for model in (unet, text):
            for layer in lora.lora_layers(model).values():
                m = layer.lora_magnitude_vector["default"].weight
                m.data *= 1 + 0.2 * torch.rand(m.shape, generator=g)


def merged_by_peft(model) -> dict[str, torch.Tensor]:
    """peft's own merge (merge_and_unload's arithmetic) of every adapter layer: module path → merged weight."""
    model = copy.deepcopy(model)
    out = {}
    for path, layer in lora.lora_layers(model).items():
        layer.merge()
        out[path] = layer.get_base_layer().weight.detach().clone()
    return out


# ───────────── ComfyUI's arithmetic, as comfy/weight_adapter/*.py `calculate_weight` applies a file ─────────────


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """base.py weight_decompose at strength 1: dora_scale [out, 1…] is "on the output axis", normalised by the
    base weight's rows (ComfyUI's current code); [1, in…] by the columns of W + ΔW."""
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)
    return weight_calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def comfy_apply(f: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> torch.Tensor:
    """One module of the file applied to its base weight (fp32), by the type its keys say."""
    t = {k[len(name) + 1 :]: v.float() for k, v in f.items() if k.startswith(name + ".")}
    weight = weight.float()
    alpha_value = t["alpha"].item() if "alpha" in t else None
    dora_scale = t.get("dora_scale")
    if "lora_up.weight" in t:  # lora.py
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
        alpha = alpha_value / down.shape[0] if alpha_value is not None else 1.0
    elif "hada_w1_a" in t:  # loha.py
        w1 = torch.mm(t["hada_w1_a"], t["hada_w1_b"])
        diff = (w1 * torch.mm(t["hada_w2_a"], t["hada_w2_b"])).reshape(weight.shape)
        alpha = alpha_value / t["hada_w1_b"].shape[0] if alpha_value is not None else 1.0
    else:  # lokr.py
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_value / dim if alpha_value is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if dora_scale is not None:
        return comfy_weight_decompose(dora_scale, weight, diff, alpha)
    return weight + alpha * diff


# ─────────────────────────────────────────────── fixtures ───────────────────────────────────────────────


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_diffusers(tmp_path_factory.mktemp("lycoris") / "base", seed=0)


@pytest.fixture(scope="module", params=KINDS)
def trained(request, base, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    wrap(kind, unet, text)
    info = {
        "family": "sd1", "model_type": "sd1", "prediction_type": "epsilon", "base": str(base), "base_sha256": None,
        "step": 10, "seed": 7, "resolution": 32, "trigger": "a photo of sks thing", "output_name": "sks",
        "adapter": "lora" if kind == "dora" else kind, "dora": kind == "dora", "lokr_factor": -1 if kind == "lokr"
        else None, "rank": RANK, "alpha": ALPHA, "conv_rank": CONV_RANK, "conv_alpha": CONV_ALPHA,
        "targets": UNET_TARGETS, "text_encoder_targets": TEXT_TARGETS,
    }  # fmt: skip
    ckpt = root / "checkpoints" / "step-10"
    lora.save_adapter(ckpt, {"unet": unet, "text_encoder": text}, info)
    return {"kind": kind, "root": root, "base": base, "ckpt": ckpt, "unet": unet, "text": text}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ─────────────────────────────────────────────── tests ───────────────────────────────────────────────


def test_kohya_file_applied_as_comfyui_does_equals_peft_merged(trained):
    """Every module of the exported file, applied to the base weight with ComfyUI's formulas, is peft's merged
    weight (fp32: relative error ~1e-7), and the adapter changed that weight (so the comparison means something)."""
    dest = trained["root"] / "sks.safetensors"
    lora.export_lora(trained["ckpt"], dest, half=False)
    f = load_file(dest)
    suffixes = {k.split(".", 1)[1] for k in f}
    expected = {
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    }.get(trained["kind"])
    if expected:
        assert suffixes == expected
    else:  # LoKr: the small linears decompose w2 (alpha / r applies), the rank-4 convs keep it whole (scale 1)
        assert {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"} == suffixes
    worst, modules = 0.0, 0
    for component, model, prefix in (("unet", trained["unet"], "lora_unet"), ("text_encoder", trained["text"],
                                                                            "lora_te")):  # fmt: skip
        base = {k: v for k, v in load_file(next((trained["base"] / component).glob("*.safetensors"))).items()}
        for module, weight in merged_by_peft(model).items():
            name = kohya_module_name(prefix, component, module)
            original = base[f"{module.removeprefix('text_model.')}.weight" if component == "text_encoder" and
                            f"{module}.weight" not in base else f"{module}.weight"]  # fmt: skip
            ours = comfy_apply(f, name, original)
            assert rel_err(weight, original) > 1e-3, f"{module}: the adapter did not change the weight"
            worst, modules = max(worst, rel_err(ours, weight)), modules + 1
    assert modules == len(lora.lora_layers(trained["unet"])) + len(lora.lora_layers(trained["text"]))
    print(f"{trained['kind']}: {modules} modules, worst relative error {worst:.1e}")
    assert worst < 1e-5


def test_merged_export_equals_peft_merged(trained):
    dest = trained["root"] / "merged.safetensors"
    lora.export_lora(trained["ckpt"], dest, merge=True, half=False)
    back = trained["root"] / "merged-back"
    convert(dest, back, ConvertOptions())
    for component, model in (("unet", trained["unet"]), ("text_encoder", trained["text"])):
        merged = load_file(next((back / component).glob("*.safetensors")))
        for module, weight in merged_by_peft(model).items():
            key = f"{module}.weight" if f"{module}.weight" in merged else f"{module.removeprefix('text_model.')}.weight"
            assert rel_err(merged[key], weight) < 1e-5, module


def test_diffusers_format(trained, caplog):
    """DoRA: diffusers' load_lora_weights takes the folder back (magnitudes included) and computes what peft's
    model does; LoHa and LoKr: diffusers has no loader for them, and the export says so in one line."""
    dest = trained["root"] / "sks-diffusers"
    if trained["kind"] != "dora":
        with pytest.raises(UserError, match=f"diffusers loads no {trained['kind'].upper()} files"):
            lora.export_lora(trained["ckpt"], dest, fmt="diffusers")
        assert not dest.exists()
        return
    lora.export_lora(trained["ckpt"], dest, fmt="diffusers", half=False)
    pipe = StableDiffusionPipeline.from_pretrained(trained["base"], safety_checker=None, requires_safety_checker=False)
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            pipe.load_lora_weights(dest)
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "key" in r.getMessage().lower()]
    g = torch.Generator().manual_seed(2)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    with torch.no_grad():
        theirs = pipe.unet(sample, 500, encoder_hidden_states=context).sample
        ours = trained["unet"](sample, 500, encoder_hidden_states=context).sample
        theirs_text = pipe.text_encoder(ids).last_hidden_state
        ours_text = trained["text"](ids).last_hidden_state
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(any(m.use_dora.values()) for m in layers)
    assert rel_err(theirs, ours) < 1e-5 and rel_err(theirs_text, ours_text) < 1e-5


def test_the_checkpoint_reloads_strictly(trained):
    """Resuming and sampling read the checkpoint back into freshly wrapped models: the same weights, every one."""
    unet = UNet2DConditionModel.from_pretrained(trained["base"] / "unet").eval()
    text = CLIPTextModel.from_pretrained(trained["base"] / "text_encoder").eval()
    torch.manual_seed(5)
    wrap(trained["kind"], unet, text)
    lora.load_adapter(trained["ckpt"], {"unet": unet, "text_encoder": text})
    for ours, theirs in ((trained["unet"], unet), (trained["text"], text)):
        expected = {k: v for k, v in ours.state_dict().items()}
        assert all(torch.equal(v, expected[k]) for k, v in theirs.state_dict().items())
