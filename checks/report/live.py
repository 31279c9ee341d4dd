"""What a run shows while it runs, on standard error: the checks as they finish and the progress events of
the running ones (``ctx.progress``: a fine-tune's methods and steps, a benchmark's GPUs, a rank's end).

- On a terminal: a live display (rich) that redraws in place, a bar over the checks and one line per
  running check with its latest event, one line per part still active (``finetune.methods  lora: step
  12/30 loss 5.912`` and ``ia3: started`` under it); it disappears when the run ends.
- Elsewhere (CI logs, a pipe): plain lines, ``[3/15] gpu.ecc: pass (0.12 s)`` per finished check and
  ``  finetune.methods  lora: step 12/30 loss 5.912`` per event. Step events (``0 < done < total``) are
  thinned per check and part: one when at least :data:`STEP_EVERY_S` passed or the part advanced by
  :data:`STEP_FRACTION` of its total since its last line; start, finish and plain messages always print.
- ``--no-progress``: nothing at all.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from checks.registry import CheckSpec, Progress
from checks.result import Result, worst

STEP_EVERY_S = 5.0
STEP_FRACTION = 0.1
MAX_PARTS_SHOWN = 8  # lines under one running check on a terminal (a node's GPUs); more are counted


class NoDisplay:
    """``--no-progress``: the hooks of a display that shows nothing."""

    def check(self, spec: CheckSpec, results: list[Result] | None) -> None:
        pass

    def event(self, spec: CheckSpec, event: Progress) -> None:
        pass

    def close(self) -> None:
        pass


class LineDisplay(NoDisplay):
    """One line per finished check and per (thinned) progress event, for logs."""

    def __init__(self, total: int, stream: Callable[[], object] = lambda: sys.stderr,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream  # looked up per line: a test's captured stderr, a redirected one
        self.clock = clock
        self.done = 0
        self.last: dict[tuple[str, str | None], tuple[float, float]] = {}  # (check, key) -> (time, done) shown
        self.closed = False
        self.lock = threading.Lock()

    def _print(self, line: str) -> None:
        out = self.stream()
        print(line, file=out, flush=True)

    def check(self, spec: CheckSpec, results: list[Result] | None) -> None:
        if results is None or not results:
            return
        with self.lock:
            if self.closed:
                return
            self.done += 1
            status = worst(r.status for r in results)
            self._print(f"[{self.done}/{self.total}] {spec.name}: {status.label} ({results[-1].duration_s:.2f} s)")

    def shows(self, spec: CheckSpec, event: Progress) -> bool:
        """Whether this event gets a line (and, if so, remember it)."""
        where = (spec.name, event.key)
        now = self.clock()
        if event.step:
            seen = self.last.get(where)
            if seen is not None:
                at, done = seen
                if now - at < STEP_EVERY_S and event.done - done < STEP_FRACTION * event.total:
                    return False
        self.last[where] = (now, event.done if event.done is not None else 0)
        return True

    def event(self, spec: CheckSpec, event: Progress) -> None:
        with self.lock:
            if not self.closed and self.shows(spec, event):
                self._print(f"  {spec.name}  {event.message}")

    def close(self) -> None:
        with self.lock:
            self.closed = True


class LiveDisplay(NoDisplay):
    """The terminal's live view (rich), redrawn a few times a second from the state the hooks keep."""

    def __init__(self, total: int, console=None):
        from rich.console import Console, Group
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.table import Table

        display = self

        class _View(Progress):
            def get_renderables(self):
                yield Group(self.make_tasks_table(self.tasks), display.running_table(Table))

        self.lock = threading.Lock()
        self.running: dict[str, dict] = {}  # check -> {"started": t, "title": ..., "parts": {key: Progress}}
        self.view = _View(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console or Console(stderr=True), transient=True,
                          refresh_per_second=4)
        self.task = self.view.add_task("starting", total=total)
        self.total = total
        self.closed = False
        self.view.start()

    def running_table(self, table_cls):
        table = table_cls.grid(expand=True, padding=(0, 1))
        table.add_column(no_wrap=True, style="cyan")
        table.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
        table.add_column(no_wrap=True, justify="right", style="dim")
        now = time.monotonic()
        with self.lock:
            rows = [(name, dict(state)) for name, state in self.running.items()]
        for name, state in rows:
            parts: dict[str | None, Progress] = state["parts"]
            active = [e for e in parts.values() if not e.final]
            shown = active or ([list(parts.values())[-1]] if parts else [])
            lines = [e.message for e in shown[:MAX_PARTS_SHOWN]] or [state["title"]]
            if len(shown) > MAX_PARTS_SHOWN:
                lines.append(f"… and {len(shown) - MAX_PARTS_SHOWN} more")
            elapsed = f"{now - state['started']:.0f}s"
            for i, line in enumerate(lines):
                table.add_row(name if i == 0 else "", line, elapsed if i == 0 else "")
        return table

    def check(self, spec: CheckSpec, results: list[Result] | None) -> None:
        with self.lock:
            if self.closed:
                return
            if results is None:
                self.running[spec.name] = {"started": time.monotonic(), "title": spec.title, "parts": {}}
            else:
                self.running.pop(spec.name, None)
            running = len(self.running)
        self.view.update(self.task, advance=0 if results is None else 1, description=f"{running} running")

    def event(self, spec: CheckSpec, event: Progress) -> None:
        with self.lock:
            state = self.running.get(spec.name)
            if state is not None and not self.closed:
                parts = dict(state["parts"])
                parts.pop(event.key, None)  # re-inserted last: the newest part's line comes last
                parts[event.key] = event
                state["parts"] = parts

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.view.stop()


def make_display(total: int, enabled: bool, stream=None) -> NoDisplay:
    """The display for a run of ``total`` checks: live on a terminal, lines elsewhere, none when disabled."""
    if not enabled:
        return NoDisplay()
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return LiveDisplay(total)
    return LineDisplay(total)
