"""Model families: what differs between SD 1.x, SD 2.x (and later SDXL, Flux-like models) for training.

A family object loads the components of a diffusers folder, encodes prompts, calls the denoiser with its
conditioning and says what the denoiser learns to predict; the training loop (dreambooth/train.py) talks to it and
to an adapter (dreambooth/adapters.py) only, so a new family is one new module here, not a branch in the loop.
"""

from pathlib import Path

from dreambooth.checkpoint.families import folder_family
from dreambooth.errors import UserError
from dreambooth.families.base import Components, Conditioning, Dtypes, Family, LatentFormat, LoraTargets
from dreambooth.families.sd import StableDiffusion
from dreambooth.families.sdxl import StableDiffusionXL, refuse_refiner

__all__ = ["Components", "Conditioning", "Dtypes", "Family", "LatentFormat", "LoraTargets", "get", "of_folder"]

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
    """The family of a diffusers folder (`checkpoint.families.folder_family`); the refiner is refused."""
    name = folder_family(folder)
    if name == "sdxl-refiner":
        refuse_refiner(folder)
    return get(name)
