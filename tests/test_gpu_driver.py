"""The driver check: its judge on captured /proc and NVML states; the real probe on this machine."""

import pytest

from checks.gpu.driver import DriverProbe, judge_driver, parse_proc_version, probe_driver
from checks.result import Status

PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.65.01  Wed Jul 20 14:00:58 UTC 2022\n"
               "GCC version:  gcc version 4.8.5 20150623 (Red Hat 4.8.5-44) (GCC)\n")
OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16-T02)\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


def test_parse_proc_version_both_module_flavours():
    assert parse_proc_version(PROPRIETARY) == "515.65.01"
    assert parse_proc_version(OPEN) == "550.54.15"
    assert parse_proc_version("garbage") is None
    assert parse_proc_version(None) is None


def test_driver_pass_from_nvml():
    v = judge_driver(DriverProbe(PROPRIETARY, "515.65.01", None), "515.65.01", 8)
    assert v.status is Status.PASS and v.measured["driver"].value == "515.65.01"


def test_driver_pass_from_proc_when_nvml_missing():
    v = judge_driver(DriverProbe(PROPRIETARY, None, "nvidia-ml-py (pynvml) is not installed"), "515.65.01", 8)
    assert v.status is Status.PASS


def test_wrong_driver_version_fails():
    v = judge_driver(DriverProbe(OPEN, "550.54.15", None), "515.65.01", 8)
    assert v.status is Status.FAIL and "550.54.15 is loaded; the stack pins 515.65.01" in v.message


def test_missing_driver_on_a_gpu_node_fails_with_reason_not_skip():
    v = judge_driver(DriverProbe(None, None, "NVML did not initialise: NVML Shared Library Not Found"), "515.65.01", 8)
    assert v.status is Status.FAIL
    assert v.message.startswith("NVIDIA driver not loaded")
    assert "NVML Shared Library Not Found" in v.message and "8 GPU(s)" in v.message
    assert "nvidia_driver role" in v.remediation


def test_missing_driver_on_a_cpu_node_is_a_skip_with_reason():
    v = judge_driver(DriverProbe(None, None, "NVML did not initialise"), "515.65.01", 0)
    assert v.status is Status.SKIP and "expected to have no GPUs" in v.message


def test_real_probe_on_this_machine():
    probe = probe_driver()
    if probe.proc_text is None:
        assert probe.nvml_version is None and probe.nvml_error
        assert judge_driver(probe, "515.65.01", 8).status is Status.FAIL
    else:
        assert parse_proc_version(probe.proc_text)


@pytest.mark.gpu
def test_real_driver_is_readable_on_a_gpu_node():
    probe = probe_driver()
    if probe.proc_text is None:
        pytest.skip("needs an NVIDIA GPU and its driver: /proc/driver/nvidia/version is absent here")
    assert probe.nvml_version == parse_proc_version(probe.proc_text)
