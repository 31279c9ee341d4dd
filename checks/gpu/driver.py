"""Is the NVIDIA driver loaded, and is it the stack's version?

On a node the expectations say has GPUs, a missing driver is a failure with the reason, never a
skip: a GPU node without its driver is the first thing to catch. The NVML and CUDA checks need this
one (``needs=("gpu.driver",)``), so a missing driver is reported once and blocks them. On a node
expected to have no GPUs the runner skips it (``needs_gpus``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from checks.registry import Context, check
from checks.result import Status, Verdict

PROC_VERSION = Path("/proc/driver/nvidia/version")
# "NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.65.01  Wed Jul 20 ..." and
# "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build ..."
NVRM_RX = re.compile(r"NVRM version:.*?\s(\d{3}\.\d+(?:\.\d+)?)\s")


@dataclass
class DriverProbe:
    proc_text: str | None  # /proc/driver/nvidia/version, None when absent
    nvml_version: str | None  # nvmlSystemGetDriverVersion, None when NVML did not initialise
    nvml_error: str | None  # why NVML did not initialise


def parse_proc_version(text: str | None) -> str | None:
    match = NVRM_RX.search(text or "")
    return match.group(1) if match else None


def probe_driver(nvml=None) -> DriverProbe:
    """``nvml``: the NVML binding to ask (default: the real pynvml; tests pass a fake)."""
    try:
        proc_text = PROC_VERSION.read_text()
    except OSError:
        proc_text = None
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return DriverProbe(proc_text, None, "nvidia-ml-py (pynvml) is not installed")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return DriverProbe(proc_text, None, f"NVML did not initialise: {exc}")
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return DriverProbe(proc_text, version.decode() if isinstance(version, bytes) else version, None)
    finally:
        nvml.nvmlShutdown()


def judge_driver(probe: DriverProbe, expected_version: str, expected_gpus: int) -> Verdict:
    expected = {"driver": expected_version, "gpus": expected_gpus}
    found = probe.nvml_version or parse_proc_version(probe.proc_text)
    measured = {"driver": found} if found else {}
    if found is None:
        reasons = ["/proc/driver/nvidia/version is absent" if probe.proc_text is None
                   else "/proc/driver/nvidia/version has no version line"]
        if probe.nvml_error:
            reasons.append(probe.nvml_error)
        return Verdict(Status.FAIL, f"NVIDIA driver not loaded ({'; '.join(reasons)}); "
                                    f"this node is expected to have {expected_gpus} GPU(s)",
                       measured, expected,
                       f"Install driver {expected_version} (nvidia_driver role) and load it: check `lsmod | grep "
                       "nvidia`, `dmesg | grep -i nvrm`, and that kernel headers match `uname -r` for DKMS.")
    if found != expected_version:
        return Verdict(Status.FAIL, f"NVIDIA driver {found} is loaded; the stack pins {expected_version}",
                       measured, expected, f"Install driver {expected_version} (nvidia_driver role), then reboot or "
                                           "reload the nvidia modules.")
    return Verdict(Status.PASS, f"NVIDIA driver {found} loaded", measured, expected)


@check("gpu.driver", "NVIDIA driver is loaded and is the stack's version", worker="nvml", needs_gpus=True,
       timeout_s=60)
def gpu_driver(ctx: Context) -> Verdict:
    return judge_driver(probe_driver(), ctx.stack["nvidia_driver"]["version"], ctx.node.gpus)
