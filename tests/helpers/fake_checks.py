"""Checks that misbehave on purpose, for the runner tests: they run in real worker processes."""

import os
import signal
import time

from checks.result import Status, Verdict


def sleeps(ctx):
    time.sleep(float(ctx.options.get("sleep_s", 30)))
    return Verdict(Status.PASS, "woke up")


def segfaults(ctx):
    os.kill(os.getpid(), signal.SIGSEGV)


def aborts(ctx):
    os.abort()


def raises(ctx):
    raise RuntimeError("probe exploded")


def exits(ctx):
    os._exit(3)


def returns_junk(ctx):
    return "not a verdict"


def passes(ctx):
    print("noise on stdout must not break the result")
    return [Verdict(Status.PASS, "ok a", {"x": 1.5}, subject="a"), Verdict(Status.WARN, "meh b", subject="b")]


def spawns_sleeper(ctx):
    """Leaves a grandchild behind: a timeout must kill the whole process group."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    with open(ctx.options["pidfile"], "w") as fh:
        fh.write(str(child.pid))
    time.sleep(60)


def fails(ctx):
    return Verdict(Status.FAIL, "the dependency is broken")


def reports_pid(ctx):
    """Which process ran the check and how many checks that process has run so far."""
    global _CALLS
    _CALLS += 1
    return Verdict(Status.PASS, "ran", {"pid": os.getpid(), "calls": _CALLS})


_CALLS = 0

# In-process checks that prove the runner's threads: two checks meeting at a barrier pass only when
# they run at the same time; exclusive checks record when they ran.
BARRIER = None
INTERVALS: list = []


def meets(ctx):
    BARRIER.wait(timeout=float(ctx.options.get("barrier_s", 10)))
    return Verdict(Status.PASS, "met")


def records_interval(ctx):
    start = time.monotonic()
    time.sleep(float(ctx.options.get("hold_s", 0.2)))
    INTERVALS.append((start, time.monotonic()))
    return Verdict(Status.PASS, "held")


def sleeps_then_passes(ctx):
    time.sleep(float(ctx.options.get("first_s", 0.3)))
    return Verdict(Status.PASS, "slept")


# Stand-ins for the blocked-by (root cause) tests of the renderers: a failed driver, a crashing toolkit.


def driver_missing(ctx):
    return Verdict(Status.FAIL, "NVIDIA driver not loaded")


def toolkit_crashes(ctx):
    raise RuntimeError("nvcc vanished")


def fine(ctx):
    return Verdict(Status.PASS, "fine")


def nothing_to_do(ctx):
    return Verdict(Status.SKIP, "single node; nothing to test")


def spec_of(name: str, func, needs: tuple[str, ...] = ()):
    """A CheckSpec for one of these stand-ins, in the group its name starts with."""
    from checks.registry import CheckSpec

    return CheckSpec(name, name.split(".")[0], name, f"{func.__module__}:{func.__name__}", needs=needs)
