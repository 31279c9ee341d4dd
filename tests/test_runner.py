"""The runner with real worker processes: hangs, crashes and exceptions become results and the
rest of the run goes on."""

import os
import time

import pytest

from checks.registry import CheckSpec, Context
from checks.result import Status
from checks.runner import effective_timeout, run_checks, run_in_process, run_isolated


def spec(func: str, isolate=True, timeout_s=None, slow=False, name=None) -> CheckSpec:
    target = f"tests.helpers.fake_checks:{func}"
    return CheckSpec(name or f"test.{func}", "test", func, target, isolate, timeout_s, slow)


@pytest.fixture
def bare_ctx():
    return Context(stack={}, node={})


def test_hung_check_is_killed_and_reported_as_timeout_within_two_seconds(bare_ctx):
    started = time.monotonic()
    [result] = run_isolated(spec("sleeps"), bare_ctx, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert result.status is Status.FAIL
    assert "timed out after 1 s" in result.message
    assert elapsed < 1.0 + 2.0
    assert result.expected["timeout"].value == 1.0


def test_timeout_kills_the_checks_children_too(bare_ctx, tmp_path):
    pidfile = tmp_path / "pid"
    ctx = Context({}, {}, options={"pidfile": str(pidfile)})
    [result] = run_isolated(spec("spawns_sleeper"), ctx, timeout_s=1.5)
    assert result.status is Status.FAIL
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a killed child of ours may linger as a zombie until reaped by init; check its state
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split()[2] == "Z":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


@pytest.mark.parametrize("func, signame", [("segfaults", "SIGSEGV"), ("aborts", "SIGABRT")])
def test_crash_in_native_code_is_an_error_naming_the_signal(bare_ctx, func, signame):
    [result] = run_isolated(spec(func), bare_ctx, timeout_s=20)
    assert result.status is Status.ERROR
    assert result.message == f"crashed with {signame}"


def test_exception_in_isolated_check_is_an_error_with_the_reason(bare_ctx):
    [result] = run_isolated(spec("raises"), bare_ctx, timeout_s=20)
    assert result.status is Status.ERROR
    assert "RuntimeError: probe exploded" in result.message


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
    assert len(seen) == 8 and seen[0] == ("test.sleeps", True) and seen[1] == ("test.sleeps", False)


def test_quick_skips_slow_checks_with_a_reason():
    ctx = Context({}, {}, quick=True)
    [result] = run_checks([spec("sleeps", slow=True)], ctx)
    assert result.status is Status.SKIP and "--quick" in result.message


def test_timeout_precedence():
    assert effective_timeout(spec("passes"), None) == 120.0
    assert effective_timeout(spec("passes", timeout_s=7), None) == 7
    assert effective_timeout(spec("passes", timeout_s=7), 3) == 3
