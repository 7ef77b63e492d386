"""Conversion speed and memory: ours vs diffusers' `from_single_file` + `save_pretrained`, vs raw I/O.

    .venv/bin/python bench/convert.py [--src FILE] [--json bench/results/convert-<machine>.json]

Without --src it writes a full-size random SD 1.x fp16 checkpoint (real key layout and shapes, ~2.1 GB).
Each contender runs in its own process (after `sync`), so peak RSS (ru_maxrss) is its own; times are the
library call, after imports (import time is reported separately). The raw baseline reads the file and
writes the same bytes.
Targets (issue 3): ours ≥ 2× faster than diffusers, ≤ 1.5× the raw read+write time, peak RSS ≤ 1.5× file size.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RAW = """
import sys, time
src, dest = sys.argv[1:3]
t = time.perf_counter()
with open(src, "rb") as f, open(dest, "wb") as g:
    while block := f.read(64 << 20):
        g.write(block)
print(time.perf_counter() - t, 0.0)
"""

OURS = """
import sys, time
t0 = time.perf_counter()
from dreambooth.checkpoint.convert import ConvertOptions, convert
imported = time.perf_counter() - t0
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], ConvertOptions(model_type="sd1"))
print(time.perf_counter() - t, imported)
"""

DIFFUSERS = """
import sys, time
t0 = time.perf_counter()
from diffusers import StableDiffusionPipeline
imported = time.perf_counter() - t0
t = time.perf_counter()
pipe = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[3], local_files_only=True)
pipe.save_pretrained(sys.argv[2], safe_serialization=True)
print(time.perf_counter() - t, imported)
"""


def run(code: str, *args: str) -> dict:
    # Flush earlier runs' dirty pages first, so that no contender pays for another's writeback.
    os.sync()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    env |= {"DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"contender failed (status {status}): {out}")
    seconds, imported = map(float, out.split()[-2:])
    return {"seconds": round(seconds, 2), "import_seconds": round(imported, 2), "peak_rss_gb": usage.ru_maxrss / 1e6}


MAKE_SOURCE = """
import sys, torch
from safetensors.torch import save_file
from tests.original_layouts import SD1, original_state_dict
save_file(original_state_dict(SD1, dtype=torch.float16), sys.argv[1])
print(0, 0)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per contender; the best is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        src = args.src or tmp / "sd1-fp16.safetensors"
        if not args.src:  # in a child: ru_maxrss of later children would count this process's pages (fork)
            run(MAKE_SOURCE, str(src))
        size_gb = src.stat().st_size / 1e9
        run(RAW, str(src), str(tmp / "warm"))  # bring the file into the page cache for everyone

        results: dict[str, dict] = {}
        for name, code in (("raw_read_write", RAW), ("ours", OURS), ("diffusers", DIFFUSERS)):
            best = None
            for i in range(args.repeat):
                dest = tmp / f"{name}-{i}"
                extra = [str(tmp / "ours-0")] if name == "diffusers" else []  # config: our folder, offline
                r = run(code, str(src), str(dest), *extra)
                best = r if best is None or r["seconds"] < best["seconds"] else best
                if name != "ours" or i:
                    shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
            results[name] = best
            print(f"{name:>15}: {best['seconds']:7.2f} s   peak RSS {best['peak_rss_gb']:.2f} GB", flush=True)

    report = {
        "benchmark": "convert SD 1.x single file → diffusers folder",
        "file_gb": round(size_gb, 3),
        "results": results,
        "speedup_vs_diffusers": round(results["diffusers"]["seconds"] / results["ours"]["seconds"], 2),
        "ratio_to_raw_io": round(results["ours"]["seconds"] / results["raw_read_write"]["seconds"], 2),
        "peak_rss_over_file_size": round(results["ours"]["peak_rss_gb"] / size_gb, 2),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps({k: report[k] for k in ("speedup_vs_diffusers", "ratio_to_raw_io", "peak_rss_over_file_size")}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "diffusers", "transformers", "safetensors", "dreambooth")}


if __name__ == "__main__":
    main()
