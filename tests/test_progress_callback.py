"""callback_plugins/peftnode_progress.py, through a real ansible-playbook with the repository's ansible.cfg.

Throwaway playbooks in tmp_path run against localhost (connection local): an async `sleep 5` polled
every second (five, not three: on a loaded machine the first poll can come 4 s after the start) gets
"still running" lines with growing times, tasks that took at least
PEFTNODE_PROGRESS_MIN_S get a duration line (a failed async task too), PEFTNODE_TIMINGS gets one
JSON line per task result and the playbook's total, and in an 80-column pseudo-terminal no line of
the callback's is wider than the terminal, even for a 120-character task name.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers.ansible_env import BIN, REPO, ansible_env  # noqa: E402

ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
PLUGIN = REPO / "callback_plugins" / "peftnode_progress.py"
LONG_NAME = ("Unpack a deliberately long-named archive step so the progress line has to shorten the task "
             "name and not the time, never.")
assert len(LONG_NAME) == 120

STILL = re.compile(r"^  \[(?P<host>[^\]]+)\] still running: (?P<name>.*) \((?P<t>[0-9hms.]+)\)$")
DONE = re.compile(r"^  \[(?P<host>[^\]]+)\] (?P<name>.*): (?P<t>[0-9hms.]+)(?: \((?P<note>[^)]*)\))?$")


def _load_plugin():
    spec = importlib.util.spec_from_file_location("peftnode_progress", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(text: str) -> float:
    """Inverse of format_duration: 3.2s, 42s, 1m05s, 1h02m05s."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([0-9.]+)s", text)
    assert m, text
    return int(m.group(1) or 0) * 3600 + int(m.group(2) or 0) * 60 + float(m.group(3))


# --- the formatting helpers, no ansible needed ------------------------------------------------------------------


def test_durations_read_as_an_operator_expects():
    fmt = _load_plugin().format_duration
    assert [fmt(s) for s in (0.04, 3.24, 9.94, 10.2, 59.4, 60, 65, 132.4, 3599.6, 3725)] == [
        "0.0s", "3.2s", "9.9s", "10s", "59s", "1m00s", "1m05s", "2m12s", "1h00m00s", "1h02m05s"]


def test_a_long_name_is_shortened_never_the_time():
    fit = _load_plugin().fit_line
    line = fit("  [node-a] still running: ", LONG_NAME, " (1h02m05s)", 80)
    assert len(line) == 79 and line.endswith("... (1h02m05s)")
    assert line.startswith("  [node-a] still running: Unpack a deliberately")
    assert fit("  [a] ", "Short", ": 3.0s", 80) == "  [a] Short: 3.0s"
    # a host name too long to leave room: the name keeps a readable minimum, the time stays whole
    line = fit("  [" + "h" * 90 + "] ", LONG_NAME, ": 2m12s", 80)
    assert line.endswith("] Unpack a...: 2m12s")


# --- real ansible-playbook runs ---------------------------------------------------------------------------------

needs_ansible = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                                   reason=f"ansible-playbook not installed next to {sys.executable}")


def _env(tmp_path: Path, timings: Path, min_s: str = "0.5") -> dict[str, str]:
    # the async jobs' status files under tmp_path: with HOME moved, "~/.ansible_async" is read back elsewhere
    env = ansible_env(tmp_path, PEFTNODE_TIMINGS=str(timings), PEFTNODE_PROGRESS_MIN_S=min_s,
                      ANSIBLE_ASYNC_DIR=str(tmp_path / "async"))
    for name in ("COLUMNS", "LINES"):  # the width must come from the terminal itself
        env.pop(name, None)
    return env


def _argv(book: Path, hosts: str = "localhost,") -> list[str]:
    return [str(ANSIBLE_PLAYBOOK), "-i", hosts, "-c", "local", "-e", f"ansible_python_interpreter={sys.executable}",
            str(book)]


def _run_in_pty(argv: list[str], env: dict[str, str], cwd: Path, columns: int = 80,
                timeout: float = 240) -> tuple[int, str]:
    """Run argv with its stdin, stdout and stderr on a pseudo-terminal of the given width; return (rc, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the terminal's other side has closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{' '.join(argv)} still running after {timeout}s")
        rc = proc.wait(timeout=30)
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


@pytest.fixture(scope="module")
def pty_run(tmp_path_factory):
    """One playbook in an 80-column terminal: async sleep 5 polled each second, a plain sleep 1, an async
    task with a 120-character name, then an async task that fails (the play ends there)."""
    tmp_path = tmp_path_factory.mktemp("progress")
    book = tmp_path / "play.yml"
    book.write_text(yaml.safe_dump([{
        "name": "Progress", "hosts": "all", "gather_facts": False,
        "tasks": [
            {"name": "Sleep five seconds", "ansible.builtin.command": "sleep 5", "async": 60, "poll": 1},
            {"name": "Sleep one second", "ansible.builtin.command": "sleep 1"},
            {"name": "Quick task", "ansible.builtin.command": "true"},
            {"name": LONG_NAME, "ansible.builtin.command": "sleep 2", "async": 60, "poll": 1},
            {"name": "Fail after two seconds", "ansible.builtin.command": "sh -c 'sleep 2; exit 3'",
             "async": 60, "poll": 1},
        ],
    }], sort_keys=False))
    timings = tmp_path / "timings.jsonl"
    rc, out = _run_in_pty(_argv(book), _env(tmp_path, timings), cwd=tmp_path)
    lines = out.splitlines()
    return {"rc": rc, "out": out, "lines": lines,
            "still": [m.groupdict() for m in map(STILL.match, lines) if m],
            "done": [m.groupdict() for line in lines if not STILL.match(line) and (m := DONE.match(line))],
            "timings": [json.loads(x) for x in timings.read_text().splitlines()] if timings.exists() else []}


@needs_ansible
@pytest.mark.slow
def test_async_polls_say_what_is_running_and_for_how_long(pty_run):
    assert pty_run["rc"] == 2, pty_run["out"][-3000:]  # the last task failed
    times = [seconds(s["t"]) for s in pty_run["still"] if s["name"] == "Sleep five seconds"]
    assert len(times) >= 2, pty_run["out"][-3000:]
    assert all(times[i] < times[i + 1] for i in range(len(times) - 1)), times
    assert times[0] >= 0.9 and times[-1] < 60, times
    assert {s["host"] for s in pty_run["still"]} == {"localhost"}


@needs_ansible
@pytest.mark.slow
def test_slow_tasks_get_a_duration_line_quick_ones_do_not(pty_run):
    done = {d["name"]: d for d in pty_run["done"]}
    assert seconds(done["Sleep five seconds"]["t"]) >= 4.5 and done["Sleep five seconds"]["note"] == "changed"
    assert seconds(done["Sleep one second"]["t"]) >= 0.9 and done["Sleep one second"]["note"] == "changed"
    assert "Quick task" not in done or seconds(done["Quick task"]["t"]) >= 0.5  # only when the machine was slow
    # the failed async task still says how long it ran
    assert done["Fail after two seconds"]["note"] == "failed"
    assert seconds(done["Fail after two seconds"]["t"]) >= 1.5


@needs_ansible
@pytest.mark.slow
def test_no_progress_line_is_wider_than_the_terminal(pty_run):
    ours = [line for line in pty_run["lines"] if STILL.match(line) or DONE.match(line)]
    long = [line for line in ours if line.startswith("  [localhost] Unpack a deliberately") or
            line.startswith("  [localhost] still running: Unpack a deliberately")]
    assert any("still running" in line for line in long) and any("still running" not in line for line in long), ours
    assert all("..." in line for line in long), long
    too_wide = [line for line in ours if len(line) > 80]
    assert not too_wide, too_wide


@needs_ansible
@pytest.mark.slow
def test_timings_file_has_a_line_per_task_result_and_the_total(pty_run):
    entries = pty_run["timings"]
    assert entries, pty_run["out"][-3000:]
    tasks, total = entries[:-1], entries[-1]
    assert [e["task"] for e in tasks] == ["Sleep five seconds", "Sleep one second", "Quick task", LONG_NAME,
                                          "Fail after two seconds"]
    for e in tasks:
        assert set(e) == {"host", "task", "role", "action", "seconds", "status", "async"}, e
        assert e["host"] == "localhost" and e["role"] is None and e["action"] == "ansible.builtin.command"
    by = {e["task"]: e for e in tasks}
    assert 4.5 <= by["Sleep five seconds"]["seconds"] < 60
    assert by["Sleep five seconds"]["async"] is True and by["Sleep one second"]["async"] is False
    assert by["Sleep one second"]["seconds"] >= 0.9
    assert [e["status"] for e in tasks] == ["changed", "changed", "changed", "changed", "failed"]
    assert set(total) == {"playbook_s", "playbook"} and total["playbook"] == "play.yml"
    assert total["playbook_s"] >= sum(e["seconds"] for e in tasks) - 0.5


@needs_ansible
@pytest.mark.slow
def test_loops_handlers_includes_roles_and_several_hosts(tmp_path):
    (tmp_path / "included.yml").write_text(yaml.safe_dump([
        {"name": "Included sleep", "ansible.builtin.command": "sleep 0.6"}]))
    role = tmp_path / "roles" / "demo" / "tasks"
    role.mkdir(parents=True)
    (role / "main.yml").write_text(yaml.safe_dump([
        {"name": "Role async sleep", "ansible.builtin.command": "sleep 3", "async": 60, "poll": 1}]))
    book = tmp_path / "play.yml"
    book.write_text(yaml.safe_dump([{
        "name": "Shapes", "hosts": "all", "gather_facts": False,
        "tasks": [
            {"name": "Sleep in a loop", "ansible.builtin.command": "sleep {{ item }}", "loop": [0.3, 0.4],
             "notify": "Handler sleep"},
            {"name": "Never runs", "ansible.builtin.command": "sleep 5", "when": False,
             "async": "{{ 60 }}", "poll": 1},
            {"name": "Include some tasks", "ansible.builtin.include_tasks": "included.yml"},
            {"name": "Include a role", "ansible.builtin.include_role": {"name": "demo"}},
        ],
        "handlers": [{"name": "Handler sleep", "ansible.builtin.command": "sleep 0.6"}],
    }], sort_keys=False))
    timings = tmp_path / "timings.jsonl"
    env = _env(tmp_path, timings, min_s="0.5")
    env["ANSIBLE_ROLES_PATH"] = str(tmp_path / "roles")
    proc = subprocess.run(_argv(book, hosts="node-a,node-b,"), env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    entries = [json.loads(x) for x in timings.read_text().splitlines()]
    assert set(entries[-1]) == {"playbook_s", "playbook"}
    got = {(e["host"], e["task"]): e for e in entries[:-1]}
    expected = ["Sleep in a loop", "Never runs", "Include some tasks", "Included sleep", "Include a role",
                "Role async sleep", "Handler sleep"]
    assert sorted(got) == sorted((h, t) for h in ("node-a", "node-b") for t in expected)
    for host in ("node-a", "node-b"):
        assert got[host, "Sleep in a loop"]["seconds"] >= 0.6 and got[host, "Sleep in a loop"]["status"] == "changed"
        assert got[host, "Never runs"]["status"] == "skipped" and got[host, "Never runs"]["async"] is True
        assert got[host, "Include some tasks"]["action"] == "ansible.builtin.include_tasks"
        assert got[host, "Included sleep"]["seconds"] >= 0.5
        assert got[host, "Role async sleep"]["role"] == "demo" and got[host, "Role async sleep"]["async"] is True
        assert got[host, "Role async sleep"]["seconds"] >= 2.5
        assert got[host, "Handler sleep"]["seconds"] >= 0.5 and got[host, "Handler sleep"]["status"] == "changed"
    lines = proc.stdout.splitlines()
    done = {(m["host"], m["name"]) for line in lines if not STILL.match(line) and (m := DONE.match(line))}
    for host in ("node-a", "node-b"):
        assert {(host, "Sleep in a loop"), (host, "demo : Role async sleep"), (host, "Handler sleep")} <= done, done
        assert (host, "Never runs") not in done  # skipped: no duration line
        assert any((m := STILL.match(line)) and m["host"] == host and m["name"] == "demo : Role async sleep"
                   for line in lines), proc.stdout[-3000:]
