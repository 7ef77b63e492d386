"""What the user sees: rich progress on a terminal, or the same events as JSON lines (`--log-format json`)."""

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True)
_json_mode = False


def set_log_format(fmt: str) -> None:
    global _json_mode
    _json_mode = fmt == "json"


def emit(event: str, **fields: object) -> None:
    """One machine-readable event (JSON mode) — or nothing: humans get progress and the final report."""
    if _json_mode:
        print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str), flush=True)


@contextmanager
def stage(description: str, **fields: object) -> Iterator[None]:
    """A long step: a spinner with elapsed time for people, start/end events for machines."""
    started = time.perf_counter()
    emit("stage_start", stage=description, **fields)
    if _json_mode or not console.is_terminal:
        yield
    else:
        with console.status(f"{description}…"):
            yield
    seconds = round(time.perf_counter() - started, 2)
    emit("stage_end", stage=description, seconds=seconds)
    if not _json_mode:
        console.print(f"[green]✓[/green] {description} [dim]({seconds:.1f} s)[/dim]")


def error(message: str, hint: str | None) -> None:
    if _json_mode:
        emit("error", message=message, hint=hint)
        return
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
