"""checks/proc.py with real processes: exit codes, signals, deadlines and whole-tree kills, including
a grandchild that left the tree's session and was re-parented to init."""

import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from checks import proc
from tests.helpers.procs import gone


def py(code: str) -> list[str]:
    return proc.python_argv("-c", textwrap.dedent(code))


def test_exit_code_and_the_tail_of_its_output():
    ex = proc.run(py("import sys; print('line one'); print('last words', file=sys.stderr); sys.exit(3)"),
                  timeout_s=30)
    assert (ex.code, ex.signal, ex.timed_out, ex.ok) == (3, None, False, False)
    assert "line one" in ex.tail and ex.last_line() == "last words"
    assert ex.describe() == "exited with code 3"


@pytest.mark.parametrize("sig, name", [(11, "SIGSEGV"), (6, "SIGABRT")])
def test_a_signal_is_named(sig, name):
    ex = proc.run(py(f"import os; os.kill(os.getpid(), {sig})"), timeout_s=30)
    assert ex.signal == name and ex.code is None
    assert ex.describe() == f"crashed with {name}"


def test_a_clean_exit_is_ok():
    ex = proc.run(py("pass"), timeout_s=30)
    assert ex.ok and ex.code == 0 and ex.killed == 0


def test_deadline_kills_the_whole_tree_even_a_grandchild_that_left_the_session(tmp_path):
    pids = tmp_path / "pids"
    code = f"""
        import os, subprocess, sys, time
        near = subprocess.Popen(["sleep", "120"])  # same process group
        far = subprocess.Popen(["sleep", "120"], start_new_session=True)  # its own session and group
        # a daemon: double fork, so init adopts it and no parent links it to the tree any more
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        time.sleep(0.5)
        open({str(pids)!r}, "w").write(" ".join(map(str, [near.pid, far.pid])))
        time.sleep(120)
    """
    started = time.monotonic()
    p = proc.Process(py(code))
    assert p.wait(2.0) is None
    ex = p.finish(timed_out=True)
    p.close()
    assert ex.timed_out and ex.describe(2.0) == "timed out after 2 s and was killed"
    assert time.monotonic() - started < 2.0 + 2 * proc.KILL_WAIT_S
    near, far = map(int, pids.read_text().split())
    assert gone(near) and gone(far)
    assert ex.leftover == []
    # nothing of the tree is left: no live process carries its token
    assert not [q for q in psutil.process_iter() if _carries(q, p.token)]


def _carries(p: psutil.Process, token: str) -> bool:
    try:
        return p.environ().get(proc.TOKEN_ENV) == token and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_re_parented_daemon_is_found_by_its_token(tmp_path):
    pidfile = tmp_path / "daemon"
    code = f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                open({str(pidfile)!r}, "w").write(str(os.getpid()))
                time.sleep(120)
            os._exit(0)
        time.sleep(120)
    """
    p = proc.Process(py(code))
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon = int(pidfile.read_text())
        assert psutil.Process(daemon).ppid() != p.pid  # not below the child any more
    finally:
        ex = p.close()
    assert ex.killed >= 2 and gone(daemon)


def test_pipes_and_waiting():
    p = proc.Process(py("import sys; print(sys.stdin.readline().upper(), end='')"), stdin="pipe", stdout="pipe")
    p.stdin.write(b"hello\n")
    p.stdin.flush()
    assert p.stdout.readline() == b"HELLO\n"
    assert p.wait(10) == 0
    ex = p.close()
    assert ex.code == 0 and not p.log_path.exists()  # a temporary log is removed


def test_child_env_carries_the_import_path_and_stays_offline(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = proc.child_env({"EXTRA": "1"})
    assert env["PYTHONPATH"].split(":")[0] == str(tmp_path)
    assert env["HF_HUB_OFFLINE"] == "1" and env["EXTRA"] == "1"
    assert "HF_HUB_OFFLINE" not in proc.child_env(allow_download=True)


def test_a_sitecustomize_on_the_path_reaches_the_child(monkeypatch, tmp_path):
    """How tests inject faults: through the import path the layer hands down, not hooks in the code."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.INJECTED = 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = proc.Process(py("import builtins; print(getattr(builtins, 'INJECTED', 'no'))"), stdout="pipe",
                     env=proc.child_env())
    out = p.stdout.read()
    p.close()
    assert out.strip() == b"yes"


def test_interpreter_is_this_one():
    assert proc.python_argv("-V")[0] == sys.executable


def test_a_timed_out_command_with_a_child_returns_promptly():
    started = time.monotonic()
    ex = proc.run(py("import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"), timeout_s=0.5)
    assert ex.timed_out and ex.leftover == []
    assert time.monotonic() - started < 0.5 + 1.5, "waited on a killed grandchild nobody reaps"


def test_keep_output_returns_all_of_it():
    ex = proc.run(py("print('x' * 10000); print('end')"), timeout_s=30, keep_output=True)
    assert ex.output == "x" * 10000 + "\nend\n"  # as printed, to the last newline
    assert len(ex.tail) <= proc.TAIL_BYTES


def test_a_command_that_cannot_start_leaves_no_log(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("peftnode-proc-*"))
    with pytest.raises(OSError):
        proc.run([str(tmp_path / "not-there")], timeout_s=5)
    assert set(Path(tempfile.gettempdir()).glob("peftnode-proc-*")) == before


def test_without_psutil_the_process_group_is_still_killed(tmp_path):
    """A bare node's system Python has no psutil (the converge test runs checks.gpu under one): the
    layer still runs, times out and kills the child's process group."""
    pidfile = tmp_path / "pid"
    script = textwrap.dedent(f"""
        import sys
        sys.modules["psutil"] = None  # import psutil -> ImportError, as where it is not installed
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from checks import proc
        import checks.gpu  # the GPU checks import and register without it
        assert proc.psutil is None
        code = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); " \\
               "open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
        ex = proc.run([sys.executable, "-c", code], timeout_s=1.5)
        print(ex.timed_out, ex.describe(1.5))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True timed out after 1.5 s and was killed"
    assert gone(int(pidfile.read_text()))


def test_a_clean_exit_still_ends_what_it_left_in_its_group(tmp_path):
    pidfile = tmp_path / "pid"
    ex = proc.run(py(f"import subprocess; p = subprocess.Popen(['sleep', '60']); "
                     f"open({str(pidfile)!r}, 'w').write(str(p.pid))"), timeout_s=30)
    assert ex.code == 0 and not ex.timed_out
    assert ex.killed == 1 and gone(int(pidfile.read_text()))
