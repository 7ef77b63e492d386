"""Flux.1's files in and out: the transformer ComfyUI's "Load Diffusion Model" reads (BFL's layout), a diffusers
folder made from the four original files (`dreambooth convert`), and what `dreambooth inspect` says about any of
them.

Tensors are copied as byte ranges where the layouts agree (renames, and the rows of a fused q/k/v), and made one at
a time where they do not (the fused modules put back together, the final modulation's halves swapped, a cast):
writing the 24 GB transformer holds one tensor in memory, never the model.
"""

import json
import time
from pathlib import Path
from typing import Any

from dreambooth import __version__
from dreambooth.checkpoint.keymap import concat_rows, copy
from dreambooth.checkpoint.load import check_input_file, open_safetensors_file, sort_safetensors_metadata
from dreambooth.checkpoint.tensorfile import LazyTensor, StoredTensor, safetensors_dtype, write_safetensors
from dreambooth.errors import UserError
from dreambooth.families.flux import parts
from dreambooth.families.flux.layout import transformer_sources, variant
from dreambooth.fileio import atomic_dir, atomic_path, write_json

# Stability's model-spec names for Flux, as kohya writes them (library/sai_model_spec.py)
MODELSPEC_ARCHITECTURE = {"flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell"}
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
TITLES = {"flux-dev": "FLUX.1 [dev]", "flux-schnell": "FLUX.1 [schnell]"}


def _torch(t: Any):
    return t.to_torch() if isinstance(t, StoredTensor) else t


def cast(t: Any, dtype_name: str | None) -> Any:
    """`t` in the safetensors dtype `dtype_name` (None: as it is), made when written when it must change."""
    if dtype_name is None or not t.is_floating_point() or _dtype_name(t) == dtype_name:
        return t
    import torch

    target = getattr(torch, parts_dtype(dtype_name))
    return LazyTensor(tuple(t.shape), dtype_name, lambda: _torch(t).to(target))


def parts_dtype(dtype_name: str) -> str:
    from dreambooth.checkpoint.tensorfile import TORCH_NAMES

    return TORCH_NAMES[dtype_name]


def _dtype_name(t: Any) -> str:
    if isinstance(t, StoredTensor | LazyTensor):
        return t.dtype_name
    return safetensors_dtype(t.dtype)


def original_transformer(config: dict, state: dict[str, Any], dtype_name: str | None = None) -> dict[str, Any]:
    """BFL's keys for a diffusers transformer state (torch tensors or StoredTensor ranges): renamed ranges stay
    ranges; fused and swapped tensors are made when written."""
    out = {}
    for original, src in transformer_sources(config).items():
        inputs = [state[k] for k in src.keys]
        if src.combine is copy:
            out[original] = cast(inputs[0], dtype_name)
            continue
        rows = sum(t.shape[0] for t in inputs) if src.combine is concat_rows else inputs[0].shape[0]
        name = dtype_name or _dtype_name(inputs[0])

        def make(combine=src.combine, inputs=inputs, name=name):
            import torch

            return combine(*(_torch(t) for t in inputs)).to(getattr(torch, parts_dtype(name)))

        out[original] = LazyTensor((rows, *inputs[0].shape[1:]), name, make)
    return out


def transformer_metadata(config: dict, training: dict | None = None) -> dict[str, str]:
    model_type = variant(config)
    meta = {
        "format": "pt",
        "dreambooth.version": __version__,
        "dreambooth.family": model_type,
        "dreambooth.model_type": model_type,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[model_type],
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": TITLES[model_type],
        # the exact config, so a non-standard transformer (a tiny test model) converts back without guessing
        "dreambooth.configs": json.dumps(
            {"transformer": {k: v for k, v in config.items() if not k.startswith("_")}}, sort_keys=True
        ),
    }
    if training:
        meta["dreambooth.training"] = json.dumps(training, sort_keys=True)
    return meta


def write_transformer(dest: Path, config: dict, state: dict[str, Any], *, half: bool, training=None) -> dict:
    """The transformer as BFL's single file (bf16 with `half`: what the releases ship, fp16 overflows Flux)."""
    tensors = original_transformer(config, state, "BF16" if half else None)
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(dest, need=need) as tmp:
        write_safetensors(tmp, tensors, metadata=transformer_metadata(config, training))
        sort_safetensors_metadata(tmp)
    return {"file": str(dest), "size_bytes": dest.stat().st_size, "tensors": len(tensors), "half": half,
            "model_type": variant(config)}  # fmt: skip


def read_transformer_folder(folder: Path) -> tuple[dict, dict[str, StoredTensor]]:
    """(config, state) of a diffusers FluxTransformer2DModel folder, the weights as byte ranges."""
    config_path = folder / "config.json"
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise UserError(
            f"{folder} lacks config.json or diffusion_pytorch_model.safetensors", "pass a Flux folder or checkpoint"
        )
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    return config, open_safetensors_file(weights, "transformer weights")


def export_transformer(src: Path, dest: Path, *, half: bool = True, training: dict | None = None) -> dict:
    """`dreambooth export` of a Flux folder or full-fine-tune checkpoint: its transformer as the single file
    ComfyUI's "Load Diffusion Model" (and Forge, and kohya) read."""
    started = time.perf_counter()
    if dest.suffix != ".safetensors":
        raise UserError(f"{dest}: a Flux transformer is written as .safetensors", f"name it {dest.stem}.safetensors")
    config, state = read_transformer_folder(Path(src) / "transformer")
    summary = write_transformer(dest, config, state, half=half, training=training)
    return {**summary, "seconds": round(time.perf_counter() - started, 2)}


# ───────────────────────────── original files → a diffusers folder ─────────────────────────────


def component_from_part(role: str, part, model_type: str) -> tuple[dict, dict[str, Any]]:
    """(config, state in the model's names) of one part, its tensors left in the file."""
    from dreambooth.checkpoint.load import open_checkpoint

    ckpt = open_checkpoint(part.path)
    tensors = parts.strip(ckpt.tensors, part.prefix)
    source = f"{parts.ROLES[role][0]} {part.path}"
    config = parts.part_config(role, tensors, model_type, source, ckpt.metadata)
    try:
        state = parts.component_state(role, tensors, config)
    except KeyError as exc:
        raise UserError(f"{source} lacks {role} weight {exc.args[0]}", "the file is incomplete") from None
    if role == "text_encoder_2":  # one copy of the shared embedding, as T5 files keep it
        state.pop("encoder.embed_tokens.weight", None)
    return config, state


def convert_parts(model_parts: dict[str, Any], dest: Path, *, overwrite: bool = False) -> dict:
    """A diffusers Flux folder from the four original parts (byte ranges copied file to file where they can be)."""
    started = time.perf_counter()
    transformer = model_parts["transformer"]
    guidance = f"{transformer.prefix}guidance_in.in_layer.weight" in open_safetensors_file(transformer.path)
    model_type = "flux-dev" if guidance else "flux-schnell"
    components = {role: component_from_part(role, part, model_type) for role, part in model_parts.items()}
    need = sum(t.numel() * t.element_size() for _, state in components.values() for t in state.values())
    with atomic_dir(dest, overwrite=overwrite, need=need) as tmp:
        parts.write_folder(tmp, components, model_type)
        summary = {
            "family": model_type,
            "model_type": model_type,
            "prediction_type": "flow",
            "parts": {role: str(part.path) for role, part in model_parts.items()},
            "parameters": {role: sum(t.numel() for t in state.values()) for role, (_, state) in components.items()},
            "converted_by": f"dreambooth {__version__}",
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / "dreambooth.json", summary)
    return summary


# ───────────────────────────── inspect ─────────────────────────────


def _dtypes(tensors: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else "unknown"


def describe_file(path: Path) -> dict | None:
    """What `inspect` says about a file holding Flux parts (None: it holds none)."""
    path = check_input_file(Path(path))
    if not parts.is_flux_file(path):
        return None  # a Stable Diffusion file, or its VAE alone (the same layout, 4 latent channels)
    tensors = open_safetensors_file(path)
    found = parts.identify(tensors)
    report: dict[str, Any] = {"file": str(path), "size_bytes": path.stat().st_size, "tensors": len(tensors),
                              "supported": True, "parts": {}}  # fmt: skip
    for role, prefix in found.items():
        own = parts.strip(tensors, prefix)
        entry = {"prefix": prefix, "dtype": _dtypes(own), "parameters": sum(t.numel() for t in own.values())}
        if role == "transformer":
            config = parts.transformer_config(own, str(path))
            entry |= {"double_blocks": config["num_layers"], "single_blocks": config["num_single_layers"],
                      "hidden": config["num_attention_heads"] * config["attention_head_dim"],
                      "guidance_embedding": config["guidance_embeds"]}  # fmt: skip
        report["parts"][role] = entry
    if "transformer" in found:
        model_type = variant({"guidance_embeds": report["parts"]["transformer"]["guidance_embedding"]})
        missing = [role for role in parts.ROLES if role not in found]
        report |= {
            "family": model_type,
            "title": TITLES[model_type],
            "model_type": model_type,
            "prediction_type": "flow",
            "dtype": report["parts"]["transformer"]["dtype"],
            "missing": {parts.ROLES[role][0]: parts.ROLES[role][1] for role in missing},
            "evidence": [
                f"`{found['transformer']}double_blocks.*`: a Flux.1 transformer in BFL's layout",
                "guidance embedding (guidance_in): FLUX.1 [dev]" if model_type == "flux-dev"
                else "no guidance embedding: FLUX.1 [schnell] (timestep-distilled)",
            ],
        }  # fmt: skip
    else:
        role = next(iter(found))
        report |= {
            "family": "flux-part",
            "part": parts.ROLES[role][1].split(" (")[0],
            "use_as": parts.ROLES[role][0],
            "dtype": report["parts"][role]["dtype"],
            "evidence": [f"a Flux.1 part alone: pass it as {parts.ROLES[role][0]} beside the transformer's file"],
        }
    report["parameters_total"] = sum(p["parameters"] for p in report["parts"].values())
    return report
