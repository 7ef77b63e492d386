"""`dreambooth inspect`: what a checkpoint is, and why we think so — without writing anything."""

from pathlib import Path

from dreambooth.checkpoint.load import check_input_file, open_checkpoint, sniff_format
from dreambooth.errors import UserError
from dreambooth.families.flux.files import describe_file
from dreambooth.families.sd.convert import analyze
from dreambooth.families.sd.detect import detect_family
from dreambooth.families.sd.spec import FAMILIES
from dreambooth.formats.convert import ConvertOptions


def inspect_file(path: Path, model_type: str = "auto", original_config: Path | None = None) -> dict:
    if sniff_format(check_input_file(Path(path))) == "safetensors":
        flux = describe_file(path)  # a Flux transformer, all-in-one checkpoint, or one of its parts
        if flux is not None:
            return flux
    ckpt = open_checkpoint(path)
    options = ConvertOptions(model_type=model_type, original_config=original_config)
    try:
        report = analyze(ckpt, options).summary()
    except UserError as exc:
        detection = detect_family(ckpt)
        if detection.family not in FAMILIES:
            # an unsupported file is still worth describing: that *is* the answer to "what is this?"
            return {
                "file": str(ckpt.path),
                "size_bytes": ckpt.path.stat().st_size,
                "family": detection.family,
                "tensors": len(ckpt.tensors),
                "evidence": detection.evidence,
                "supported": False,
            }
        raise exc
    report["tensors"] = len(ckpt.tensors)
    report["title"] = FAMILIES[report["family"]].title
    report["supported"] = True
    if ckpt.other_entries:
        report["other_entries"] = {k: v for k, v in ckpt.other_entries.items() if isinstance(v, int | float | str)}
    return report
