"""Derive the bundled CLIP tokenizer files from the BPE vocabulary inside the `open_clip_torch` wheel.

Stable Diffusion 1.x (OpenAI CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) use the same byte-level BPE: 49,152
ranked merges over 256 byte symbols, plus `<|startoftext|>` / `<|endoftext|>` — 49,408 tokens. The hub's
`vocab.json` / `merges.txt` are a re-encoding of that one file, so we rebuild them here instead of downloading
them at run time. Run once by a maintainer (needs PyPI), output committed under dreambooth/assets/tokenizer/:

    python tools/derive_clip_tokenizer.py            # downloads open_clip_torch==3.3.0 with pip, no deps
    python tools/derive_clip_tokenizer.py --bpe path/to/bpe_simple_vocab_16e6.txt.gz
"""

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OUT_DIR = Path(__file__).resolve().parents[1] / "dreambooth" / "assets" / "tokenizer"
NUM_MERGES = 49152 - 256 - 2  # the ranks CLIP keeps: 48,894 (same slice as CLIP's simple_tokenizer.py)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table, which CLIP's BPE operates on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def read_bpe_from_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", OPEN_CLIP_WHEEL, "-d", tmp]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(BPE_MEMBER)


def derive(bpe_gz: bytes, out_dir: Path) -> None:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: from the open_clip wheel)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    derive(args.bpe.read_bytes() if args.bpe else read_bpe_from_wheel(), args.out)
    print(f"wrote {args.out}/vocab.json and merges.txt")


if __name__ == "__main__":
    main()
