"""How fast `dreambooth serve` answers: page loads, and the delay from a run writing an event to the page getting it.

    python bench/ui_latency.py [--rounds 20] [--out bench/results/ui-latency.md]

It starts `dreambooth serve` on a free port over a scratch output folder holding one finished run (a 400-step loss
history, two checkpoints of samples, an export), then times over HTTP on this machine:
- each page and the run's JSON (what the run page fetches first), `--rounds` times, median and slowest;
- event latency: with the run page's event stream open, a `train_step` line is appended to the run's events.jsonl
  and timed until it arrives over server-sent events (the server looks every POLL_SECONDS).
"""

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

PATHS = ("/", "/run?run=bench-run", "/new", "/api/runs", "/api/run?run=bench-run", "/static/app.js")


def scratch_run(output: Path) -> None:
    folder = output / "bench-run"
    for step in (200, 400):
        samples = folder / "checkpoints" / f"step-{step}" / "samples"
        samples.mkdir(parents=True)
        (samples.parent / "dreambooth.json").write_text("{}")
        for i in range(4):
            Image.new("RGB", (512, 512), (i * 60, 80, 120)).save(samples / f"prompt0-{i:02d}.png")
    (folder / "export").mkdir()
    (folder / "export" / "model.safetensors").write_bytes(os.urandom(32 << 20))
    now = time.time() - 1000
    lines = [{"event": "train_start", "time": now, "max_train_steps": 1000, "family": "sd1", "adapter": "lora"}]
    lines += [{"event": "train_step", "time": now + s, "step": s, "loss": 1 / s, "lr": 1e-4} for s in range(1, 401)]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def timed(client: httpx.Client, path: str, rounds: int) -> dict:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = client.get(path)
        response.raise_for_status()
        seconds.append(time.perf_counter() - started)
    return {
        "median_ms": 1000 * statistics.median(seconds),
        "max_ms": 1000 * max(seconds),
        "bytes": len(response.content),
    }


def event_latency(base: str, events: Path, rounds: int) -> dict:
    arrived: dict[int, float] = {}
    ready = threading.Event()

    def listen() -> None:
        with httpx.stream(
            "GET", f"{base}/api/run/events", params={"run": "bench-run", "from": events.stat().st_size}, timeout=None
        ) as s:
            ready.set()
            for line in s.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event.get("event") == "train_step" and event.get("step", 0) > 1000:
                        arrived[event["step"]] = time.perf_counter()
                        if len(arrived) == rounds:
                            return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(30)
    time.sleep(1.0)
    delays = []
    for i in range(rounds):
        step = 1001 + i
        written = time.perf_counter()
        with events.open("a") as f:
            f.write(json.dumps({"event": "train_step", "time": time.time(), "step": step, "loss": 0.1}) + "\n")
        deadline = time.time() + 10
        while step not in arrived and time.time() < deadline:
            time.sleep(0.005)
        delays.append(arrived[step] - written)
        time.sleep(random.uniform(0.2, 0.8))  # at every phase of the server's polling
    return {"median_ms": 1000 * statistics.median(delays), "max_ms": 1000 * max(delays)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name in ("models", "data", "output", "cache"):
            (root / name).mkdir()
        scratch_run(root / "output")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "dreambooth", "serve", "--port", str(port),
                   *(f"--{n}={root / n}" for n in ("models", "data", "output", "cache"))]  # fmt: skip
        server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            server.stdout.readline()
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                client.get("/").raise_for_status()  # warm: templates compiled
                rows = {path: timed(client, path, args.rounds) for path in PATHS}
            latency = event_latency(base, root / "output" / "bench-run" / "events.jsonl", args.rounds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    lines = [
        "# dreambooth serve: page loads and event latency",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}. Command: `python bench/ui_latency.py --rounds {args.rounds}` (HTTP on "
        "127.0.0.1, one client; a finished run with 400 steps of losses, 8 samples and a 32 MiB export).",
        "",
        "| request | median | slowest | bytes |",
        "|---|---|---|---|",
        *(f"| `GET {p}` | {r['median_ms']:.1f} ms | {r['max_ms']:.1f} ms | {r['bytes']} |" for p, r in rows.items()),
        "",
        f"Event latency (a line appended to events.jsonl → received by the page's event stream), {args.rounds} "
        f"events: median {latency['median_ms']:.0f} ms, slowest {latency['max_ms']:.0f} ms (the server looks "
        "for new lines every 0.5 s).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
