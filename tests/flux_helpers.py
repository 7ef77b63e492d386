"""A tiny Flux.1 as users keep it: ComfyUI's four files (BFL's transformer, CLIP-L, T5-XXL, the autoencoder), an
all-in-one checkpoint, and the diffusers folder — built in code from one random tiny model (no download).

The transformer's original layout comes from our tables (families/flux/layout.py); that those tables give BFL's
released names and shapes is checked against BFL's own code at full size (tests/golden/flux-*-transformer.txt).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dreambooth.checkpoint.keymap import build_original
from dreambooth.families.flux.files import write_transformer
from dreambooth.families.sd.layout import vae_sources
from dreambooth.tiny_model import tiny_flux

FLUX_FLAGS = ("--t5-max-length", 32)  # a short T5 prompt: the tests run in seconds, the code path is the same


def original_parts(components: dict[str, tuple[dict, dict]]) -> dict[str, dict[str, torch.Tensor]]:
    """CLIP-L, T5-XXL and the VAE under the names their original files use (the transformer: write_transformer)."""
    clip = {"text_model." + k: v for k, v in components["text_encoder"][1].items()}
    t5 = {k: v for k, v in components["text_encoder_2"][1].items() if k != "encoder.embed_tokens.weight"}
    vae_config, vae_state = components["vae"]
    ae = build_original(vae_sources(list(vae_state), vae_config, prefix=""), vae_state)
    return {"text_encoder": clip, "text_encoder_2": t5, "vae": ae}


def _save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None, configs: dict | None = None) -> Path:
    """The tensors (cast), with the parts' exact configs in the metadata as our own files record them: a tiny
    CLIP's attention heads cannot be read off its weights."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"dreambooth.configs": json.dumps(configs)} if configs else None
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def write_flux_files(
    folder: Path, seed: int = 0, model_type: str = "flux-dev", *, dtype: torch.dtype | None = None
) -> dict[str, Path]:
    """ComfyUI's four files of a tiny Flux: role → path (transformer, text_encoder, text_encoder_2, vae)."""
    folder.mkdir(parents=True, exist_ok=True)
    components = tiny_flux(seed, model_type)
    config, state = components["transformer"]
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_transformer(folder / "flux1.safetensors", config, state, half=False)
    paths = {"transformer": folder / "flux1.safetensors"}
    names = {"text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl.safetensors", "vae": "ae.safetensors"}
    for role, part in original_parts(components).items():
        paths[role] = _save(part, folder / names[role], dtype, {role: components[role][0]})
    return paths


def write_all_in_one(path: Path, seed: int = 0, model_type: str = "flux-dev") -> Path:
    """ComfyUI's all-in-one Flux checkpoint: every part in one file, under its own prefix."""
    from dreambooth.families.flux.files import original_transformer

    components = tiny_flux(seed, model_type)
    config, state = components["transformer"]
    transformer = {k: v.make() if hasattr(v, "make") else v for k, v in original_transformer(config, state).items()}
    prefixes = {
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.t5xxl.transformer.",
        "vae": "vae.",
    }
    out = {"model.diffusion_model." + k: v for k, v in transformer.items()}
    for role, part in original_parts(components).items():
        out |= {prefixes[role] + k: v for k, v in part.items()}
    return _save(out, path, None, {role: config for role, (config, _) in components.items()})


def flux_args(files: dict[str, Path]) -> list[object]:
    """`--model` and the part flags for ComfyUI's four files."""
    return ["--clip-l", files["text_encoder"], "--t5xxl", files["text_encoder_2"], "--ae", files["vae"]]
