"""LoRA adapters on disk: the training checkpoint's `lora/` folder, the kohya/A1111 file, diffusers' format, merge.

A training checkpoint stores each peft-wrapped component's adapter as peft saved it (`<module>.lora_A.weight`,
`<module>.lora_B.weight`, fp32) plus `lora.json`, where every module's rank and alpha are read off the live layers
once, so nothing downstream re-interprets peft's `rank_pattern`/`alpha_pattern`.

The file the WebUI, ComfyUI and kohya's tools share names a module by a prefix and its module path with dots as
underscores (`lora_unet_down_blocks_0_…_to_q`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`) and stores
`.lora_down.weight` [r, in(, k, k)], `.lora_up.weight` [out, r(, 1, 1)] and `.alpha` (scale = alpha / r): the
same tensors as peft's A and B.
"""

import hashlib
import json
import time
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from dreambooth.checkpoint import lycoris
from dreambooth.checkpoint.keymap import TEXT_MODEL
from dreambooth.checkpoint.load import sort_safetensors_metadata
from dreambooth.errors import UserError
from dreambooth.families.flux import lora as flux_lora
from dreambooth.families.sd.lora import diffusers_adapter_metadata, kohya_metadata, merged_states, to_kohya
from dreambooth.fileio import atomic_dir, atomic_path, write_json
from dreambooth.formats.export import SUFFIXES, ExportOptions, export_model, read_diffusers_folder

ADAPTER_DIR = "lora"  # inside a training checkpoint folder checkpoints/step-N/
ADAPTER_INFO = "lora.json"
ADAPTER_NAME = "default"  # peft's adapter name; we train one adapter per model
FORMATS = ("kohya", "diffusers")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m in peft's state dict
NORMS_SUFFIX = ".norms.safetensors"  # a DoRA component's row norms, beside its weights


# --- the training checkpoint's lora/ folder ---------------------------------------------------------------------


def lora_layers(model: torch.nn.Module, adapter: str = ADAPTER_NAME) -> dict[str, torch.nn.Module]:
    """The peft adapter layers (LoRA, LoHa, LoKr) of a wrapped model that hold `adapter`, by module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft only where the work needs it: `export` starts fast

    return {
        _module_path(name): m
        for name, m in model.named_modules()
        if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "r", {})
    }


def dora_norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each DoRA module's row norms of its base weight ‖W‖ and of W + ΔW (what peft divides by): the kohya file's
    dora_scale is written from them (dreambooth/checkpoint/lycoris.py), so the export needs no base model."""
    norms = {}
    for path, layer in lora_layers(model).items():
        if not getattr(layer, "use_dora", {}).get(ADAPTER_NAME):
            continue
        with torch.no_grad():
            weight = layer.get_base_layer().weight.float()
            delta = layer.get_delta_weight(ADAPTER_NAME).float().reshape(weight.shape)
            norms[path + lycoris.BASE_NORM] = lycoris.row_norms(weight).cpu()
            norms[path + lycoris.WEIGHT_NORM] = lycoris.row_norms(weight + delta).cpu()
    return norms


def _module_path(name: str) -> str:
    return name.removeprefix("base_model.model.")  # a PeftModel wrapper adds this level


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {_module_path(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def describe_adapters(models: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """Per component: its LoraConfig (JSON-able) and every module's rank and alpha, read off the live layers."""
    components = {}
    for name, model in models.items():
        layers = lora_layers(model)
        if not layers:
            raise ValueError(f"{name} has no peft LoRA layers named {ADAPTER_NAME!r}: wrap it first")
        config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
        components[name] = {
            "peft_config": _jsonable(config.to_dict()) if config is not None else None,
            "ranks": {path: int(m.r[ADAPTER_NAME]) for path, m in layers.items()},
            # kohya's alpha is the one that makes alpha / r the scale peft applies (rslora included)
            "alphas": {path: float(m.scaling[ADAPTER_NAME] * m.r[ADAPTER_NAME]) for path, m in layers.items()},
        }
    return components


def save_adapter(dest: Path, models: dict[str, torch.nn.Module], info: dict) -> None:
    """Write dest/lora/<component>.safetensors (peft state dict, fp32) and dest/lora/lora.json."""
    folder = Path(dest) / ADAPTER_DIR
    components = describe_adapters(models)
    for name, model in models.items():
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            save_file(_adapter_state(model), tmp, metadata={"format": "pt"})
        norms = dora_norms(model)
        if norms:
            with atomic_path(folder / f"{name}{NORMS_SUFFIX}") as tmp:
                save_file(norms, tmp, metadata={"format": "pt"})
    # the weights first, the info last: a folder with lora.json is complete
    write_json(folder / ADAPTER_INFO, {**info, "components": components})


def _adapter_folder(src: Path) -> Path:
    src = Path(src)
    if (src / ADAPTER_DIR / ADAPTER_INFO).is_file():
        return src / ADAPTER_DIR
    if (src / ADAPTER_INFO).is_file():
        return src
    if src.is_file() and src.suffix == ".safetensors" and is_lora_file(src):
        raise UserError(
            f"{src} is an exported LoRA file, not a training checkpoint folder",
            "pass the checkpoint folder training wrote (output/checkpoints/step-N); this file is already an export",
        )
    raise UserError(
        f"{src} is not a LoRA training checkpoint (no {ADAPTER_DIR}/{ADAPTER_INFO})",
        "pass output/checkpoints/step-N of a `--adapter lora` run",
    )


def read_adapter(src: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(info, {component: peft state dict}) without building any model."""
    folder = _adapter_folder(src)
    try:
        info = json.loads((folder / ADAPTER_INFO).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read {folder / ADAPTER_INFO}: {exc}", "the checkpoint is damaged; use another"
        ) from exc
    states = {}
    for name in info.get("components", {}):
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise UserError(f"{folder} lacks {path.name}, which {ADAPTER_INFO} lists", "use another checkpoint")
        states[name] = load_file(path)
    return info, states


def read_norms(src: Path, components) -> dict[str, dict[str, torch.Tensor]]:
    """The DoRA row norms a checkpoint recorded, per component."""
    folder = _adapter_folder(src)
    out = {}
    for name in components:
        path = folder / f"{name}{NORMS_SUFFIX}"
        if not path.is_file():
            raise UserError(f"{folder} lacks {path.name}, which a DoRA export needs", "use another checkpoint")
        out[name] = load_file(path)
    return out


def load_adapter(src: Path, models: dict[str, torch.nn.Module]) -> dict:
    """Load the saved adapter weights into already peft-wrapped models, strictly; returns the info dict."""
    info, states = read_adapter(src)
    extra = sorted(set(states) - set(models))
    if extra:
        raise UserError(f"{src} has a LoRA for {', '.join(extra)}, which this run does not wrap", _SAME_SETTINGS)
    for name, model in models.items():
        if name not in states:
            raise UserError(f"{src} has no LoRA for {name}, which this run wraps", _SAME_SETTINGS)
        expected = _adapter_state(model)
        saved = states[name]
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise UserError(
                f"{src}: the {name} LoRA does not match this run's "
                f"({len(missing)} weights missing, {len(unexpected)} unexpected; first: {first})",
                _SAME_SETTINGS,
            )
        wrong = [k for k in expected if expected[k].shape != saved[k].shape]
        if wrong:
            k = wrong[0]
            raise UserError(
                f"{src}: {name} {k} is {tuple(saved[k].shape)}, this run's is {tuple(expected[k].shape)}",
                _SAME_SETTINGS,
            )
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, saved, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:  # cannot happen after the checks above, unless peft renames keys differently
            raise RuntimeError(f"{name}: peft did not load {len(unexpected)} LoRA weights (first: {unexpected[0]})")
    return info


_SAME_SETTINGS = (
    "resume with the adapter settings (--adapter, --lora-dora, --lora-rank, --lokr-factor, targets, text "
    "encoder) the checkpoint was trained with"
)


def is_lora_checkpoint(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_DIR / ADAPTER_INFO).is_file()


def is_lora_file(path: Path) -> bool:
    """A .safetensors file whose tensors are LoRA weights (kohya, diffusers or peft naming)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # not a safetensors file at all: the caller's own check reports it
        return False
    return bool(keys) and all(".lora_" in k or k.endswith(".alpha") or "lora_" in k.split(".")[0] or
                              k.startswith("lycoris_") for k in keys)  # fmt: skip


# --- the kohya / A1111 file -------------------------------------------------------------------------------------


def tensor_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """The hashes kohya precomputes into a LoRA file's metadata, so tools need not read the tensors.

    sshs_model_hash: SHA-256 of the file's bytes after the header (sd-webui-additional-networks' "addnet" hash; it
    does not depend on the metadata). sshs_legacy_hash: the first 8 hex digits of SHA-256 over 64 KiB at 1 MiB of the
    file as saved with only the `ss_` metadata (kohya's definition). modelspec.hash_sha256: "0x" + SHA-256 over
    each tensor's raw bytes in the dict's order (kohya's sai_model_spec). With the keys sorted and one dtype that
    is the same byte stream as the file's data section.
    """
    blob = save(state, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    modelspec = hashlib.sha256()
    for tensor in state.values():
        modelspec.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "sshs_model_hash": hashlib.sha256(blob[8 + header :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
        "modelspec.hash_sha256": f"0x{modelspec.hexdigest()}",
    }


# --- export -----------------------------------------------------------------------------------------------------


def export_lora(
    src: Path,
    dest: Path,
    *,
    fmt: str = "kohya",
    merge: bool = False,
    half: bool = True,
    base: Path | None = None,
) -> dict:
    """`dreambooth export` on a LoRA checkpoint folder: a kohya file, a diffusers LoRA folder, or a merged model."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}", "kohya loads in A1111 and ComfyUI")
    src, dest = Path(src), Path(dest)
    info, states = read_adapter(src)
    kind = lycoris.kind_of(info)
    if kind in ("loha", "lokr") and fmt == "diffusers":
        raise UserError(f"--format diffusers: diffusers loads no {kind.upper()} files",
                        "use --format kohya (the WebUI and ComfyUI load it), or --merge")  # fmt: skip
    norms = read_norms(src, states) if kind == "dora" and not merge else None
    if merge:
        if fmt != "kohya":
            raise UserError("--merge writes one full model file; --format applies to LoRA files", "drop --format")
        summary = _export_merged(info, states, dest, half=half, base=base)
    elif fmt == "kohya":
        summary = _export_kohya(info, states, dest, half=half, norms=norms)
    else:
        summary = _export_diffusers(info, states, dest, half=half)
    return {**summary, "format": fmt, "merged": merge, "seconds": round(time.perf_counter() - started, 2)}


def _cast(state: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    return {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _export_kohya(info: dict, states: dict, dest: Path, *, half: bool, norms: dict | None = None) -> dict:
    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: a kohya LoRA file is a .safetensors file", f"name it {dest.stem}.safetensors")
    flux = is_flux(info)
    state = _cast(flux_lora.to_kohya(info, states, norms) if flux else to_kohya(info, states, norms=norms), half)
    state = dict(sorted(state.items()))
    metadata = flux_lora.kohya_metadata(info) if flux else kohya_metadata(info)
    metadata |= tensor_hashes(state, metadata)
    with atomic_path(dest) as tmp:
        save_file(state, tmp, metadata=metadata)
        sort_safetensors_metadata(tmp)  # the same LoRA gives the same bytes, whichever process wrote it
    return {"file": str(dest), "size_bytes": dest.stat().st_size, "tensors": len(state), "half": half}


def _export_diffusers(info: dict, states: dict, dest: Path, *, half: bool) -> dict:
    if dest.suffix in SUFFIXES:
        raise UserError(f"{dest}: --format diffusers writes a folder", f"pass a folder name, e.g. {dest.stem}")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is a file", "pass a folder path for the diffusers LoRA")
    if is_flux(info):
        return _export_diffusers_flux(info, states, dest, half=half)
    kwargs = {}
    names = ("unet", "text_encoder", "text_encoder_2")
    for name in names:
        if name in states:
            state, component = _cast(states[name], half), info["components"][name]
            if name.startswith("text_encoder"):
                # keys as the published diffusers LoRAs have them (transformers 4's `text_model.` level: diffusers
                # strips it for transformers 5); module names in the config without it, which peft matches as a
                # suffix under either layout
                state = {TEXT_MODEL + k.removeprefix(TEXT_MODEL): v for k, v in state.items()}
                # transformers' loader finds a DoRA magnitude as a parameter's name (`….weight`), diffusers' UNet
                # loader as peft's key: both load
                state = {k + (".weight" if k.endswith(MAGNITUDE) else ""): v for k, v in state.items()}
                component = {
                    key: {m.removeprefix(TEXT_MODEL): v for m, v in component[key].items()}
                    for key in ("ranks", "alphas")
                }
            kwargs[f"{name}_lora_layers"] = state
            kwargs[f"{name}_lora_adapter_metadata"] = diffusers_adapter_metadata(component, dora=bool(info.get("dora")))
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if info["family"] == "sdxl" else StableDiffusionPipeline
    with atomic_dir(dest, overwrite=True) as tmp:
        pipeline.save_lora_weights(tmp, weight_name=DIFFUSERS_WEIGHTS, **kwargs)
        write_json(tmp / ADAPTER_INFO, {k: v for k, v in info.items() if k != "components"})
    file = dest / DIFFUSERS_WEIGHTS
    tensors = sum(len(states[n]) for n in names if n in states)
    return {"file": str(file), "folder": str(dest), "size_bytes": file.stat().st_size, "tensors": tensors, "half": half}


def _export_diffusers_flux(info: dict, states: dict, dest: Path, *, half: bool) -> dict:
    """FluxPipeline's own LoRA file: `transformer.…` and `text_encoder.…` keys, each scale in its up."""
    from diffusers import FluxPipeline

    with atomic_dir(dest, overwrite=True) as tmp:
        FluxPipeline.save_lora_weights(
            tmp, weight_name=DIFFUSERS_WEIGHTS, **flux_lora.diffusers_layers(info, states, half)
        )
        write_json(tmp / ADAPTER_INFO, {k: v for k, v in info.items() if k != "components"})
    file = dest / DIFFUSERS_WEIGHTS
    tensors = sum(len(state) for state in states.values())
    return {"file": str(file), "folder": str(dest), "size_bytes": file.stat().st_size, "tensors": tensors, "half": half}


def is_flux(info: dict) -> bool:
    return str(info.get("family", "")).startswith("flux")


def _export_merged(info: dict, states: dict, dest: Path, *, half: bool, base: Path | None) -> dict:
    if is_flux(info):
        if dest.suffix != ".safetensors":
            raise UserError(
                f"{dest}: a merged Flux transformer is a .safetensors file", f"name it {dest.stem}.safetensors"
            )
        return flux_lora.export_merged(info, states, dest, half=half, base=base)
    base_folder = Path(base) if base is not None else Path(str(info.get("base") or ""))
    if base is None and not info.get("base"):
        raise UserError("the checkpoint does not record its base model", "pass --base with the diffusers folder")
    if base_folder.is_file() and is_lora_file(base_folder):
        raise UserError(f"--base {base_folder} is a LoRA file, not a model", "pass the base model's diffusers folder")
    model = read_diffusers_folder(base_folder)
    if model.family != info["family"]:
        raise UserError(
            f"--base {base_folder} is {model.family}, the LoRA was trained on {info['family']}",
            "merge onto the model the LoRA was trained on (info: base)",
        )
    model.states = merged_states(info, states, model.states, str(base_folder))
    training = {k: info.get(k) for k in ("step", "seed", "trigger", "rank", "alpha", "base") if k in info}
    summary = export_model(model, dest, ExportOptions(half=half, training={"lora": training}))
    return summary
