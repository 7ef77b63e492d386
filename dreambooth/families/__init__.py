"""Model families: what differs between SD 1.x/2.x, SDXL and Flux.1 for training, and for their files.

A family object loads the components of a model, names its objective (objectives.py), encodes prompts, calls the
denoiser with its conditioning; the training loop (dreambooth/train.py) talks to it and to an adapter
(dreambooth/adapters.py) only, so a new family is a folder of declarations here, not branches in the loop.

This package's own import is light: `convert` and `inspect` read the families' key tables without torch, so the
training classes (which need torch) are imported when a family is asked for.
"""

from pathlib import Path

from dreambooth.errors import UserError
from dreambooth.families.folders import folder_family

__all__ = ["NAMES", "folder_family", "get", "of_folder"]

NAMES = ("sd1", "sd2", "sdxl", "flux-dev", "flux-schnell")


def get(name: str):
    """The training family of this name (families.base.Family)."""
    if name in ("sd1", "sd2"):
        from dreambooth.families.sd.family import StableDiffusion

        return StableDiffusion(name)
    if name == "sdxl":
        from dreambooth.families.sdxl.family import StableDiffusionXL

        return StableDiffusionXL()
    if name in ("flux-dev", "flux-schnell"):
        from dreambooth.families.flux.family import Flux

        return Flux(name)
    raise UserError(f"model family {name!r} cannot be trained", f"supported: {', '.join(NAMES)}")


def of_folder(folder: Path):
    """The training family of a diffusers folder (`folder_family`); the refiner is refused."""
    name = folder_family(folder)
    if name == "sdxl-refiner":
        from dreambooth.families.sdxl.family import refuse_refiner

        refuse_refiner(folder)
    return get(name)
