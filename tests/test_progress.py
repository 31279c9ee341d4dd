"""Progress inside long checks: ``ctx.progress`` reaches the run's display from wherever the check runs (the
runner's threads, a shared worker, an isolated worker, threads the check starts), while the check runs; the
fine-tune reports each method's steps during the method; off a terminal one line per event, steps thinned;
on a terminal (a real pseudo-terminal) the live display shows the running method's step; --no-progress
shows none.

The stand-in checks below run in real worker processes (``tests.test_progress:<name>`` is imported there).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from checks.registry import CheckSpec, Context, Progress, current_progress, progress_to
from checks.report.live import STEP_EVERY_S, LineDisplay, NoDisplay, make_display
from checks.result import Status, Verdict
from checks.runner import run_checks
from tests.conftest import ROOT

# --- stand-in checks (run in worker processes) -------------------------------------------------------------


def emits_and_waits(ctx):
    """Says it is waiting, then waits for the go file the test creates when that event reaches it: passes only
    when progress is forwarded while the check runs, not with its result."""
    ctx.progress("waiting for go", key="main")
    go = Path(ctx.options["go"])
    deadline = time.monotonic() + 20
    while not go.exists():
        if time.monotonic() > deadline:
            return Verdict(Status.FAIL, "no go: the waiting event never reached the run")
        time.sleep(0.02)

    def part(i: int) -> None:  # a thread of the check's own, as perf runs one per GPU
        emit = ctx.progress
        for step in range(1, 6):
            emit(f"part {i} step {step}/5", done=step, total=5, key=f"part{i}")
        emit(f"part {i} done", key=f"part{i}", final=True)

    threads = [threading.Thread(target=part, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    current_progress()("from a probe without ctx")
    return Verdict(Status.PASS, "went", {"pid": os.getpid()})


def leaves_a_talker(ctx):
    """Returns while a thread of its own still reports: those late events must not be told as the next check's."""
    def late():
        time.sleep(0.3)
        for _ in range(20):
            ctx.progress("late word")
            time.sleep(0.02)

    threading.Thread(target=late, daemon=True).start()
    return Verdict(Status.PASS, "left a talker")


def quiet_sleeper(ctx):
    time.sleep(1.2)
    return Verdict(Status.PASS, "slept quietly")


def stand_in(func: str, name: str | None = None, **extra) -> CheckSpec:
    return CheckSpec(name or f"test.{func}", "test", func, f"tests.test_progress:{func}", **extra)


class Recorder:
    """The run's hooks: every event and every check result, with when they came."""

    def __init__(self, go: Path | None = None):
        self.events: list[tuple[str, Progress, float]] = []
        self.finished: dict[str, float] = {}
        self.go = go

    def check(self, spec, results):
        if results is not None:
            self.finished[spec.name] = time.monotonic()

    def event(self, spec, event: Progress):
        self.events.append((spec.name, event, time.monotonic()))
        if self.go is not None and event.message == "waiting for go":
            self.go.touch()


# --- where a check runs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [{"worker": "torch"}, {"isolate": True}, {}], ids=["shared", "isolated", "runner"])
def test_events_reach_the_run_while_the_check_runs(tmp_path, where):
    go = tmp_path / "go"
    rec = Recorder(go)
    [result] = run_checks([stand_in("emits_and_waits", **where)], Context({}, {}, options={"go": str(go)}),
                          progress=rec.check, events=rec.event)
    assert result.status is Status.PASS, result.message  # the go file came from the forwarded event
    in_worker = result.measured["pid"].value != os.getpid()
    assert in_worker is bool(where)
    messages = [e.message for _, e, _ in rec.events]
    assert messages[0] == "waiting for go" and "from a probe without ctx" in messages
    for i in range(4):  # every thread's events, in its own order, whole (no interleaved half lines)
        mine = [e for _, e, _ in rec.events if e.key == f"part{i}"]
        assert [e.message for e in mine] == [f"part {i} step {s}/5" for s in range(1, 6)] + [f"part {i} done"]
        assert [e.done for e in mine[:5]] == [1, 2, 3, 4, 5] and mine[-1].final and not mine[-1].step
    assert all(name == "test.emits_and_waits" for name, _, _ in rec.events)
    assert max(t for _, _, t in rec.events) <= rec.finished["test.emits_and_waits"]


def test_a_thread_left_talking_is_not_heard_as_the_next_check():
    rec = Recorder()
    specs = [stand_in("leaves_a_talker", worker="torch"), stand_in("quiet_sleeper", worker="torch")]
    results = run_checks(specs, Context({}, {}), jobs=1, progress=rec.check, events=rec.event)
    assert [r.status for r in results] == [Status.PASS, Status.PASS]
    assert not [e for name, e, _ in rec.events if name == "test.quiet_sleeper"], rec.events


def test_progress_without_a_listener_does_nothing_and_never_fails_a_check():
    Context({}, {}).progress("nobody listens", done=1, total=2)
    current_progress()("nobody here either")

    def broken(event):
        raise OSError("display gone")

    with progress_to(broken):
        current_progress()("still fine")
    Context({}, {}, sink=broken).progress("still fine")


def test_a_step_is_between_start_and_finish():
    assert Progress("x", 3, 10).step
    assert not Progress("x", 0, 10).step and not Progress("x", 10, 10).step and not Progress("x").step
    assert not Progress("x", 3, 10, final=True).step
    assert Progress.from_dict(Progress("m", 1, 2, "k", True).to_dict()) == Progress("m", 1, 2, "k", True)


# --- the displays --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_lines_thin_steps_per_part_but_never_starts_or_ends(capsys):
    clock = Clock()
    spec = stand_in("x", name="finetune.methods")
    display = LineDisplay(1, clock=clock)
    display.event(spec, Progress("lora: started", 0, 100, "lora"))
    for step in range(1, 101):  # 100 steps in 2 s: one line per 10 %
        clock.now = step * 0.02
        display.event(spec, Progress(f"lora: step {step}/100", step, 100, "lora"))
        display.event(spec, Progress(f"ia3: step {step}/1000", step, 1000, "ia3"))  # ia3 is thinned on its own
    clock.now += STEP_EVERY_S  # later: the next step prints whatever its progress
    display.event(spec, Progress("ia3: step 101/1000", 101, 1000, "ia3"))
    display.event(spec, Progress("[1/2] lora: pass", key="lora", final=True))
    display.check(spec, [])  # no results: nothing to count
    display.close()
    display.event(spec, Progress("after close"))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "  finetune.methods  lora: started"
    lora = [ln for ln in lines if "lora: step" in ln]
    assert lora == [f"  finetune.methods  lora: step {s}/100" for s in range(10, 101, 10)]
    assert [ln for ln in lines if "ia3" in ln] == ["  finetune.methods  ia3: step 1/1000",
                                                     "  finetune.methods  ia3: step 101/1000"]
    assert lines[-1] == "  finetune.methods  [1/2] lora: pass" and "after close" not in "".join(lines)


def test_no_progress_means_no_display_and_a_pipe_gets_lines(tmp_path):
    assert type(make_display(3, False)) is NoDisplay
    with open(tmp_path / "log", "w") as log:
        assert isinstance(make_display(3, True, log), LineDisplay)


# --- the emitters ------------------------------------------------------------------------------------------


def test_perf_reports_every_gpu_as_it_finishes():
    torch = pytest.importorskip("torch")
    from checks.perf import Device, Settings, probe_gpus

    tiny = Settings(gemm_n=64, gemm_buffers=2, copy_bytes=1024, copy_buffers=3, host_bytes=1024, host_buffers=2,
                    warmup_ops=1, warmup_s=0.0, repeats=2, iters=2)
    devices = [Device(i, "CPU stand-in", torch.device("cpu")) for i in range(3)]
    for bench in ("gemm", "pcie"):
        events: list[Progress] = []
        lock = threading.Lock()

        def sink(event, events=events, lock=lock):
            with lock:
                events.append(event)

        with progress_to(sink):
            probe = probe_gpus(bench, True, devices=devices, settings=tiny)
        assert all(s.error is None for s in probe.samples)
        finals = {e.key: e for e in events if e.final}
        assert set(finals) == {"gpu0", "gpu1", "gpu2"}
        unit = "TFLOP/s" if bench == "gemm" else "GB/s"
        assert all(re.fullmatch(rf"gpu\d: .* [0-9.]+ {re.escape(unit)}.*", e.message) for e in finals.values())
        if bench == "pcie":  # one GPU at a time: each says when it starts
            assert [e.key for e in events] == ["gpu0", "gpu0", "gpu1", "gpu1", "gpu2", "gpu2"]
        else:
            assert events[0].message.endswith("on 3 GPUs at once")


@pytest.mark.slow
def test_allreduce_reports_each_rank():
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    from checks.nccl.allreduce import MiB, probe_allreduce

    events: list[Progress] = []
    with progress_to(events.append):
        probe = probe_allreduce(2, MiB, backend="gloo", warmup=1, repeats=1, iters=2)
    assert not probe.errors, probe.errors
    assert events[0].message == "all-reduce of 1 MiB: 2 gloo ranks started"
    ranks = sorted(e.message for e in events if e.final)
    assert len(ranks) == 2 and all(re.fullmatch(r"rank \d: [0-9.]+ ms per all-reduce \(\d/2 done\)", m)
                                   for m in ranks), ranks


# --- the fine-tune through the CLI -------------------------------------------------------------------------


def finetune_argv(*extra: str) -> list[str]:
    return [sys.executable, "-c", "from checks.cli import finetune_console_main; finetune_console_main()",
            "--model", "tiny", *extra]


@pytest.mark.slow
def test_finetune_steps_show_during_the_method_in_a_log(tmp_path):
    pytest.importorskip("peft")
    proc = subprocess.run(finetune_argv("--methods", "lora,ia3", "--steps", "200", "--workers", "1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    first_done = next(i for i, ln in enumerate(lines) if re.search(r"\[1/2\] lora: pass \(", ln))
    steps = [ln for ln in lines[:first_done] if re.search(r"lora: step \d+/200 loss \d", ln)]
    assert steps and all(ln.startswith("  finetune.methods  lora: step ") for ln in steps), lines
    assert any(int(re.search(r"step (\d+)/", ln).group(1)) < 200 for ln in steps)  # during the method
    assert lines.index("  finetune.methods  lora: started") < first_done
    assert len([ln for ln in lines if "lora: step" in ln]) <= 12  # thinned: 10 % steps and the last
    assert lines[-1].startswith("[1/1] finetune.methods: pass")
    assert "finetune.methods" not in proc.stdout  # progress goes to stderr only; stdout has the report
    quiet = subprocess.run(finetune_argv("--methods", "lora", "--steps", "20", "--no-progress"), cwd=ROOT,
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-2000:]


COLOUR = re.compile(r"\x1b\[[0-9;]*m")
MOVES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")  # cursor moves, erases: a new screen line


@pytest.mark.slow
def test_a_terminal_shows_the_running_method_live_within_80_columns():
    pytest.importorskip("peft")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    env.pop("NO_COLOR", None)
    child = subprocess.Popen(finetune_argv("--methods", "lora", "--steps", "400", "--workers", "1"), cwd=ROOT,
                             stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    raw = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        elif child.poll() is not None:
            break
    child.wait(timeout=30)
    os.close(master)
    assert child.returncode == 0, raw[-2000:]
    text = raw.decode(errors="replace")
    screen = MOVES.sub("\n", COLOUR.sub("", text))
    live = [ln for ln in screen.splitlines() if re.search(r"finetune\.methods +lora: step \d+/400 loss \d", ln)]
    assert live, text[-3000:]  # the running check with its latest event, redrawn in place
    assert "\x1b[" in text  # drawn by the live display (cursor movement), not printed as log lines
    assert all(len(ln) <= 80 for ln in screen.splitlines()), max(screen.splitlines(), key=len)
    assert "  finetune.methods  lora: step" not in text  # no log lines on a terminal
