"""The driver check: its judge on captured /proc and NVML states; the real probe on this machine; and,
through the runner, what a node without GPUs or a failing driver check does to the checks that need it."""

import pytest

from checks.gpu.driver import DriverProbe, judge_driver, parse_proc_version, probe_driver
from checks.registry import Context, all_checks
from checks.result import Status
from checks.runner import blocked_roots, run_checks

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


# --- through the runner: needs_gpus and needs -----------------------------------------------------

def driver_stack(cu117, version: str) -> dict:
    return {**cu117.data, "nvidia_driver": {**cu117.data["nvidia_driver"], "version": version}}


def needing_the_driver() -> list:
    """gpu.driver and every check that needs it, directly or through another check."""
    specs = all_checks()
    names = {"gpu.driver"}
    while True:
        more = {s.name for s in specs if names & set(s.needs)} - names
        if not more:
            return [s for s in specs if s.name in names]
        names |= more


def test_a_node_without_gpus_skips_the_driver_check_and_its_gpu_dependants(cu117):
    # (a dependant that also runs without GPUs, such as the CPU fine-tune, is not blocked by a skip)
    specs = [s for s in needing_the_driver() if s.needs_gpus]
    assert {"gpu.driver", "gpu.inventory", "gpu.dcgm_diag", "cuda.torch"} <= {s.name for s in specs}
    results = run_checks(specs, Context(cu117.data, {**cu117.expectations(), "gpus": 0}))
    assert len(results) == len(specs) > 5
    for r in results:
        assert r.status is Status.SKIP, (r.name, r.message)
        assert r.message == "this node is expected to have no GPUs (node.gpus = 0)", (r.name, r.message)


def test_a_failing_driver_check_blocks_its_dependants_as_one_root_cause(cu117):
    # A version no machine has: gpu.driver fails on this machine (no driver) and on a GPU node alike.
    specs = needing_the_driver()
    assert {"gpu.inventory", "gpu.ecc", "gpu.dcgm_diag", "cuda.torch"} <= {s.name for s in specs}
    results = run_checks(specs, Context(driver_stack(cu117, "1.0.0"), {**cu117.expectations(), "gpus": 8}))
    [driver] = [r for r in results if r.name == "gpu.driver"]
    assert driver.status is Status.FAIL
    blocked = [r for r in results if r.name != "gpu.driver"]
    for r in blocked:
        assert r.status is Status.SKIP and r.message.startswith("blocked by gpu.driver"), (r.name, r.message)
        assert r.message.endswith(f"({driver.message})")
    assert blocked_roots(results) == {"gpu.driver": len(blocked)}


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
