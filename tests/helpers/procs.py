"""Waiting for processes in tests, and starting them as a terminal would."""

import signal
import time

import psutil


def gone(pid: int, within_s: float = 3.0) -> bool:
    """The process ended within ``within_s`` (a zombie awaiting its reaper counts as ended)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def default_sigint() -> None:
    """A ``preexec_fn``: in the child, before exec, SIGINT back to its default action. A shell without job
    control starts background commands (``pytest … &``, ``nohup .ci/run &``, some CI runners) with SIGINT
    ignored and children inherit that; Python then installs no KeyboardInterrupt handler, and a test's
    Ctrl-C (SIGINT) would be shrugged off."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
