"""What a run folder says, read from disk only: status, progress, losses, samples, exports.

A run folder is OUTPUT itself or a folder directly under it holding a run's files (manifest.json of `dreambooth run`,
train_report.json, checkpoints/, the event stream EVENTS of a run the page started, or the run lock). Nothing here
is cached between requests except the exports' sha256 (by path, size and modification time): a server restarted
mid-run finds every run as it is.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dreambooth import runlock
from dreambooth.fileio import sha256_file

EVENTS = "events.jsonl"  # the run's JSON event stream (`--log-format json`), as the page starts runs
CONSOLE = "console.log"  # what the run wrote to stderr
COMMAND = "ui-command.json"  # the command the page started the run with (Resume starts it again)
MARKERS = ("manifest.json", "train_report.json", "checkpoints", EVENTS, runlock.LOCK_FILE)
STATUSES = ("running", "done", "stopped", "failed", "diverged")
_SHA256: dict[tuple[str, int, int], str] = {}


@dataclass
class RunSummary:
    name: str  # the folder's path under OUTPUT ("." for OUTPUT itself)
    status: str
    family: str | None = None
    adapter: str | None = None
    step: int = 0
    total: int | None = None
    loss: float | None = None
    started: float | None = None  # seconds since the epoch
    elapsed: float | None = None  # seconds
    eta: float | None = None  # seconds left, from the recent steps' rate
    checkpoint: str | None = None  # the last finished checkpoint, e.g. "step-400"
    message: str | None = None  # why it failed or diverged
    doing: str | None = None  # while it runs: the stage under way ("class images 16/32", "saving checkpoint step-8")
    pid: int | None = None  # the running process (the lock's holder)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EventLog:
    """What a run's event stream holds, folded: the last train_start, every step's losses, checkpoints, errors."""

    start: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    finished: dict | None = None
    errors: list[str] = field(default_factory=list)
    first_time: float | None = None
    last_time: float | None = None
    stages: list[str] = field(default_factory=list)
    doing: str | None = None  # the stage under way, e.g. "class images 16/32" (None between stages)


def is_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).exists() for marker in MARKERS)


def run_folders(output: Path) -> list[Path]:
    """OUTPUT (when it is a run) and every run folder directly under it."""
    found = [output] if is_run(output) else []
    if output.is_dir():
        found += [p for p in sorted(output.iterdir()) if not p.name.startswith(".") and is_run(p)]
    return found


def tail_events(folder: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The events of the run's stream from byte `offset` on, and the offset after the last complete line (a line
    being written is left for the next read): the live page reads only what is new."""
    try:
        with (folder / EVENTS).open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "event" in event:
            out.append(event)
    return out, offset + end


def read_events(folder: Path) -> list[dict]:
    """Every complete JSON line of the event stream."""
    return tail_events(folder)[0]


def fold(events: list[dict]) -> EventLog:
    log = EventLog()
    for event in events:
        kind, when = event.get("event"), event.get("time")
        if isinstance(when, (int, float)):
            log.first_time = when if log.first_time is None else log.first_time
            log.last_time = when
        if kind == "train_start":
            log.start = event
        elif kind == "train_step" and isinstance(event.get("step"), int):
            log.steps.append(event)
        elif kind == "checkpoint_saved" and isinstance(event.get("step"), int):
            log.checkpoints.append(event["step"])
        elif kind == "run_finished":
            log.finished = event
        elif kind == "error":
            log.errors.append(str(event.get("message")))
        elif kind == "stage_start":
            log.stages.append(str(event.get("stage")))
            log.doing = str(event.get("stage"))
        elif kind == "stage_end":
            log.doing = None
        elif kind == "progress" and event.get("stage") != "training":  # training: the step count says it
            done, total = event.get("done"), event.get("total")
            log.doing = f"{event.get('stage')} {done}/{total}" if done != total else None
    return log


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def finished_checkpoints(folder: Path) -> list[int]:
    """The steps of the checkpoints whose saving finished (a folder being written has a scratch name)."""
    steps = []
    for entry in (folder / "checkpoints").glob("step-*"):
        number = entry.name.removeprefix("step-")
        if number.isdigit() and (entry / "dreambooth.json").exists():
            steps.append(int(number))
    return sorted(steps)


def summarize(
    output: Path, folder: Path, *, started_here: bool = False, now: float | None = None, events: list | None = None
) -> RunSummary:
    """FOLDER's run as the runs list shows it. `started_here`: a process the server started for it is still
    alive — running, even after it let go of the lock while it finishes. `events`: its stream, when read already."""
    now = time.time() if now is None else now
    name = folder.relative_to(output).as_posix() if folder != output else "."
    log = fold(read_events(folder) if events is None else events)
    manifest = _json(folder / "manifest.json")
    report = _json(folder / "train_report.json")
    holder = runlock.holder(folder)
    checkpoints = finished_checkpoints(folder)
    start = log.start or {}
    summary = RunSummary(
        name=name,
        status="running" if started_here else _status(holder, log, manifest, report),
        family=start.get("family") or report.get("family"),
        adapter=start.get("adapter") or report.get("adapter"),
        total=start.get("max_train_steps") or (report.get("settings") or {}).get("max_train_steps"),
        checkpoint=f"step-{checkpoints[-1]}" if checkpoints else None,
        pid=(holder or {}).get("pid") if holder is not None else None,
    )
    if log.steps:
        summary.step, summary.loss = log.steps[-1]["step"], log.steps[-1].get("loss")
    elif report:
        summary.step = report.get("steps") or 0
        summary.loss = report.get("final_loss")
    summary.started = log.first_time or _started(manifest, folder)
    if summary.status == "running":
        summary.doing = log.doing
    if summary.status == "running" and summary.started:
        summary.elapsed = now - summary.started
        summary.eta = _eta(log.steps, summary.total)
    else:
        summary.elapsed = manifest.get("seconds") or report.get("seconds") or _span(log)
    if summary.status in ("failed", "diverged"):
        summary.message = _failure(log, report)
    return summary


def _status(holder: dict | None, log: EventLog, manifest: dict, report: dict) -> str:
    if holder is not None:
        return "running"
    if (report.get("stopped") or {}).get("reason") == "diverged":
        return "diverged"
    if log.finished is not None:
        return "done" if log.finished.get("status") == "done" else "failed"
    state = manifest.get("status")
    if state == "done":
        return "done"
    if state == "interrupted":
        return "stopped"
    if state == "failed" or log.errors:
        return "failed"
    if report and not report.get("stopped"):
        return "done"  # `dreambooth train` has no manifest: its report is written when it finishes
    return "stopped"  # ended without saying why (killed): what it saved is still there


def _started(manifest: dict, folder: Path) -> float | None:
    try:
        return (folder / "manifest.json").stat().st_mtime if not manifest else _iso(manifest.get("started_at"))
    except OSError:
        return None


def _iso(text) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _span(log: EventLog) -> float | None:
    if log.first_time is None or log.last_time is None:
        return None
    return log.last_time - log.first_time


def _eta(steps: list[dict], total: int | None, window: int = 20) -> float | None:
    """Seconds left at the rate of the last `window` steps (of this process: a resume restarts the clock)."""
    recent = [s for s in steps[-window:] if isinstance(s.get("time"), (int, float))]
    if total is None or len(recent) < 2:
        return None
    done = recent[-1]["step"] - recent[0]["step"]
    seconds = recent[-1]["time"] - recent[0]["time"]
    if done <= 0 or seconds <= 0:
        return None
    return max(0.0, (total - recent[-1]["step"]) * seconds / done)


def _failure(log: EventLog, report: dict) -> str | None:
    stopped = report.get("stopped") or {}
    if stopped.get("message"):
        return str(stopped["message"])
    return log.errors[-1] if log.errors else None


def list_runs(output: Path, started_here=lambda folder: False) -> list[RunSummary]:
    """Every run under OUTPUT, newest first (`started_here(folder)`: see `summarize`)."""
    runs = [summarize(output, folder, started_here=started_here(folder)) for folder in run_folders(output)]
    return sorted(runs, key=lambda r: r.started or 0.0, reverse=True)


def losses(folder: Path, events: list[dict]) -> dict:
    """The loss plot's data: per step the instance loss, class loss and learning rate (the event stream while it
    runs; the report's record of a run started elsewhere)."""
    log = fold(events)
    if log.steps:
        by_step = {s["step"]: s for s in log.steps}  # a resumed run repeats no step, but keep the last
        steps = sorted(by_step)
        return {
            "step": steps,
            "loss": [by_step[s].get("loss") for s in steps],
            "class_loss": [by_step[s].get("class_loss") for s in steps],
            "lr": [by_step[s].get("lr") for s in steps],
        }
    recorded = _json(folder / "train_report.json").get("losses") or {}
    instance = recorded.get("instance") or []
    first = _json(folder / "train_report.json").get("first_step") or 1
    return {
        "step": list(range(first, first + len(instance))),
        "loss": instance,
        "class_loss": recorded.get("class") or [None] * len(instance),
        "lr": recorded.get("lr") or [None] * len(instance),
    }


def samples(output: Path, folder: Path) -> list[dict]:
    """Each checkpoint's sample images (and the run's own samples/), oldest checkpoint first, as paths under
    OUTPUT."""
    found = []
    for step in finished_checkpoints(folder):
        images = sorted((folder / "checkpoints" / f"step-{step}" / "samples").glob("*.png"))
        found += [{"step": step, "path": p.relative_to(output).as_posix(), "name": p.name} for p in images]
    found += [
        {"step": None, "path": p.relative_to(output).as_posix(), "name": p.name}
        for p in sorted((folder / "samples").glob("*.png"))
    ]
    return found


def exports(output: Path, folder: Path) -> list[dict]:
    """The exported files (OUTPUT/…/export) with size and sha256."""
    found = []
    for path in sorted((folder / "export").glob("*")):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            if key not in _SHA256:
                _SHA256[key] = sha256_file(path)
            found.append(
                {
                    "name": path.name,
                    "path": path.relative_to(output).as_posix(),
                    "size": stat.st_size,
                    "sha256": _SHA256[key],
                }
            )
    return found


def log_lines(folder: Path, events: list[dict], count: int = 30) -> list[str]:
    """The last lines the run wrote: its events as text, then what it wrote to stderr."""
    lines = [_event_line(e) for e in events[-count:] if e.get("event") != "progress"]
    try:
        with (folder / CONSOLE).open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            lines += f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        pass
    return lines[-count:]


def _event_line(event: dict) -> str:
    kind = event.get("event")
    rest = {k: v for k, v in event.items() if k not in ("event", "time")}
    if kind == "train_step":
        return "step {step}: loss {loss}".format(step=rest.get("step"), loss=rest.get("loss"))
    if kind in ("notice", "warning", "error"):
        return f"{kind}: {rest.get('message')}" + (f" ({rest['hint']})" if rest.get("hint") else "")
    if kind == "stage_start":
        return f"▶ {rest.get('stage')}"
    if kind == "stage_end":
        return f"✓ {rest.get('stage')} ({rest.get('seconds')} s)"
    short = ", ".join(f"{k}={v}" for k, v in list(rest.items())[:4])
    return f"{kind}: {short}"


def gpu_memory(events: list[dict]) -> dict | None:
    """The GPU memory a CUDA run reports with each step (`mem`, the peak allocated so far, e.g. "11.2G")."""
    for event in reversed(events):
        mem = event.get("mem") if event.get("event") == "train_step" else None
        if isinstance(mem, str) and mem.endswith("G"):
            try:
                return {"peak_gib": float(mem[:-1])}
            except ValueError:
                return None
    return None


def detail(output: Path, folder: Path, *, started_here: bool = False) -> dict:
    """Everything the run page shows, from one read of the event stream; `offset` is where its live stream goes
    on."""
    events, offset = tail_events(folder)
    report = folder / "report.html"
    return {
        "summary": summarize(output, folder, started_here=started_here, events=events).to_dict(),
        "losses": losses(folder, events),
        "samples": samples(output, folder),
        "exports": exports(output, folder),
        "log": log_lines(folder, events),
        "report": report.relative_to(output).as_posix() if report.exists() else None,
        "memory": gpu_memory(events),
        "offset": offset,
    }
