"""Soak: a long CPU training run of the tiny model, with the training process's memory and open files watched.

    .venv/bin/python bench/soak.py                 # 2,000 steps, a save every 50, --keep-last 3, samples at each save
    .venv/bin/python bench/soak.py --smoke         # 30 steps, a save every 10 (tests/test_bench_soak.py)

One `dreambooth --log-format json train …` process on the tiny random model (dreambooth/tiny_model.py, built in
code), 16 px, batch 1, no prior preservation, cached latents, one sample image (2 denoising steps) drawn at every
save, old checkpoints pruned by --keep-last. Every --every seconds the harness reads, from /proc/<pid> of the
training process: VmRSS (resident memory) and the number of entries in fd/ (open file descriptors), with the last
step the run reported. What a leak would look like: memory that climbs save after save (a pipeline, a sampler, a
tensor kept per checkpoint), descriptors that pile up (files, pipes, locks not closed).

The bound, checked and recorded in the result: after warm-up (the first --warmup-fraction of the steps, by which
every code path — step, save, sample, prune — has run several times), resident memory grows less than 5 %
(the median of the last fifth of the samples against the median of the fifth right after warm-up; medians, so
that one save's transient peak is not taken for growth), and the open descriptors stay within ±4 of their count
right after warm-up. Results: bench/results/soak.json (machine, versions, command, samples, verdict).
"""

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RSS_GROWTH_BOUND = 0.05
FD_BOUND = 4


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"cpu": cpu, "nproc": os.cpu_count(), "ram_gib": round(pages / 2**30, 1), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}  # fmt: skip


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("dreambooth", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["dreambooth_commit"] = git("rev-parse", "HEAD") or None
    out["dreambooth_tree_dirty"] = bool(git("status", "--porcelain"))
    return out


def git(*args: str) -> str:
    """git's answer, or "" where there is no git or no repository (the test image has neither)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def prepare(work: Path) -> tuple[Path, Path]:
    from dreambooth.demo.synthetic import write_instance_images
    from dreambooth.tiny_model import write_tiny_diffusers

    model, images = work / "model", work / "instance"
    if not (model / "model_index.json").is_file():
        write_tiny_diffusers(model, seed=0)
    if not images.is_dir():
        write_instance_images(images, n=4, seed=0)
    return model, images


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(VmRSS bytes, open descriptors) of a live process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def verdict(samples: list[dict], steps: int, warmup_fraction: float) -> dict:
    after = [s for s in samples if s["step"] is not None and s["step"] >= warmup_fraction * steps]
    if len(after) < 10:
        return {"ok": False, "reason": f"only {len(after)} samples after warm-up"}
    fifth = max(2, len(after) // 5)
    early, late = after[:fifth], after[-fifth:]
    rss_early, rss_late = statistics.median(s["rss"] for s in early), statistics.median(s["rss"] for s in late)
    growth = rss_late / rss_early - 1
    fd_base = statistics.median(s["fds"] for s in early)
    fd_min, fd_max = min(s["fds"] for s in after), max(s["fds"] for s in after)
    ok = growth < RSS_GROWTH_BOUND and fd_max - fd_base <= FD_BOUND and fd_base - fd_min <= FD_BOUND
    return {
        "ok": ok,
        "bound": f"RSS growth after warm-up < {RSS_GROWTH_BOUND:.0%} (median of last fifth vs first fifth); "
        f"open fds within ±{FD_BOUND} of the count after warm-up",
        "rss_after_warmup_bytes": int(rss_early),
        "rss_at_end_bytes": int(rss_late),
        "rss_growth": round(growth, 4),
        "rss_max_bytes": max(s["rss"] for s in after),
        "fds_after_warmup": fd_base,
        "fds_min": fd_min,
        "fds_max": fd_max,
        "samples_after_warmup": len(after),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between /proc samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--smoke", action="store_true", help="30 steps, a save every 10: for the test")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "output" / "soak")
    parser.add_argument("--result", type=Path, default=None, help="default: bench/results/soak[-smoke].json")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.save_every, args.every, args.warmup_fraction = 30, 10, 0.2, 0.25
    result_path = args.result or RESULTS / ("soak-smoke.json" if args.smoke else "soak.json")

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model, images = prepare(work)
    output = work / "run"
    if output.exists():
        import shutil

        shutil.rmtree(output)
    command = [
        "dreambooth", "--log-format", "json", "train", "--model", str(model), "--instance-data-dir", str(images),
        "--instance-prompt", "a sks shape", "--output", str(output), "--resolution", "16", "--train-batch-size", "1",
        "--max-train-steps", str(args.steps), "--save-interval", str(args.save_every),
        "--keep-last", str(args.keep_last), "--save-sample-prompt", "a sks shape", "--n-save-sample", "1",
        "--save-infer-steps", "2", "--learning-rate", "1e-4", "--seed", "0",
    ]  # fmt: skip
    argv = [sys.executable, "-c", "from dreambooth.cli import main; main()", *command[1:]]
    started = time.time()
    # one thread: on a shared CPU, OpenMP's spinning threads fighting other processes cost more than they give
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = {"step": None, "saves": 0, "last_event": None}
    stderr_tail: list[str] = []

    def read_events() -> None:
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "train_step":
                state["step"] = event["step"]
            elif event.get("event") == "checkpoint_saved":
                state["saves"] += 1
            state["last_event"] = event.get("event")

    def read_stderr() -> None:
        for line in proc.stderr:
            stderr_tail.append(line)
            del stderr_tail[:-40]

    threads = [threading.Thread(target=f, daemon=True) for f in (read_events, read_stderr)]
    for t in threads:
        t.start()
    samples = []
    while proc.poll() is None:
        sample = proc_sample(proc.pid)
        if sample:
            samples.append({"t": round(time.time() - started, 1), "step": state["step"], "saves": state["saves"],
                            "rss": sample[0], "fds": sample[1]})  # fmt: skip
        time.sleep(args.every)
    for t in threads:
        t.join(timeout=10)
    seconds = round(time.time() - started, 1)
    report = {
        "benchmark": "soak",
        "smoke": args.smoke,
        "machine": machine(),
        "versions": versions(),
        "command": shlex.join(command),
        "environment": {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
        "settings": {
            "steps": args.steps,
            "save_every": args.save_every,
            "keep_last": args.keep_last,
            "sample_every_s": args.every,
            "warmup_fraction": args.warmup_fraction,
            "model": "tiny_model.py",
            "resolution": 16,
            "sampling": "1 image, 2 steps, at every save",
        },
        "exit_code": proc.returncode,
        "seconds": seconds,
        "steps_reached": state["step"],
        "checkpoints_saved": state["saves"],
        "checkpoints_left": sorted(p.name for p in (output / "checkpoints").glob("step-*")),
        "verdict": verdict(samples, args.steps, args.warmup_fraction),
        # every sample for a short run; about 400 evenly spread for a long one
        "samples": samples[:: max(1, len(samples) // 400)],
    }
    if proc.returncode != 0:
        report["stderr_tail"] = "".join(stderr_tail)[-4000:]
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(report, indent=2) + "\n")
    v = report["verdict"]
    print(f"soak: exit {proc.returncode}, {state['step']} steps, {state['saves']} saves in {seconds} s; "
          f"RSS growth {v.get('rss_growth')}, fds {v.get('fds_min')}–{v.get('fds_max')}: "
          f"{'within' if v['ok'] else 'OUTSIDE'} the bound → {result_path}")  # fmt: skip
    return 0 if proc.returncode == 0 and v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
