"""Converge tier: the nvidia_driver and fabricmanager roles in a booted Debian bookworm container.

No kernel module can load here, so the node gets stand-ins that record what the roles do to them:

- the stack's runfile (``NVIDIA-Linux-x86_64-515.65.01.run``, served from a controller directory
  with its real sha256 through the artifact role) is a script that records its arguments and
  whether the kernel's build tree was there when it ran, and installs a stand-in ``nvidia-smi``
  printing the pinned version and a stand-in ``nvidia-persistenced``;
- ``update-initramfs`` records its calls;
- a local apt repository (``file:``, the only source apt sees) holds stand-in packages built here:
  ``linux-headers-<uname -r>`` (the build tree), ``dkms``, and ``nvidia-fabricmanager-515`` at
  515.65.01-1 *and* 515.86.01-1 (the newer one proves the role pins exactly the driver's version);
- a fake sysfs tree holds an HGX A800's PCI devices: 8 GPUs (class 0x0302) and 6 NVSwitches
  (10de:1af1, class 0x0680);
- a stand-in fabric manager archive in NVIDIA's layout (``fabricmanager-linux-x86_64-515.65.01-archive``
  with bin/, lib/, etc/, share/nvidia/nvswitch/, systemd/), served like the runfile.

Proved: the missing-headers failure names the kernel and runs nothing after it; headers before
the runfile; the runfile's flags; the nouveau blacklist and the initramfs handler; the reboot
decision (a message, no reboot); nvidia-persistenced enabled and running; fabric manager
515.65.01-1 installed (forced, then detected) and active, and the verify check gpu.fabricmanager
passing on it; a second run changes nothing; preflight refuses a fabric manager version other
than the driver's; fabric manager from the archive instead of the package, idempotent; a node
without NVIDIA devices gets no driver (a message), and fabric manager only when forced.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.integration import container as ct

pytestmark = pytest.mark.converge

PLAYBOOK = Path(__file__).parent / "playbooks" / "driver.yml"
DRIVER = "515.65.01"
NEWER = "515.86.01"
RUNFILE = f"NVIDIA-Linux-x86_64-{DRIVER}.run"
FM_ARCHIVE = f"fabricmanager-linux-x86_64-{DRIVER}-archive.tar.xz"
LIBDIR = "/usr/lib/x86_64-linux-gnu"
LOG = "/var/log/peftnode-test"
FAKE_SYS = "/srv/fake-sys"
MISSING_KERNEL = "0.0.0-peftnode-missing"
RESULTS: dict = {}

STANDIN_RUNFILE = f"""#!/bin/sh
# Stand-in for NVIDIA's driver runfile (peftnode converge test): records how it was called.
set -e
mkdir -p {LOG}
echo "$*" > {LOG}/runfile.args
echo "runfile $*" >> {LOG}/calls.log
if [ -e "/lib/modules/$(uname -r)/build/Makefile" ]; then echo yes; else echo no; fi > {LOG}/runfile.headers
cat > /usr/bin/nvidia-smi <<'EOS'
#!/bin/sh
case "$*" in
  *--query-gpu=driver_version*) for i in 1 2 3 4 5 6 7 8; do echo {DRIVER}; done ;;
  *) echo "NVIDIA-SMI {DRIVER} (peftnode stand-in)" ;;
esac
EOS
cat > /usr/bin/nvidia-persistenced <<'EOS'
#!/bin/sh
echo "nvidia-persistenced $*" >> {LOG}/calls.log
sleep 1000000 >/dev/null 2>&1 &
exit 0
EOS
chmod 0755 /usr/bin/nvidia-smi /usr/bin/nvidia-persistenced
"""

# Run inside the container: the stand-in tools, the fake sysfs and the local apt repository.
SETUP_PY = r'''
import hashlib, os, pathlib, subprocess
LOG = pathlib.Path("@LOG@")
LOG.mkdir(parents=True, exist_ok=True)
K = os.uname().release
repo = pathlib.Path("/srv/peftnode-repo")
repo.mkdir(parents=True, exist_ok=True)

def write(path, text, mode=0o644):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)

write("/usr/sbin/update-initramfs", "#!/bin/sh\necho \"update-initramfs $*\" >> @LOG@/calls.log\n", 0o755)

# an HGX A800: 8 GPUs, 6 NVSwitches, and a host bridge
devices = [(f"0000:{b:02x}:00.0", "0x10de", "0x030200", "0x20f3") for b in (7, 15, 71, 78, 135, 144, 183, 189)]
devices += [(f"0000:{b:02x}:00.0", "0x10de", "0x068000", "0x1af1") for b in range(0xc4, 0xca)]
devices += [("0000:00:00.0", "0x8086", "0x060000", "0x09a2")]
for slot, vendor, klass, device in devices:
    for name, value in (("vendor", vendor), ("class", klass), ("device", device)):
        write(f"@FAKE_SYS@/bus/pci/devices/{slot}/{name}", value + "\n")
pathlib.Path("@FAKE_SYS@/module").mkdir(parents=True, exist_ok=True)

def deb(name, version, files, postinst=None):
    root = pathlib.Path("/tmp/peftnode-pkg") / f"{name}_{version}"
    write(root / "DEBIAN/control", f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
          "Maintainer: peftnode tests <tests@peftnode.invalid>\nDescription: peftnode converge test stand-in\n")
    if postinst:
        write(root / "DEBIAN/postinst", "#!/bin/sh\n" + postinst + "\n", 0o755)
    for path, (text, mode) in files.items():
        write(root / path.lstrip("/"), text, mode)
    out = repo / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    data = out.read_bytes()
    return (f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: peftnode tests <tests@peftnode.invalid>\n"
            f"Filename: ./{out.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
            "Description: peftnode converge test stand-in\n")

stanzas = [
    deb(f"linux-headers-{K}", "1.0", {f"/lib/modules/{K}/build/Makefile": ("# stand-in\n", 0o644)},
        f"echo linux-headers-{K} >> @LOG@/calls.log"),
    deb("dkms", "0.0-peftnode", {"/usr/sbin/dkms": ("#!/bin/sh\nexit 0\n", 0o755)}, "echo dkms >> @LOG@/calls.log"),
]
for v in ("@DRIVER@", "@NEWER@"):
    fm = ("#!/bin/sh\ncase \"$1\" in -v|--version) echo \"Fabric Manager version is : " + v + "\"; exit 0;; esac\n"
          "echo \"nv-fabricmanager " + v + " $*\" >> @LOG@/calls.log\nexec sleep infinity\n")
    unit = ("[Unit]\nDescription=NVIDIA fabric manager service (peftnode stand-in)\n\n[Service]\n"
            "ExecStart=/usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg\n\n"
            "[Install]\nWantedBy=multi-user.target\n")
    stanzas.append(deb("nvidia-fabricmanager-515", v + "-1", {
        "/usr/bin/nv-fabricmanager": (fm, 0o755),
        "/lib/systemd/system/nvidia-fabricmanager.service": (unit, 0o644)}))
packages = "\n".join(stanzas).encode()
(repo / "Packages").write_bytes(packages)
(repo / "Release").write_text("Origin: peftnode-test\nLabel: peftnode-test\nSHA256:\n"
                              f" {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n")
print(K)
'''

# python3-apt (the apt module needs it) and xz-utils (the archive's unpacking; the base role's job in
# site.yml) from the container's own Debian sources; then apt sees only the local repository, so
# nothing real can stand in for a stand-in.
APT_SETUP = """set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends python3-apt xz-utils >/dev/null
mkdir -p /etc/apt/peftnode-disabled
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do [ -e "$f" ] && mv "$f" /etc/apt/peftnode-disabled/; done
echo 'deb [trusted=yes] file:/srv/peftnode-repo ./' > /etc/apt/sources.list.d/peftnode-test.list
apt-get update -q >/dev/null
"""


def _fm_archive(path: Path) -> None:
    """A stand-in fabric manager archive in NVIDIA's layout."""
    top = path.name.removesuffix(".tar.xz")
    fm = (f"#!/bin/sh\ncase \"$1\" in -v|--version) echo \"Fabric Manager version is : {DRIVER}\"; exit 0;; esac\n"
          f"echo \"nv-fabricmanager-archive {DRIVER} $*\" >> {LOG}/calls.log\nexec sleep infinity\n")
    unit = ("[Unit]\nDescription=NVIDIA fabric manager service (peftnode stand-in, archive)\n\n[Service]\n"
            "ExecStart=/usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg\n\n"
            "[Install]\nWantedBy=multi-user.target\n")
    members = {
        "bin/nv-fabricmanager": (fm, 0o755),
        "bin/nvswitch-audit": ("#!/bin/sh\nexit 0\n", 0o755),
        "lib/libnvfm.so.1": ("stand-in library\n", 0o644),
        "etc/fabricmanager.cfg": ("LOG_LEVEL=4\n", 0o644),
        "share/nvidia/nvswitch/dgxa100_hgxa100_topology": ("stand-in topology\n", 0o644),
        "systemd/nvidia-fabricmanager.service": (unit, 0o644),
        "LICENSE": ("stand-in\n", 0o644),
    }
    with tarfile.open(path, "w:xz") as tar:
        for name, (text, mode) in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def inputs(node, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("driver")
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    runfile = artifacts / RUNFILE
    runfile.write_text(STANDIN_RUNFILE)
    stack = yaml.safe_load((ct.ROOT / "stacks" / "cu117.yml").read_text())
    assert stack["nvidia_driver"]["version"] == DRIVER
    stack["nvidia_driver"]["artifact"] = {"file": RUNFILE, "sha256": ct.sha256_file(runfile), "url": None}
    stack_file = tmp / "cu117-driver-standin.yml"
    stack_file.write_text(yaml.safe_dump(stack, sort_keys=False))
    _fm_archive(artifacts / FM_ARCHIVE)
    stack["fabricmanager"] = {"version": DRIVER, "artifact": {
        "file": FM_ARCHIVE, "sha256": ct.sha256_file(artifacts / FM_ARCHIVE), "url": None}}
    archive_stack = tmp / "cu117-driver-standin-fm-archive.yml"
    archive_stack.write_text(yaml.safe_dump(stack, sort_keys=False))

    script = SETUP_PY
    for key, value in {"@LOG@": LOG, "@FAKE_SYS@": FAKE_SYS, "@DRIVER@": DRIVER, "@NEWER@": NEWER}.items():
        script = script.replace(key, value)
    kernel = node.ssh(f"python3 -c {shlex.quote(script)}").stdout.strip()
    node.ssh(APT_SETUP, timeout=300)
    extra = {
        "peftnode_stack_name": str(stack_file),
        "peftnode_artifact_dir": str(artifacts),
        "peftnode_offline": True,
        "peftnode_nvidia_driver_sysfs_root": FAKE_SYS,
        "peftnode_fabricmanager_sysfs_root": FAKE_SYS,
    }
    yield SimpleNamespace(extra=extra, kernel=kernel, runfile=runfile, archive_stack=str(archive_stack))
    RESULTS.update({k: v for k, v in ct.timings.items() if k in ("boot_s", "extract_s")})
    print(f"\n[converge-driver] summary: {json.dumps(RESULTS, sort_keys=True)}")


def _run(node, inputs, label: str, extra_args: tuple[str, ...] = (), **overrides) -> ct.AnsibleRun:
    run = ct.playbook(node, PLAYBOOK, {**inputs.extra, **overrides}, label=label, timeout=300, extra_args=extra_args)
    RESULTS[f"{label}_s"] = run.seconds
    RESULTS[f"{label}_recap"] = run.recap()
    print(f"\n[converge-driver] {label}: rc={run.rc} in {run.seconds} s; recap {run.recap()}")
    return run


def _ran(run: ct.AnsibleRun, task: str) -> bool:
    """Whether a task ran (ok/changed) rather than being skipped."""
    block = run.output.split(f"TASK [{task}]", 1)
    return len(block) == 2 and bool(re.match(r"\s*\**\s*\n(ok|changed):", block[1]))


def _calls(node) -> list[str]:
    return node.ssh(f"cat {LOG}/calls.log 2>/dev/null || true").stdout.splitlines()


@pytest.fixture(scope="module")
def check_mode(node, inputs):
    """First of all, on the bare node: --check says what it would do and changes nothing."""
    run = _run(node, inputs, "driver0_check", extra_args=("--check",), peftnode_fabricmanager_sysfs_root="/sys")
    state = node.ssh("ls /etc/modprobe.d/blacklist-nouveau.conf /usr/bin/nvidia-smi /var/cache/peftnode "
                     f"{LOG}/runfile.args 2>/dev/null; dpkg-query -W 'nvidia-fabricmanager*' 'linux-headers*' "
                     "dkms 2>/dev/null; true").stdout
    return SimpleNamespace(run=run, state=state)


@pytest.fixture(scope="module")
def missing_headers(node, inputs, check_mode):
    """Then the headers of a kernel no repository has."""
    run = _run(node, inputs, "driver0_missing_headers", peftnode_nvidia_driver_kernel=MISSING_KERNEL)
    blacklist = node.ssh("cat /etc/modprobe.d/blacklist-nouveau.conf", check=False).stdout
    # start the real converge from a node without the blacklist, so its handler has to run again
    node.ssh("rm -f /etc/modprobe.d/blacklist-nouveau.conf")
    return SimpleNamespace(run=run, blacklist=blacklist, calls=_calls(node))


@pytest.fixture(scope="module")
def first(node, inputs, missing_headers):
    return _run(node, inputs, "driver1", peftnode_fabricmanager=True)


@pytest.fixture
def converged(first):
    if first.rc != 0:
        pytest.skip("the first driver converge failed (see test_first_converge)")
    return first


def test_check_mode_changes_nothing(check_mode):
    run = check_mode.run
    assert run.rc == 0, run.tail(60)
    text = " ".join(run.output.split())
    assert ("NVIDIA driver 515.65.01 would be installed (runfile method, NVIDIA-Linux-x86_64-515.65.01.run), "
            "with the headers of kernel") in text
    assert "No reboot: driver 515.65.01 was not installed in this run (loaded: none)" in text
    assert "No NVSwitch on peftnode-ci" in text and "fabric manager is not installed" in text
    assert check_mode.state.strip() == "", check_mode.state  # no file, no package, no cache


def test_missing_headers_fail_once_naming_the_kernel(node, missing_headers):
    run = missing_headers.run
    assert run.rc != 0 and run.recap().get("failed") == 1, run.tail(60)
    failed = re.findall(r"^fatal: \[peftnode-ci\]: FAILED! => (.*)$", run.output, re.M)
    assert len(failed) == 1, failed
    message = " ".join(run.output.split("fatal: [peftnode-ci]: FAILED!", 1)[1].split())
    assert f"The kernel headers for the running kernel {MISSING_KERNEL} are not available" in message
    assert f"linux-headers-{MISSING_KERNEL}" in message and "reboot into the newest installed kernel" in message
    # nothing after the headers ran: no runfile, no DKMS
    assert not any(c.startswith(("runfile", "dkms")) for c in missing_headers.calls), missing_headers.calls
    assert "blacklist nouveau" in missing_headers.blacklist  # nouveau goes first, before the headers


def test_first_converge(converged):
    recap = converged.recap()
    assert recap.get("failed") == 0 and recap.get("changed", 0) > 0, converged.tail(80)
    assert "nvidia_driver: NVIDIA-Linux-x86_64-515.65.01.run: needed=True" in converged.output


def test_headers_dkms_runfile_initramfs_in_order(node, inputs, converged):
    calls = _calls(node)
    heads = f"linux-headers-{inputs.kernel}"
    order = [c.split()[0] for c in calls if c.split()[0] in (heads, "dkms", "runfile", "update-initramfs")]
    assert order == [heads, "dkms", "runfile", "update-initramfs"], calls
    assert node.ssh(f"cat {LOG}/runfile.headers").stdout.strip() == "yes"


def test_runfile_flags(node, converged):
    assert node.ssh(f"cat {LOG}/runfile.args").stdout.strip() == "--silent --dkms --no-questions"
    assert node.ssh(f"test -x /var/cache/peftnode/{RUNFILE} && echo ok").stdout.strip() == "ok"


def test_nouveau_blacklisted_and_initramfs_rebuilt_once(node, converged):
    conf = node.ssh("cat /etc/modprobe.d/blacklist-nouveau.conf").stdout
    assert "blacklist nouveau" in conf.splitlines() and "options nouveau modeset=0" in conf.splitlines()
    assert [c for c in _calls(node) if c.startswith("update-initramfs")] == ["update-initramfs -u"]
    assert "RUNNING HANDLER [peftnode_nvidia_driver : Rebuild the initramfs without nouveau]" in converged.output


def test_reboot_is_a_message_not_a_reboot(node, converged):
    text = " ".join(converged.output.split())
    assert ("A reboot is pending (driver 515.65.01 was installed in this run); peftnode_driver_reboot is false"
            in text)
    assert not _ran(converged, "peftnode_nvidia_driver : Reboot into driver 515.65.01")
    # the container was not rebooted: systemd has been up since before the run
    assert float(node.ssh("cut -d' ' -f1 /proc/uptime").stdout) > converged.seconds


def test_persistenced_enabled_and_running(node, converged):
    assert node.ssh("systemctl is-enabled nvidia-persistenced", check=False).stdout.strip() == "enabled"
    assert node.ssh("systemctl is-active nvidia-persistenced", check=False).stdout.strip() == "active"
    assert "ExecStart=/usr/bin/nvidia-persistenced" in node.ssh(
        "cat /etc/systemd/system/nvidia-persistenced.service").stdout


def test_fabricmanager_is_exactly_the_driver_version(node, converged):
    assert node.ssh("dpkg-query -W -f '${Version}' nvidia-fabricmanager-515").stdout == f"{DRIVER}-1"
    policy = node.ssh("apt-cache policy nvidia-fabricmanager-515").stdout
    assert f"Candidate: {NEWER}-1" in policy  # a newer one was there: the role pinned the driver's
    assert node.ssh("systemctl is-active nvidia-fabricmanager", check=False).stdout.strip() == "active"
    assert node.ssh("systemctl is-enabled nvidia-fabricmanager", check=False).stdout.strip() == "enabled"


def test_verify_gpu_fabricmanager_passes_in_the_node(node, converged):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(ct.ROOT / "checks", arcname="checks", filter=lambda t: None if "__pycache__" in t.name else t)
    (node.dir / "checks.tgz").write_bytes(buf.getvalue())
    ct.run(["scp", "-q", "-i", str(node.key), "-P", str(node.port), *ct.SSH_OPTS, str(node.dir / "checks.tgz"),
            "root@127.0.0.1:/tmp/checks.tgz"])
    code = ("import json, pathlib; from checks.gpu import fabricmanager as fm; "
            f"v = fm.judge_fabricmanager(fm.probe_fabricmanager(pathlib.Path('{FAKE_SYS}')), '{DRIVER}'); "
            "print(json.dumps([v.status.label, v.message]))")
    out = node.ssh(f"rm -rf /tmp/v && mkdir /tmp/v && tar -xzf /tmp/checks.tgz -C /tmp/v && cd /tmp/v && "
                   f"python3 -c {shlex.quote(code)}").stdout
    status, message = json.loads(out)
    assert status == "pass", message
    assert message == "fabric manager 515.65.01 active at the driver's version, 6 NVSwitch(es)"
    # stopped, it fails with the CUDA error 802 remediation
    node.ssh("systemctl stop nvidia-fabricmanager")
    try:
        code_fail = code.replace("print(json.dumps([v.status.label, v.message]))",
                                 "print(json.dumps([v.status.label, v.remediation]))")
        out = node.ssh(f"cd /tmp/v && python3 -c {shlex.quote(code_fail)}").stdout
        status, remediation = json.loads(out)
        assert status == "fail" and "system not yet initialized" in remediation
    finally:
        node.ssh("systemctl start nvidia-fabricmanager")


def test_second_run_changes_nothing(node, inputs, converged):
    before = _calls(node)
    second = _run(node, inputs, "driver2")
    assert second.rc == 0, second.tail(60)
    assert second.recap().get("changed") == 0, f"changed tasks: {second.changed_tasks()}"
    assert "nvidia_driver: NVIDIA-Linux-x86_64-515.65.01.run: needed=False" in second.output
    # fabric manager detected (auto): its tasks ran, and found everything in place
    assert _ran(second, "peftnode_fabricmanager : Ask fabric manager for its version")
    assert [c for c in _calls(node) if not c.startswith("nv-fabricmanager")] == [
        c for c in before if not c.startswith("nv-fabricmanager")]


def test_preflight_refuses_another_fabricmanager_version(node, inputs, converged):
    run = _run(node, inputs, "driver3_fm_version", peftnode_fabricmanager_version=NEWER)
    assert run.rc != 0
    text = " ".join(run.output.split())
    assert (f"fabricmanager: peftnode_fabricmanager_version is {NEWER}, but the driver is {DRIVER}; fabric manager "
            "refuses to start unless both are the same version") in text
    assert run.recap().get("changed") == 0
    assert not _ran(run, "peftnode_fabricmanager : Refuse a fabric manager version that is not the driver's")
    assert node.ssh("dpkg-query -W -f '${Version}' nvidia-fabricmanager-515").stdout == f"{DRIVER}-1"


@pytest.fixture(scope="module")
def from_archive(node, inputs, first):
    """Fabric manager from the stack's archive instead of the package (the package removed first)."""
    if first.rc != 0:
        pytest.skip("the first driver converge failed (see test_first_converge)")
    node.ssh("systemctl disable --now nvidia-fabricmanager && apt-get purge -y -q nvidia-fabricmanager-515 "
             ">/dev/null && systemctl daemon-reload")
    return _run(node, inputs, "driver5_fm_archive", peftnode_stack_name=inputs.archive_stack)


def test_fabricmanager_from_the_archive(node, from_archive):
    run = from_archive
    assert run.rc == 0, run.tail(60)
    assert f"fabricmanager: {FM_ARCHIVE}: needed=True" in run.output
    changed = run.changed_tasks()
    assert {t.split(" : ")[0] for t in changed} <= {"peftnode_fabricmanager", "peftnode_artifact"}, changed
    assert node.ssh("nv-fabricmanager --version").stdout.strip() == f"Fabric Manager version is : {DRIVER}"
    for path in ("/etc/systemd/system/nvidia-fabricmanager.service", "/usr/share/nvidia/nvswitch/fabricmanager.cfg",
                 "/usr/share/nvidia/nvswitch/dgxa100_hgxa100_topology", f"{LIBDIR}/libnvfm.so.1",
                 "/usr/bin/nvswitch-audit"):
        assert node.ssh(f"test -f {path} && echo ok", check=False).stdout.strip() == "ok", path
    assert node.ssh("test -x /usr/bin/nv-fabricmanager && echo ok").stdout.strip() == "ok"
    assert node.ssh(f"ls /var/cache/peftnode/build/fabricmanager-{DRIVER} 2>/dev/null; true").stdout == ""
    assert node.ssh("systemctl is-active nvidia-fabricmanager", check=False).stdout.strip() == "active"
    assert node.ssh("systemctl is-enabled nvidia-fabricmanager", check=False).stdout.strip() == "enabled"
    assert "nv-fabricmanager-archive 515.65.01 -c /usr/share/nvidia/nvswitch/fabricmanager.cfg" in _calls(node)


def test_node_without_nvidia_devices_gets_no_driver_and_fabricmanager_only_when_forced(node, inputs, from_archive):
    """The real /sys (no NVIDIA device here): the driver role leaves the node alone with a message;
    fabric manager, forced, runs its tasks and finds the archive's install in place (changed=0)."""
    if any(p.read_text().strip() == "0x10de" for p in Path("/sys/bus/pci/devices").glob("*/vendor")):
        pytest.skip("this host has NVIDIA PCI devices; the container shares its /sys")
    run = _run(node, inputs, "driver4_no_gpu", peftnode_stack_name=inputs.archive_stack,
               peftnode_nvidia_driver_sysfs_root="/sys", peftnode_fabricmanager_sysfs_root="/sys",
               peftnode_fabricmanager=True)
    assert run.rc == 0 and run.recap().get("changed") == 0, f"{run.tail(60)}\nchanged: {run.changed_tasks()}"
    text = " ".join(run.output.split())
    assert "No NVIDIA GPU on peftnode-ci" in text and "the NVIDIA driver is not installed" in text
    assert not _ran(run, "peftnode_nvidia_driver : Blacklist nouveau")
    assert _ran(run, "peftnode_fabricmanager : Work out the loaded driver and the package to install")
    assert "nvidia_driver: NVIDIA-Linux-x86_64-515.65.01.run: needed=False" in run.output
    assert f"fabricmanager: {FM_ARCHIVE}: needed=False" in run.output
