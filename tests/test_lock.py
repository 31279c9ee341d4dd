"""roles/peftnode/files/peftnode-lock: one run at a time per node, and the step runner.

Real processes, a real flock, real signals: the script runs under this Python (and under 2.7 and
3.6 where this machine has them, as on CentOS 7 and old Ubuntu nodes) in subprocesses, with the lock
file and the steps directory under tmp_path.
"""

from __future__ import annotations

import calendar
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "roles" / "peftnode" / "files" / "peftnode-lock"


def _interpreters() -> list[str]:
    """This Python, plus a Python 2.7 and a 3.6 when this machine has one that runs."""
    found = [sys.executable]
    for version in ("2.7", "3.6"):
        candidates = [shutil.which(f"python{version}") or ""]
        candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))
        for candidate in candidates:
            if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
                found.append(candidate)
                break
    return found


INTERPRETERS = _interpreters()


@pytest.fixture(params=INTERPRETERS, ids=lambda p: "python" + Path(p).name.removeprefix("python"))
def python(request) -> str:
    return request.param


@pytest.fixture
def lock(tmp_path) -> Path:
    return tmp_path / "lock" / "peftnode.lock"


@pytest.fixture
def holders():
    """Every holder a test started is gone at the end, whatever the test did."""
    started: list[int] = []
    yield started
    for pid in started:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def call(python: str, *args, timeout: float = 30) -> tuple[int, dict]:
    proc = subprocess.run([python, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"rc={proc.returncode} no output; stderr:\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def acquire(python, lock, run_id, holders, *extra, steps=None):
    rc, data = call(python, "acquire", "--lock", lock, "--run-id", run_id, "--owner",
                    json.dumps({"host": "controller", "pid": 1234, "playbook": "site.yml"}),
                    "--steps-dir", steps or lock.parent / "steps", *(extra or ("--wait", "0")))
    if data.get("acquired") and data["holder"]:
        holders.append(data["holder"]["holder_pid"])
    return rc, data


def starttime(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


def gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


# --- the lock ----------------------------------------------------------------------------------


def test_acquire_refuse_wait_reuse_release(python, lock, holders):
    rc, first = acquire(python, lock, "run-a", holders)
    assert rc == 0 and first["acquired"] and not first["reused"], first
    holder = first["holder"]
    assert holder["run_id"] == "run-a" and holder["owner"]["pid"] == 1234
    assert holder["holder_starttime"] == starttime(holder["holder_pid"])
    # the lock file says who holds it, and status agrees
    assert json.loads(lock.read_text()) == holder
    assert call(python, "status", "--lock", lock)[1] == {"held": True, "holder": holder, "previous": None}

    # another run is refused at once, and told who holds it
    began = time.time()
    rc, busy = acquire(python, lock, "run-b", holders)
    assert rc == 3 and busy["acquired"] is False and time.time() - began < 5
    assert (busy["holder"]["holder_pid"], busy["holder"]["holder_starttime"]) == (
        holder["holder_pid"], holder["holder_starttime"])
    assert busy["holder"]["owner"] == {"host": "controller", "pid": 1234, "playbook": "site.yml"}

    # the same run takes it again without a second holder (after a reboot it would be free)
    rc, again = acquire(python, lock, "run-a", holders)
    assert rc == 0 and again["reused"] and again["holder"] == holder

    # a waiting run gets it once the holder's run releases it
    release = threading.Timer(1.0, call, (python, "release", "--lock", lock, "--run-id", "run-a"))
    release.start()
    rc, waited = acquire(python, lock, "run-b", holders, "--wait", "20")
    release.join()
    assert rc == 0 and waited["acquired"] and waited["waited_s"] >= 0.5, waited
    assert waited["previous"] == holder and waited["holder"]["run_id"] == "run-b"
    assert gone(holder["holder_pid"])

    # release only answers to the holder's run
    assert call(python, "release", "--lock", lock, "--run-id", "run-a")[1]["released"] is False
    assert call(python, "status", "--lock", lock)[1]["held"] is True
    assert call(python, "release", "--lock", lock, "--run-id", "run-b") == (
        0, {"released": True, "holder": waited["holder"]})
    status = call(python, "status", "--lock", lock)[1]
    assert status["held"] is False and status["holder"] is None and status["previous"]["run_id"] == "run-b"
    # nothing held: release still succeeds (the unlock play runs whatever happened)
    assert call(python, "release", "--lock", lock, "--run-id", "run-b")[0] == 0


def test_the_kernel_frees_the_lock_of_a_killed_holder(python, lock, holders):
    rc, first = acquire(python, lock, "run-a", holders)
    assert rc == 0
    os.kill(first["holder"]["holder_pid"], signal.SIGKILL)
    assert gone(first["holder"]["holder_pid"])
    assert call(python, "status", "--lock", lock)[1]["held"] is False
    rc, second = acquire(python, lock, "run-b", holders)
    assert rc == 0 and second["acquired"] and second["previous"]["run_id"] == "run-a"


def test_the_holder_ignores_hangup_and_interrupt_and_ends_at_max_hold(lock, holders):
    rc, first = acquire(sys.executable, lock, "run-a", holders, "--wait", "0", "--max-hold", "2")
    assert rc == 0
    pid = first["holder"]["holder_pid"]
    os.kill(pid, signal.SIGHUP)
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    assert call(sys.executable, "status", "--lock", lock)[1]["held"] is True
    assert gone(pid, 10)
    assert call(sys.executable, "status", "--lock", lock)[1]["held"] is False


def test_break_stops_only_the_holder_it_names(python, lock, holders):
    rc, first = acquire(python, lock, "run-a", holders)
    holder = first["holder"]
    # a PID that was reused since (another start time) is left alone
    rc, wrong = call(python, "break", "--lock", lock, "--holder-pid", holder["holder_pid"],
                     "--holder-starttime", holder["holder_starttime"] + 1)
    assert rc == 0 and wrong["broken"] is False and wrong["held"] is True
    assert not gone(holder["holder_pid"], 0.2)
    rc, broken = call(python, "break", "--lock", lock, "--holder-pid", holder["holder_pid"],
                      "--holder-starttime", holder["holder_starttime"])
    assert rc == 0 and broken == {"broken": True, "held": False, "holder": holder}
    assert gone(holder["holder_pid"])
    assert acquire(python, lock, "run-b", holders)[0] == 0


def _blocking_taker(lock: Path) -> subprocess.Popen:
    """A process that takes the flock the instant it is free (a blocking flock): the harshest waiter."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "print('waiting', flush=True)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('took', flush=True)\n"
            "time.sleep(60)\n")
    taker = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert taker.stdout.readline().strip() == "waiting"
    return taker


@pytest.mark.parametrize("how", ["release", "break"])
def test_letting_go_succeeds_when_a_waiting_run_takes_the_lock_at_once(python, lock, holders, how):
    """The old check ("is the lock free?") failed when a waiter took the lock between two looks: a
    release then reported failure after 15 s although the holder was gone (a CI flake with two plays)."""
    rc, first = acquire(python, lock, "run-a", holders)
    holder = first["holder"]
    taker = _blocking_taker(lock)
    try:
        began = time.time()
        if how == "release":
            rc, data = call(python, "release", "--lock", lock, "--run-id", "run-a")
            assert (rc, data["released"]) == (0, True), data
        else:
            rc, data = call(python, "break", "--lock", lock, "--holder-pid", holder["holder_pid"],
                            "--holder-starttime", holder["holder_starttime"])
            assert (rc, data["broken"], data["held"]) == (0, True, True), data
        assert time.time() - began < 5
        assert gone(holder["holder_pid"])
        assert taker.stdout.readline().strip() == "took"
        assert call(python, "status", "--lock", lock)[1]["held"] is True
    finally:
        taker.kill()
        taker.wait()


# --- processes ---------------------------------------------------------------------------------


def test_alive_tells_the_same_process_from_a_reused_pid(python):
    me = os.getpid()
    assert call(python, "alive", "--pid", me, "--starttime", starttime(me))[1] == {"alive": True}
    assert call(python, "alive", "--pid", me, "--starttime", starttime(me) - 1)[1] == {"alive": False}
    zombie = subprocess.Popen(["true"])
    assert gone(zombie.pid)  # exited, not yet reaped: a zombie
    assert call(python, "alive", "--pid", zombie.pid, "--starttime", starttime(zombie.pid))[1] == {"alive": False}
    zombie.wait()
    assert call(python, "alive", "--pid", zombie.pid, "--starttime", 1)[1] == {"alive": False}


def test_controller_info_names_the_topmost_ansible_playbook(python, tmp_path):
    # a stand-in for ansible-playbook: a shell script of that name running the script two levels down
    fake = tmp_path / "ansible-playbook"
    fake.write_text(f"#!/bin/sh\nsh -c '{python} {SCRIPT} controller-info; true'\ntrue\n")
    fake.chmod(0o755)
    proc = subprocess.Popen([str(fake)], stdout=subprocess.PIPE, text=True)
    started = starttime(proc.pid)  # (the script takes a while to start Python)
    stdout, _ = proc.communicate(timeout=30)
    info = json.loads(stdout)
    assert info["ansible_playbook"] is True and info["pid"] == proc.pid
    assert set(info) == {"ansible_playbook", "host", "pid", "starttime", "started_at", "user"}
    assert info["host"] == socket.gethostname() and info["user"] == pwd.getpwuid(os.getuid()).pw_name
    assert info["starttime"] == started
    assert 0 <= time.time() - calendar.timegm(time.strptime(info["started_at"], "%Y-%m-%dT%H:%M:%SZ")) < 60
    # outside ansible-playbook it names the parent, and says so
    rc, plain = call(python, "controller-info")
    assert rc == 0 and plain["ansible_playbook"] is False and plain["pid"] == os.getpid()


# --- the step runner ---------------------------------------------------------------------------


def test_run_passes_output_and_exit_codes_through(python, tmp_path):
    steps = tmp_path / "steps"
    seen = subprocess.run([python, str(SCRIPT), "run", "--steps-dir", steps, "--run-id", "r1", "--name", "probe",
                           "--", "sh", "-c", f"cat {steps}/*.json; echo to-stderr >&2; exit 7"],
                          capture_output=True, text=True, timeout=30)
    assert seen.returncode == 7 and seen.stderr == "to-stderr\n"
    registration = json.loads(seen.stdout)
    assert registration["run_id"] == "r1" and registration["name"] == "probe"
    assert registration["argv"][:2] == ["sh", "-c"] and registration["pgid"] == registration["pid"]
    assert list(steps.iterdir()) == []  # deregistered on exit
    killed = subprocess.run([python, str(SCRIPT), "run", "--steps-dir", steps, "--", "sh", "-c", "kill -KILL $$"],
                            timeout=30)
    assert killed.returncode == 128 + signal.SIGKILL
    assert list(steps.iterdir()) == []


def test_run_forwards_a_signal_to_the_whole_step(python, tmp_path):
    steps = tmp_path / "steps"
    pidfile = tmp_path / "grandchild"
    runner = subprocess.Popen([python, str(SCRIPT), "run", "--steps-dir", steps, "--run-id", "r1", "--",
                               "sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
    deadline = time.time() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    registration = json.loads(next(steps.glob("*.json")).read_text())
    # the step has a process group of its own, which the grandchild shares
    assert os.getpgid(grandchild) == registration["pgid"] != os.getpgid(runner.pid)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=10) == 128 + signal.SIGTERM
    assert gone(grandchild)
    assert list(steps.iterdir()) == []


def test_acquire_stops_the_steps_an_interrupted_run_left(python, lock, holders, tmp_path):
    steps = lock.parent / "steps"
    pidfile = tmp_path / "grandchild"
    # run "old" had a step going when its controller died: the runner is gone (SIGKILL), the step is not
    runner = subprocess.Popen([python, str(SCRIPT), "run", "--steps-dir", steps, "--run-id", "old", "--name", "make",
                               "--", "sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], start_new_session=True)
    deadline = time.time() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    registration = json.loads(next(steps.glob("*.json")).read_text())
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert not gone(registration["pid"], 0.2) and not gone(grandchild, 0.1)
    # a step of the acquiring run itself is left alone; a dead process's registration is removed
    mine = subprocess.Popen([python, str(SCRIPT), "run", "--steps-dir", steps, "--run-id", "new", "--",
                             "sleep", "300"], start_new_session=True)
    (steps / "999999.json").write_text(json.dumps({"pid": 999999, "starttime": 1, "pgid": 999999, "run_id": "x"}))
    deadline = time.time() + 10
    while len(list(steps.glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    try:
        rc, data = acquire(python, lock, "new", holders, steps=steps)
        assert rc == 0 and data["acquired"]
        assert [(k["pid"], k["name"], k["run_id"], k["signal"]) for k in data["orphans_killed"]] == [
            (registration["pid"], "make", "old", "SIGTERM")]
        assert gone(registration["pid"]) and gone(grandchild)
        assert [json.loads(p.read_text())["run_id"] for p in steps.glob("*.json")] == ["new"]
        assert mine.poll() is None
    finally:
        mine.send_signal(signal.SIGTERM)
        mine.wait(timeout=10)


# --- the lock tasks, through ansible-playbook (connection local) -----------------------------------

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

# site.yml's provisioning play in small: the lock first, the work in a block whose always: releases it
PLAYBOOK = """\
- name: Provision the node
  hosts: all
  gather_facts: false
  pre_tasks:
    - name: Take the node lock
      ansible.builtin.import_role:
        name: peftnode
        tasks_from: lock
      tags: [always]
  tasks:
    - name: Work, then release the node lock
      block:
        - name: Work until told to stop
          ansible.builtin.wait_for:
            path: "{{ go_file }}"
            timeout: 120
        - name: Fail where asked
          ansible.builtin.fail:
            msg: this host fails
          when: fail_here | default(false) | bool
      always:
        - name: Release the node lock
          ansible.builtin.import_role:
            name: peftnode
            tasks_from: unlock
          tags: [always]
"""


@pytest.fixture
def play(tmp_path):
    """Start the small play with this host's lock under tmp_path; (Popen, stdout file) each time."""
    from tests.helpers.ansible_env import ansible_env

    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"no ansible-playbook next to {sys.executable}")
    book = tmp_path / "play.yml"
    book.write_text(PLAYBOOK)
    started = []

    def start(label: str, *extra: str, hosts: str = "localhost,", **variables):
        values = {"ansible_python_interpreter": sys.executable, "go_file": str(tmp_path / "go"),
                  "peftnode_lock_path": str(tmp_path / "lock" / "peftnode.lock"),
                  "peftnode_lock_script": str(tmp_path / "bin" / "peftnode-lock"),
                  "peftnode_steps_dir": str(tmp_path / "steps"), **variables}
        log = tmp_path / f"{label}.out"
        with open(log, "w") as out:
            proc = subprocess.Popen([str(ANSIBLE_PLAYBOOK), "-i", hosts, "-c", "local", str(book),
                                     "-e", json.dumps(values), *extra], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, env=ansible_env(tmp_path), start_new_session=True)
        started.append(proc)
        return proc, log

    yield start
    (tmp_path / "go").touch()
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    status = lock_status(tmp_path / "lock" / "peftnode.lock")
    if status.get("held"):
        os.kill(status["holder"]["holder_pid"], signal.SIGKILL)


def lock_status(path: Path) -> dict:
    return call(sys.executable, "status", "--lock", path)[1]


def wait_held(path: Path, proc, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        status = lock_status(path) if path.exists() else {}
        if status.get("held"):
            return status["holder"]
        assert proc.poll() is None, "the playbook ended before it took the lock"
        time.sleep(0.2)
    raise AssertionError(f"nobody took {path}")


@pytest.mark.slow
def test_a_second_run_fails_naming_the_first_or_waits_for_it(play, tmp_path):
    lock_file = tmp_path / "lock" / "peftnode.lock"
    first, first_log = play("first")
    holder = wait_held(lock_file, first)
    assert holder["owner"]["pid"] == first.pid and holder["owner"]["ansible_playbook"] is True

    refused, refused_log = play("refused", peftnode_lock_wait=0)
    assert refused.wait(timeout=120) != 0
    out = refused_log.read_text()
    fatal = [line for line in out.splitlines() if line.startswith("fatal: [localhost]")]
    assert len(fatal) == 1, out
    message = json.loads(fatal[0].split(" => ", 1)[1])["msg"]
    assert f"ansible-playbook PID {first.pid} on {socket.gethostname()}" in message, message
    assert f"started {holder['owner']['started_at']}" in message
    assert f"through PID {holder['holder_pid']} on the node" in message
    assert f"break --lock {lock_file} --holder-pid {holder['holder_pid']} " in message
    assert lock_status(lock_file)["holder"] == holder  # the refused run took nothing

    waiting, waiting_log = play("waiting", peftnode_lock_wait=120)
    time.sleep(1)
    deadline = time.time() + 60
    while "waiting up to 120 s" not in waiting_log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    assert lock_status(lock_file)["holder"] == holder
    (tmp_path / "go").touch()
    assert first.wait(timeout=120) == 0, first_log.read_text()
    assert waiting.wait(timeout=120) == 0, waiting_log.read_text()
    out = waiting_log.read_text()
    assert (f"waiting up to 120 s for the peftnode run holding {lock_file} on localhost: "
            f"ansible-playbook PID {first.pid} on {socket.gethostname()} started {holder['owner']['started_at']} "
            f"(holder PID {holder['holder_pid']})") in out
    status = lock_status(lock_file)
    assert status["held"] is False and status["previous"]["owner"]["pid"] == waiting.pid


@pytest.mark.slow
def test_a_run_takes_over_the_lock_of_a_killed_run_and_stops_its_steps(play, tmp_path):
    lock_file = tmp_path / "lock" / "peftnode.lock"
    first, _ = play("first")
    holder = wait_held(lock_file, first)
    # the killed run had a long step going on the node
    step = subprocess.Popen([sys.executable, str(tmp_path / "bin" / "peftnode-lock"), "run", "--steps-dir",
                             tmp_path / "steps", "--run-id", holder["run_id"], "--name", "make", "--",
                             "sleep", "300"], start_new_session=True)
    deadline = time.time() + 10
    while not list((tmp_path / "steps").glob("*.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # as a controller killed outright: no release
    first.wait()
    assert lock_status(lock_file)["holder"] == holder  # the holder outlives its run

    (tmp_path / "go").touch()
    second, second_log = play("second", peftnode_lock_wait=0)
    assert second.wait(timeout=120) == 0, second_log.read_text()
    out = second_log.read_text()
    assert (f"the run that held {lock_file} (ansible-playbook PID {first.pid}, started "
            f"{holder['owner']['started_at']}) is gone: taking it over") in out
    assert "stopped 1 step(s) left by an interrupted run: sleep 300 (PID" in out
    assert step.wait(timeout=20) == 128 + signal.SIGTERM or step.returncode == -signal.SIGKILL
    assert gone(holder["holder_pid"])
    assert lock_status(lock_file)["held"] is False


@pytest.mark.slow
def test_a_failed_host_releases_the_lock_and_the_run_still_fails(play, tmp_path):
    (tmp_path / "go").touch()
    run, log = play("failing", fail_here=True)
    assert run.wait(timeout=120) == 2
    out = log.read_text()
    assert re.search(r"^localhost\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=1 ", out, re.M), out
    assert "TASK [peftnode : Release the node lock]" in out
    status = lock_status(tmp_path / "lock" / "peftnode.lock")
    assert status["held"] is False and status["previous"]["owner"]["pid"] == run.pid


def test_site_takes_the_lock_first_and_releases_it_however_the_roles_end():
    """site.yml's provisioning play has the shape the small play above proves: the lock in
    pre_tasks, every role in one block whose always: releases it; the driver role takes it again
    after its reboot."""
    import yaml

    play = yaml.safe_load((REPO / "site.yml").read_text())[1]
    small = yaml.safe_load(PLAYBOOK)[0]
    assert "roles" not in play and play["pre_tasks"] == small["pre_tasks"]
    assert len(play["tasks"]) == 1 and play["tasks"][0]["always"] == small["tasks"][0]["always"]
    block = play["tasks"][0]["block"]
    assert all("ansible.builtin.import_role" in t or t.get("ansible.builtin.meta") == "flush_handlers" for t in block)
    assert block[-1]["ansible.builtin.meta"] == "flush_handlers"  # handlers run before the release

    driver = yaml.safe_load((REPO / "roles" / "peftnode_nvidia_driver" / "tasks" / "driver.yml").read_text())
    names = [t["name"] for t in driver]
    reboot = names.index(next(n for n in names if n.startswith("Reboot into driver")))
    again = driver[reboot + 1]
    assert again["ansible.builtin.include_role"] == {"name": "peftnode", "tasks_from": "lock"}
    assert again["when"] == driver[reboot]["when"]
