"""`--vae PATH`: a replacement VAE from a standalone file (e.g. vae-ft-mse-840000) or a diffusers folder."""

import json
from pathlib import Path

from dreambooth.checkpoint.load import open_checkpoint, open_safetensors_file
from dreambooth.errors import UserError
from dreambooth.families.sd import components as comp
from dreambooth.families.sd.layout import VAE_PREFIX
from dreambooth.families.sd.spec import infer_vae_config


def load_vae(path: Path, model_type: str) -> comp.Component:
    path = Path(path)
    if path.is_dir():
        return _from_diffusers_folder(path)
    ckpt = open_checkpoint(path)
    keys = list(ckpt.tensors)
    if any(k.startswith(VAE_PREFIX) for k in keys):
        prefix = VAE_PREFIX
    elif any(k.startswith("encoder.down.") for k in keys):
        prefix = ""  # a standalone LDM VAE file: the same keys without the first_stage_model. prefix
    else:
        raise UserError(
            f"--vae {path} holds no VAE weights in the original layout (`encoder.down.*`)",
            "pass a VAE .safetensors/.ckpt as A1111 uses them, or a diffusers VAE folder",
        )
    tensors = {VAE_PREFIX + k.removeprefix(prefix): v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    config = infer_vae_config(tensors, model_type)
    return comp.vae_from_original(tensors, config, source=f"--vae {path}")


def _from_diffusers_folder(path: Path) -> comp.Component:
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise UserError(
            f"--vae {path} is a folder without config.json and diffusion_pytorch_model.safetensors",
            "pass a diffusers VAE folder, or a single VAE file",
        )
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    return comp.checked("vae", config, open_safetensors_file(weights, "--vae"), f"--vae {path}")
