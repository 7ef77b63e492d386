"""The Stable Diffusion lineage's LoRA files: kohya's/the WebUI's names and metadata, diffusers' adapter metadata,
and a LoRA merged into the base's weights.

The file the WebUI, ComfyUI and kohya's tools share names a module by a prefix and its module path with dots as
underscores (`lora_unet_down_blocks_0_…_to_q`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`) and stores
`.lora_down.weight` [r, in(, k, k)], `.lora_up.weight` [out, r(, 1, 1)] and `.alpha` (scale = alpha / r): the
same tensors as peft's A and B. SD 1.x/2.x UNets keep their diffusers module paths there (kohya's convention),
SDXL's take the original (SGM) ones.
"""

import datetime
import json
from collections import Counter
from pathlib import Path

import torch

from dreambooth import __version__
from dreambooth.checkpoint import lycoris
from dreambooth.checkpoint.keymap import TEXT_MODEL, kohya_module_name
from dreambooth.errors import UserError
from dreambooth.families.sd.export import MODELSPEC_ARCHITECTURE
from dreambooth.families.sd.layout import unet_original_key

ADAPTER_INFO = "lora.json"
# kohya's ss_base_model_version (sd-scripts model_util / sdxl_model_util); the WebUI tells SDXL by "sdxl_"
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd1-v": "sd_v1_v", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
# what a LoRA file's modelspec.implementation says its module names follow (kohya's sai_model_spec choice)
IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models"}
# the UNet config fields that decide its original (SGM) module names; lora.json keeps them for the export
UNET_LAYOUT = ("down_block_types", "up_block_types", "layers_per_block")


def _module_path(name: str) -> str:
    return name.removeprefix("base_model.model.")  # a PeftModel wrapper adds this level


# kohya's module-name prefix of each component (the WebUI's and ComfyUI's too)
PREFIXES = {
    # SD 1.x and 2.x share the names (the text encoder in the Hugging Face CLIP layout)
    "sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
    # kohya's sdxl_train_network: lora_te1 (CLIP ViT-L), lora_te2 (OpenCLIP ViT-bigG); the UNet in the SGM layout
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def kohya_prefixes(family: str) -> dict[str, str]:
    return PREFIXES[family]


def sgm_unet_module(module: str, layout: dict) -> str:
    """A diffusers UNet module path in the original layout (`down_blocks.1.attentions.0.…` →
    `input_blocks.4.1.…`): kohya's SDXL LoRAs name the UNet's modules so, as its SDXL UNet is the original one."""
    return unet_original_key(module + ".weight", layout).removesuffix(".weight")


def to_kohya(info: dict, states: dict[str, dict[str, torch.Tensor]], prefixes: dict[str, str] | None = None,
             norms: dict | None = None) -> dict:  # fmt: skip
    """peft keys → kohya/A1111 names: `.lora_down.weight`, `.lora_up.weight`, `.alpha` per module (LoHa's `hada_`,
    LoKr's `lokr_` and DoRA's `dora_scale` alike, dreambooth/checkpoint/lycoris.py). SD 1.x/2.x UNets keep their
    diffusers module paths (kohya's convention there), SDXL's take the original ones."""
    prefixes = prefixes or kohya_prefixes(info["family"])
    kind = lycoris.kind_of(info)
    sgm = info["family"] == "sdxl"
    if sgm and not info.get("unet_layout"):
        raise UserError(f"{ADAPTER_INFO} of this SDXL LoRA lacks unet_layout", "export a checkpoint this version wrote")
    out: dict[str, torch.Tensor] = {}
    norms = norms or {}
    for component, state in states.items():
        if component not in prefixes:
            raise ValueError(f"no kohya prefix for component {component!r} (have {sorted(prefixes)})")
        alphas, ranks = info["components"][component]["alphas"], info["components"][component]["ranks"]
        for key in lycoris.module_paths(state, kind):
            module = _module_path(key)
            published = sgm_unet_module(module, info["unet_layout"]) if sgm and component == "unet" else module
            name = kohya_module_name(prefixes[component], component, published)
            tensors = lycoris.file_tensors(kind, state, key, ranks[module], alphas[module], norms.get(component))
            out |= {name + suffix: tensor for suffix, tensor in tensors.items()}
    return out


def kohya_metadata(info: dict) -> dict[str, str]:
    """The safetensors metadata the WebUI, kohya's tools and modelspec readers look for."""
    model_type = info.get("model_type") or info["family"]
    v_pred = info.get("prediction_type") == "v_prediction"
    resolution = int(info.get("resolution") or 512)
    trigger = info.get("trigger") or ""
    network_args = {}
    if info.get("conv_rank"):
        network_args = {"conv_dim": str(info["conv_rank"]), "conv_alpha": str(info.get("conv_alpha") or 1)}
    network_args |= lycoris_network_args(info)
    version = BASE_MODEL_VERSION.get(model_type, BASE_MODEL_VERSION[info["family"]])
    if v_pred and not version.endswith("_v") and info["family"] != "sdxl":  # SDXL: modelspec.prediction_type says it
        version += "_v"
    architecture = MODELSPEC_ARCHITECTURE.get(model_type, MODELSPEC_ARCHITECTURE.get(info["family"]))
    steps = info.get("step", 0)
    meta = {
        "ss_network_module": network_module(info, "networks.lora"),
        "ss_network_dim": str(info["rank"]),
        "ss_network_alpha": str(float(info["alpha"])),
        "ss_network_train_unet_only": str(not info.get("text_encoder_targets")),
        "ss_base_model_version": version,
        "ss_v2": str(info["family"] == "sd2"),
        "ss_output_name": str(info.get("output_name") or "lora"),
        "ss_resolution": str((resolution, resolution)),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(info.get("max_train_steps", steps)),
        "ss_seed": str(info.get("seed")),
        "ss_sd_model_name": Path(str(info.get("base") or "")).name,
        # A1111/Civitai show a LoRA's training tags from here: {dataset: {tag: count}}
        "ss_tag_frequency": json.dumps({"instance": {trigger: 1}} if trigger else {}),
        "dreambooth.version": __version__,
        "dreambooth.family": info["family"],
        "dreambooth.model_type": model_type,
        "dreambooth.prediction_type": info.get("prediction_type") or "epsilon",
        "dreambooth.trigger": trigger,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        # kohya's choice: SD 1.x/2.x LoRAs name diffusers modules, SDXL's the original (SGM) ones
        "modelspec.implementation": IMPLEMENTATION.get(info["family"], "diffusers"),
        "modelspec.title": str(info.get("output_name") or "LoRA"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if info.get("base_sha256"):
        meta["ss_new_sd_model_hash"] = info["base_sha256"]
        meta["dreambooth.base_model_sha256"] = info["base_sha256"]
    return meta


def network_module(info: dict, lora: str) -> str:
    """kohya's ss_network_module: its LoRA module, or LyCORIS' (which trains LoHa and LoKr) for those."""
    return "lycoris.kohya" if lycoris.kind_of(info) in ("loha", "lokr") else lora


def lycoris_network_args(info: dict) -> dict[str, str]:
    """What LyCORIS' and kohya's network_args say of the adapter: its algo, LoKr's factor, DoRA (dora_wd)."""
    kind = lycoris.kind_of(info)
    if kind == "dora":
        return {"dora_wd": "True"}
    if kind == "loha":
        return {"algo": "loha"}
    if kind == "lokr":
        return {"algo": "lokr", "factor": str(info.get("lokr_factor") or -1)}
    return {}


def diffusers_adapter_metadata(component: dict, dora: bool = False) -> dict:
    """The LoraConfig arguments diffusers stores with its LoRA file: per-module ranks and alphas made explicit."""
    ranks, alphas = component["ranks"], component["alphas"]
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "use_dora": dora,
        "lora_bias": False,
    }


def merged_states(info: dict, states: dict, base_states: dict[str, dict[str, torch.Tensor]], source: str) -> dict:
    """Base weights with each module's adapter merged as peft merges it (fp32 arithmetic: LoRA's scale·up@down,
    DoRA's renormalised rows, LoHa's and LoKr's products); refuses a base whose modules do not fit."""
    kind = lycoris.kind_of(info)
    out = {name: dict(state) for name, state in base_states.items()}
    for component, state in states.items():
        target = out.get(component)
        if target is None:
            raise UserError(f"--base {source} has no {component}", "merge onto the model the LoRA was trained on")
        for module, scale in lycoris.module_scales(info, component, state).items():
            weight_key = _base_key(target, module)
            if weight_key is None:
                raise UserError(
                    f"--base {source} has no {component} module {module}: the LoRA was trained on another model",
                    "merge onto the model the LoRA was trained on (info: base)",
                )
            weight = target[weight_key]
            if kind in ("lora", "dora"):
                fits = (state[module + ".lora_B.weight"].shape[0], *state[module + ".lora_A.weight"].shape[1:])
                if tuple(weight.shape) != fits:
                    raise UserError(
                        f"--base {source}: {component} {module} is {tuple(weight.shape)}, the LoRA expects {fits}: "
                        "a model of another family or size",
                        "merge onto the model the LoRA was trained on (info: base)",
                    )
            try:
                new = lycoris.merged(kind, state, module, scale, weight)
            except RuntimeError as exc:  # the product does not reshape to this weight
                raise UserError(
                    f"--base {source}: {component} {module} is {tuple(weight.shape)}, which the LoRA does not fit: "
                    "a model of another family or size",
                    "merge onto the model the LoRA was trained on (info: base)",
                ) from exc
            target[weight_key] = new.to(weight.dtype)
    return out


def _base_key(state: dict, module: str) -> str | None:
    for candidate in (module, module.removeprefix(TEXT_MODEL), TEXT_MODEL + module):
        if f"{candidate}.weight" in state:
            return f"{candidate}.weight"
    return None
