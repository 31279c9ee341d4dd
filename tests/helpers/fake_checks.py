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
