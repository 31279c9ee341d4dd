"""The one way peftnode starts a process: with a deadline, killed as a whole tree, and described.

Every child process of a verify run goes through here: the check runner's workers, the shared GPU
worker, the NCCL all-reduce ranks, torchrun and its ranks, the fine-tune workers, nccl-tests, dcgmi.
What each caller used to do by hand lives here once:

- the child's environment (``child_env``): this interpreter's ``sys.path`` as ``PYTHONPATH``,
  unbuffered output, no hub downloads unless asked, and a token naming the tree;
- its own session, so ``killpg`` reaches what it started (without psutil, as on a bare node's system
  Python, that process group is all a kill reaches);
- a deadline; past it, or on any exception in the parent (Ctrl-C included), the whole tree is killed:
  the processes psutil sees below the child, every process group among them, and any process still
  carrying the tree's token in its environment (ranks re-parented to init once their launcher died);
- an :class:`Exit` that says how it ended (exit code, signal, timeout) with the tail of its output.

Tests inject faults through this layer from the outside: whatever ``sys.path`` holds is the child's
``PYTHONPATH``, so a test directory with a ``sitecustomize.py`` on it changes the child's behaviour
without a hook in production code.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:  # a dependency of peftnode; a bare node's system Python may lack it (see Process.kill_tree)
    import psutil
except ImportError:  # pragma: no cover - exercised by the converge test's bare-Python run
    psutil = None

TOKEN_ENV = "PEFTNODE_PROC_TOKEN"
TAIL_BYTES = 4000
KILL_WAIT_S = 5.0


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def child_env(extra: dict[str, str] | None = None, *, allow_download: bool = False) -> dict[str, str]:
    """The environment of a Python child: this interpreter's import path, unbuffered output, passive
    OpenMP waits (spinning threads slow training ~10x when processes share the CPUs), and no model-hub
    downloads unless ``allow_download``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not allow_download:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env | (extra or {})


def python_argv(*args: str) -> list[str]:
    """``[this python, *args]``: children run under the interpreter (and virtualenv) verify runs in."""
    return [sys.executable, *args]


@dataclass
class Exit:
    """How a process ended."""

    code: int | None = None  # its exit status, when it exited by itself
    signal: str | None = None  # the signal that ended it, when one did (ours after a timeout not counted)
    timed_out: bool = False
    elapsed_s: float = 0.0
    tail: str = ""  # the last TAIL_BYTES of its combined output
    killed: int = 0  # processes this layer signalled to end the tree
    leftover: list[int] = field(default_factory=list)  # pids still alive after the kill (should be none)
    output: str | None = None  # its whole combined output, when the caller asked to keep it

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.timed_out

    def last_line(self) -> str:
        rows = [r.strip() for r in self.tail.splitlines() if r.strip() and not set(r.strip()) <= set("*=-")]
        return rows[-1] if rows else ""

    def describe(self, timeout_s: float | None = None) -> str:
        if self.timed_out:
            return f"timed out after {timeout_s if timeout_s is not None else self.elapsed_s:g} s and was killed"
        if self.signal:
            return f"crashed with {self.signal}"
        return f"exited with code {self.code}"


class Process:
    """A started child (leader of its own session) whose tree this object can end.

    ``stdin``/``stdout`` are ``"pipe"`` (a pipe the caller uses), ``"log"`` (stdout only: into the log
    file, stderr with it) or None (``/dev/null`` for stdin). stderr always goes to the log file, which
    is a temporary file unless ``log_path`` is given; ``tail()`` reads its end.
    """

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 log_path: str | os.PathLike | None = None, stdin: str | None = None, stdout: str = "log",
                 pass_fds: tuple[int, ...] = ()):
        self.argv = list(argv)
        self.token = uuid.uuid4().hex
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="peftnode-proc-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.started = time.monotonic()
        environment = dict(env if env is not None else child_env())
        environment[TOKEN_ENV] = self.token
        try:
            with open(self.log_path, "ab") as log:
                self.popen = subprocess.Popen(
                    self.argv, env=environment, cwd=cwd, start_new_session=True, pass_fds=pass_fds,
                    stdin=subprocess.PIPE if stdin == "pipe" else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if stdout == "pipe" else log, stderr=log,
                )
        except BaseException:  # nothing started: leave nothing behind either
            if self._own_log:
                self.log_path.unlink(missing_ok=True)
            raise
        self.pid = self.popen.pid
        self.stdin = self.popen.stdin
        self.stdout = self.popen.stdout
        self._buf = b""
        self._exit: Exit | None = None
        self._killed_by_us = False

    # -- a JSON-lines channel over stdin/stdout (both opened with "pipe"; the child uses reply_channel) --

    def send(self, message: dict) -> None:
        """One request line; BrokenPipeError/OSError when the child is gone."""
        self.stdin.write((json.dumps(message) + "\n").encode())
        self.stdin.flush()

    def receive(self, timeout_s: float) -> dict | None:
        """The next reply line, or None when the child closed its end (it died, or this side was closed
        from another thread); TimeoutError if none arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            if self.stdout.closed:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            try:
                ready, _, _ = select.select([self.stdout.fileno()], [], [], min(remaining, 0.5))
                chunk = os.read(self.stdout.fileno(), 1 << 16) if ready else None
            except (ValueError, OSError):  # closed from another thread while waiting
                return None
            if chunk is None:
                continue
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    # -- waiting ----------------------------------------------------------------------------------

    def poll(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit status (negative: the signal), or None if still running at the deadline."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    # -- ending -----------------------------------------------------------------------------------

    def _tree(self) -> list:
        """The processes below the child (psutil.Process each). Without psutil: none, and kill_tree
        reaches the child's own process group only, which holds every descendant that did not start
        a session of its own."""
        if psutil is None:
            return []
        procs: dict[int, psutil.Process] = {}
        try:
            for p in psutil.Process(self.pid).children(recursive=True):
                procs[p.pid] = p
        except psutil.Error:
            pass
        for p in _carrying(self.token):
            procs.setdefault(p.pid, p)
        return list(procs.values())

    def kill_tree(self) -> tuple[int, list[int]]:
        """SIGKILL the child, its process groups and everything below it (also re-parented ranks that
        still carry this tree's token). Returns (processes signalled, pids alive afterwards)."""
        if self.popen.poll() is None:
            self._killed_by_us = True
        members = self._tree()
        signalled: set[int] = set()
        own_group = os.getpgrp()
        groups = set()
        for pid in ([self.pid] if self.popen.poll() is None else []) + [p.pid for p in members]:
            try:
                groups.add(os.getpgid(pid))
            except OSError:
                pass
        for group in groups - {own_group}:
            try:
                os.killpg(group, signal.SIGKILL)
            except OSError:
                pass
        if self.popen.poll() is None:
            try:
                self.popen.kill()
                signalled.add(self.pid)
            except OSError:
                pass
        for p in members:
            try:
                p.kill()
                signalled.add(p.pid)
            except psutil.Error:
                pass
        try:
            self.popen.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        # Grandchildren are not ours to reap: once killed they are zombies until their new parent
        # reaps them, which a container's init may never do. A zombie holds nothing: it counts as gone.
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            rest = {p.pid for p in members if _running(p)} | {p.pid for p in _carrying(self.token) if _running(p)}
            if not rest or time.monotonic() > deadline:
                return len(signalled), sorted(rest)
            time.sleep(0.02)

    def _group_left(self) -> bool:
        """Something of its process group outlived it (a child it did not wait for). One signal-0 probe,
        not a scan of every process's environment: after a clean exit only what stayed in the group is
        ended; a process that made a session of its own is found by its token when the tree is killed."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True

    def finish(self, *, timed_out: bool = False) -> Exit:
        """End the tree (if anything of it is left) and say how the process ended."""
        if self._exit is not None:
            return self._exit
        was_running = self.popen.poll() is None
        killed, leftover = self.kill_tree() if (was_running or self._group_left()) else (0, [])
        code = self.popen.poll()
        ex = Exit(timed_out=timed_out, elapsed_s=round(time.monotonic() - self.started, 3), tail=self.tail(),
                  killed=killed, leftover=leftover)
        if code is not None and not (was_running and self._killed_by_us):
            if code < 0:
                ex.signal = signal_name(-code)
            else:
                ex.code = code
        self._exit = ex
        for stream in (self.stdin, self.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        return ex

    def tail(self, nbytes: int = TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, self.log_path.stat().st_size - nbytes))
                return fh.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def output(self) -> str:
        """Everything it printed, as printed."""
        try:
            return self.log_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> Exit:
        """Finish and remove the temporary log (a log the caller named is kept)."""
        ex = self.finish()
        if self._own_log:
            try:
                self.log_path.unlink()
            except OSError:
                pass
        return ex


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _carrying(token: str) -> list:
    """Live processes whose environment holds this tree's token (none known without psutil)."""
    if psutil is None:
        return []
    found = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(TOKEN_ENV) == token and _running(p):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def child_pids() -> set[int]:
    """The pids of this process's direct children (empty without psutil)."""
    if psutil is None:
        return set()
    try:
        return {p.pid for p in psutil.Process().children()}
    except psutil.Error:
        return set()


def end_children(spared: set[int] = frozenset()) -> list[int]:
    """SIGKILL every process this one started (its direct children but ``spared``) with their trees: their
    process groups, their descendants and processes still carrying their :mod:`checks.proc` token
    (re-parented ranks). Returns the pids signalled. Without psutil: nothing (the workers' own close()
    still kills their process groups)."""
    if psutil is None:
        return []
    try:
        roots = [p for p in psutil.Process().children() if p.pid not in spared]
    except psutil.Error:
        return []
    members: dict[int, psutil.Process] = {}
    tokens: set[str] = set()
    for root in roots:
        members[root.pid] = root
        try:
            tokens.add(root.environ().get(TOKEN_ENV) or "")
        except (psutil.Error, OSError):
            pass
        try:
            for p in root.children(recursive=True):
                members[p.pid] = p
        except psutil.Error:
            pass
    for token in tokens - {""}:
        for p in _carrying(token):
            members.setdefault(p.pid, p)
    own_group = os.getpgrp()
    for p in members.values():
        try:
            group = os.getpgid(p.pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
        try:
            p.kill()
        except psutil.Error:
            pass
    # Not psutil.wait_procs: it would reap our own children under their Popen objects. A zombie holds nothing.
    deadline = time.monotonic() + KILL_WAIT_S
    while any(_running(p) for p in members.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return sorted(members)


def reply_channel():
    """The child's end of the channel: a text stream on the real stdout for its replies, while fd 1 (stray
    prints from libraries) goes to stderr, the parent's log of it."""
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def run(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None, cwd: str | None = None,
        log_path: str | os.PathLike | None = None, keep_output: bool = False) -> Exit:
    """Run to the end or the deadline, whichever comes first; the tree is gone when this returns
    (also when the caller is interrupted). ``keep_output``: ``Exit.output`` holds all it printed."""
    proc = Process(argv, env=env, cwd=cwd, log_path=log_path)
    try:
        code = proc.wait(timeout_s)
        ex = proc.finish(timed_out=code is None)
        if keep_output:
            ex.output = proc.output()
        return ex
    finally:
        proc.close()
