"""Model families: what differs between SD 1.x, SD 2.x (and later SDXL, Flux-like models) for training.

A family object loads the components of a diffusers folder, encodes prompts, calls the denoiser with its
conditioning and says what the denoiser learns to predict; the training loop (dreambooth/train.py) talks to it and
to an adapter (dreambooth/adapters.py) only, so a new family is one new module here, not a branch in the loop.
"""

import json
from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.families.base import Components, Conditioning, Family
from dreambooth.families.sd import StableDiffusion
from dreambooth.families.sdxl import StableDiffusionXL, refuse_refiner

__all__ = ["Components", "Conditioning", "Family", "get", "of_folder"]

FAMILIES: dict[str, Family] = {
    "sd1": StableDiffusion("sd1"),
    "sd2": StableDiffusion("sd2"),
    "sdxl": StableDiffusionXL(),
}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"model family {name!r} cannot be trained", f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def of_folder(folder: Path) -> Family:
    """The family of a diffusers folder: its provenance (written by `dreambooth convert`) or its text encoders."""
    provenance = folder / "dreambooth.json"
    name = json.loads(provenance.read_text()).get("family") if provenance.is_file() else None
    if name == "sdxl-refiner" or (not (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir()):
        refuse_refiner(folder)
    if name in FAMILIES:
        return FAMILIES[name]
    if (folder / "text_encoder_2").is_dir():
        return FAMILIES["sdxl"]
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    # SD 1.x: OpenAI CLIP (quick_gelu); SD 2.x: OpenCLIP (gelu). Nothing else distinguishes a plain folder.
    return FAMILIES["sd1" if config.get("hidden_act") == "quick_gelu" else "sd2"]
