"""Start rank processes with torchrun, wait with a deadline, and collect what each rank reported.

``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE RUN_DIR`` runs MODULE's
``main`` once per rank. Every rank writes ``rank<N>.json`` in RUN_DIR at each stage it reaches (see
:class:`checks.finetune.ranks.Status`), so a run that is killed still says where each rank was.

torchrun puts every rank in a session of its own, so killing torchrun's process group does not reach
them. At the deadline the launcher kills torchrun's group, then the process group of every process
below it, then any process still running from this run's directory; every rank also asks the kernel
for SIGKILL when its parent (torchrun) dies, and torchrun when the launcher dies, so nothing outlives
a killed check. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KILL_WAIT_S = 5.0
LOG_TAIL_BYTES = 16384

# Runs torchrun after asking the kernel to kill it when the launcher dies (the request survives exec).
_SHIM = ("import ctypes, os, sys\n"
         "try:\n"
         "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
         "except Exception:\n"
         "    pass\n"
         "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[1:]])\n")


@dataclass
class Launch:
    """What came back from one torchrun run."""

    module: str
    nproc: int
    command: list[str]
    returncode: int | None = None  # torchrun's; None when it was killed at the deadline
    timed_out: bool = False
    timeout_s: float = 0.0
    wall_s: float = 0.0
    ranks: dict[int, dict] = field(default_factory=dict)  # rank -> its last status (missing: never wrote one)
    log_tail: str = ""
    killed: int = 0  # processes the launcher had to kill
    leftover: list[int] = field(default_factory=list)  # pids still alive after the kill (should be none)

    def missing(self) -> list[int]:
        return [r for r in range(self.nproc) if r not in self.ranks]


def torchrun_command(module: str, nproc: int, run_dir: str) -> list[str]:
    return [sys.executable, "-c", _SHIM, "--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0",
            f"--log_dir={os.path.join(run_dir, 'torchelastic')}", "-m", module, run_dir]


def rank_env(extra: dict[str, str] | None = None, allow_download: bool = False) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path)),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for several ranks, without its warning
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a hung NCCL collective raises at its timeout
    if not allow_download:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env | (extra or {})


def run_torchrun(module: str, nproc: int, config: dict, *, timeout_s: float, env: dict[str, str] | None = None,
                 allow_download: bool = False) -> Launch:
    """Run ``module`` on ``nproc`` ranks with ``config`` (JSON, read by every rank from RUN_DIR/config.json)."""
    run_dir = tempfile.mkdtemp(prefix="peftnode-torchrun-")
    command = torchrun_command(module, nproc, run_dir)
    launch = Launch(module, nproc, command, timeout_s=timeout_s)
    Path(run_dir, "config.json").write_text(json.dumps(config))
    log_path = Path(run_dir, "torchrun.log")
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=rank_env(env, allow_download), start_new_session=True)
        try:
            try:
                launch.returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                launch.timed_out = True
        finally:  # also on KeyboardInterrupt: never leave ranks behind
            launch.killed, launch.leftover = kill_tree(proc, run_dir)
        launch.wall_s = round(time.monotonic() - started, 3)
        launch.ranks = read_ranks(run_dir, nproc)
        launch.log_tail = _tail(log_path)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return launch


def read_ranks(run_dir: str, nproc: int) -> dict[int, dict]:
    out = {}
    for rank in range(nproc):
        try:
            out[rank] = json.loads(Path(run_dir, f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            pass
    return out


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def last_line(text: str) -> str:
    """The last meaningful line of torchrun's output (its banner of asterisks and blanks left out)."""
    rows = [r.strip() for r in text.splitlines() if r.strip() and not set(r.strip()) <= set("*=-")]
    return rows[-1] if rows else ""


# --- processes ----------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc; empty where there is no /proc)."""
    try:
        tree = _children_map()
    except OSError:
        return []
    out, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(tree.get(child, []))
    return out


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"] and state != ["X"]


def processes_using(token: str) -> list[int]:
    """Live processes whose command line mentions ``token`` (this run's directory)."""
    found = []
    needle = token.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and _alive(int(entry)):
            found.append(int(entry))
    return found


def _signal(pid: int, group: bool) -> bool:
    try:
        if group and os.getpgid(pid) != os.getpgrp():  # never our own group
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_tree(proc: subprocess.Popen, token: str) -> tuple[int, list[int]]:
    """Kill torchrun (``proc``, leader of its own group) and every rank below it, each rank's group too.
    Returns (processes signalled, pids still running afterwards)."""
    if proc.poll() is not None and not processes_using(token):
        return 0, []
    below = descendants(proc.pid)
    signalled: set[int] = set()
    for pid in ([proc.pid] if proc.poll() is None else []) + below:
        if _signal(pid, group=True):
            signalled.add(pid)
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + KILL_WAIT_S
    while True:  # ranks are reparented once torchrun is gone: find them by this run's directory too
        rest = sorted(set(processes_using(token)) | {p for p in below if _alive(p)})
        if not rest or time.monotonic() > deadline:
            break
        for pid in rest:
            if _signal(pid, group=False):
                signalled.add(pid)
        time.sleep(0.1)
    return len(signalled), rest
