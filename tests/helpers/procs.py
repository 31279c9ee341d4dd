"""Waiting for processes in tests."""

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
