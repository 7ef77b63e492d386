"""An SD 1.x/2.x/XL diffusers folder → one file in the layout of the released checkpoints (`dreambooth export`)."""

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth import __version__
from dreambooth.checkpoint.folders import PROVENANCE_FILE, WEIGHT_FILES
from dreambooth.checkpoint.keymap import build_original
from dreambooth.checkpoint.load import load_safetensors_file, read_json_file, sort_safetensors_metadata
from dreambooth.errors import UserError
from dreambooth.families.folders import folder_family
from dreambooth.families.sd.convert import EXTRAS_FILE
from dreambooth.families.sd.detect import V_PRED_KEY, ZTSNR_KEY
from dreambooth.families.sd.layout import clip_position_ids_key, text_sources, unet_sources, vae_sources
from dreambooth.families.sd.spec import FAMILIES, model_type_of
from dreambooth.fileio import atomic_path

SUFFIXES = (".safetensors", ".ckpt")
# Stability's model-spec names, which A1111/ComfyUI tooling reads from safetensors metadata
MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd1-v": "stable-diffusion-v1",  # model spec has no v1 v-prediction name: modelspec.prediction_type says it
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-v": "stable-diffusion-xl-v1-base",  # as sd1-v: modelspec.prediction_type says v
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
    "sdxl-refiner-v": "stable-diffusion-xl-v1-refiner",
}


@dataclass(frozen=True)
class ExportOptions:
    half: bool = False
    overwrite: bool = True
    training: dict | None = None  # a training summary to record in the metadata


@dataclass
class DiffusersModel:
    folder: Path
    configs: dict[str, dict]
    states: dict[str, dict[str, torch.Tensor]]
    family: str
    prediction_type: str
    provenance: dict
    scheduler: dict = field(default_factory=dict)  # its scheduler_config.json

    @property
    def model_type(self) -> str:
        return model_type_of(self.family, self.prediction_type)


def read_diffusers_folder(folder: Path) -> DiffusersModel:
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file, not a diffusers folder"
        raise UserError(f"{folder} {what}", "pass the folder `dreambooth convert` or training wrote")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"{folder} has no model_index.json: not a diffusers model folder", "pass its top folder")
    provenance = read_json_file(folder / PROVENANCE_FILE, "provenance") if (folder / PROVENANCE_FILE).is_file() else {}
    family = provenance.get("family") or folder_family(folder)
    if family not in FAMILIES:
        raise UserError(
            f"{folder}: model family {family!r} cannot be exported", "only SD 1.x, 2.x and SDXL are supported"
        )
    configs, states = {}, {}
    for name in FAMILIES[family].components:
        cfg_path = folder / name / "config.json"
        weights = folder / name / f"{WEIGHT_FILES[name]}.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise UserError(
                f"{folder} is incomplete: {name}/config.json or {weights.relative_to(folder)} is missing",
                "re-run the conversion or training step that wrote it",
            )
        configs[name] = read_json_file(cfg_path, f"{name} config")
        states[name] = load_safetensors_file(weights, f"{name} weights")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json_file(scheduler, "scheduler config") if scheduler.is_file() else {}
    prediction = scheduler_config.get("prediction_type", "epsilon")
    return DiffusersModel(folder, configs, states, family, prediction, provenance, scheduler_config)


def to_original(model: DiffusersModel) -> dict[str, torch.Tensor]:
    family = FAMILIES[model.family]
    out: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae"):
        sources_of = unet_sources if name == "unet" else vae_sources
        state = model.states[name]
        out |= build_original(sources_of(list(state), model.configs[name]), state)
    for name, encoder in family.text_encoders.items():
        state = model.states[name]
        out |= build_original(text_sources(list(state), model.configs[name], encoder.kind, encoder.prefix), state)
        if encoder.kind == "clip":
            # transformers no longer saves this buffer; the released SD 1.x and SDXL files have it, old loaders want it
            positions = model.configs[name]["max_position_embeddings"]
            out[clip_position_ids_key(encoder.prefix)] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    extras = model.folder / EXTRAS_FILE
    if extras.is_file():
        out = load_safetensors_file(extras) | out  # our component weights win over anything kept aside
    if model.family.startswith("sdxl"):
        # ComfyUI and the WebUI know an SDXL v-prediction / zero-terminal-SNR file by these empty tensors (they
        # read no yaml for SDXL); a converted file's own markers, kept aside, stay as they were
        if model.prediction_type == "v_prediction":
            out.setdefault(V_PRED_KEY, torch.zeros(0))
        if model.scheduler.get("rescale_betas_zero_snr"):
            out.setdefault(ZTSNR_KEY, torch.zeros(0))
    return out


def export_model(model: DiffusersModel, dest: Path, options: ExportOptions, *, started: float | None = None) -> dict:
    """Write one in-memory diffusers model (e.g. a base with a LoRA merged in) as a single file."""
    started = time.perf_counter() if started is None else started
    dest = Path(dest)
    if dest.suffix not in SUFFIXES:
        raise UserError(f"{dest}: unknown file type {dest.suffix!r}", "name it .safetensors (or .ckpt for old tools)")
    if dest.exists() and not options.overwrite:
        raise UserError(f"{dest} exists", "pass --overwrite or choose another name")
    state = to_original(model)
    if options.half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    # one storage per tensor, contiguous: safetensors and old loaders need both
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = export_metadata(model, options)
    need = sum(v.numel() * v.element_size() for v in state.values())  # for the message if the disk fills up
    with atomic_path(dest, need=need) as tmp:
        if dest.suffix == ".safetensors":
            save_file(state, tmp, metadata=metadata)
            sort_safetensors_metadata(tmp)  # the same model gives the same bytes, whichever process wrote it
        else:
            torch.save({"state_dict": state}, tmp)
    if model.prediction_type == "v_prediction" and model.family in SIDECAR_YAML:
        write_sidecar_yaml(dest, model.family)
    return {
        "file": str(dest),
        "size_bytes": dest.stat().st_size,
        "tensors": len(state),
        "model_type": model.model_type,
        "half": options.half,
        "seconds": round(time.perf_counter() - started, 2),
    }


def export_metadata(model: DiffusersModel, options: ExportOptions) -> dict[str, str]:
    meta = {
        "format": "pt",
        "dreambooth.version": __version__,
        "dreambooth.family": model.family,
        "dreambooth.model_type": model.model_type,
        "dreambooth.prediction_type": model.prediction_type,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[model.model_type],
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        # exact configs, so a non-standard model (e.g. the tiny demo) converts back without guessing
        # without `_name_or_path` (where training loaded it from): that is a path on the training machine, which
        # the file should neither reveal nor differ by
        "dreambooth.configs": json.dumps(
            {name: {k: v for k, v in cfg.items() if k != "_name_or_path"} for name, cfg in model.configs.items()},
            sort_keys=True,
        ),
    }
    if model.provenance.get("sha256"):
        meta["dreambooth.base_model_sha256"] = model.provenance["sha256"]
    if model.provenance.get("base_model_sha256"):
        meta["dreambooth.base_model_sha256"] = model.provenance["base_model_sha256"]
    training = options.training or model.provenance.get("training")
    if training:
        meta["dreambooth.training"] = json.dumps(training, sort_keys=True)
    return meta


SIDECAR_YAML = {"sd1": "v1-inference-v.yaml", "sd2": "v2-inference-v.yaml"}


def write_sidecar_yaml(dest: Path, family: str) -> None:
    """A1111 picks a model's config from `<name>.yaml` beside it; a v-prediction model needs `parameterization: v`
    (an epsilon model needs no yaml: the WebUI's defaults are epsilon)."""
    text = (resources.files("dreambooth") / "assets" / "ldm" / SIDECAR_YAML[family]).read_text()
    with atomic_path(dest.with_suffix(".yaml")) as tmp:
        tmp.write_text(text)
