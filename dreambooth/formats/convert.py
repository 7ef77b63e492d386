"""`dreambooth convert`: one original single-file checkpoint (SD 1.x/2.x/XL; a Flux.1 transformer with its other
parts) → a complete, offline-loadable diffusers folder."""

import time
from dataclasses import dataclass
from pathlib import Path

from dreambooth import __version__
from dreambooth.checkpoint.folders import PROVENANCE_FILE
from dreambooth.checkpoint.load import check_input_file, open_checkpoint
from dreambooth.errors import UserError
from dreambooth.families.flux import files as flux_files
from dreambooth.families.flux import parts as flux_parts
from dreambooth.families.sd.convert import analyze, write_diffusers_folder
from dreambooth.families.sd.spec import MODEL_TYPES
from dreambooth.fileio import BackgroundSha256, atomic_dir, write_json


@dataclass(frozen=True)
class ConvertOptions:
    model_type: str = "auto"  # auto | sd1 | sd1-v | sd2 | sd2-v | sdxl | sdxl-v | sdxl-refiner
    original_config: Path | None = None
    ema: bool = False
    vae: Path | None = None
    overwrite: bool = False
    # Flux given as its transformer's file: the other three parts, as ComfyUI users keep them
    clip_l: Path | None = None
    t5xxl: Path | None = None
    ae: Path | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ("auto", *MODEL_TYPES):
            raise UserError(f"--model-type {self.model_type!r} is not one of auto, {', '.join(MODEL_TYPES)}")
        if self.original_config is not None:
            check_input_file(self.original_config, "--original-config")


def convert(src: Path, dest: Path, options: ConvertOptions = ConvertOptions(), *, sha256: str | None = None) -> dict:
    """Convert and write; returns the summary (also written to DEST/dreambooth.json). `sha256`: the source's,
    when the caller has hashed it already (`run` has, for its manifest); else it is hashed beside the conversion."""
    started = time.perf_counter()
    src, dest = Path(src), Path(dest)
    check_destination(dest, options.overwrite)
    flux = flux_parts_of(src, options)
    if flux is not None:
        return flux_files.convert_parts(flux, dest, overwrite=options.overwrite)
    # alongside the conversion (the file is in the page cache), unless it is known
    digest = KnownSha256(sha256) if sha256 else BackgroundSha256(check_input_file(src))
    try:
        analysis = analyze(open_checkpoint(src), options)
    except BaseException:
        digest.cancel()
        raise
    tensors = [t for c in analysis.components.values() for t in c.state.values()] + list(analysis.leftovers.values())
    need = sum(t.numel() * t.element_size() for t in tensors)  # for the message if the disk fills up
    try:
        with atomic_dir(dest, overwrite=options.overwrite, need=need) as tmp:
            write_diffusers_folder(
                tmp,
                analysis.components,
                analysis.family,
                analysis.model_type,
                analysis.leftovers,
                scheduler_overrides=analysis.scheduler_overrides,
            )
            summary = {
                **analysis.summary(),
                "sha256": digest.result(),
                "converted_by": f"dreambooth {__version__}",
                "seconds": round(time.perf_counter() - started, 2),
            }
            write_json(tmp / PROVENANCE_FILE, summary)
    except BaseException:
        digest.cancel()  # a failed write: the hash is not needed
        raise
    return summary


def flux_parts_of(src: Path, options: ConvertOptions) -> dict | None:
    """The four Flux parts when `src` holds a Flux transformer (and --clip-l, --t5xxl, --ae name the rest); None
    for a Stable Diffusion file, which takes none of those flags."""
    given = {"text_encoder": options.clip_l, "text_encoder_2": options.t5xxl, "vae": options.ae}
    check_input_file(src)
    if src.suffix.lower() == ".safetensors" and flux_parts.is_flux_file(src):
        return flux_parts.resolve(src, given)
    flag = next((f for f, v in (("--clip-l", options.clip_l), ("--t5xxl", options.t5xxl), ("--ae", options.ae)) if v),
                None)  # fmt: skip
    if flag:
        raise UserError(f"{flag} names a part of a Flux.1 model, and {src} is not a Flux transformer", f"drop {flag}")
    return None


class KnownSha256:
    """A digest already computed, where convert would start a BackgroundSha256."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def result(self) -> str:
        return self.digest

    def cancel(self) -> None:
        pass


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"destination {dest} exists and is a file", "pass a folder path for the diffusers model")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise UserError(f"destination {dest} exists and is not empty", "pass --overwrite, or choose another folder")
