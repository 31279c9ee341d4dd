"""The runner with real worker processes: hangs, crashes and exceptions become results and the
rest of the run goes on; shared workers serve many checks; dependencies block with one root cause;
independent checks run at once while exclusive ones never overlap."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from checks.registry import CheckSpec, Context
from checks.result import Status
from checks.runner import blocked_roots, effective_timeout, run_checks, run_in_process, run_isolated
from tests.conftest import ROOT
from tests.helpers import fake_checks
from tests.helpers.procs import default_sigint, gone


def spec(func: str, isolate=True, timeout_s=None, slow=False, name=None, **extra) -> CheckSpec:
    target = f"tests.helpers.fake_checks:{func}"
    return CheckSpec(name or f"test.{func}", "test", func, target, isolate, timeout_s, slow, **extra)


def shared(func: str, name=None, **extra) -> CheckSpec:
    return spec(func, isolate=False, name=name, worker="torch", **extra)


@pytest.fixture
def bare_ctx():
    return Context(stack={}, node={})


# --- one check, one worker ------------------------------------------------------------------------


def test_hung_check_is_killed_and_reported_as_timeout_within_two_seconds(bare_ctx):
    started = time.monotonic()
    [result] = run_isolated(spec("sleeps"), bare_ctx, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert result.status is Status.FAIL
    assert "timed out after 1 s" in result.message
    assert elapsed < 1.0 + 2.0
    assert result.expected["timeout"].value == 1.0


def test_timeout_kills_the_checks_children_too(tmp_path):
    pidfile = tmp_path / "pid"
    ctx = Context({}, {}, options={"pidfile": str(pidfile)})
    [result] = run_isolated(spec("spawns_sleeper"), ctx, timeout_s=1.5)
    assert result.status is Status.FAIL
    assert gone(int(pidfile.read_text())), "grandchild survived the timeout"


@pytest.mark.parametrize("func, signame", [("segfaults", "SIGSEGV"), ("aborts", "SIGABRT")])
def test_crash_in_native_code_is_an_error_naming_the_signal(bare_ctx, func, signame):
    [result] = run_isolated(spec(func), bare_ctx, timeout_s=20)
    assert result.status is Status.ERROR
    assert result.message == f"crashed with {signame}"


def test_exception_in_isolated_check_is_an_error_with_the_reason(bare_ctx):
    [result] = run_isolated(spec("raises"), bare_ctx, timeout_s=20)
    assert result.status is Status.ERROR
    assert "RuntimeError: probe exploded" in result.message
    assert "fake_checks.py" in result.message  # where it raised


def test_hard_exit_without_result_is_an_error(bare_ctx):
    [result] = run_isolated(spec("exits"), bare_ctx, timeout_s=20)
    assert result.status is Status.ERROR
    assert "exited with code 3" in result.message


def test_isolated_verdicts_come_back_with_subjects_and_values(bare_ctx):
    results = run_isolated(spec("passes"), bare_ctx, timeout_s=20)
    assert [(r.name, r.status) for r in results] == [("test.passes[a]", Status.PASS), ("test.passes[b]", Status.WARN)]
    assert results[0].measured["x"].value == 1.5


@pytest.mark.parametrize("func", ["raises", "returns_junk"])
def test_in_process_failures_are_errors(bare_ctx, func):
    [result] = run_in_process(spec(func, isolate=False), bare_ctx)
    assert result.status is Status.ERROR
    assert "check crashed" in result.message


def test_bad_checks_do_not_stop_the_run(bare_ctx):
    specs = [spec("sleeps", timeout_s=0.5), spec("segfaults"), spec("raises", isolate=False), spec("passes")]
    seen = []
    results = run_checks(specs, bare_ctx, progress=lambda s, r: seen.append((s.name, r is None)))
    statuses = [(r.name, r.status) for r in results]
    assert statuses == [
        ("test.sleeps", Status.FAIL),
        ("test.segfaults", Status.ERROR),
        ("test.raises", Status.ERROR),
        ("test.passes[a]", Status.PASS),
        ("test.passes[b]", Status.WARN),
    ]
    # every check announced once before its result, once with it
    assert len(seen) == 8
    for name in {n for n, _ in seen}:
        assert seen.index((name, True)) < seen.index((name, False))


def test_quick_skips_slow_checks_with_a_reason():
    ctx = Context({}, {}, quick=True)
    [result] = run_checks([spec("sleeps", slow=True)], ctx)
    assert result.status is Status.SKIP and "--quick" in result.message


def test_timeout_precedence():
    assert effective_timeout(spec("passes"), None) == 120.0
    assert effective_timeout(spec("passes", timeout_s=7), None) == 7
    assert effective_timeout(spec("passes", timeout_s=7), 3) == 3


# --- shared workers -------------------------------------------------------------------------------


def _pids(results):
    return [r.measured["pid"].value for r in results]


def test_shared_worker_serves_every_check_in_one_process(bare_ctx):
    specs = [shared("reports_pid", name=f"test.shared{i}") for i in range(3)]
    results = run_checks(specs, bare_ctx)
    assert all(r.status is Status.PASS for r in results)
    assert len(set(_pids(results))) == 1 and os.getpid() not in _pids(results)
    assert sorted(r.measured["calls"].value for r in results) == [1, 2, 3]  # what it imported, it kept
    assert gone(_pids(results)[0]), "the shared worker outlived the run"


def test_fresh_workers_give_each_check_its_own_process(bare_ctx):
    specs = [shared("reports_pid", name=f"test.shared{i}") for i in range(3)]
    results = run_checks(specs, bare_ctx, fresh_workers=True)
    assert len(set(_pids(results))) == 3
    assert [r.measured["calls"].value for r in results] == [1, 1, 1]


def test_a_crash_or_hang_in_the_shared_worker_costs_one_check(bare_ctx):
    specs = [shared("reports_pid", name="test.before"), shared("segfaults"),
             shared("sleeps", timeout_s=1.0), shared("reports_pid", name="test.after")]
    before, crashed, hung, after = run_checks(specs, bare_ctx, jobs=1)
    assert crashed.status is Status.ERROR and crashed.message == "crashed with SIGSEGV"
    assert hung.status is Status.FAIL and "timed out after 1 s" in hung.message
    assert before.status is after.status is Status.PASS
    assert before.measured["pid"].value != after.measured["pid"].value  # a new worker after the kill
    assert after.measured["calls"].value == 1


# --- dependencies ---------------------------------------------------------------------------------


def test_a_failed_dependency_blocks_its_dependants_with_one_root_cause(bare_ctx):
    specs = [spec("fails", isolate=False, name="test.driver"),
             spec("passes", isolate=False, name="test.inventory", needs=("test.driver",)),
             spec("passes", isolate=False, name="test.bench", needs=("test.inventory",)),
             spec("reports_pid", isolate=False, name="test.other")]
    results = run_checks(specs, bare_ctx)
    by_name = {r.name.split("[")[0]: r for r in results}
    assert by_name["test.driver"].status is Status.FAIL
    inventory, bench = by_name["test.inventory"], by_name["test.bench"]
    assert inventory.status is Status.SKIP
    assert inventory.message == "blocked by test.driver (the dependency is broken)"
    assert bench.status is Status.SKIP
    assert bench.message == "blocked by test.driver via test.inventory (the dependency is broken)"
    assert by_name["test.other"].status is Status.PASS
    assert blocked_roots(results) == {"test.driver": 2}


def test_a_passing_or_absent_dependency_does_not_block(bare_ctx):
    specs = [spec("passes", isolate=False, name="test.driver"),
             spec("reports_pid", isolate=False, name="test.a", needs=("test.driver",)),
             spec("reports_pid", isolate=False, name="test.b", needs=("test.not_in_this_run",))]
    results = run_checks(specs, bare_ctx)
    assert [r.status for r in results if r.name in ("test.a", "test.b")] == [Status.PASS, Status.PASS]


def test_dependencies_listed_after_their_dependants_still_run_first(bare_ctx):
    specs = [spec("passes", isolate=False, name="test.late", needs=("test.root",)),
             spec("fails", isolate=False, name="test.root")]
    results = run_checks(specs, bare_ctx, jobs=1)
    assert [r.name for r in results] == ["test.late", "test.root"]  # the order given
    assert results[0].message.startswith("blocked by test.root")


def test_checks_needing_each_other_are_refused(bare_ctx):
    specs = [spec("passes", isolate=False, name="test.a", needs=("test.b",)),
             spec("passes", isolate=False, name="test.b", needs=("test.a",))]
    with pytest.raises(RuntimeError, match="need each other"):
        run_checks(specs, bare_ctx)


@pytest.mark.parametrize("gpus, status", [(0, Status.SKIP), (1, Status.PASS)])
def test_needs_gpus_skips_on_a_node_without_gpus(gpus, status):
    ctx = Context({}, {"gpus": gpus})
    [result] = run_checks([spec("reports_pid", isolate=False, needs_gpus=True)], ctx)
    assert result.status is status
    if status is Status.SKIP:
        assert result.message == "this node is expected to have no GPUs (node.gpus = 0)"


# --- concurrency ----------------------------------------------------------------------------------


def test_independent_checks_run_at_the_same_time(bare_ctx, monkeypatch):
    # three checks meeting at a 3-party barrier: they pass only if all three run at once
    monkeypatch.setattr(fake_checks, "BARRIER", threading.Barrier(3))
    ctx = Context({}, {}, options={"barrier_s": 10})
    specs = [spec("meets", isolate=False, name=f"test.meet{i}") for i in range(3)]
    assert [r.status for r in run_checks(specs, ctx, jobs=3)] == [Status.PASS] * 3


def test_jobs_bounds_how_many_run_at_once(monkeypatch):
    monkeypatch.setattr(fake_checks, "BARRIER", threading.Barrier(3))
    ctx = Context({}, {}, options={"barrier_s": 1})
    specs = [spec("meets", isolate=False, name=f"test.meet{i}") for i in range(3)]
    results = run_checks(specs, ctx, jobs=2)
    assert all(r.status is Status.ERROR and "BrokenBarrierError" in r.message for r in results)


def test_exclusive_checks_never_overlap(monkeypatch):
    monkeypatch.setattr(fake_checks, "INTERVALS", [])
    ctx = Context({}, {}, options={"hold_s": 0.2})
    specs = [spec("records_interval", isolate=False, name=f"test.bench{i}", exclusive=True) for i in range(3)]
    run_checks(specs, ctx, jobs=3)
    intervals = sorted(fake_checks.INTERVALS)
    assert len(intervals) == 3
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert start >= end, f"exclusive checks overlapped: {intervals}"


def test_results_keep_the_given_order_whatever_finishes_first():
    ctx = Context({}, {}, options={"first_s": 0.4})
    specs = [spec("sleeps_then_passes", isolate=False, name="test.slow"),
             spec("passes", isolate=False, name="test.fast")]
    results = run_checks(specs, ctx, jobs=2)
    assert [r.name for r in results] == ["test.slow", "test.fast[a]", "test.fast[b]"]


# --- interrupted ----------------------------------------------------------------------------------


def test_ctrl_c_kills_the_shared_worker_and_its_children(tmp_path):
    """A real SIGINT to a process running checks: the shared worker and what it started are gone."""
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from checks.registry import CheckSpec, Context
        from checks.runner import run_checks
        spec = CheckSpec("test.sleeper", "test", "t", "tests.helpers.fake_checks:spawns_sleeper", worker="torch")
        try:
            run_checks([spec], Context({{}}, {{}}, options={{"pidfile": {str(pidfile)!r}}}))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             preexec_fn=default_sigint)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the check never started"
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    worker = psutil.Process(grandchild).ppid()
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 130 and "interrupted" in out
    assert gone(worker) and gone(grandchild)
