"""A real Debian bookworm node for the converge tier: a systemd-nspawn container with systemd as PID 1.

The host does not need systemd: ``systemd-nspawn --boot --register=no --keep-unit`` boots the tree
without machined or a system bus. The container shares the host's network namespace, so its sshd
(a drop-in: ``Port N``, ``ListenAddress 127.0.0.1``) and every service the roles start listen on the
host's loopback. Ansible reaches it over SSH with a throw-away ed25519 key.

Nothing here names a package mirror: the Debian mirror is read from the machine's own apt sources at
run time, and everything downloaded is cached under ``.cache/converge/`` (git-ignored) so a second
local run skips debootstrap and the downloads; CI starts from nothing and builds the same cache.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.procs import default_sigint

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PEFTNODE_CONVERGE_CACHE", ROOT / ".cache" / "converge"))
WORK = Path(tempfile.gettempdir()) / "peftnode-ci"  # container trees, keys, logs: one dir per machine
PREFIX = "peftnode-ci-"
SUITE = "bookworm"
VARIANT = "minbase"
# What the harness needs in the tree to boot it and reach it; everything else is the roles' job.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "sudo", "ca-certificates")
HARNESS_REVISION = 1  # bump when the way the cached tree is made changes
BOOT_TIMEOUT = 120.0
SSH_OPTS = (
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
)


timings: dict[str, float] = {}  # filled as the harness goes; printed by the tests


class HarnessError(RuntimeError):
    """The container could not be built, booted or reached."""


def log(msg: str) -> None:
    print(f"[converge] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], *, timeout: float | None = None, log_to: Path | None = None,
        check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a host command; on failure raise with the command and the tail of its output."""
    if log_to is not None:
        with open(log_to, "ab") as fh:
            fh.write(f"\n$ {shlex.join(argv)}\n".encode())
            fh.flush()
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, **kw)
        output = log_to.read_text(errors="replace")[-4000:]
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
        output = (proc.stdout or "")[-2000:] + (proc.stderr or "")[-2000:]
    if check and proc.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} exited {proc.returncode}:\n{output}")
    return proc


# --- the machine's own Debian mirror ------------------------------------------------------------


@dataclass
class AptSource:
    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    signed_by: str | None = None


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, cur, key = [], {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def _one_line_sources(text: str) -> list[AptSource]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
        if not m:
            continue
        options = dict(o.split("=", 1) for o in (m.group(2) or "").split() if "=" in o)
        out.append(AptSource([m.group(1)], [m.group(3)], [m.group(4)], m.group(5).split(),
                             options.get("signed-by")))
    return out


def apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled entry of the machine's apt sources (deb822 ``*.sources`` and one-line ``*.list``)."""
    found: list[AptSource] = []
    files = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for st in _deb822_stanzas(text):
                if st.get("enabled", "yes").lower() == "no" or "uris" not in st:
                    continue
                found.append(AptSource(st.get("types", "deb").split(), st["uris"].split(),
                                       st.get("suites", "").split(), st.get("components", "").split(),
                                       st.get("signed-by")))
        elif path.suffix == ".list" or path.name == "sources.list":
            found.extend(_one_line_sources(text))
    return found


def debian_mirror() -> AptSource:
    """The entry that serves the main Debian archive: a plain codename suite (not -security/-updates)
    on a URI that is not a security archive. Its URI is used for debootstrap and deb-src entries."""
    keyrings = ("/usr/share/keyrings/debian-archive-keyring.gpg",)
    for src in apt_sources():
        plain = [s for s in src.suites if re.fullmatch(r"[a-z]+", s) and s not in ("stable", "testing")]
        uris = [u for u in src.uris if "security" not in u and u.startswith(("http://", "https://"))]
        if "deb" in src.types and plain and uris:
            signed_by = src.signed_by if src.signed_by and "\n" not in src.signed_by else None
            if signed_by is None and Path(keyrings[0]).is_file():
                signed_by = keyrings[0]
            return AptSource(["deb"], uris[:1], plain, ["main"], signed_by)
    raise HarnessError("no Debian archive entry found in /etc/apt/sources.list{,.d/*}: cannot derive a mirror")


# --- host prerequisites --------------------------------------------------------------------------


def ensure_host_tools() -> None:
    """debootstrap, systemd-nspawn and ssh on the host; installed with apt-get when missing."""
    wanted = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
              "ssh": "openssh-client", "ssh-keygen": "openssh-client", "zstd": "zstd"}
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not missing:
        return
    log(f"installing host tools: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if run(["apt-get", "install", "-y", "-q", *missing], check=False, env=env, timeout=600).returncode != 0:
        run(["apt-get", "update", "-q"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-q", *missing], env=env, timeout=600)


# --- the root file system (debootstrap once, then a cached tarball) ------------------------------


def rootfs_key() -> str:
    spec = {"suite": SUITE, "variant": VARIANT, "packages": sorted(PACKAGES), "rev": HARNESS_REVISION,
            "arch": os.uname().machine}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_tarball() -> Path:
    """The cached bookworm tree as ``.cache/converge/rootfs-bookworm-<key>.tar.zst``; built with
    debootstrap (≈ 1 min) when absent."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"rootfs-{SUITE}-{rootfs_key()}.tar.zst"
    if tarball.is_file():
        return tarball
    mirror = debian_mirror().uris[0]
    build = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    tree = build / "root"
    logfile = CACHE / "debootstrap.log"
    logfile.unlink(missing_ok=True)
    t0 = time.monotonic()
    log(f"debootstrap --variant={VARIANT} {SUITE} (mirror from the machine's apt sources)")
    try:
        run(["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE, str(tree), mirror],
            log_to=logfile, timeout=1200)
        # Leave nothing host-specific or bulky in the cached tree.
        shutil.rmtree(tree / "var/cache/apt/archives", ignore_errors=True)
        (tree / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        for key in (tree / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        partial = tarball.with_name(tarball.name + f".part-{os.getpid()}")
        run(["tar", "--zstd", "--numeric-owner", "--xattrs", "--acls", "-C", str(tree), "-cpf", str(partial), "."],
            log_to=logfile, timeout=600)
        os.replace(partial, tarball)
    finally:
        _remove_tree(build)
    timings["debootstrap_s"] = round(time.monotonic() - t0, 1)
    log(f"rootfs cached as {tarball.name} in {timings['debootstrap_s']} s")
    return tarball


# --- process / mount hygiene ---------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie counts as gone


def _root_source(pid: int) -> str | None:
    """Where a process's root directory comes from, as the host sees it. For a process inside an
    nspawn container (its own mount namespace, so /proc/PID/root just reads "/") this is the host
    path of the container tree, taken from the root line of /proc/PID/mountinfo."""
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == "/":
            return fields[3].replace("\\040", " ").removesuffix("//deleted")
    return None


def _kill_inside(tree: Path) -> None:
    """SIGKILL every process whose root is the container tree (its systemd first: killing the init of
    a PID namespace takes every process in it along), by pid."""
    prefix = str(tree)
    me = os.getpid()
    for _ in range(20):
        victims = [p for p in _pids() if p != me
                   and (r := _root_source(p)) is not None and (r == prefix or r.startswith(prefix + "/"))]
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    log(f"processes of {tree} survived SIGKILL: {victims}")


def _unmount_below(path: Path) -> None:
    prefix = str(path)
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def _remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mount (a leftover /proc or /sys bind must not be walked)."""
    if not path.exists():
        return
    _unmount_below(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True)


def cleanup_stale() -> None:
    """Remove what a crashed earlier run left: container dirs whose owner process is gone, and any
    ``systemd-nspawn --machine=peftnode-ci-*`` whose directory has no live owner."""
    if not WORK.is_dir():
        return
    for d in sorted(WORK.glob(PREFIX + "*")):
        owner = d / "owner.json"
        try:
            info = json.loads(owner.read_text())
            alive = _starttime(int(info["pid"])) == info["starttime"]
        except (OSError, ValueError, KeyError):
            alive = False
        if alive:
            continue
        log(f"removing leftovers of a previous run: {d.name}")
        nspawns = [pid for pid in _pids()
                   if (argv := _cmdline(pid)) and Path(argv[0]).name == "systemd-nspawn"
                   and f"--machine={d.name}" in argv]
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for pid in nspawns:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_starttime(p) for p in nspawns):
                time.sleep(0.2)
        _kill_inside(d / "root")
        _remove_tree(d)


# --- the container -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


_LIVE: list[Container] = []


def _stop_all(*_args) -> None:
    for c in list(_LIVE):
        with contextlib.suppress(Exception):
            c.stop()


def _install_safety_nets() -> None:
    if getattr(_install_safety_nets, "done", False):
        return
    _install_safety_nets.done = True
    atexit.register(_stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous == signal.SIG_IGN:
            continue

        def handler(signum, frame, previous=previous):
            _stop_all()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


@dataclass
class Container:
    """One booted container. ``start()`` extracts the cached tree, boots it and waits for systemd;
    ``stop()`` (idempotent; also run at exit and on SIGTERM/SIGHUP) shuts it down and removes it."""

    name: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{os.urandom(3).hex()}")
    port: int = 0
    dir: Path = field(init=False)
    proc: subprocess.Popen | None = field(default=None, init=False)

    def __post_init__(self):
        self.dir = WORK / self.name

    # paths
    @property
    def tree(self) -> Path:
        return self.dir / "root"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.ini"

    # lifecycle
    def start(self, tarball: Path, boot_timeout: float = BOOT_TIMEOUT) -> Container:
        _install_safety_nets()
        self.dir.mkdir(parents=True)
        (self.dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "starttime": _starttime(os.getpid())}))
        _LIVE.append(self)
        t0 = time.monotonic()
        self.tree.mkdir()
        run(["tar", "--zstd", "--numeric-owner", "--xattrs", "--acls", "-C", str(self.tree), "-xpf", str(tarball)],
            timeout=600)
        timings["extract_s"] = round(time.monotonic() - t0, 1)
        self._prepare()
        t0 = time.monotonic()
        self._boot()
        self.wait_running(boot_timeout)
        timings["boot_s"] = round(time.monotonic() - t0, 1)
        log(f"{self.name} up: systemd running, sshd on 127.0.0.1:{self.port} ({timings['boot_s']} s)")
        return self

    def _prepare(self) -> None:
        t = self.tree
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(self.key)])
        run(["ssh-keygen", "-A", "-f", str(t)])  # fresh host keys for this container
        ssh_dir = t / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(Path(f"{self.key}.pub").read_text())
        auth.chmod(0o600)
        self.port = self.port or free_port()
        dropin = t / "etc/ssh/sshd_config.d/peftnode-ci.conf"
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            "# written by tests/integration/container.py: the host's loopback is shared with the container\n"
            f"Port {self.port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUseDNS no\n"
        )
        (t / "etc/hostname").write_text("peftnode-ci\n")
        # Only sshd and what the roles start may listen: no getty on a console nobody reads.
        for unit in ("getty@tty1.service", "console-getty.service"):
            mask = t / "etc/systemd/system" / unit
            mask.parent.mkdir(parents=True, exist_ok=True)
            if not mask.exists():
                mask.symlink_to("/dev/null")
        self.inventory.write_text(
            "[converge]\n"
            f"peftnode-ci ansible_host=127.0.0.1 ansible_port={self.port} ansible_user=root "
            f"ansible_ssh_private_key_file={self.key} ansible_python_interpreter=/usr/bin/python3 "
            "ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no'\n"
        )

    def _boot(self) -> None:
        if port_in_use(self.port):
            raise HarnessError(f"port {self.port} on 127.0.0.1 is taken; cannot give it to the container's sshd")
        argv = ["systemd-nspawn", "--boot", f"--directory={self.tree}", f"--machine={self.name}",
                # no machined and no system bus on a host whose PID 1 is not systemd
                "--register=no", "--keep-unit",
                "--console=read-only", "--resolv-conf=copy-host", "--timezone=off",
                "--setenv=SYSTEMD_COLORS=0"]
        log(f"booting {self.name}: {shlex.join(argv)}")
        with open(self.console_log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_running(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"systemd-nspawn exited {self.proc.returncode} during boot:\n{self.console_tail()}")
            left = max(5.0, deadline - time.monotonic())
            try:
                r = self.ssh("systemctl is-system-running --wait", timeout=left, check=False)
            except subprocess.TimeoutExpired:
                break
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.ssh("systemctl --failed --no-legend --plain", check=False).stdout.strip()
                    log(f"{self.name} is degraded; failed units:\n{failed}")
                return
            last = f"rc={r.returncode} state={state!r} {r.stderr.strip()}"
            time.sleep(1)
        raise HarnessError(f"{self.name} did not reach running/degraded within {timeout:.0f} s "
                           f"(last: {last})\n{self.console_tail()}")

    def console_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no console log)"

    def stop(self) -> None:
        """Shut the container down (SIGTERM → clean poweroff, SIGKILL after 30 s), kill anything left
        inside, unmount and remove its directory. Safe to call twice, and after a failed start."""
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        _kill_inside(self.tree)
        if os.environ.get("PEFTNODE_CONVERGE_KEEP"):
            log(f"PEFTNODE_CONVERGE_KEEP set: leaving {self.dir}")
            return
        _remove_tree(self.dir)

    # access
    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", "-i", str(self.key), "-p", str(self.port), *SSH_OPTS, "root@127.0.0.1", command]

    def ssh(self, command: str, *, check: bool = True, timeout: float = 120,
            user: str | None = None) -> subprocess.CompletedProcess:
        """Run a shell command inside as root (or as ``user`` through runuser)."""
        if user:
            command = f"runuser -u {shlex.quote(user)} -- sh -c {shlex.quote(command)}"
        r = subprocess.run(self.ssh_argv(command), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise HarnessError(f"in {self.name}: {command!r} exited {r.returncode}\n"
                               f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def ansible_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_LOCAL_TEMP": str(self.dir / "ansible-tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.dir / "cp"),
            "PYTHONUNBUFFERED": "1",
        }


def ansible_bin(name: str) -> str:
    """ansible / ansible-playbook of the environment pytest runs in (the project's .venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise HarnessError(f"{name} not found next to {sys.executable} or on PATH (scripts/bootstrap test)")
    return found


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- Ansible against a container -----------------------------------------------------------------


@dataclass
class AnsibleRun:
    argv: list[str]
    rc: int
    output: str
    seconds: float
    task_timings: list[dict] = field(default_factory=list)  # PEFTNODE_TIMINGS lines, when written

    def seconds_by_role(self) -> dict[str, float]:
        """Where the run's time went: seconds per role (tasks outside a role under "play")."""
        out: dict[str, float] = {}
        for t in self.task_timings:
            if "seconds" in t and "task" in t:
                role = t.get("role") or "play"
                out[role] = round(out.get(role, 0.0) + float(t["seconds"]), 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def slowest_tasks(self, n: int = 8) -> list[tuple[str, float]]:
        tasks = [(f"{t.get('role') or 'play'}: {t['task']}", float(t["seconds"]))
                 for t in self.task_timings if "seconds" in t and "task" in t]
        return sorted(tasks, key=lambda kv: -kv[1])[:n]

    def recap(self, host: str = "peftnode-ci") -> dict[str, int]:
        """The host's PLAY RECAP counters (ok, changed, unreachable, failed, skipped, ...)."""
        counts: dict[str, int] = {}
        in_recap = False
        for line in self.output.splitlines():
            if line.startswith("PLAY RECAP"):
                in_recap = True
                continue
            if in_recap and line.split(":", 1)[0].strip() == host:
                counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        return counts

    def changed_tasks(self) -> list[str]:
        """Every task and handler that reported changed, by name, for a readable idempotence failure."""
        task, out = None, []
        for line in self.output.splitlines():
            m = re.match(r"(?:TASK|RUNNING HANDLER) \[(.*)\]", line)
            if m:
                task = m.group(1)
            elif line.startswith("changed:") and task:
                out.append(task)
        return out

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def ansible(node: Container, *args: str, timeout: float = 300) -> AnsibleRun:
    return _ansible_run(node, [ansible_bin("ansible"), "-i", str(node.inventory), "all", *args], timeout)


def _playbook_argv(node: Container, playbook_path: Path, extra_vars: dict, label: str,
                   extra_args: tuple[str, ...]) -> list[str]:
    vars_file = node.dir / f"{label}.vars.json"
    vars_file.write_text(json.dumps(extra_vars, indent=2))
    return [ansible_bin("ansible-playbook"), "-i", str(node.inventory), "-e", f"@{vars_file}",
            *extra_args, str(playbook_path)]


def playbook(node: Container, playbook_path: Path, extra_vars: dict, *, label: str,
             timeout: float = 2400, extra_args: tuple[str, ...] = ()) -> AnsibleRun:
    """ansible-playbook with ``extra_vars`` (as a JSON file, so booleans stay booleans); the full
    output is kept in the container's directory as ``<label>.log`` and streamed to stderr."""
    argv = _playbook_argv(node, playbook_path, extra_vars, label, extra_args)
    return PlaybookProcess(node, argv, timeout, node.dir / f"{label}.log",
                           timings=node.dir / f"{label}.timings.jsonl").wait()


def start_playbook(node: Container, playbook_path: Path, extra_vars: dict, *, label: str,
                   timeout: float = 2400, extra_args: tuple[str, ...] = ()) -> PlaybookProcess:
    """Like ``playbook`` but returns at once: the run goes on in the background (to interrupt it,
    or to run two at once)."""
    argv = _playbook_argv(node, playbook_path, extra_vars, label, extra_args)
    return PlaybookProcess(node, argv, timeout, node.dir / f"{label}.log", timings=node.dir / f"{label}.timings.jsonl")


class PlaybookProcess:
    """One ansible-playbook (or ansible) in its own process group, its output read by a thread:
    ``wait_for`` a line, ``interrupt`` it as Ctrl-C does (SIGINT to the whole process group), ``wait``
    for the AnsibleRun. A watchdog SIGKILLs the group after ``timeout`` seconds."""

    def __init__(self, node: Container, argv: list[str], timeout: float, logfile: Path | None = None,
                 timings: Path | None = None):
        log(f"$ {shlex.join(argv)}")
        env = node.ansible_env()
        self.timings = timings
        if timings is not None:  # one JSON line per task (callback_plugins/peftnode_progress.py)
            timings.unlink(missing_ok=True)
            env["PEFTNODE_TIMINGS"] = str(timings)
        self.argv = argv
        self.t0 = time.monotonic()
        self.lines: list[str] = []
        self.interrupted_at: float | None = None
        self._cond = threading.Condition()
        self._timed_out = threading.Event()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=ROOT, start_new_session=True, preexec_fn=default_sigint)
        self.pid = self.proc.pid
        self._watchdog = threading.Timer(timeout, self._kill)
        self._watchdog.start()
        self._reader = threading.Thread(target=self._read, args=(logfile,), daemon=True)
        self._reader.start()

    def _read(self, logfile: Path | None) -> None:
        with open(logfile, "w") if logfile else contextlib.nullcontext() as fh:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
                if fh:
                    fh.write(line)
                    fh.flush()
                    sys.stderr.write(line)
        with self._cond:
            self._cond.notify_all()

    def _kill(self) -> None:
        self._timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        """The first output line matching ``pattern`` (a regex), waiting for it up to ``timeout``
        seconds; None when the run ended or the time ran out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and seen == len(self.lines)):
                    return None
                self._cond.wait(min(left, 1.0))

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        """What Ctrl-C in the terminal does: ``sig`` to every process of the run's process group."""
        self.interrupted_at = round(time.monotonic() - self.t0, 1)
        log(f"sending {signal.Signals(sig).name} to the process group of {self.proc.pid} "
            f"after {self.interrupted_at} s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> AnsibleRun:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = self.proc.wait()
        self._reader.join(30)
        self._watchdog.cancel()
        lines = list(self.lines)
        if self._timed_out.is_set():
            lines.append("[converge] killed by the watchdog")
            rc = 124
        return AnsibleRun(self.argv, rc, "\n".join(lines), round(time.monotonic() - self.t0, 1),
                          _read_timings(self.timings))


def _read_timings(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _ansible_run(node: Container, argv: list[str], timeout: float, logfile: Path | None = None) -> AnsibleRun:
    return PlaybookProcess(node, argv, timeout, logfile).wait()
