"""Filters of the peftnode_dcgm role: which DCGM packages a node gets, how the installed version reads,
and what cannot work, as pure functions (unit-tested in tests/test_dcgm_role.py).

Packages (NVIDIA's CUDA repository; /work/shared/FACTS.md section 5):
- DCGM 3.x is one package, ``datacenter-gpu-manager``;
- DCGM 4.x is split: ``datacenter-gpu-manager-4-core`` plus ``datacenter-gpu-manager-4-cuda<MAJOR>``
  for the CUDA major the node's stack uses (11, 12; 13 with the later 4.x releases).
Versions are pinned the way each package manager spells it: ``name=1:<version>*`` for apt (the Debian
packages carry epoch 1, e.g. ``1:3.3.6``, ``1:4.4.1-1``; the trailing ``*`` takes any Debian
revision such as ``-1``), ``name-<version>`` for yum and dnf.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

PACKAGE_3 = "datacenter-gpu-manager"
PACKAGE_4_CORE = "datacenter-gpu-manager-4-core"
PACKAGE_4_CUDA = "datacenter-gpu-manager-4-cuda{major}"
CUDA_MAJORS_4 = (11, 12, 13)  # the -4-cudaNN packages DCGM 4.x ships (-cuda13 with the later 4.x)
DEB_EPOCH = "1"
FAMILIES = ("Debian", "RedHat")
ARTIFACT_SUFFIX = {"Debian": ".deb", "RedHat": ".rpm"}
# DCGM 3.0/3.1 release notes: R450 and later (>= 450.80.02).
MIN_DRIVER_3 = "450.80.02"

VERSION_RX = re.compile(r"^\d+\.\d+\.\d+$")
PROBE_RX = re.compile(r"version\s*:?\s*(\d+\.\d+\.\d+)", re.IGNORECASE)


def _major(version: str) -> int:
    version = str(version)
    if not VERSION_RX.match(version):
        raise AnsibleFilterError(f"DCGM version {version!r} is not MAJOR.MINOR.PATCH (like 3.3.9)")
    return int(version.split(".")[0])


def _cuda_major(cuda_version: str) -> int:
    m = re.match(r"^(\d+)\.", str(cuda_version))
    if not m:
        raise AnsibleFilterError(f"CUDA version {cuda_version!r} is not MAJOR.MINOR[.PATCH]")
    return int(m.group(1))


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(text)))


def dcgm_package_names(version: str, cuda_version: str, extra: list | None = None) -> list[str]:
    """The package names of DCGM ``version`` for a stack on CUDA ``cuda_version`` (no versions)."""
    major = _major(version)
    if major == 3:
        names = [PACKAGE_3]
    elif major == 4:
        cuda = _cuda_major(cuda_version)
        if cuda not in CUDA_MAJORS_4:
            raise AnsibleFilterError(
                f"DCGM {version} ships datacenter-gpu-manager-4-cuda{'|'.join(map(str, CUDA_MAJORS_4))}, "
                f"none for CUDA {cuda} (cuda.version {cuda_version})")
        names = [PACKAGE_4_CORE, PACKAGE_4_CUDA.format(major=cuda)]
    else:
        raise AnsibleFilterError(f"DCGM {version}: peftnode installs DCGM 3.x or 4.x")
    return names + [str(n) for n in (extra or []) if str(n) not in names]


def dcgm_packages(version: str, cuda_version: str, os_family: str, extra: list | None = None) -> list[str]:
    """The package specs to install, each pinned to ``version`` in the OS family's spelling."""
    if os_family not in FAMILIES:
        raise AnsibleFilterError(f"OS family {os_family!r}: peftnode installs DCGM on {' and '.join(FAMILIES)}")
    names = dcgm_package_names(version, cuda_version, extra)
    if os_family == "Debian":
        return [f"{n}={DEB_EPOCH}:{version}*" for n in names]
    return [f"{n}-{version}" for n in names]


def dcgm_remove_first(installed: str, wanted: str) -> list[str]:
    """Packages to remove before installing ``wanted``: DCGM 4.x replaces the 3.x package
    datacenter-gpu-manager, which NVIDIA's upgrade procedure removes first; [] otherwise."""
    if not installed or not VERSION_RX.match(str(installed)):
        return []
    if int(str(installed).split(".")[0]) <= 3 and _major(wanted) >= 4:
        return [PACKAGE_3]
    return []


def dcgm_probe_version(output: str) -> str:
    """The version ``dcgmi --version`` prints ('dcgmi  version: 3.3.9'), or '' when there is none."""
    m = PROBE_RX.search(str(output or ""))
    return m.group(1) if m else ""


def dcgm_problems(stack: dict, method: str, os_family: str) -> list[str]:
    """What stops DCGM from being installed on this node, one line each ('dcgm: ...'); [] when nothing."""
    dcgm = (stack or {}).get("dcgm")
    if not dcgm:
        return ["dcgm: the stack has no dcgm section (dcgm.version, optionally dcgm.artifact): add one, "
                "or set peftnode_dcgm_enabled: false"]
    problems: list[str] = []
    version = str(dcgm.get("version", ""))
    try:
        major = _major(version)
        if method == "repo":
            dcgm_package_names(version, str(stack.get("cuda", {}).get("version", "")))
    except AnsibleFilterError as exc:
        return [f"dcgm: {exc}"]
    if major not in (3, 4):
        problems.append(f"dcgm: DCGM {version}: peftnode installs DCGM 3.x or 4.x")
    driver = str((stack.get("nvidia_driver") or {}).get("version", ""))
    if major == 3 and driver and _version_tuple(driver) < _version_tuple(MIN_DRIVER_3):
        problems.append(f"dcgm: DCGM {version} needs driver R450 or later (>= {MIN_DRIVER_3}); "
                        f"the stack's driver is {driver}")
    if os_family not in FAMILIES:
        problems.append(f"dcgm: OS family {os_family}: peftnode installs DCGM on {' and '.join(FAMILIES)} only")
    elif method == "artifact":
        artifact = dcgm.get("artifact")
        if not artifact:
            problems.append("dcgm: peftnode_dcgm_method is artifact, but the stack's dcgm section has no "
                            "artifact; add dcgm.artifact (a .deb or .rpm) or use peftnode_dcgm_method: repo")
        elif not str(artifact.get("file", "")).endswith(ARTIFACT_SUFFIX[os_family]):
            problems.append(f"dcgm: dcgm.artifact {artifact.get('file')} is not a {ARTIFACT_SUFFIX[os_family]} "
                            f"package, which this {os_family} node needs")
    elif method != "repo":
        problems.append(f"dcgm: peftnode_dcgm_method {method!r} is not repo or artifact")
    return problems


class FilterModule:
    def filters(self):
        return {
            "dcgm_package_names": dcgm_package_names,
            "dcgm_packages": dcgm_packages,
            "dcgm_probe_version": dcgm_probe_version,
            "dcgm_remove_first": dcgm_remove_first,
            "dcgm_problems": dcgm_problems,
        }
