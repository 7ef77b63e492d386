"""Runs of `dreambooth` that the fault tests kill, stop and starve, each in its own process, started warm.

Importing torch and diffusers costs 15–40 s of CPU on the shared test machine, which fifty kill-and-rerun trials
cannot pay twice each. So one server process imports everything once and *forks* a child per run; the child runs
`dreambooth.cli.main(args)` exactly as the console script does (same entry point, same error handling, its own pid,
its own run lock), writes its JSON events (`--log-format json`) to a file the test reads as they come, and is killed
with a real SIGKILL from the test: no handler runs, nothing is cleaned up, as with `kill -9` or the OOM killer.
Nothing in the product is hooked or patched; where a kill lands is chosen from the outside (see test_faults.py).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SERVER = r"""
import json, os, sys, traceback
# everything a run imports, imported once: a forked run starts warm. No torch op runs here, so no thread pool
# exists yet to be broken by fork.
import torch, diffusers, transformers
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
import dreambooth.cli, dreambooth.pipeline, dreambooth.train, dreambooth.prior, dreambooth.sample
import dreambooth.formats.convert, dreambooth.formats.export, dreambooth.formats.lora
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, job["log"]), (2, job["err"])):
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, fd)
                os.close(out)
            code = 0
            try:
                dreambooth.cli.main(job["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Job:
    """One forked run: its pid, its events as they arrive, and (once it ends) its exit status."""

    server: "Runner"
    pid: int
    log: Path
    err: Path
    events: list[dict] = field(default_factory=list)
    _offset: int = 0
    status: int | None = None

    def poll_events(self) -> list[dict]:
        with self.log.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "text", "text": line})
        return self.events

    def alive(self) -> bool:
        return self.status is None and _running(self.pid)

    def wait_for_events(self, count: int, timeout: float = 600) -> bool:
        """Until the run has emitted `count` events (True) or ended first (False)."""
        deadline = time.monotonic() + timeout
        while len(self.poll_events()) < count:
            if not self.alive():
                self.poll_events()
                return len(self.events) >= count
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {self.pid} emitted {len(self.events)} of {count} events in {timeout} s")
            time.sleep(0.005)
        return True

    def wait_for(self, predicate, timeout: float = 600) -> bool:
        """Until the run emits an event for which `predicate` holds (True), or ends first (False)."""
        deadline = time.monotonic() + timeout
        while not any(predicate(e) for e in self.poll_events()):
            if not self.alive():
                return any(predicate(e) for e in self.poll_events())
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {self.pid}: no such event in {timeout} s")
            time.sleep(0.005)
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def wait(self, timeout: float = 900) -> int:
        if self.status is None:
            self.status = self.server._read("status", timeout)
            self.poll_events()
        return self.status

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


class Runner:
    """The server process; `start(args, cwd)` forks one `dreambooth ARGS…` run. One run at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        # one thread per run: on a shared CPU, OpenMP's spinning threads make a tiny model's step 5x slower
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "server.err").open("w"),
            text=True,
            env=env,
            cwd=REPO,
        )
        self._read("ready", 600)
        self.count = 0
        self.current: Job | None = None

    def _read(self, key: str, timeout: float):
        import select

        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"fault harness: no {key!r} from the server in {timeout} s")
            line = self.proc.stdout.readline()
            if not line:
                tail = (self.workdir / "server.err").read_text()[-2000:]
                raise RuntimeError(f"fault harness: the server ended: {tail}")
            message = json.loads(line)
            if key in message:
                return message[key]

    def start(self, args: list, cwd: Path, env: dict | None = None) -> Job:
        if self.current is not None and self.current.status is None:  # a test that failed mid-run left it going
            self.current.cont()
            self.current.kill()
            self.current.wait()
        self.count += 1
        log, err = self.workdir / f"run-{self.count}.jsonl", self.workdir / f"run-{self.count}.err"
        job = {"args": [str(a) for a in args], "cwd": str(cwd), "env": env or {}, "log": str(log), "err": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self._read("pid", 60)
        while not log.exists():
            time.sleep(0.001)
        self.current = Job(self, pid, log, err)
        return self.current

    def run(self, args: list, cwd: Path, env: dict | None = None, timeout: float = 900) -> Job:
        job = self.start(args, cwd, env)
        job.wait(timeout)
        return job

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
