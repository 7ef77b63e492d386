"""What the user sees: rich progress on a terminal, or the same events as JSON lines (`--log-format json`)."""

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True)
_json_mode = False
_silent = False
_label = ""


def set_log_format(fmt: str) -> None:
    global _json_mode
    _json_mode = fmt == "json"


def silence(on: bool = True, label: str = "") -> None:
    """Nothing but errors (marked with `label`) from this process on: in a multi-process run the first process
    speaks for all."""
    global _silent, _label
    _silent, _label = on, label if on else ""


def silenced() -> bool:
    return _silent


def emit(event: str, **fields: object) -> None:
    """One machine-readable event (JSON mode) — or nothing: humans get progress and the final report."""
    if _json_mode and not _silent:
        print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str), flush=True)


@contextmanager
def stage(description: str, **fields: object) -> Iterator[None]:
    """A long step: a spinner with elapsed time for people, start/end events for machines."""
    started = time.perf_counter()
    emit("stage_start", stage=description, **fields)
    if _json_mode or _silent or not console.is_terminal:
        yield
    else:
        with console.status(f"{description}…"):
            yield
    seconds = round(time.perf_counter() - started, 2)
    emit("stage_end", stage=description, seconds=seconds)
    if not _json_mode and not _silent:
        console.print(f"[green]✓[/green] {description} [dim]({seconds:.1f} s)[/dim]")


def error(message: str, hint: str | None) -> None:
    message = f"[{_label}] {message}" if _label else message
    if _json_mode:
        emit("error", message=message, hint=hint)
        return
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def warn(message: str) -> None:
    """Something the user should know that does not stop the run (a skipped image, a fallback)."""
    if _silent:
        return
    if _json_mode:
        emit("warning", message=message)
        return
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def notice(message: str) -> None:
    """One informative line (e.g. which optimizer or attention actually runs)."""
    if _silent:
        return
    if _json_mode:
        emit("notice", message=message)
        return
    console.print(message, highlight=False, soft_wrap=True)


@contextmanager
def progress(description: str, total: int, completed: int = 0) -> Iterator:
    """A progress bar (done/total, it/s, ETA and any fields passed, e.g. loss, lr, GPU memory) for people;
    one `progress` event per advance for machines. Yields `advance(n, **fields)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state = {"done": completed, "started": time.perf_counter(), "start_done": completed}
    show = not _json_mode and not _silent and console.is_terminal
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not show,
    )
    task = bar.add_task(description, total=total, completed=completed, rate="", info="")

    def advance(n: int = 1, **fields: object) -> None:
        state["done"] += n
        elapsed = time.perf_counter() - state["started"]
        rate = (state["done"] - state["start_done"]) / elapsed if elapsed > 0 else 0.0
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        bar.update(task, advance=n, rate=f"{rate:.2f} it/s", info=info)
        emit("progress", stage=description, done=state["done"], total=total, it_per_s=round(rate, 3), **fields)
        plain = not _json_mode and not _silent and not show
        if plain and (state["done"] == total or state["done"] % max(1, total // 10) == 0):
            # no terminal (docker logs, CI): a plain line every 10 % instead of a redrawn bar
            print(f"{description}: {state['done']}/{total} {rate:.2f} it/s {info}", file=sys.stderr, flush=True)

    with bar:
        yield advance
