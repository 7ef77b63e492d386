"""An SD 1.x/2.x/XL single file read: its family, prediction type and components (`analyze`), and the diffusers
folder they make (`write_diffusers_folder`), complete and loadable offline. `dreambooth convert` (formats/convert.py)
calls them for the Stable Diffusion lineage."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from dreambooth.checkpoint.folders import WEIGHT_FILES
from dreambooth.checkpoint.load import Checkpoint
from dreambooth.checkpoint.tensorfile import StoredTensor, write_safetensors
from dreambooth.checkpoint.tokenizers import write_tokenizer
from dreambooth.errors import UserError
from dreambooth.families.sd import components as comp
from dreambooth.families.sd.detect import (
    MODEL_TYPE_HINT,
    V_PRED_KEY,
    ZTSNR_KEY,
    Detection,
    decide_prediction_type,
    detect_family,
    probe_prediction_type,
    refuse_unsupported,
)
from dreambooth.families.sd.layout import EMA_PREFIX, clip_position_ids_key, text_sources, unet_sources, vae_sources
from dreambooth.families.sd.spec import (
    FAMILIES,
    infer_text_config,
    infer_unet_config,
    infer_vae_config,
    model_type_of,
    scheduler_config,
)
from dreambooth.families.sd.vae_file import load_vae
from dreambooth.fileio import write_json

EXTRAS_FILE = "original_extras.safetensors"  # original tensors diffusers has no place for (see `leftovers`)


@dataclass
class Analysis:
    """Everything learned from the file: what it is, its components, and what is left over."""

    path: Path
    family: str
    model_type: str
    prediction_type: str
    prediction_rule: str  # what decided it: detect.RULES
    has_ema: bool
    ema_used: bool
    dtype: str
    file_bytes: int
    evidence: list[str]
    components: dict[str, comp.Component]
    leftovers: dict[str, Any] = field(repr=False)
    scheduler_overrides: dict = field(default_factory=dict)  # e.g. an SDXL file marked zero-terminal-SNR

    def summary(self) -> dict:
        return {
            "file": str(self.path),
            "size_bytes": self.file_bytes,
            "family": self.family,
            "model_type": self.model_type,
            "prediction_type": self.prediction_type,
            "prediction_type_from": self.prediction_rule,
            "ema_present": self.has_ema,
            "ema_used": self.ema_used,
            "dtype": self.dtype,
            "parameters": {name: c.num_params for name, c in self.components.items()},
            "extra_tensors": len(self.leftovers),
            "evidence": self.evidence,
        }


def analyze(ckpt: Checkpoint, options, *, probe: bool = True) -> Analysis:
    """What an SD 1.x/2.x/XL file is and its components. `options`: formats.convert.ConvertOptions (model_type,
    original_config, ema, vae)."""
    detection = detect_family(ckpt)
    refuse_unsupported(detection, ckpt.path)
    if options.ema and not detection.has_ema:
        raise UserError(
            f"--ema: {ckpt.path} has no EMA weights", "drop --ema (the file's weights are used as they are)"
        )
    decide_prediction_type(detection, ckpt, options.model_type, options.original_config)

    family = detection.family
    # configs depend on the model type only through sample size / scheduler; start from epsilon's, fix below
    provisional = model_type_of(family, detection.prediction_type or "epsilon")
    source = str(ckpt.path)
    recorded = recorded_configs(ckpt)
    if recorded:
        detection.evidence.append("component configs from the file's metadata (written by dreambooth export)")
    with complete(source, "UNet"):
        unet_config = recorded.get("unet") or infer_unet_config(ckpt.tensors, provisional)
        unet = comp.unet_from_original(ckpt.tensors, unet_config, ema=options.ema, source=source)
    if detection.prediction_type is None and probe:
        probe_prediction_type(_unet_module(unet), detection)
    if detection.prediction_type is None:
        raise UserError(f"cannot tell whether {ckpt.path} is an epsilon or a v-prediction model", MODEL_TYPE_HINT)
    model_type = model_type_of(family, detection.prediction_type)
    if "unet" not in recorded:
        unet.config.update(sample_size=infer_unet_config(ckpt.tensors, model_type)["sample_size"])

    if options.vae is not None:
        vae = load_vae(options.vae, model_type)
        detection.evidence.append(f"VAE replaced by {options.vae}")
    else:
        with complete(source, "VAE"):
            vae_config = recorded.get("vae") or infer_vae_config(ckpt.tensors, model_type)
            vae = comp.vae_from_original(ckpt.tensors, vae_config, source=source)
    components = {"unet": unet, "vae": vae}
    for name, encoder in FAMILIES[family].text_encoders.items():  # SD: text_encoder; SDXL: text_encoder(_2)
        with complete(source, f"{name} (`{encoder.prefix}*`)"):
            text_config = recorded.get(name) or infer_text_config(ckpt.tensors, model_type, name)
            components[name] = comp.text_from_original(ckpt.tensors, text_config, family, source=source, name=name)
    kept = leftovers(ckpt, detection, components, ema_used=options.ema)
    if detection.prediction_type != "v_prediction":
        kept.pop(V_PRED_KEY, None)  # the flag said epsilon: export must not mark the file v again
    overrides = {}
    if family.startswith("sdxl") and ZTSNR_KEY in ckpt.tensors:
        # the model expects the rescaled schedule, sampled from its last step (as training wrote it, adapters.py)
        overrides = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        detection.evidence.append(f"zero-terminal-SNR schedule (the file's `{ZTSNR_KEY}` key)")
    detection.evidence.append(
        "UNet weights: EMA"
        if options.ema
        else (
            "UNet weights: non-EMA (EMA kept aside)"
            if detection.has_ema
            else "UNet weights: the file's (no EMA present)"
        )
    )
    return Analysis(
        path=ckpt.path,
        family=family,
        model_type=model_type,
        prediction_type=detection.prediction_type,
        prediction_rule=detection.prediction_rule,
        has_ema=detection.has_ema,
        ema_used=options.ema,
        dtype=_dtype_summary(ckpt.tensors),
        file_bytes=ckpt.path.stat().st_size,
        evidence=detection.evidence,
        components=components,
        leftovers=kept,
        scheduler_overrides=overrides,
    )


@contextmanager
def complete(source: str, what: str) -> Iterator[None]:
    """Reading a config off the shapes, and diffusers' key maps, index the file's keys directly: a key that is not
    there means a partial file (or another architecture), which the user hears about in one line."""
    try:
        yield
    except (KeyError, StopIteration, IndexError) as exc:
        key = f" (first missing: {exc.args[0]})" if isinstance(exc, KeyError) and exc.args else ""
        raise UserError(
            f"{source} lacks {what} weights this architecture needs{key}",
            "the file is incomplete (a partial download?) or a different model architecture",
        ) from exc


def recorded_configs(ckpt: Checkpoint) -> dict[str, dict]:
    """Exact component configs that our own export stored in the file (shapes are still checked)."""
    try:
        configs = json.loads(ckpt.metadata.get("dreambooth.configs", "{}"))
    except ValueError:
        return {}
    return {name: {k: v for k, v in cfg.items() if not k.startswith("_")} for name, cfg in configs.items()}


def original_names(components: dict[str, comp.Component], family: str) -> set[str]:
    """The original keys that exporting these components produces (the reverse key map, names only)."""
    names = set(unet_sources(list(components["unet"].state), components["unet"].config))
    names |= set(vae_sources(list(components["vae"].state), components["vae"].config))
    for name, encoder in FAMILIES[family].text_encoders.items():
        text = components[name]
        names |= set(text_sources(list(text.state), text.config, encoder.kind, encoder.prefix))
        if encoder.kind == "clip":
            names.add(clip_position_ids_key(encoder.prefix))
    return names


def leftovers(ckpt: Checkpoint, detection: Detection, components: dict, *, ema_used: bool) -> dict:
    """Original tensors with no place in a diffusers folder, kept so that export gives the same file back.

    SD 2.x's unused last text layer, text_projection and logit_scale; the noise-schedule buffers; the EMA copy
    of the UNet when the non-EMA weights were taken. When the EMA weights were taken they *are* the UNet now, so
    the EMA copy is not kept twice (and the non-EMA weights are dropped, as the user asked).
    """
    produced = original_names(components, detection.family)
    position_ids = {clip_position_ids_key(e.prefix) for e in FAMILIES[detection.family].text_encoders.values()}
    unknown_to_file = sorted(n for n in produced if n not in ckpt.tensors and n not in position_ids)
    if unknown_to_file and not ema_used:
        raise RuntimeError(f"key map disagrees with the file (bug): e.g. {unknown_to_file[:3]}")
    return {k: v for k, v in ckpt.tensors.items() if k not in produced and not (ema_used and k.startswith(EMA_PREFIX))}


def _unet_module(unet: comp.Component) -> Any:
    """The UNet as a torch module, for the prediction probe (the only part of converting that runs a model)."""
    import torch

    state = {k: v.to_torch() if isinstance(v, StoredTensor) else v for k, v in unet.state.items()}
    with torch.device("meta"):
        model = comp.build_model("unet", unet.config)
    model.load_state_dict(state, assign=True)  # assign: use the loaded tensors, copy nothing
    return model.eval()


def _dtype_summary(tensors: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.get) if counts else "unknown"


LIBRARY_CLASS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}


def write_diffusers_folder(
    folder: Path,
    components: dict[str, comp.Component],
    family: str,
    model_type: str,
    leftovers: dict | None = None,
    *,
    scheduler_overrides: dict | None = None,
) -> None:
    """Everything the family's pipeline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, …) needs for
    `from_pretrained(folder, local_files_only=True)`."""
    for name, component in components.items():
        (folder / name).mkdir(parents=True)
        weights = folder / name / f"{WEIGHT_FILES[name]}.safetensors"
        write_safetensors(weights, component.state, metadata={"format": "pt"})
        write_json(folder / name / "config.json", component_config_file(name, component.config))
    if leftovers:
        write_safetensors(folder / EXTRAS_FILE, leftovers, metadata={"format": "pt"})
    scheduler = scheduler_config(model_type) | (scheduler_overrides or {})
    (folder / "scheduler").mkdir()
    write_json(
        folder / "scheduler" / "scheduler_config.json",
        {**scheduler, "_diffusers_version": library_version("diffusers")},
    )
    for name, tokenizer_config in FAMILIES[family].tokenizers.items():
        write_tokenizer(folder / name, tokenizer_config)
    write_json(folder / "model_index.json", model_index(family, scheduler["_class_name"], components))


def model_index(family: str, scheduler_class: str, components: dict) -> dict:
    spec = FAMILIES[family]
    index = {
        "_class_name": spec.pipeline,
        "_diffusers_version": library_version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
    }
    if spec.pipeline == "StableDiffusionPipeline":
        index |= {"requires_safety_checker": False, "safety_checker": [None, None]}
    elif family == "sdxl":
        index |= {"force_zeros_for_empty_prompt": True}  # as the released base's model_index.json
    else:  # the refiner: no CLIP-L, and conditioned on an aesthetic score
        index |= {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        present = name in components or name in spec.tokenizers
        if present or spec.pipeline != "StableDiffusionPipeline":
            index[name] = LIBRARY_CLASS[name] if present else [None, None]
    return index | {name: LIBRARY_CLASS[name] for name in ("unet", "vae")}


def library_version(name: str) -> str:
    """An installed library's version, read from its metadata: importing diffusers to ask would cost seconds."""
    return metadata.version(name)


def component_config_file(name: str, config: dict) -> dict:
    """config.json of a component. A text encoder's is the config as we hold it: transformers fills in the
    defaults of whatever it leaves out when it loads it (a test checks that this gives the same CLIPTextConfig)."""
    if name in ("text_encoder", "text_encoder_2"):
        cls = "CLIPTextModelWithProjection" if name == "text_encoder_2" else "CLIPTextModel"
        head = {"architectures": [cls], "model_type": "clip_text_model"}
        return {**head, **config, "transformers_version": library_version("transformers")}
    cls = "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
    return {**config, "_class_name": cls, "_diffusers_version": library_version("diffusers")}
