"""The NVIDIA roles' pure decisions (filter_plugins/peftnode_nvidia.py) on healthy and faulty inputs:
PCI detection of GPUs and NVSwitches, package names per OS family and release, version probes, the
reboot decision, and the preflight problems."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("peftnode_nvidia", REPO / "filter_plugins" / "peftnode_nvidia.py")
nv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nv)

# An HGX A800 board as sysfs shows it: 8 GPUs (3D controller 0x0302), 6 NVSwitches (bridge 0x0680),
# plus the host's own devices (an Intel bridge, a Mellanox NIC, an ASPEED VGA).
HGX_A800 = (
    [f"0000:{bus:02x}:00.0 0x10de 0x030200 0x20f3" for bus in (0x07, 0x0f, 0x47, 0x4e, 0x87, 0x90, 0xb7, 0xbd)]
    + [f"0000:{bus:02x}:00.0 0x10de 0x068000 0x1af1" for bus in (0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9)]
    + ["0000:00:00.0 0x8086 0x060000 0x09a2", "0000:0c:00.0 0x15b3 0x020000 0x101b",
       "0000:03:00.0 0x1a03 0x030000 0x2000"]
)


def test_pci_parse_and_detect_on_an_hgx_a800():
    devices = nv.pci_devices(HGX_A800)
    assert len(devices) == 17
    assert len(nv.nvidia_gpus(devices)) == 8
    switches = nv.nvidia_nvswitches(devices)
    assert len(switches) == 6 and {d["device"] for d in switches} == {0x1AF1}
    assert nv.fabricmanager_wanted("auto", len(switches)) is True


def test_detect_from_tuples_h100_switch_and_pcie_gpus():
    # H100 NVSwitch id 22a3 (class 0x0680); a PCIe node has GPUs but no switch
    h100 = [("0x10de", "0x030200", "0x2330")] * 8 + [("0x10de", "0x068000", "0x22a3")] * 4
    assert len(nv.nvidia_gpus(h100)) == 8 and len(nv.nvidia_nvswitches(h100)) == 4
    pcie = [(0x10DE, 0x030000, 0x1E07), (0x10DE, 0x040300, 0x10F7)]  # 2080 Ti VGA + its HDA audio function
    assert len(nv.nvidia_gpus(pcie)) == 1 and nv.nvidia_nvswitches(pcie) == []
    assert nv.fabricmanager_wanted("auto", 0) is False


def test_known_nvswitch_id_counts_even_with_another_class():
    assert len(nv.nvidia_nvswitches([("0x10de", "0x060400", "0x1af1")])) == 1
    # another vendor's 0x0680 bridge is not an NVSwitch; a GB200 NVIDIA PCI bridge 0604 22b1 is not either
    assert nv.nvidia_nvswitches([("0x8086", "0x068000", "0x1af1"), ("0x10de", "0x060400", "0x22b1")]) == []


def test_no_nvidia_device_and_garbage_lines():
    assert nv.nvidia_gpus(nv.pci_devices(["0000:00:00.0 0x8086 0x060000 0x09a2"])) == []
    assert nv.pci_devices(["", "0000:01:00.0 0x10de", "0000:01:00.0 zz 0x030000 0x1", None]) == []
    assert nv.nvidia_gpus([]) == [] and nv.nvidia_gpus(None) == []
    assert nv.nvidia_gpus([("0x10de", None, "0x1")]) == []


def test_branch_and_bad_versions():
    assert nv.nvidia_driver_branch("515.65.01") == "515"
    assert nv.nvidia_driver_branch("550.54.15") == "550"
    assert nv.nvidia_driver_branch("470.82") == "470"
    for bad in ("", None, "latest", "5.15", "515-65-01"):
        with pytest.raises(ValueError):
            nv.nvidia_driver_branch(bad)


@pytest.mark.parametrize(
    ("family", "major", "version", "expected"),
    [
        ("RedHat", "7", "515.65.01",
         {"packages": ["nvidia-driver-branch-515-515.65.01", "kmod-nvidia-latest-dkms-515.65.01"], "module": None}),
        ("RedHat", "8", "515.65.01", {"packages": [], "module": "nvidia-driver:515-dkms"}),
        ("RedHat", "9", "550.54.15", {"packages": [], "module": "nvidia-driver:550-dkms"}),
        ("Debian", "12", "515.65.01", {"packages": ["cuda-drivers-515=515.65.01-1"], "module": None}),
        ("Debian", "22", "550.54.15", {"packages": ["cuda-drivers-550=550.54.15-1"], "module": None}),
    ],
)
def test_repo_packages_per_family(family, major, version, expected):
    assert nv.nvidia_driver_repo_install(family, major, version) == expected


@pytest.mark.parametrize(("family", "major"), [("RedHat", "6"), ("Suse", "15"), ("", "")])
def test_repo_packages_refused_where_unknown(family, major):
    with pytest.raises(ValueError, match="knows no driver packages"):
        nv.nvidia_driver_repo_install(family, major, "515.65.01")


def test_kernel_headers_per_family():
    assert nv.nvidia_kernel_headers("RedHat", "3.10.0-1160.el7.x86_64") == [
        "kernel-devel-3.10.0-1160.el7.x86_64", "kernel-headers-3.10.0-1160.el7.x86_64"]
    assert nv.nvidia_kernel_headers("Debian", "6.1.0-18-amd64") == ["linux-headers-6.1.0-18-amd64"]
    with pytest.raises(ValueError):
        nv.nvidia_kernel_headers("Debian", "")
    with pytest.raises(ValueError):
        nv.nvidia_kernel_headers("Gentoo", "6.1.0")


def test_fabricmanager_package_is_exactly_the_driver_version():
    assert nv.nvidia_fabricmanager_package("RedHat", "515.65.01") == "nvidia-fabricmanager-515-515.65.01-1"
    assert nv.nvidia_fabricmanager_package("Debian", "515.65.01") == "nvidia-fabricmanager-515=515.65.01-1"
    assert nv.nvidia_fabricmanager_package("Debian", "550.54.15") == "nvidia-fabricmanager-550=550.54.15-1"
    with pytest.raises(ValueError):
        nv.nvidia_fabricmanager_package("Windows", "550.54.15")


def test_runfile_argv_is_silent_dkms_no_questions_then_extra():
    assert nv.nvidia_runfile_argv("/c/NVIDIA-Linux-x86_64-515.65.01.run") == [
        "/c/NVIDIA-Linux-x86_64-515.65.01.run", "--silent", "--dkms", "--no-questions"]
    assert nv.nvidia_runfile_argv("/r.run", ["--no-opengl-files"])[-1] == "--no-opengl-files"
    # building for the running kernel: no --kernel-name; for another one (installed, booted next): named
    assert nv.nvidia_runfile_argv("/r.run", [], "6.1.0-18-amd64", "6.1.0-18-amd64") == [
        "/r.run", "--silent", "--dkms", "--no-questions"]
    assert nv.nvidia_runfile_argv("/r.run", ["-x"], "6.1.0-20-amd64", "6.1.0-18-amd64") == [
        "/r.run", "--silent", "--dkms", "--no-questions", "--kernel-name=6.1.0-20-amd64", "-x"]


PROC_515 = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.65.01  Wed Jul 20 14:00:58 UTC 2022\n"
            "GCC version: 4.8.5\n")
PROC_550_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16)\n"


def test_version_probes():
    assert nv.nvidia_version_from(PROC_515, "proc") == "515.65.01"
    assert nv.nvidia_version_from(PROC_550_OPEN, "proc") == "550.54.15"
    assert nv.nvidia_version_from("", "proc") is None
    assert nv.nvidia_version_from("515.65.01\n" * 8, "smi") == "515.65.01"
    # two drivers answering for different GPUs, or nvidia-smi's error text: no version
    assert nv.nvidia_version_from("515.65.01\n550.54.15\n", "smi") is None
    assert nv.nvidia_version_from("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
                                  "smi") is None
    assert nv.nvidia_version_from("Fabric Manager version is : 515.65.01", "text") == "515.65.01"
    assert nv.nvidia_version_from("modinfo: ERROR: Module nvidia not found.", "text") is None


def test_driver_state():
    assert nv.nvidia_driver_state("515.65.01", PROC_515, None, "515.65.01") == {
        "loaded": "515.65.01", "installed": "515.65.01", "current": True}
    # installed on disk, not loaded yet (first install, before the reboot)
    assert nv.nvidia_driver_state("515.65.01", None, "NVIDIA-SMI has failed", "515.65.01") == {
        "loaded": None, "installed": "515.65.01", "current": True}
    # an older driver is loaded and installed: not current
    old = nv.nvidia_driver_state("515.65.01", PROC_550_OPEN.replace("550.54.15", "510.47.03"), None, "510.47.03")
    assert old["current"] is False and old["loaded"] == "510.47.03"
    # nothing at all
    assert nv.nvidia_driver_state("515.65.01") == {"loaded": None, "installed": None, "current": False}
    # nvidia-smi only (the converge test's stand-in)
    assert nv.nvidia_driver_state("515.65.01", None, "515.65.01\n")["current"] is True


def test_reboot_decision():
    loaded = {"loaded": "515.65.01", "installed": "515.65.01", "current": True}
    quiet = nv.nvidia_reboot_decision("515.65.01", loaded, False, True, "ssh")
    assert quiet == {"pending": False, "reboot": False,
                     "message": "NVIDIA driver 515.65.01 is loaded; no reboot needed"}
    changed = nv.nvidia_reboot_decision("515.65.01", loaded, True, True, "ssh")
    assert changed["reboot"] is True and changed["pending"] is True
    # not allowed: a message, no reboot
    held = nv.nvidia_reboot_decision("515.65.01", loaded, True, False, "ssh")
    assert held["reboot"] is False and held["pending"] is True
    assert "A reboot is pending (driver 515.65.01 was installed in this run)" in held["message"]
    assert "peftnode_driver_reboot is false" in held["message"]
    # never on a local connection, even when allowed
    local = nv.nvidia_reboot_decision("515.65.01", loaded, True, "true", "local")
    assert local["reboot"] is False and "connection local" in local["message"]
    # installed on disk but another driver still loaded: pending without a change in this run
    stale = nv.nvidia_reboot_decision("515.65.01", {"loaded": "510.47.03", "installed": "515.65.01"}, False, True,
                                      "ssh")
    assert stale["reboot"] is True and "510.47.03 is loaded" in stale["message"]
    assert nv.nvidia_reboot_decision("515.65.01", {"installed": "515.65.01"}, False, "no", "ssh")["pending"] is True
    # check mode on a bare node: nothing installed, nothing loaded: no reboot, and no claim that it is loaded
    bare = nv.nvidia_reboot_decision("515.65.01", nv.nvidia_driver_state("515.65.01"), False, True, "ssh")
    assert bare == {"pending": False, "reboot": False,
                    "message": "No reboot: driver 515.65.01 was not installed in this run (loaded: none)"}


def test_driver_problems():
    assert nv.nvidia_driver_problems("runfile", "RedHat", "7") == []
    assert nv.nvidia_driver_problems("repo", "Debian", "12") == []
    assert nv.nvidia_driver_problems("repo", "RedHat", "6") == [
        "nvidia_driver: the repo method knows no driver packages for RedHat 6; use peftnode_nvidia_driver_method: "
        "runfile"]
    assert nv.nvidia_driver_problems("apt", "Debian", "12")[0].startswith(
        "nvidia_driver: peftnode_nvidia_driver_method is 'apt'")
    assert "--no-dkms" in nv.nvidia_driver_problems("runfile", "Debian", "12", ["--no-dkms"])[0]
    assert nv.nvidia_driver_problems("runfile", "Debian", "12", ["--no-opengl-files"]) == []
    assert nv.nvidia_driver_problems("repo", "Debian", "12", ["--no-dkms"]) == []  # the runfile is not used
    assert "local connection" in nv.nvidia_driver_problems("runfile", "Debian", "12", [], True, "local")[0]
    assert nv.nvidia_driver_problems("runfile", "Debian", "12", [], True, "ssh") == []


def test_fabricmanager_setting_and_version_rule():
    assert nv.fabricmanager_wanted(True, 0) is True
    assert nv.fabricmanager_wanted("false", 6) is False
    assert nv.fabricmanager_wanted("auto", 6) is True
    assert nv.fabricmanager_wanted("sometimes", 6) is False  # refused by fabricmanager_problems
    assert nv.fabricmanager_problems("auto", "515.65.01", "515.65.01") == []
    problems = nv.fabricmanager_problems("true", "515.86.01", "515.65.01")
    assert problems == ["fabricmanager: peftnode_fabricmanager_version is 515.86.01, but the driver is 515.65.01; "
                        "fabric manager refuses to start unless both are the same version: leave "
                        "peftnode_fabricmanager_version unset (it follows the driver)"]
    assert "use auto, true or false" in nv.fabricmanager_problems("maybe", "515.65.01", "515.65.01")[0]
    assert nv.fabricmanager_problems("auto", "515.65.01", "515.65.01", "archive", True) == []
    assert "the stack has no fabricmanager.artifact" in nv.fabricmanager_problems(
        "auto", "515.65.01", "515.65.01", "archive", False)[0]
    assert "use repo or archive" in nv.fabricmanager_problems("auto", "515.65.01", "515.65.01", "tarball")[0]


def test_filters_are_registered():
    names = nv.FilterModule().filters()
    assert names["nvidia_reboot_decision"] is nv.nvidia_reboot_decision
    assert {"nvidia_pci_devices", "nvidia_gpus", "nvidia_nvswitches", "nvidia_fabricmanager_package"} <= set(names)
