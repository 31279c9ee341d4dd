"""Is NVIDIA Fabric Manager running, at the driver's version, on a node with NVSwitches?

On an NVSwitch system (HGX A100/A800/H100/H800) CUDA cannot initialise until fabric manager has
configured the switches: without it every CUDA program fails with error 802 (cudaErrorSystemNotReady,
"system not yet initialized"), and fabric manager refuses to run with a driver of another version.
Nodes without NVSwitches skip this check; so does a node expected to have no GPUs (``needs_gpus``).
The driver's version is read from /proc (or nvidia-smi) without needing gpu.driver to pass: a stopped
fabric manager is worth reporting beside a driver problem, and is often behind CUDA's error 802.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from checks.gpu.commands import run_command
from checks.gpu.driver import PROC_VERSION, parse_proc_version
from checks.registry import Context, check
from checks.result import Status, Verdict

SYSFS = Path("/sys")
UNIT = "nvidia-fabricmanager"
BINARY = "nv-fabricmanager"
PROBE_TIMEOUT_S = 15

NVIDIA_VENDOR = 0x10DE
NVSWITCH_CLASS = 0x0680  # PCI "other bridge": how NVSwitches present themselves
# NVSwitches one full HGX baseboard carries, by device id (NVIDIA HGX A100 and H100 8-GPU specs):
# fewer means a switch is missing from the bus and NVLink bandwidth is degraded (warn).
NVSWITCHES_PER_BOARD = {0x1AF1: 6, 0x22A3: 4}  # HGX A100/A800: 6 (2nd gen); HGX H100/H800: 4 (3rd gen)
VERSION_RX = re.compile(r"(?<![\d.])(\d{3}\.\d{1,3}(?:\.\d{1,3})?)(?![\d.])")

REMEDIATION_802 = (
    "On an NVSwitch system CUDA does not initialise until fabric manager runs, at exactly the driver's version: "
    "every CUDA program fails with error 802 \"system not yet initialized\" (cudaErrorSystemNotReady; nccl-tests "
    "prints \"Test CUDA failure common.cu:... 'system not yet initialized'\"). Install nvidia-fabricmanager-<branch> "
    "of the driver's version (fabricmanager role), then `systemctl enable --now nvidia-fabricmanager`; read "
    "`journalctl -u nvidia-fabricmanager` and /var/log/fabricmanager.log for why it stopped."
)


@dataclass
class FabricManagerProbe:
    nvswitches: dict[int, int] = field(default_factory=dict)  # NVSwitch device id -> count, from sysfs
    service: str | None = None  # `systemctl is-active` answer ("active", "failed", ...); None without systemctl
    version_text: str | None = None  # `nv-fabricmanager --version` output; None when it did not run
    driver: str | None = None  # the loaded driver's version (/proc, else nvidia-smi); None when not loaded
    error: str | None = None  # why a probe could not run


def _hex(path: Path) -> int | None:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def is_nvswitch(vendor: int | None, klass: int | None, device: int | None) -> bool:
    """An NVIDIA PCI device of class 0x0680xx, or one of the known NVSwitch ids whatever class a kernel
    or firmware reports. The one rule: the fabricmanager role's filter (filter_plugins/) uses it too."""
    return vendor == NVIDIA_VENDOR and klass is not None and (klass >> 8 == NVSWITCH_CLASS
                                                             or device in NVSWITCHES_PER_BOARD)


def count_nvswitches(sysfs: Path = SYSFS) -> dict[int, int]:
    """NVSwitches in sysfs (vendor 0x10de, class 0x0680xx), counted per device id."""
    found: dict[int, int] = {}
    for dev in sorted((sysfs / "bus" / "pci" / "devices").glob("*")):
        vendor, klass, device = (_hex(dev / name) for name in ("vendor", "class", "device"))
        if is_nvswitch(vendor, klass, device):
            found[device or 0] = found.get(device or 0, 0) + 1
    return found


SERVICE_STATE_RX = re.compile(r"[a-z-]+")  # systemctl is-active: active, inactive, failed, activating, ...


def probe_fabricmanager(sysfs: Path = SYSFS, proc_version: Path = PROC_VERSION) -> FabricManagerProbe:
    probe = FabricManagerProbe(nvswitches=count_nvswitches(sysfs))
    if not probe.nvswitches:
        return probe
    state = run_command(["systemctl", "is-active", UNIT], PROBE_TIMEOUT_S)
    if state.exit is None:
        probe.error = "systemctl is not available" + ("" if state.error == "not installed" else f" ({state.error})")
    else:  # it exits 3 for an inactive unit: the state word is the answer either way
        answer = state.exit.last_line()
        broken = state.exit.timed_out or state.exit.signal
        if not broken and SERVICE_STATE_RX.fullmatch(answer):
            probe.service = answer
        else:  # no systemd as PID 1 (a container), a hung D-Bus
            probe.service = "unknown"
            probe.error = f"systemctl is-active {state.problem()}" if broken or not answer \
                else f"systemctl: {answer}"
    version = run_command([BINARY, "--version"], PROBE_TIMEOUT_S)
    if version.ok:
        probe.version_text = version.output.strip()
    try:
        probe.driver = parse_proc_version(proc_version.read_text())
    except OSError:
        probe.driver = None
    if probe.driver is None:
        smi = run_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], PROBE_TIMEOUT_S)
        versions = {line.strip() for line in (smi.output if smi.ok else "").splitlines()
                    if VERSION_RX.fullmatch(line.strip())}
        probe.driver = versions.pop() if len(versions) == 1 else None
    return probe


def judge_fabricmanager(probe: FabricManagerProbe, expected_driver: str) -> Verdict:
    """Skip without NVSwitches; fail unless the service is active and fabric manager's version is the
    driver's (the loaded one, else the stack's); warn when a baseboard shows fewer switches than it has."""
    count = sum(probe.nvswitches.values())
    if count == 0:
        return Verdict(Status.SKIP, "no NVSwitch on this node (no NVIDIA PCI bridge of class 0x0680): "
                                    "fabric manager is not needed", {"nvswitches": 0}, {})
    fm = None
    if probe.version_text:
        m = VERSION_RX.search(probe.version_text)
        fm = m.group(1) if m else None
    driver = probe.driver or expected_driver
    measured = {"nvswitches": count, "service": probe.service or "unknown", "fabricmanager": fm or "none",
                "driver": probe.driver or "not loaded"}
    expected = {"service": "active", "fabricmanager": driver}
    problems = []
    if probe.service != "active":
        problems.append(f"{UNIT}.service is {probe.service or 'unknown'}"
                        + (f" ({probe.error})" if probe.error else ""))
    if fm is None:
        problems.append(f"{BINARY} --version gave no version (fabric manager not installed?)")
    elif fm != driver:
        problems.append(f"fabric manager {fm} is not the driver's version {driver} "
                        f"({'loaded' if probe.driver else 'the stack pins'}); it refuses to run with another driver")
    if problems:
        return Verdict(Status.FAIL, f"{count} NVSwitch(es), but " + "; ".join(problems), measured, expected,
                       REMEDIATION_802)
    short = [f"{n} of {NVSWITCHES_PER_BOARD[d]} NVSwitches 10de:{d:04x}" for d, n in sorted(probe.nvswitches.items())
             if d in NVSWITCHES_PER_BOARD and n % NVSWITCHES_PER_BOARD[d]]
    if short:
        return Verdict(Status.WARN, f"fabric manager {fm} active, but {', '.join(short)} are visible: a switch is "
                                    "missing from the bus (degraded NVLink bandwidth)", measured, expected,
                       "Check `lspci -d 10de:` against the baseboard, the kernel log for NVSwitch errors (SXid), "
                       "and /var/log/fabricmanager.log; reseat or RMA the baseboard.")
    return Verdict(Status.PASS, f"fabric manager {fm} active at the driver's version, {count} NVSwitch(es)",
                   measured, expected)


@check("gpu.fabricmanager", "Fabric manager active at the driver's version on NVSwitch systems",
       needs_gpus=True, timeout_s=60)
def gpu_fabricmanager(ctx: Context) -> Verdict:
    return judge_fabricmanager(probe_fabricmanager(), ctx.stack["nvidia_driver"]["version"])
