"""Decide what a checkpoint is — family, EMA, prediction type — and keep the evidence for the user to see.

v-prediction cannot be read from key names or shapes (SD 2.x 512 and 768-v are the same network). The old
script guessed it from `global_step`; we ask, in order: the --model-type flag, an --original-config yaml,
the file's own metadata (or, for SDXL, the empty `v_pred` tensor that ComfyUI and the WebUI read), a sidecar yaml
next to it (A1111's convention). If none of them says, SD 1.x and SDXL are epsilon (as the WebUI and diffusers
assume: a v-prediction fine-tune needs `--model-type sd1-v` / `sdxl-v`, metadata or a yaml), and only SD 2.x,
whose 512-px epsilon and 768-px v models share every shape, gets a one-step numerical probe of the UNet (what
A1111 does). An inconclusive probe is said so, with the flag to pass. The rule that decided is kept in
`Detection.prediction_rule` and shown by `dreambooth inspect`.

SDXL is told by its conditioner: base 1.0 has CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.0/1`), the
refiner bigG alone (as `embedders.0`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreambooth.checkpoint.load import Checkpoint
from dreambooth.errors import UserError
from dreambooth.families.sd.layout import (
    CLIP_PREFIX,
    EMA_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    SDXL_REFINER_OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

MODEL_TYPE_HINT = "pass --model-type sd2 (512 px, epsilon) or sd2-v (768 px, v-prediction)"
# what decided the prediction type, as `inspect` reports it
RULES = ("flag", "original-config", "metadata", "sidecar", "sd1-default", "sdxl-default", "probe")
# ComfyUI's and the WebUI's marks on an SDXL file, empty tensors under these keys (our export writes them): trained
# for v-prediction, and on the zero-terminal-SNR schedule (sampled with the rescaled betas)
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


@dataclass
class Detection:
    family: str  # sd1 | sd2 | sdxl | sdxl-refiner | lora | unknown
    has_ema: bool
    evidence: list[str] = field(default_factory=list)
    prediction_type: str | None = None  # epsilon | v_prediction | None while undecided
    prediction_rule: str | None = None  # which of RULES decided it


def detect_family(ckpt: Checkpoint) -> Detection:
    keys = list(ckpt.tensors)
    has_ema = sum(k.startswith(EMA_PREFIX) for k in keys) > 100
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return _detect_sdxl(keys, has_ema)
    if any("lora_" in k or ".lora_down." in k or ".lora_A." in k for k in keys):
        return Detection("lora", False, ["has LoRA keys (`lora_*`)"])
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        standalone_vae = any(k.startswith(("encoder.down.", VAE_PREFIX + "encoder.")) for k in keys)
        why = "only VAE weights" if standalone_vae else f"no `{UNET_PREFIX}*` keys"
        return Detection("unknown", has_ema, [why])
    to_k = next((v for k, v in ckpt.tensors.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")),
                None)  # fmt: skip
    if to_k is None:  # e.g. a diffusion model ComfyUI saved under model.diffusion_model. that is no SD UNet
        return Detection("unknown", has_ema, [f"`{UNET_PREFIX}*` keys, but no Stable Diffusion UNet among them"])
    if any(k.startswith(OPENCLIP_PREFIX + "transformer.resblocks.") for k in keys):
        return Detection("sd2", has_ema, [f"OpenCLIP text encoder; UNet cross-attention width {to_k.shape[1]}"])
    if any(k.startswith(CLIP_PREFIX) for k in keys):
        return Detection("sd1", has_ema, [f"CLIP text encoder; UNet cross-attention width {to_k.shape[1]}"])
    return Detection("unknown", has_ema, ["a UNet but no text encoder (`cond_stage_model.*`)"])


def _detect_sdxl(keys: list[str], has_ema: bool) -> Detection:
    """SDXL base 1.0 holds CLIP ViT-L as embedders.0 and OpenCLIP bigG as embedders.1; the refiner bigG alone as 0."""
    has = {p: any(k.startswith(p) for k in keys) for p in (SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX)}
    refiner = any(k.startswith(SDXL_REFINER_OPENCLIP_PREFIX) for k in keys)
    unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if refiner and not has[SDXL_CLIP_PREFIX] and not has[SDXL_OPENCLIP_PREFIX]:
        evidence = f"`{SDXL_REFINER_OPENCLIP_PREFIX}*` only: OpenCLIP ViT-bigG without CLIP ViT-L (the SDXL refiner)"
        return Detection("sdxl-refiner" if unet else "unknown", has_ema, [evidence if unet else "no UNet"])
    if has[SDXL_CLIP_PREFIX] and has[SDXL_OPENCLIP_PREFIX]:
        evidence = (
            f"`{SDXL_CLIP_PREFIX}*` (CLIP ViT-L) and `{SDXL_OPENCLIP_PREFIX}*` (OpenCLIP ViT-bigG): "
            "SDXL base's two text encoders"
        )
        return Detection("sdxl" if unet else "unknown", has_ema, [evidence if unet else "no UNet"])
    found = sorted({".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.embedders.")})
    return Detection("unknown", has_ema, [f"SDXL-style conditioner keys, but not SDXL's pair of encoders: {found}"])


def refuse_unsupported(detection: Detection, path: Path) -> None:
    if detection.family == "lora":
        raise UserError(
            f"{path} is a LoRA adapter, not a full model",
            "pass the base model it was trained on; load LoRAs in your UI (A1111/ComfyUI)",
        )
    if detection.family == "unknown":
        raise UserError(
            f"{path} is not a Stable Diffusion 1.x/2.x/XL checkpoint ({detection.evidence[0]})",
            "pass a full model file (UNet + VAE + text encoder), e.g. v1-5-pruned.safetensors",
        )


def _parameterization_in_yaml(path: Path) -> str | None:
    try:
        doc = yaml.safe_load(Path(path).read_text())
        params = doc["model"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise UserError(
            f"cannot read the model config yaml {path} ({exc})", "pass an LDM config like v1-inference.yaml"
        ) from exc
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _prediction_in_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    for key in ("dreambooth.prediction_type", "modelspec.prediction_type", "prediction_type"):
        value = metadata.get(key, "").lower()
        if value in ("v", "v_prediction", "v-prediction"):
            return "v_prediction", key
        if value in ("epsilon", "eps"):
            return "epsilon", key
    if metadata.get("ss_v_parameterization", "").lower() == "true":  # kohya sd-scripts
        return "v_prediction", "ss_v_parameterization"
    return None


def decide_prediction_type(
    detection: Detection, ckpt: Checkpoint, model_type: str, original_config: Path | None
) -> None:
    """Fill in `detection.prediction_type` from the first conclusive source (the probe comes later)."""
    if model_type != "auto":
        family = model_type.removesuffix("-v")
        if family != detection.family:
            raise UserError(
                f"--model-type {model_type} does not fit {ckpt.path}, which is {detection.family} "
                f"({detection.evidence[0]})",
                f"drop --model-type, or pass --model-type {detection.family}",
            )
        if ckpt.tensors.get(V_PRED_KEY) is not None and not model_type.endswith("-v"):
            detection.evidence.append(f"note: the file has a `{V_PRED_KEY}` key (marks v-prediction); the flag wins")
        prediction = "v_prediction" if model_type.endswith("-v") else "epsilon"
        _decided(detection, prediction, "flag", f"prediction type from --model-type {model_type}")
        return
    if original_config is not None:
        prediction = _parameterization_in_yaml(original_config)
        _decided(detection, prediction, "original-config", f"prediction type from --original-config {original_config}")
        return
    found = _prediction_in_metadata(ckpt.metadata)
    if found is None and detection.family.startswith("sdxl") and V_PRED_KEY in ckpt.tensors:
        found = "v_prediction", f"`{V_PRED_KEY}` key"
    if found:
        _decided(detection, found[0], "metadata", f"prediction type from the file's metadata ({found[1]})")
        return
    sidecar = ckpt.path.with_suffix(".yaml")
    if sidecar.is_file():
        prediction = _parameterization_in_yaml(sidecar)
        _decided(detection, prediction, "sidecar", f"prediction type from the sidecar config {sidecar.name}")
        return
    if detection.family == "sd1":
        why = "prediction type: SD 1.x is epsilon unless a flag, config, metadata or sidecar says v (see sd1-v)"
        _decided(detection, "epsilon", "sd1-default", why)
    if detection.family.startswith("sdxl"):
        why = "prediction type: SDXL is epsilon unless a flag, config, metadata, `v_pred` key or sidecar says v"
        _decided(detection, "epsilon", "sdxl-default", why)


def _decided(detection: Detection, prediction_type: str, rule: str, evidence: str) -> None:
    detection.prediction_type, detection.prediction_rule = prediction_type, rule
    detection.evidence.append(evidence)


# A1111's SD 2.x test: feed a flat 0.5 latent at t=999 with a flat context. An epsilon model predicts noise
# close to its input (mean(out - x) ≈ 0); a v model predicts ≈ -x0, far below. We add a dead band so that
# an untrained or exotic UNet is called inconclusive rather than guessed.
V_BELOW = -1.0
EPSILON_ABOVE = -0.5


def probe_prediction_type(unet: Any, detection: Detection) -> None:
    """Run the UNet (a torch module, so torch is loaded only for the files that need this) on the probe."""
    import torch

    param = next(unet.parameters())
    cross = unet.config.cross_attention_dim
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=param.dtype)
    context = torch.full((1, 2, cross), 0.5, dtype=param.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    score = (out.float() - x.float()).mean().item()
    if score < V_BELOW:
        detection.prediction_type, detection.prediction_rule = "v_prediction", "probe"
    elif score > EPSILON_ABOVE:
        detection.prediction_type, detection.prediction_rule = "epsilon", "probe"
    verdict = detection.prediction_type or "inconclusive"
    detection.evidence.append(f"numerical probe of the UNet: mean(out - x) = {score:.3f} → {verdict}")
