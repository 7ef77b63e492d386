"""`dreambooth export`: a model folder (converted, or a full fine-tune's checkpoint) → the single file other tools
load: SD 1.x/2.x/XL in the layout of their released checkpoints, Flux.1 as its transformer's file (what ComfyUI's
"Load Diffusion Model" reads). LoRA checkpoints: formats/lora.py."""

import time
from pathlib import Path

from dreambooth import families
from dreambooth.errors import UserError
from dreambooth.families.flux.files import export_transformer
from dreambooth.families.sd.export import SUFFIXES, ExportOptions, export_model, read_diffusers_folder


def export(src: Path, dest: Path, options: ExportOptions | None = None) -> dict:
    started = time.perf_counter()
    options = options or ExportOptions()
    dest = Path(dest)
    if Path(src).is_dir() and families.folder_family(Path(src)).startswith("flux"):
        return export_transformer(Path(src), dest, half=options.half, training=options.training)
    if dest.suffix not in SUFFIXES:
        raise UserError(f"{dest}: unknown file type {dest.suffix!r}", "name it .safetensors (or .ckpt for old tools)")
    if dest.exists() and not options.overwrite:
        raise UserError(f"{dest} exists", "pass --overwrite or choose another name")
    return export_model(read_diffusers_folder(src), dest, options, started=started)


__all__ = ["ExportOptions", "export"]
