"""The fabric manager check: its judge on healthy and faulty captured states, the sysfs probe on a
fake tree, and the real probe on this machine (no NVSwitch here: a skip)."""

from __future__ import annotations

from pathlib import Path

from checks.gpu import fabricmanager as fm
from checks.registry import Context, all_checks
from checks.result import Status
from checks.runner import run_checks

A800_SWITCHES = {0x1AF1: 6}


def probe(**kw) -> fm.FabricManagerProbe:
    base = {"nvswitches": dict(A800_SWITCHES), "service": "active",
            "version_text": "Fabric Manager version is : 515.65.01", "driver": "515.65.01"}
    return fm.FabricManagerProbe(**{**base, **kw})


def test_healthy_hgx_a800_passes_with_the_switch_count():
    v = fm.judge_fabricmanager(probe(), "515.65.01")
    assert v.status is Status.PASS, v.message
    assert v.measured["nvswitches"].value == 6 and v.measured["fabricmanager"].value == "515.65.01"
    assert "6 NVSwitch(es)" in v.message


def test_no_nvswitch_is_a_skip():
    v = fm.judge_fabricmanager(fm.FabricManagerProbe(), "515.65.01")
    assert v.status is Status.SKIP and "no NVSwitch" in v.message


def test_inactive_service_fails_naming_error_802():
    v = fm.judge_fabricmanager(probe(service="inactive"), "515.65.01")
    assert v.status is Status.FAIL and "nvidia-fabricmanager.service is inactive" in v.message
    assert "802" in v.remediation and "system not yet initialized" in v.remediation
    assert "fabricmanager role" in v.remediation


def test_version_other_than_the_loaded_driver_fails():
    # gpu-operator#544: fabric manager 530.30.02 with driver 530.41.03
    v = fm.judge_fabricmanager(probe(version_text="Fabric Manager version is : 530.30.02", driver="530.41.03"),
                               "530.41.03")
    assert v.status is Status.FAIL
    assert "fabric manager 530.30.02 is not the driver's version 530.41.03 (loaded)" in v.message


def test_without_a_loaded_driver_the_stack_version_is_the_reference():
    v = fm.judge_fabricmanager(probe(driver=None, service="failed"), "515.65.01")
    assert v.status is Status.FAIL and "failed" in v.message and v.measured["driver"].value == "not loaded"
    ok_version = fm.judge_fabricmanager(probe(driver=None), "515.65.01")
    assert ok_version.status is Status.PASS
    wrong = fm.judge_fabricmanager(probe(driver=None), "550.54.15")
    assert wrong.status is Status.FAIL and "(the stack pins)" in wrong.message


def test_not_installed_fails():
    v = fm.judge_fabricmanager(probe(version_text=None, service="inactive"), "515.65.01")
    assert v.status is Status.FAIL and "gave no version" in v.message


def test_no_systemctl_fails_with_the_reason():
    v = fm.judge_fabricmanager(probe(service=None, error="systemctl is not available"), "515.65.01")
    assert v.status is Status.FAIL and "systemctl is not available" in v.message


def test_a_missing_switch_warns():
    v = fm.judge_fabricmanager(probe(nvswitches={0x1AF1: 5}), "515.65.01")
    assert v.status is Status.WARN and "5 of 6 NVSwitches 10de:1af1" in v.message
    h100 = fm.judge_fabricmanager(probe(nvswitches={0x22A3: 4}), "515.65.01")
    assert h100.status is Status.PASS


def _fake_sysfs(root: Path, devices: list[tuple[str, str, str]]) -> Path:
    for i, (vendor, klass, device) in enumerate(devices):
        d = root / "bus" / "pci" / "devices" / f"0000:{i:02x}:00.0"
        d.mkdir(parents=True)
        for name, value in (("vendor", vendor), ("class", klass), ("device", device)):
            (d / name).write_text(value + "\n")
    return root


def test_count_nvswitches_from_a_fake_sysfs(tmp_path):
    root = _fake_sysfs(tmp_path, [("0x10de", "0x030200", "0x20f3")] * 8 + [("0x10de", "0x068000", "0x1af1")] * 6
                       + [("0x8086", "0x068000", "0x1234"), ("0x15b3", "0x020000", "0x101b")])
    assert fm.count_nvswitches(root) == {0x1AF1: 6}
    assert fm.count_nvswitches(tmp_path / "absent") == {}


def test_probe_on_a_node_with_nvswitches_but_no_fabric_manager(tmp_path):
    root = _fake_sysfs(tmp_path, [("0x10de", "0x068000", "0x22a3")] * 4)
    p = fm.probe_fabricmanager(root, tmp_path / "no-proc-version")
    assert p.nvswitches == {0x22A3: 4}
    v = fm.judge_fabricmanager(p, "550.54.15")
    assert v.status is Status.FAIL and "802" in v.remediation  # nothing of fabric manager on this machine


def fake_commands(directory: Path, **scripts: str) -> None:
    """Executables standing in for systemctl, nv-fabricmanager and nvidia-smi: no fabric manager here."""
    for name, body in scripts.items():
        (directory / name).write_text("#!/bin/sh\n" + body + "\n")
        (directory / name).chmod(0o755)


HEALTHY = {"systemctl": "echo active", "nv-fabricmanager": "echo 'Fabric Manager version is : 515.65.01'",
           "nvidia-smi": "printf '515.65.01\\n515.65.01\\n'"}


def probe_with(tmp_path, monkeypatch, **scripts) -> fm.FabricManagerProbe:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    fake_commands(bin_dir, **{**HEALTHY, **scripts})
    sysfs = tmp_path / "sys"
    if not sysfs.exists():
        _fake_sysfs(sysfs, [("0x10de", "0x068000", "0x1af1")] * 6)
    return fm.probe_fabricmanager(sysfs, tmp_path / "no-proc-version")


def test_probe_runs_the_commands_and_reads_their_answers(tmp_path, monkeypatch):
    p = probe_with(tmp_path, monkeypatch)
    assert (p.service, p.driver, p.error) == ("active", "515.65.01", None)  # the driver from nvidia-smi
    assert fm.judge_fabricmanager(p, "515.65.01").status is Status.PASS


def test_probe_of_a_stopped_or_unreachable_service(tmp_path, monkeypatch):
    p = probe_with(tmp_path, monkeypatch, systemctl="echo inactive; exit 3")  # is-active's answer for a stopped unit
    assert (p.service, p.error) == ("inactive", None)
    p = probe_with(tmp_path, monkeypatch, systemctl="echo 'System has not been booted with systemd as init system "
                                                   "(PID 1). Can'\\''t operate.' >&2; exit 1")
    assert p.service == "unknown" and p.error.startswith("systemctl: System has not been booted with systemd")
    v = fm.judge_fabricmanager(p, "515.65.01")
    assert v.status is Status.FAIL and "is unknown (systemctl: System has not been booted" in v.message


def test_a_hung_systemctl_is_killed_at_the_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "PROBE_TIMEOUT_S", 0.5)
    p = probe_with(tmp_path, monkeypatch, systemctl="exec /bin/sleep 30")
    assert p.service == "unknown" and p.error == "systemctl is-active timed out after 0.5 s and was killed"
    assert p.driver == "515.65.01"  # the other commands still answered


def test_registered_and_real_probe_on_this_machine():
    [spec] = [s for s in all_checks() if s.name == "gpu.fabricmanager"]
    assert spec.needs_gpus and not spec.needs  # reported beside a driver problem, not blocked by it
    ctx = Context(stack={"nvidia_driver": {"version": "515.65.01"}}, node={"gpus": 8})
    v = fm.gpu_fabricmanager(ctx)
    if not fm.count_nvswitches():
        assert v.status is Status.SKIP and "no NVSwitch" in v.message


def test_a_node_without_gpus_skips_through_the_runner():
    [spec] = [s for s in all_checks() if s.name == "gpu.fabricmanager"]
    [r] = run_checks([spec], Context(stack={"nvidia_driver": {"version": "515.65.01"}}, node={"gpus": 0}))
    assert r.status is Status.SKIP and r.message == "this node is expected to have no GPUs (node.gpus = 0)"
