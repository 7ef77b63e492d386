"""Full fine-tune vs LoRA: step time, peak RAM, checkpoint and export size, on the CPU (issue 13, items 3 and 8).

    .venv/bin/python bench/lora.py                    # SD 1.5 at full size (random weights), 128 px, CPU
    .venv/bin/python bench/lora.py --configs lora-r4,full --steps 8
    .venv/bin/python bench/lora.py --smoke            # the tiny test model, seconds (tests/test_bench_lora.py)

Each configuration is its own `dreambooth --log-format json train …` process: batch 1, no prior preservation, fp32,
cached latents (the default), torch AdamW, one save at the end with --export-single-file. Measured per run:
- s/step: differences of consecutive `train_step` events' timestamps (ms resolution); the first step's duration
  is counted from `train_start`. Reported: the median over the steps after the first --warmup (2) steps.
- peak RSS: the run's own train_report.json `peak_memory.cpu_max_rss_bytes` (getrusage of the training process),
  and /usr/bin/time -v's maximum resident set size when that tool exists.
- checkpoint size: every file under checkpoints/step-N, a hard-linked inode counted once (full checkpoints
  hard-link the frozen parts they did not train to the base model's files: those bytes are reported separately,
  as `checkpoint_linked_bytes`, and are not new disk space).
- export size: the file --export-single-file wrote (export/*.safetensors).
The model is built in code by bench/train.py (`build_model`, `prepare_inputs`): shapes, not values, decide speed
and memory. Results: bench/results/lora-cpu-<n>core.json and .md.
"""

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load_train_harness():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_train_harness()

# name, what, extra `dreambooth train` flags; in priority order
CONFIGS = [
    ("lora-r4", "LoRA rank 4, UNet attention", ["--adapter", "lora", "--lora-rank", "4"]),
    ("lora-r16", "LoRA rank 16, UNet attention", ["--adapter", "lora", "--lora-rank", "16"]),
    ("lora-r64", "LoRA rank 64, UNet attention", ["--adapter", "lora", "--lora-rank", "64"]),
    (
        "lora-r16-te",
        "LoRA rank 16, UNet attention + text encoder",
        ["--adapter", "lora", "--lora-rank", "16", "--train-text-encoder"],
    ),
    ("full", "full fine-tune, UNet only", ["--adapter", "full"]),
]
FULL_MIN_AVAILABLE_GIB = 16  # fp32 AdamW on 860 M parameters: weights + grads + 2 states ≈ 13.8 GiB, plus the rest


def train_command(extra: list[str], model: Path, instance: Path, output: Path, resolution: int, steps: int):
    cmd = ["dreambooth", "--log-format", "json", "train", "--model", str(model), "--output", str(output)]
    cmd += ["--instance-data-dir", str(instance), "--instance-prompt", harness.INSTANCE_PROMPT]
    cmd += ["--no-with-prior-preservation", "--resolution", str(resolution), "--train-batch-size", "1"]
    cmd += ["--max-train-steps", str(steps), "--save-interval", str(steps), "--export-single-file"]
    cmd += ["--mixed-precision", "no", "--no-use-8bit-adam", "--no-gradient-checkpointing", "--cache-latents"]
    cmd += ["--learning-rate", "1e-4", "--lr-scheduler", "constant", "--seed", "0"]
    return cmd + extra


def tree_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the distinct inodes under folder, bytes of those with more than one link)."""
    seen: set[tuple[int, int]] = set()
    total = linked = 0
    for path in folder.rglob("*"):
        st = path.lstat()
        if not path.is_file() or path.is_symlink() or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_size
        if st.st_nlink > 1:
            linked += st.st_size
    return total, linked


def mem_available_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return round(int(match[1]) / 2**20, 1) if match else None


def mem_total_gib() -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return round(int(match[1]) / 2**20, 1) if match else None


def run_one(name: str, what: str, extra: list[str], inputs, work: Path, env: dict, args) -> dict:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    output = out / "output"
    command = train_command(extra, inputs.model, inputs.instance_dir, output, inputs.resolution, args.steps)
    row: dict = {"name": name, "what": what, "command": shlex.join(command), "steps": args.steps}
    if name == "full" and not args.smoke:
        available = mem_available_gib()
        row["mem_available_gib_before"] = available
        if available is not None and available < FULL_MIN_AVAILABLE_GIB:
            return row | {
                "status": "skipped",
                "reason": f"MemAvailable {available} GiB < {FULL_MIN_AVAILABLE_GIB} GiB needed for fp32 AdamW",
            }
    argv = [sys.executable, "-m", "dreambooth", *command[1:]]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    timev = out / "time-v.txt"
    if timer:
        argv = [timer, "-v", "-o", str(timev), *argv]
    print(f"── {name}: {row['command']}", flush=True)
    started = time.perf_counter()
    with open(out / "log.txt", "wb") as log:
        try:
            rc = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.run_timeout_s
            )
            rc = rc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    row["wall_s"] = round(time.perf_counter() - started, 1)
    row["returncode"] = rc
    text = (out / "log.txt").read_text(errors="replace")
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    start = [e["time"] for e in events if e.get("event") == "train_start"]
    steps = [(e["step"], e["time"]) for e in events if e.get("event") == "train_step"]
    marks = start[-1:] + [t for _, t in steps]
    durations = [round(b - a, 3) for a, b in itertools.pairwise(marks)] if start else []
    row["step_s"] = durations
    steady = durations[args.warmup :]
    row["steps_measured"] = len(steady)
    row["step_s_median"] = round(statistics.median(steady), 3) if steady else None
    report_path = output / "train_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        row["peak_rss_bytes"] = (report.get("peak_memory") or {}).get("cpu_max_rss_bytes")
        row["training_seconds"] = report.get("training_seconds")
        row["trainable_parameters"] = report.get("trainable_parameters")
    else:
        row["peak_rss_bytes"] = None
    if timev.is_file():
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timev.read_text())
        row["time_v_max_rss_bytes"] = int(match[1]) * 1024 if match else None
    ckpt = output / "checkpoints" / f"step-{args.steps}"
    if ckpt.is_dir():
        total, linked = tree_bytes(ckpt)
        row |= {"checkpoint": str(ckpt.relative_to(output)), "checkpoint_bytes": total}
        row |= {
            "checkpoint_linked_bytes": linked,
            "checkpoint_files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())[:40],
        }
    else:
        row["checkpoint_bytes"] = None
    exports = sorted((output / "export").glob("*.safetensors")) if (output / "export").is_dir() else []
    row["export_files"] = [p.name for p in exports]
    row["export_bytes"] = sum(p.stat().st_size for p in exports) if exports else None
    ok = rc == 0 and row["step_s_median"] is not None and row["checkpoint_bytes"] and row["export_bytes"]
    row["status"] = "ok" if ok else ("timeout" if rc is None else "failed")
    if not ok:
        row["log_tail"] = text[-3000:]
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    print(
        f"   {row['status']}: median {row['step_s_median']} s/step, rss {row['peak_rss_bytes']}, "
        f"ckpt {row['checkpoint_bytes']}, export {row['export_bytes']}, wall {row['wall_s']} s",
        flush=True,
    )
    return row


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = harness.versions()
    try:
        out["peft"] = version("peft")
    except PackageNotFoundError:
        out["peft"] = None
    return out


def _gib(n) -> str:
    return "not measured" if n is None else f"{n / 2**30:.2f} GiB"


def _size(n) -> str:
    if n is None:
        return "not measured"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def markdown_table(report: dict) -> str:
    s = report["settings"]
    m = report["machine"]
    head = (
        f"{'**Smoke run (tiny model): timings are not a benchmark.** ' if report['smoke'] else ''}"
        f"{s['model']}, {s['resolution']} px, batch 1, fp32, no prior preservation, cached latents, "
        f"{s['steps']} steps, median s/step over the steps after the first {s['warmup']}; "
        f"CPU: {m['nproc']} cores, {m['ram_gib']} GiB RAM; torch {report['versions']['torch']}, "
        f"diffusers {report['versions']['diffusers']}, peft {report['versions']['peft']}; "
        f"commit {report['versions']['dreambooth_commit']}.\n\n"
    )
    rows = [
        "| config | what | s/step (median) | peak RSS | checkpoint on disk | export file | status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        med = "not measured" if r.get("step_s_median") is None else f"{r['step_s_median']:.2f}"
        ckpt = _size(r.get("checkpoint_bytes"))
        if r.get("checkpoint_linked_bytes"):
            ckpt += f" (of which {_size(r['checkpoint_linked_bytes'])} hard-linked)"
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        rows.append(
            f"| {r['name']} | {r['what']} | {med} | {_gib(r.get('peak_rss_bytes'))} | {ckpt} | "
            f"{_size(r.get('export_bytes'))} | {status} |"
        )
    return head + "\n".join(rows) + "\n"


def write(report: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = f"lora-cpu-{report['machine']['nproc']}core" + ("-smoke" if report["smoke"] else "")
    path = results_dir / f"{slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown_table(report))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny test model, 32 px, a few steps")
    parser.add_argument("--configs", help="comma-separated: " + ",".join(c[0] for c in CONFIGS))
    parser.add_argument("--steps", type=int, help="default 8 (smoke 4)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--resolution", type=int, help="default 128 (smoke 32)")
    parser.add_argument("--run-timeout-s", type=float, default=1200)
    parser.add_argument("--work-dir", type=Path, help="model, images, outputs (default: a folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the run outputs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 8)
    resolution = args.resolution or (32 if args.smoke else 128)
    names = args.configs.split(",") if args.configs else [c[0] for c in CONFIGS]
    known = {c[0]: c for c in CONFIGS}
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown configs: {', '.join(unknown)}")
    if args.smoke and not args.configs:
        names = ["lora-r4", "full"]

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    env = harness.child_env(args.smoke, work)
    if not args.smoke:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, also on a machine with a GPU
    report = {
        "benchmark": "full fine-tune vs LoRA, dreambooth train, CPU",
        "smoke": args.smoke,
        "machine": {
            "nproc": os.cpu_count(),
            "ram_gib": mem_total_gib(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "versions": versions(),
        "settings": {
            "model": "tiny SD 1.x (dreambooth/tiny_model.py)" if args.smoke else "SD 1.5 full size, random weights",
            "resolution": resolution,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": 1,
            "precision": "fp32",
            "prior_preservation": False,
            "cached_latents": True,
            "optimizer": "torch AdamW",
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
        },
        "harness_command": shlex.join([sys.executable, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": [],
    }
    try:
        t = time.perf_counter()
        inputs = harness.prepare_inputs(work, tiny=args.smoke, resolution=resolution, steps=args.steps, env=env)
        report["setup_s"] = round(time.perf_counter() - t, 1)
        for name in names:
            _, what, extra = known[name]
            report["results"].append(run_one(name, what, extra, inputs, work, env, args))
            report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write(report, args.results_dir)
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    path = write(report, args.results_dir)
    print(markdown_table(report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
