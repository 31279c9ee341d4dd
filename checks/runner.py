"""Run checks: in-process for the safe ones, in worker processes with a timeout for the ones that
can hang or crash. One bad check never takes the run down: it becomes a ``fail`` (timeout) or an
``error`` (crash) result and the next check runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from checks.registry import DEFAULT_TIMEOUT_S, CheckSpec, Context
from checks.result import Result, Status, Value, Verdict

ProgressHook = Callable[[CheckSpec, "list[Result] | None"], None]  # before (None) and after each check


def verdicts_of(outcome) -> list[Verdict]:
    """A check returns one Verdict or a non-empty list of them."""
    if isinstance(outcome, Verdict):
        return [outcome]
    if isinstance(outcome, (list, tuple)) and outcome and all(isinstance(v, Verdict) for v in outcome):
        return list(outcome)
    raise TypeError(f"a check must return a Verdict or a non-empty list of Verdicts, not {type(outcome).__name__}")


def _error(spec: CheckSpec, message: str, started: float, remediation: str | None = None) -> Result:
    return Result(spec.name, spec.group, Status.ERROR, message, remediation=remediation,
                  duration_s=time.monotonic() - started)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_in_process(spec: CheckSpec, ctx: Context) -> list[Result]:
    started = time.monotonic()
    try:
        verdicts = verdicts_of(spec.load()(ctx))
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return [_error(spec, f"check crashed: {type(exc).__name__}: {exc} (at {Path(tb.filename).name}:{tb.lineno})",
                       started, "This is a bug in the check or an unexpected system state; rerun with the "
                                "traceback: python -m checks.worker, or report it.")]
    duration = time.monotonic() - started
    return [Result.from_verdict(spec.name, spec.group, v, duration) for v in verdicts]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_isolated(spec: CheckSpec, ctx: Context, timeout_s: float) -> list[Result]:
    """Run the check in a fresh Python process (its own session, so a timeout kills its children too)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="peftnode-check-") as tmp:
        request = Path(tmp, "request.json")
        result = Path(tmp, "result.json")
        request.write_text(json.dumps({"spec": dataclasses.asdict(spec), "context": ctx.to_dict()}))
        log = Path(tmp, "output.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "checks.worker", str(request), str(result)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*sys.path]))},
            )
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return [Result(spec.name, spec.group, Status.FAIL, f"timed out after {timeout_s:g} s and was killed",
                               measured={"elapsed": Value(round(time.monotonic() - started, 3), "s")},
                               expected={"timeout": Value(timeout_s, "s")},
                               remediation="Something on the node hangs (driver, GPU, NCCL, filesystem); run the "
                                           "check alone with a longer --timeout to see whether it finishes.",
                               duration_s=time.monotonic() - started)]
            except BaseException:
                _kill_group(proc)
                raise
        tail = log.read_text(errors="replace")[-2000:].strip()
        if code < 0:
            return [_error(spec, f"crashed with {_signal_name(-code)}", started,
                           "The process died in native code (driver, CUDA, NCCL library); see the output: "
                           + (tail.splitlines()[-1] if tail else "(none)"))]
        if not result.exists():
            last = tail.splitlines()[-1] if tail else "no output"
            return [_error(spec, f"worker exited with code {code} without a result ({last})", started)]
        payload = json.loads(result.read_text())
    duration = time.monotonic() - started
    if not payload["ok"]:
        return [_error(spec, f"check crashed: {payload['error']}", started,
                       "This is a bug in the check or an unexpected system state.")]
    results = []
    for v in payload["verdicts"]:
        verdict = Verdict(
            status=Status.parse(v["status"]), message=v["message"],
            measured={k: Value.from_dict(x) for k, x in v["measured"].items()},
            expected={k: Value.from_dict(x) for k, x in v["expected"].items()},
            remediation=v["remediation"], subject=v["subject"],
        )
        results.append(Result.from_verdict(spec.name, spec.group, verdict, duration))
    return results


def effective_timeout(spec: CheckSpec, override_s: float | None) -> float:
    """``--timeout`` overrides every check; otherwise the check's own timeout or the default."""
    if override_s is not None:
        return override_s
    return spec.timeout_s if spec.timeout_s is not None else DEFAULT_TIMEOUT_S


def run_checks(specs: Iterable[CheckSpec], ctx: Context, *, timeout_s: float | None = None,
               progress: ProgressHook | None = None) -> list[Result]:
    results: list[Result] = []
    for spec in specs:
        if progress:
            progress(spec, None)
        if ctx.quick and spec.slow:
            got = [Result(spec.name, spec.group, Status.SKIP, "skipped by --quick (long-running check)")]
        elif spec.isolate:
            got = run_isolated(spec, ctx, effective_timeout(spec, timeout_s))
        else:
            got = run_in_process(spec, ctx)
        results.extend(got)
        if progress:
            progress(spec, got)
    return results
