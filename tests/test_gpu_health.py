"""GPU health checks driven through a fake NVML (the one boundary that cannot exist without a GPU),
through healthy and faulty states; plus the real probes on this machine."""

import time
from dataclasses import replace
from pathlib import Path

import pynvml
import pytest

from checks.gpu import driver, health, judges
from checks.gpu.fabricmanager import count_nvswitches
from checks.gpu.nvml import probe_nvml
from checks.registry import Context, all_checks
from checks.result import Status
from checks.runner import run_checks
from tests.helpers.fake_nvml import FakeNVML, healthy_node

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"


@pytest.fixture
def node_ctx(cu117):
    return Context(cu117.data, {**cu117.expectations(), "gpus": 8, "gpu_model": "H100"})


def use(monkeypatch, fake):
    monkeypatch.setattr(health, "load_nvml", lambda: fake)
    return fake


def statuses(verdicts):
    verdicts = verdicts if isinstance(verdicts, list) else [verdicts]
    return [v.status for v in verdicts]


HEALTH_CHECKS = [health.gpu_inventory, health.gpu_ecc, health.gpu_memory_errors, health.gpu_throttle,
                 health.gpu_pcie, health.gpu_settings, health.gpu_nvlink, health.gpu_processes]


def test_healthy_node_passes_every_check(monkeypatch, node_ctx):
    fake = use(monkeypatch, FakeNVML(healthy_node(8)))
    for fn in HEALTH_CHECKS:
        got = fn(node_ctx)
        assert set(statuses(got)) == {Status.PASS}, (fn.__name__, got)
    assert fake.initialised == 0  # every init was shut down again


def test_per_gpu_results_name_each_gpu(monkeypatch, node_ctx):
    use(monkeypatch, FakeNVML(healthy_node(8)))
    verdicts = health.gpu_ecc(node_ctx)
    assert [v.subject for v in verdicts] == [f"gpu{i}" for i in range(8)]


def test_snapshot_reads_every_field():
    snap = probe_nvml(FakeNVML(healthy_node(2)))
    g = snap.gpus[1]
    assert snap.driver == "515.65.01" and snap.cuda_driver == "11.7"
    assert (g.bus_id, g.ecc_enabled, g.remap_pending, g.pcie_width_max, g.mig_enabled) == \
        ("00000000:28:00.0", True, False, 16, False)
    assert g.nvlink_active == [True] * 18 and g.memory_used_mib == 512.0


def fault(monkeypatch, node_ctx, check, gpu_index=3, n=8, **overrides):
    gpus = healthy_node(n)
    gpus[gpu_index].update(overrides)
    use(monkeypatch, FakeNVML(gpus))
    verdicts = check(node_ctx)
    verdicts = verdicts if isinstance(verdicts, list) else [verdicts]
    bad = [v for v in verdicts if v.status is not Status.PASS]
    return bad


@pytest.mark.parametrize("check, overrides, status, text", [
    (health.gpu_ecc, {"ecc": (0, 0)}, Status.FAIL, "ECC is disabled"),
    (health.gpu_ecc, {"ecc": (0, 1)}, Status.FAIL, "enabled after reboot"),
    (health.gpu_ecc, {"ecc_uncorrected": 2}, Status.FAIL, "2 uncorrectable ECC error(s)"),
    (health.gpu_ecc, {"ecc_corrected": 20_000}, Status.WARN, "20000 correctable ECC errors"),
    (health.gpu_ecc, {"ecc": None}, Status.SKIP, "no ECC on this board"),
    (health.gpu_memory_errors, {"remap": (0, 1, 1, 0)}, Status.FAIL, "a row remap is pending"),
    (health.gpu_memory_errors, {"remap": (0, 4, 0, 1)}, Status.FAIL, "row remapping failed"),
    (health.gpu_memory_errors, {"remap": None, "retired_dbe": list(range(11))}, Status.FAIL, "11 retired pages"),
    (health.gpu_memory_errors, {"retired_pending": 1}, Status.FAIL, "page retirement is pending"),
    (health.gpu_throttle, {"throttle": 0x8}, Status.FAIL, "HW slowdown"),
    (health.gpu_throttle, {"throttle": 0x40 | 0x4}, Status.FAIL, "HW thermal slowdown"),
    (health.gpu_throttle, {"throttle": 0x80}, Status.FAIL, "HW power brake slowdown"),
    (health.gpu_throttle, {"throttle": 0x20}, Status.FAIL, "SW thermal slowdown"),
    (health.gpu_throttle, {"temperature": 84}, Status.WARN, "within 5 C of slowdown"),
    (health.gpu_throttle, {"temperature": 90}, Status.FAIL, "at or above the slowdown threshold 87 C"),
    (health.gpu_pcie, {"pcie": (5, 5, 8, 16)}, Status.FAIL, "PCIe link x8, the GPU and slot support x16"),
    (health.gpu_pcie, {"pcie": (3, 5, 16, 16), "throttle": 0x0}, Status.WARN, "PCIe gen3, gen5 possible"),
    (health.gpu_settings, {"persistence": 0}, Status.WARN, "persistence mode is off"),
    (health.gpu_settings, {"mig": (1, 1)}, Status.FAIL, "MIG is enabled, the node expects it disabled"),
    (health.gpu_nvlink, {"nvlinks": [1] * 5 + [0] + [1] * 12}, Status.FAIL, "NVLink link(s) 5 inactive (17/18 up)"),
    (health.gpu_nvlink, {"nvlinks": None}, Status.SKIP, "no NVLink on this GPU"),
    (health.gpu_processes, {"processes": [{"pid": 4242, "used": 30 * 2**30}]}, Status.WARN, "pid 4242"),
    (health.gpu_processes, {"memory": (80 * 2**30, 2 * 2**30)}, Status.WARN, "2048 MiB in use"),
])
def test_faults_are_caught_on_the_faulty_gpu_only(monkeypatch, node_ctx, check, overrides, status, text):
    bad = fault(monkeypatch, node_ctx, check, **overrides)
    assert len(bad) == 1, bad
    assert bad[0].status is status and bad[0].subject == "gpu3"
    assert text in bad[0].message and bad[0].message.startswith("GPU 3 (NVIDIA H100 80GB HBM3)")
    if status is Status.FAIL:
        assert bad[0].remediation


def test_sw_power_cap_and_idle_are_fine(monkeypatch, node_ctx):
    assert fault(monkeypatch, node_ctx, health.gpu_throttle, throttle=0x4 | 0x1) == []


def test_idle_pcie_downshift_is_fine(monkeypatch, node_ctx):
    assert fault(monkeypatch, node_ctx, health.gpu_pcie, pcie=(1, 5, 16, 16), throttle=0x1) == []


def test_missing_gpu(monkeypatch, node_ctx):
    use(monkeypatch, FakeNVML(healthy_node(7)))
    [v] = health.gpu_inventory(node_ctx)
    assert v.status is Status.FAIL and v.message.startswith("7 GPU(s) visible, 8 expected")


def test_wrong_model(monkeypatch, node_ctx):
    use(monkeypatch, FakeNVML(healthy_node(8)))
    node_ctx.node = replace(node_ctx.node, gpu_model="A800")
    [v] = health.gpu_inventory(node_ctx)
    assert v.status is Status.FAIL and "8 GPU(s) are not A800" in v.message


def test_mixed_vbios(monkeypatch, node_ctx):
    gpus = healthy_node(8)
    gpus[5]["vbios"] = "96.00.61.00.01"
    use(monkeypatch, FakeNVML(gpus))
    [v] = health.gpu_inventory(node_ctx)
    assert v.status is Status.FAIL and "mixed VBIOS" in v.message and "96.00.61.00.01" in v.message


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_nvml_absent_is_a_clear_fail_on_a_gpu_node(monkeypatch, node_ctx, code):
    use(monkeypatch, FakeNVML([], init_error=code))
    for fn in HEALTH_CHECKS:
        v = fn(node_ctx)
        assert isinstance(v, judges.Verdict) and v.status is Status.FAIL
        assert v.message.startswith("NVIDIA driver not loaded (NVML did not initialise")


def test_gpu_less_node_skips_through_the_runner(node_ctx):
    # needs_gpus: the runner skips them before any NVML or kernel log is touched
    specs = [s for s in all_checks() if s.target.startswith("checks.gpu.health:")]
    assert len(specs) == len(HEALTH_CHECKS) + 1 and all(s.needs_gpus for s in specs)
    node_ctx.node = replace(node_ctx.node, gpus=0)
    results = run_checks(specs, node_ctx)
    assert [r.name for r in results] == [s.name for s in specs]
    assert {(r.status, r.message) for r in results} == {
        (Status.SKIP, "this node is expected to have no GPUs (node.gpus = 0)")}


def test_wrong_driver_version_through_nvml():
    probe = driver.probe_driver(FakeNVML(healthy_node(1), driver="550.54.15"))
    v = driver.judge_driver(probe, "515.65.01", 8)
    assert v.status is Status.FAIL and "550.54.15 is loaded; the stack pins 515.65.01" in v.message
    assert driver.judge_driver(driver.probe_driver(FakeNVML(healthy_node(1))), "515.65.01", 8).status is Status.PASS


# --- Xid ----------------------------------------------------------------------------------------

OWN_LOG = """\
[    5.123456] nvidia: loading out-of-tree module taints kernel.
[ 1234.5] NVRM: Xid (PCI:0000:48:00): 79, pid=0, GPU has fallen off the bus.
[ 1300.1] NVRM: Xid (PCI:0000:18:00): 13, pid=5121, name=python, Graphics Exception: ESR 0x504648=0x2000d
[ 1301.1] NVRM: Xid (PCI:0000:18:00): 13, pid=5121, name=python, Graphics Exception: ESR 0x504648=0x2000d
"""


def test_xid_parse_and_map_to_gpu():
    events = judges.parse_xids(OWN_LOG)
    assert [(e.pci, e.xid) for e in events] == [("0000:48:00", 79), ("0000:18:00", 13), ("0000:18:00", 13)]
    snap = probe_nvml(FakeNVML(healthy_node(8)))
    v = judges.judge_xids(events, snap.gpus, "dmesg")
    assert v.status is Status.FAIL
    assert "GPU 3 (0000:48:00): Xid 79 (pid=0, GPU has fallen off the bus.)" in v.message
    assert v.measured["critical"].value == 1


def test_only_non_critical_xids_pass_with_a_note():
    v = judges.judge_xids(judges.parse_xids(OWN_LOG.replace(": 79,", ": 31,")), [], "journalctl -k -b")
    assert v.status is Status.PASS and "13 (x2)" in v.message and "31 (x1)" in v.message


def test_xid_check_reads_the_kernel_log(monkeypatch, node_ctx):
    monkeypatch.setattr(health, "probe_kernel_log", lambda: (OWN_LOG, "dmesg"))
    use(monkeypatch, FakeNVML(healthy_node(8)))
    v = health.gpu_xid(node_ctx)
    assert v.status is Status.FAIL and "GPU 3" in v.message
    monkeypatch.setattr(health, "probe_kernel_log", lambda: (None, "dmesg: Operation not permitted"))
    assert health.gpu_xid(node_ctx).status is Status.WARN


def fake_commands(directory: Path, **scripts: str) -> None:
    """Executables on an otherwise empty PATH: the kernel log commands as a node without access, or a hung
    journal, would answer."""
    for name, body in scripts.items():
        (directory / name).write_text("#!/bin/sh\n" + body + "\n")
        (directory / name).chmod(0o755)


def test_kernel_log_falls_back_to_dmesg_and_says_what_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_commands(tmp_path, journalctl="echo 'No journal files were found.' >&2; exit 1",
                  dmesg=f"/bin/cat <<'EOF'\n{OWN_LOG}EOF")
    assert health.probe_kernel_log() == (OWN_LOG, "dmesg")
    fake_commands(tmp_path, dmesg="echo 'dmesg: read kernel buffer failed: Operation not permitted' >&2; exit 1")
    text, why = health.probe_kernel_log()
    assert text is None and why == ("journalctl -k -b: No journal files were found.; "
                                    "dmesg: dmesg: read kernel buffer failed: Operation not permitted")


def test_a_hung_kernel_log_command_is_killed_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_commands(tmp_path, journalctl="exec /bin/sleep 30")
    started = time.monotonic()
    text, why = health.probe_kernel_log(timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert text is None and why == "journalctl -k -b: timed out after 0.5 s and was killed; dmesg: not installed"


@pytest.mark.skipif(not (SAMPLES / "dmesg_xid_48_63_dbe_page_retire.txt").exists(),
                    reason="../shared/samples is not beside this checkout")
def test_xid_real_kernel_log_sample():
    events = judges.parse_xids((SAMPLES / "dmesg_xid_48_63_dbe_page_retire.txt").read_text())
    assert [(e.pci, e.xid) for e in events] == [("0000:8a:00", 48), ("0000:8a:00", 63)]
    v = judges.judge_xids(events, [], "dmesg")
    assert v.status is Status.FAIL and "Xid 48" in v.message and "Xid 63" in v.message


def test_normalise_pci():
    assert judges.normalise_pci("00000000:3B:00.0") == "0000:3b:00"
    assert judges.normalise_pci("0000:3b:00") == "0000:3b:00"


# --- the real probes on this machine ---------------------------------------------------------

def test_real_gpu_group_on_this_machine(node_ctx):
    specs = [s for s in all_checks() if s.group == "gpu" and s.name != "gpu.dcgm_diag"]
    results = run_checks(specs, node_ctx)
    has_driver = Path("/proc/driver/nvidia/version").exists()
    needs = {s.name: s.needs for s in specs}
    for r in results:
        assert r.status is not Status.ERROR, r.message
        if r.name == "gpu.fabricmanager" and not count_nvswitches():
            assert r.status is Status.SKIP, r.message  # sysfs decides, not the driver: no NVSwitch here
        elif has_driver or r.name == "gpu.xid":  # the kernel log is read with or without a driver
            continue
        elif r.name == "gpu.driver":
            assert r.status is Status.FAIL and r.message.startswith("NVIDIA driver not loaded"), r.message
        else:  # the NVML checks: one root cause, not one failure each
            assert needs[r.name] == ("gpu.driver",)
            assert r.status is Status.SKIP, (r.name, r.message)
            assert r.message.startswith("blocked by gpu.driver (NVIDIA driver not loaded"), (r.name, r.message)


@pytest.mark.gpu
def test_real_nvml_snapshot_on_a_gpu_node():
    if not Path("/proc/driver/nvidia/version").exists():
        pytest.skip("needs an NVIDIA GPU and its driver: /proc/driver/nvidia/version is absent here")
    snap = probe_nvml(pynvml)
    assert snap.error is None and snap.gpus and all(g.name for g in snap.gpus)


def test_every_per_gpu_result_names_its_hardware(monkeypatch, node_ctx):
    """Index, UUID, PCI bus id and serial reach each GPU's result and survive the JSON round trip; a board
    without a serial (NVML: not supported) reports None rather than failing the check."""
    from checks.result import Result

    gpus = healthy_node(8)
    gpus[5]["serial"] = None
    use(monkeypatch, FakeNVML(gpus))
    for fn in HEALTH_CHECKS[1:]:
        per_gpu = [v for v in fn(node_ctx) if v.subject and v.subject.startswith("gpu")]
        assert [v.gpu.index for v in per_gpu] == list(range(8)), fn.__name__
        for v in per_gpu:
            assert v.gpu.uuid == gpus[v.gpu.index]["uuid"]
            assert v.gpu.pci_bus_id == gpus[v.gpu.index]["bus_id"]
            assert v.gpu.serial == gpus[v.gpu.index]["serial"]
            again = Result.from_dict(Result.from_verdict("gpu.x", "gpu", v, 0.1).to_dict())
            assert again.gpu == v.gpu
    assert [v.gpu for v in health.gpu_ecc(node_ctx)][5].serial is None
