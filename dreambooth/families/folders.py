"""Which family a diffusers folder is, from its files alone (no model is loaded)."""

from pathlib import Path

from dreambooth.families.sd.spec import FAMILIES
from dreambooth.fileio import read_json_object

FLUX_TYPES = ("flux-dev", "flux-schnell")  # families/flux: their family and model type are one name


def folder_family(folder: Path) -> str:
    """The family of a diffusers folder: what its provenance says (`dreambooth convert` and training write it), else
    what its text encoders and pipeline class tell. A part that is missing or unreadable counts as absent: the
    folder's own checks name it."""
    provenance = read_json_object(folder / "dreambooth.json").get("family")
    if provenance in FAMILIES or provenance in FLUX_TYPES:
        return provenance
    if (folder / "transformer").is_dir():  # Flux.1: dev has a guidance embedding, schnell none
        guidance = read_json_object(folder / "transformer" / "config.json").get("guidance_embeds")
        return "flux-dev" if guidance else "flux-schnell"
    if (folder / "text_encoder_2").is_dir():
        return "sdxl" if (folder / "text_encoder").is_dir() else "sdxl-refiner"
    if "XL" in str(read_json_object(folder / "model_index.json").get("_class_name", "")):
        return "sdxl"
    # SD 1.x: OpenAI CLIP (quick_gelu); SD 2.x: OpenCLIP (gelu). Nothing else distinguishes a plain folder.
    activation = read_json_object(folder / "text_encoder" / "config.json").get("hidden_act", "quick_gelu")
    return "sd1" if activation == "quick_gelu" else "sd2"
