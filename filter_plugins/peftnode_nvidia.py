# peftnode: the pure decisions of the nvidia_driver and fabricmanager roles, as Jinja filters.
"""Filters for the NVIDIA roles: what the node has (PCI devices from sysfs, driver versions from
their probes), which packages each OS family and release needs, and whether to reboot.

Everything here is pure: the roles probe the node and pass plain text and lists in, so every rule is
unit-tested on captured inputs (tests/test_nvidia_decisions.py) without a GPU.
"""

from __future__ import annotations

import os
import re
import sys

# The rules verify applies to the same facts come from the checks package: this checkout's copy (as
# lookup_plugins/peftnode_stack.py does), else an installed one.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_REPO, "checks", "__init__.py")) and _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from checks.gpu.driver import parse_proc_version  # noqa: E402
from checks.gpu.fabricmanager import NVIDIA_VENDOR, is_nvswitch  # noqa: E402
from checks.gpu.fabricmanager import VERSION_RX as DRIVER_VERSION_RX  # noqa: E402

# PCI class codes (sysfs "class" is 0xCCSSPP: class, subclass, programming interface).
DISPLAY_CLASS = 0x03  # 0x0300 VGA, 0x0302 3D controller: a GPU
METHODS = ("runfile", "repo")
FABRICMANAGER_SETTINGS = ("auto", "true", "false")
# runfile options that undo what the role asks of the installer (DKMS, no questions).
CONFLICTING_RUNFILE_ARGS = ("--no-dkms", "--ui=ncurses")


def _hex(text) -> int | None:
    try:
        return int(str(text).strip(), 16)
    except (TypeError, ValueError):
        return None


def pci_devices(lines) -> list[dict]:
    """Parse "<slot> <vendor> <class> <device>" lines (the roles' sysfs read) into
    [{slot, vendor, class, device}] with integer ids; unreadable lines are dropped."""
    out = []
    for line in lines or []:
        fields = str(line).split()
        if len(fields) != 4:
            continue
        vendor, klass, device = (_hex(f) for f in fields[1:])
        if None in (vendor, klass, device):
            continue
        out.append({"slot": fields[0], "vendor": vendor, "class": klass, "device": device})
    return out


def _as_device(entry) -> dict:
    if isinstance(entry, dict):
        return {"slot": entry.get("slot", ""), "vendor": _hex_or_int(entry.get("vendor")),
                "class": _hex_or_int(entry.get("class")), "device": _hex_or_int(entry.get("device"))}
    vendor, klass, device = (list(entry) + [None, None, None])[:3]
    return {"slot": "", "vendor": _hex_or_int(vendor), "class": _hex_or_int(klass), "device": _hex_or_int(device)}


def _hex_or_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return _hex(value)


def nvidia_gpus(devices) -> list[dict]:
    """The NVIDIA GPUs among PCI devices ((vendor, class, device) tuples or parsed dicts): vendor
    0x10de and a display class (0x03xxxx)."""
    found = []
    for d in map(_as_device, devices or []):
        if d["vendor"] == NVIDIA_VENDOR and d["class"] is not None and d["class"] >> 16 == DISPLAY_CLASS:
            found.append(d)
    return found


def nvidia_nvswitches(devices) -> list[dict]:
    """The NVSwitches among PCI devices: NVIDIA bridges of class 0x0680, or a known NVSwitch id."""
    found = []
    for d in map(_as_device, devices or []):
        if is_nvswitch(d["vendor"], d["class"], d["device"]):
            found.append(d)
    return found


def nvidia_driver_branch(version) -> str:
    """The driver branch (its major): '515.65.01' -> '515'."""
    text = str(version or "").strip()
    if not re.fullmatch(r"\d{3}\.\d+(\.\d+)?", text):
        raise ValueError(f"not a driver version like 515.65.01: {version!r}")
    return text.split(".")[0]


def nvidia_version_from(text, source: str = "text") -> str | None:
    """The driver version in a probe's output: 'proc' for /proc/driver/nvidia/version, 'smi' for
    `nvidia-smi --query-gpu=driver_version --format=csv,noheader` (one line per GPU: all must agree),
    'text' for anything else with one version in it (modinfo -F version, nv-fabricmanager --version)."""
    text = str(text or "")
    if source == "proc":
        return parse_proc_version(text)
    if source == "smi":
        versions = {line.strip() for line in text.splitlines() if line.strip()}
        if len(versions) == 1:
            v = versions.pop()
            return v if DRIVER_VERSION_RX.fullmatch(v) else None
        return None
    m = DRIVER_VERSION_RX.search(text)
    return m.group(1) if m else None


def _family(os_family, major) -> tuple[str, str]:
    return str(os_family or ""), str(major or "")


def nvidia_kernel_headers(os_family, kernel) -> list[str]:
    """The packages holding the build tree of `kernel` (what DKMS compiles the module against)."""
    family, kernel = str(os_family or ""), str(kernel or "").strip()
    if not kernel:
        raise ValueError("no kernel release given")
    if family == "RedHat":
        return [f"kernel-devel-{kernel}", f"kernel-headers-{kernel}"]
    if family == "Debian":
        return [f"linux-headers-{kernel}"]
    raise ValueError(f"no kernel header packages known for OS family {family!r}")


def nvidia_driver_repo_install(os_family, major, version) -> dict:
    """What the repo method installs from NVIDIA's CUDA repository (configured by the operator):
    {'packages': [...], 'module': 'name:stream' or None}. EL7: the branch meta-package and the
    DKMS kernel module, pinned to the version; EL8/9: the dnf module stream <branch>-dkms (the newest
    driver of the branch); Debian/Ubuntu: cuda-drivers-<branch> pinned to <version>-1."""
    family, major = _family(os_family, major)
    branch = nvidia_driver_branch(version)
    if family == "RedHat" and major == "7":
        return {"packages": [f"nvidia-driver-branch-{branch}-{version}", f"kmod-nvidia-latest-dkms-{version}"],
                "module": None}
    if family == "RedHat" and major in ("8", "9"):
        return {"packages": [], "module": f"nvidia-driver:{branch}-dkms"}
    if family == "Debian":
        return {"packages": [f"cuda-drivers-{branch}={version}-1"], "module": None}
    raise ValueError(f"the repo method knows no driver packages for {family or '?'} {major or '?'}")


def nvidia_fabricmanager_package(os_family, version) -> str:
    """The fabric manager package of exactly `version` (the driver's): EL nvidia-fabricmanager-<branch>-
    <version>-1 (name-version-release), Debian/Ubuntu nvidia-fabricmanager-<branch>=<version>-1."""
    family = str(os_family or "")
    branch = nvidia_driver_branch(version)
    if family == "RedHat":
        return f"nvidia-fabricmanager-{branch}-{version}-1"
    if family == "Debian":
        return f"nvidia-fabricmanager-{branch}={version}-1"
    raise ValueError(f"no fabric manager package known for OS family {family!r}")


def nvidia_runfile_argv(path, extra_args=None, kernel=None, running_kernel=None) -> list[str]:
    """The runfile's command line: silent, DKMS, no questions, --kernel-name when the module is built
    for another kernel than the running one, then the operator's options."""
    argv = [str(path), "--silent", "--dkms", "--no-questions"]
    if kernel and running_kernel and str(kernel) != str(running_kernel):
        argv.append(f"--kernel-name={kernel}")
    return argv + [str(a) for a in (extra_args or [])]


def nvidia_driver_state(wanted, proc_text=None, smi_text=None, modinfo_text=None) -> dict:
    """What the probes say: loaded (the running module: /proc, else nvidia-smi), installed (the
    module on disk for the kernel: modinfo, else the loaded one), current (installed == wanted)."""
    loaded = nvidia_version_from(proc_text, "proc") or nvidia_version_from(smi_text, "smi")
    installed = nvidia_version_from(modinfo_text, "text") or loaded
    return {"loaded": loaded, "installed": installed, "current": installed == str(wanted)}


def nvidia_reboot_decision(wanted, state, changed, allowed, connection) -> dict:
    """Whether to reboot now: only when a reboot is pending (the driver changed in this run, or the
    module on disk is the wanted one but another is loaded), peftnode_driver_reboot allows it, and the
    play does not run on the node itself. {'pending', 'reboot', 'message'}."""
    state = state or {}
    wanted = str(wanted)
    pending = bool(changed) or (state.get("installed") == wanted and state.get("loaded") != wanted)
    if not pending:
        message = (f"NVIDIA driver {wanted} is loaded; no reboot needed" if state.get("loaded") == wanted
                   else f"No reboot: driver {wanted} was not installed in this run "
                        f"(loaded: {state.get('loaded') or 'none'})")
        return {"pending": False, "reboot": False, "message": message}
    why = (f"driver {wanted} was installed in this run" if changed
           else f"driver {wanted} is installed but {state.get('loaded') or 'no driver'} is loaded")
    if str(connection) == "local":
        return {"pending": True, "reboot": False,
                "message": f"A reboot is pending ({why}); this play runs on the node itself (connection local), "
                           "which peftnode never reboots: reboot the node yourself"}
    if not _truthy(allowed):
        return {"pending": True, "reboot": False,
                "message": f"A reboot is pending ({why}); peftnode_driver_reboot is false: reboot the node "
                           "yourself, or set peftnode_driver_reboot: true"}
    return {"pending": True, "reboot": True, "message": f"Rebooting: {why}"}


def _truthy(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on", "y")


def nvidia_driver_problems(method, os_family, major, extra_args=None, reboot=False, connection="ssh") -> list[str]:
    """Combinations of the driver role's variables that cannot work, one line each for preflight."""
    problems = []
    if method not in METHODS:
        problems.append(f"nvidia_driver: peftnode_nvidia_driver_method is {method!r}; use one of {', '.join(METHODS)}")
    elif method == "repo":
        try:
            nvidia_driver_repo_install(os_family, major, "000.00.00")
        except ValueError as exc:
            problems.append(f"nvidia_driver: {exc}; use peftnode_nvidia_driver_method: runfile")
    for arg in (extra_args or []) if method == "runfile" else []:
        if str(arg) in CONFLICTING_RUNFILE_ARGS:
            problems.append(f"nvidia_driver: peftnode_nvidia_driver_runfile_args has {arg!r}, which undoes the "
                            "role's --dkms / non-interactive install; remove it")
    if _truthy(reboot) and str(connection) == "local":
        problems.append("nvidia_driver: peftnode_driver_reboot is true, but this play reaches the node through a "
                        "local connection, where peftnode never reboots; set it false and reboot yourself")
    return problems


def fabricmanager_wanted(setting, nvswitch_count) -> bool:
    """peftnode_fabricmanager: true/false force it; auto installs it where NVSwitches are present. Any
    other setting is False here (fabricmanager_problems reports it, and the role refuses it)."""
    text = str(setting).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    return text == "auto" and int(nvswitch_count or 0) > 0


def fabricmanager_problems(setting, version, driver_version, method="repo", has_artifact=False) -> list[str]:
    """The fabric manager role's variables against the driver (the same version, exactly) and the stack
    (the archive method needs fabricmanager.artifact)."""
    problems = []
    if method == "archive" and not has_artifact:
        problems.append("fabricmanager: peftnode_fabricmanager_method is archive, but the stack has no "
                        "fabricmanager.artifact (fabricmanager-linux-x86_64-<version>-archive.tar.xz); add it, or "
                        "use the repo method")
    elif method not in ("repo", "archive"):
        problems.append(f"fabricmanager: peftnode_fabricmanager_method is {method!r}; use repo or archive")
    if str(setting).strip().lower() not in ("auto", "true", "false", "yes", "no", "on", "off", "1", "0"):
        problems.append(f"fabricmanager: peftnode_fabricmanager is {setting!r}; use auto, true or false")
    if str(version) != str(driver_version):
        problems.append(f"fabricmanager: peftnode_fabricmanager_version is {version}, but the driver is "
                        f"{driver_version}; fabric manager refuses to start unless both are the same version: "
                        "leave peftnode_fabricmanager_version unset (it follows the driver)")
    return problems


class FilterModule:
    def filters(self):
        return {
            "nvidia_pci_devices": pci_devices,
            "nvidia_gpus": nvidia_gpus,
            "nvidia_nvswitches": nvidia_nvswitches,
            "nvidia_driver_branch": nvidia_driver_branch,
            "nvidia_version_from": nvidia_version_from,
            "nvidia_kernel_headers": nvidia_kernel_headers,
            "nvidia_driver_repo_install": nvidia_driver_repo_install,
            "nvidia_fabricmanager_package": nvidia_fabricmanager_package,
            "nvidia_runfile_argv": nvidia_runfile_argv,
            "nvidia_driver_state": nvidia_driver_state,
            "nvidia_reboot_decision": nvidia_reboot_decision,
            "nvidia_driver_problems": nvidia_driver_problems,
            "nvidia_fabricmanager_wanted": fabricmanager_wanted,
            "nvidia_fabricmanager_problems": fabricmanager_problems,
        }
