"""peftnode_progress: say what a long step is doing, how long each slow task took, and where a run's time went.

Runs beside the stdout callback (ansible.cfg enables it). It adds three things:

- on each poll of an asynchronous task (the long builds, installs and unpacks run with async/poll):
  ``  [host] still running: <task> (1m05s)``, the time since the task started on that host;
- when a task ends on a host (ok, changed or failed; not skipped) after at least
  PEFTNODE_PROGRESS_MIN_S seconds (default 10): ``  [host] <task>: 2m12s`` with "(changed)" or
  "(failed)" noted;
- with PEFTNODE_TIMINGS=<file>: one JSON line per task result appended to the file
  ({"host", "task", "role", "action", "seconds", "status", "async"}; status ok|changed|failed|skipped)
  and, when the playbook ends, {"playbook_s": <total>, "playbook": <file name>}. A file without
  the playbook_s line after a run's task lines is a run that was interrupted.

Lines are kept to the terminal's width (80 columns when it cannot be told) by shortening the
task name, never the time.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: peftnode_progress
type: aggregate
short_description: progress of long (async) steps, slow-task durations, optional JSON timings
description:
  - Prints a line on each poll of an asynchronous task with the time since it started, a line when a
    task that took at least O(min_seconds) ends, and appends one JSON line per task result to
    O(timings_file) when set.
requirements:
  - enabled in callbacks_enabled (peftnode's ansible.cfg does)
options:
  min_seconds:
    description: Print the duration of a task that ends after at least this many seconds.
    type: float
    default: 10
    env:
      - name: PEFTNODE_PROGRESS_MIN_S
    ini:
      - section: callback_peftnode_progress
        key: min_seconds
  timings_file:
    description: Append one JSON line per task result, and the playbook's total at its end, to this file.
    type: path
    env:
      - name: PEFTNODE_TIMINGS
    ini:
      - section: callback_peftnode_progress
        key: timings_file
"""

MIN_NAME = 12  # never shorten a task name below this many characters, however long the host name


def format_duration(seconds: float) -> str:
    """3.2s, 42s, 1m05s, 1h02m05s."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def fit_line(before: str, name: str, after: str, width: int) -> str:
    """before + name + after, the name shortened (ending in "...") so the line is shorter than width."""
    room = width - 1 - len(before) - len(after)
    if len(name) > room:
        room = max(room, MIN_NAME)
        name = name[:room - 3].rstrip() + "..."
    return before + name + after


def _display_name(task) -> str:
    """The task's name as the stdout callback shows it ("role : name"); include_role's get_name() takes no arguments."""
    try:
        return task.get_name(include_role_fqcn=False).strip()
    except TypeError:
        return task.get_name().strip()


def _is_async(task, result: dict) -> bool:
    if result.get("ansible_job_id"):
        return True
    value = getattr(task, "async_val", 0) or 0
    try:
        return int(value) > 0
    except (TypeError, ValueError):
        return bool(value)  # still a template when the task was skipped before it was templated


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "peftnode_progress"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()  # runner_on_start comes from the main thread, results from another
        self._started = {}  # (host name, task uuid) -> monotonic start
        self._current = {}  # host name -> (task name, monotonic start): what an async poll is about
        self._playbook_start = time.monotonic()
        self._playbook = None
        self._min_seconds = 10.0
        self._timings = None

    def set_options(self, task_keys=None, var_options=None, direct=None):
        super().set_options(task_keys=task_keys, var_options=var_options, direct=direct)
        self._min_seconds = float(self.get_option("min_seconds"))
        self._timings = self.get_option("timings_file") or None

    # --- output -------------------------------------------------------------------------------

    @staticmethod
    def _width() -> int:
        return max(shutil.get_terminal_size(fallback=(80, 24)).columns, 40)

    def _say(self, host: str, name: str, after: str, prefix: str = "") -> None:
        self._display.display(fit_line(f"  [{host}] {prefix}", name, after, self._width()))

    def _record(self, entry: dict) -> None:
        if not self._timings:
            return
        try:
            with open(self._timings, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry, sort_keys=True) + "\n")
        except OSError as exc:
            self._display.warning(f"peftnode_progress: cannot append to {self._timings} ({exc}); timings off")
            self._timings = None

    # --- the hooks ------------------------------------------------------------------------------

    def v2_playbook_on_start(self, playbook):
        self._playbook_start = time.monotonic()
        self._playbook = os.path.basename(getattr(playbook, "_file_name", "") or "") or None

    def v2_runner_on_start(self, host, task):
        now = time.monotonic()
        with self._lock:
            self._started[(host.get_name(), task._uuid)] = now
            self._current[host.get_name()] = (_display_name(task), now)

    def v2_runner_on_async_poll(self, result):
        # The poll's own task is an implicit async_status; the host's running task is the one it is about.
        host = result._host.get_name()
        with self._lock:
            current = self._current.get(host)
        if current is None:
            return
        name, start = current
        self._say(host, name, f" ({format_duration(time.monotonic() - start)})", prefix="still running: ")

    def _finish(self, result, status: str, note: str = "") -> None:
        host, task = result._host.get_name(), result._task
        with self._lock:
            start = self._started.get((host, task._uuid))
        seconds = time.monotonic() - start if start is not None else 0.0
        res = result._result if isinstance(result._result, dict) else {}
        self._record({
            "host": host,
            "task": (task.name or task.action or "").strip(),
            "role": task._role.get_name(include_role_fqcn=False) if task._role else None,
            "action": task.action,
            "seconds": round(seconds, 3),
            "status": status,
            "async": _is_async(task, res),
        })
        if status != "skipped" and start is not None and seconds >= self._min_seconds:
            label = note or (status if status in ("changed", "failed") else "")
            after = f": {format_duration(seconds)}" + (f" ({label})" if label else "")
            self._say(host, _display_name(task), after)

    def v2_runner_on_ok(self, result):
        self._finish(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._finish(result, "failed", note="failed, ignored" if ignore_errors else "")

    def v2_runner_on_unreachable(self, result):
        self._finish(result, "failed", note="unreachable")

    def v2_runner_on_skipped(self, result):
        self._finish(result, "skipped")

    def v2_playbook_on_stats(self, stats):
        entry = {"playbook_s": round(time.monotonic() - self._playbook_start, 3)}
        if self._playbook:
            entry["playbook"] = self._playbook
        self._record(entry)
