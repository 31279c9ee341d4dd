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
    assert (g.ecc_aggregate_uncorrected, g.ecc_aggregate_corrected, g.ecc_aggregate_sram_uncorrected,
            g.ecc_aggregate_sram_corrected, g.ecc_aggregate_dram_uncorrected, g.ecc_aggregate_dram_corrected) == \
        (0, 0, 0, 0, 0, 0)


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
    (health.gpu_ecc, {"agg_locations": {"DRAM": (0, 0), "SRAM": (0, 1)}}, Status.FAIL,
     "1 uncorrectable SRAM ECC error(s) in the GPU's lifetime (aggregate counter: a reset does not clear it)"),
    (health.gpu_ecc, {"agg_locations": {"DRAM": (0, 0), "SRAM": (10_001, 0)}}, Status.FAIL,
     "10001 correctable SRAM ECC errors in the GPU's lifetime (more than 10000)"),
    (health.gpu_ecc, {"agg_locations": {"DRAM": (20_000_001, 0), "SRAM": (0, 0)}}, Status.FAIL,
     "20000001 DRAM ECC errors of one kind in the GPU's lifetime"),
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


def test_aggregate_sram_uncorrectable_fails_after_a_reset_with_rma_remediation(monkeypatch, node_ctx):
    """A reset clears the volatile counters (0 here), never the aggregate ones: the GPU still fails, and the
    remediation is an RMA naming the board's serial."""
    [bad] = fault(monkeypatch, node_ctx, health.gpu_ecc, ecc_uncorrected=0, ecc_corrected=0,
                  agg_locations={"DRAM": (12, 3), "SRAM": (40, 2)})
    assert bad.status is Status.FAIL and "2 uncorrectable SRAM ECC error(s)" in bad.message
    assert "RMA" in bad.remediation and "1650000000003" in bad.remediation
    m = {k: v.value for k, v in bad.measured.items()}
    assert m == {"uncorrected_volatile": 0, "corrected_volatile": 0, "uncorrected_aggregate": 5,
                 "corrected_aggregate": 52, "sram_uncorrected_aggregate": 2, "sram_corrected_aggregate": 40,
                 "dram_uncorrected_aggregate": 3, "dram_corrected_aggregate": 12}
    assert bad.expected["sram_uncorrected_aggregate"].value == 0


def test_aggregate_thresholds_are_inclusive_and_dram_history_alone_passes(monkeypatch, node_ctx):
    assert fault(monkeypatch, node_ctx, health.gpu_ecc,
                 agg_locations={"DRAM": (20_000_000, 7), "SRAM": (10_000, 0)}) == []
    use(monkeypatch, FakeNVML(healthy_node(1, agg_locations={"DRAM": (5, 7), "SRAM": (1, 0)})))
    [v] = health.gpu_ecc(node_ctx)
    assert v.message.endswith("ECC enabled, no uncorrectable errors; lifetime: 7 uncorrectable, 6 correctable")


def test_ecc_disabled_and_sram_errors_are_both_reported(monkeypatch, node_ctx):
    [bad] = fault(monkeypatch, node_ctx, health.gpu_ecc, ecc=(0, 0), agg_locations={"DRAM": (0, 0), "SRAM": (0, 4)})
    assert bad.status is Status.FAIL and "ECC is disabled" in bad.message and "4 uncorrectable SRAM" in bad.message
    assert "nvidia-smi -i N -e 1" in bad.remediation and "RMA" in bad.remediation


def test_older_boards_report_sram_per_location_and_some_none_at_all(monkeypatch, node_ctx):
    """Before Turing NVML has no SRAM location: L1/L2/register file/texture are summed. A board without
    aggregate counters reports none of them and is judged on the volatile ones."""
    volta = {"DEVICE_MEMORY": (3, 0), "L1_CACHE": (0, 1), "L2_CACHE": (2, 0), "REGISTER_FILE": (0, 0)}
    g = probe_nvml(FakeNVML(healthy_node(1, agg_locations=volta))).gpus[0]
    assert (g.ecc_aggregate_sram_uncorrected, g.ecc_aggregate_sram_corrected) == (1, 2)
    assert (g.ecc_aggregate_dram_uncorrected, g.ecc_aggregate_dram_corrected) == (0, 3)
    assert (g.ecc_aggregate_uncorrected, g.ecc_aggregate_corrected) == (1, 5)
    assert judges.judge_ecc(g).status is Status.FAIL
    g = probe_nvml(FakeNVML(healthy_node(1, agg_locations=None))).gpus[0]
    assert (g.ecc_aggregate_uncorrected, g.ecc_aggregate_sram_uncorrected, g.ecc_aggregate_dram_corrected) == \
        (None, None, None)
    v = judges.judge_ecc(g)
    assert v.status is Status.PASS and v.message.endswith("ECC enabled, no uncorrectable errors")
    assert not any(k.endswith("_aggregate") for k in v.measured)
    g = probe_nvml(FakeNVML(healthy_node(1, agg_locations={"DRAM": (0, 2)}))).gpus[0]  # SRAM not supported
    assert (g.ecc_aggregate_sram_uncorrected, g.ecc_aggregate_dram_uncorrected) == (None, 2)


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


def by_subject(verdicts):
    return {v.subject: v for v in verdicts}


def test_xid_parse_and_map_to_gpu():
    events = judges.parse_xids(OWN_LOG)
    assert [(e.pci, e.xid, e.uptime_s) for e in events] == [("0000:48:00", 79, 1234.5), ("0000:18:00", 13, 1300.1),
                                                           ("0000:18:00", 13, 1301.1)]
    snap = probe_nvml(FakeNVML(healthy_node(8)))
    verdicts = judges.judge_xids(events, snap.gpus, "dmesg")
    assert [v.subject for v in verdicts] == [f"gpu{i}" for i in range(8)]  # one per GPU, with its identity
    assert [v.gpu.index for v in verdicts] == list(range(8))
    v = verdicts[3]
    assert v.status is Status.FAIL and v.gpu.pci_bus_id == "00000000:48:00.0" and v.gpu.serial == "1650000000003"
    assert "Xid 79 x1 (GPU has fallen off the bus; NVIDIA: reboot the node), first 1234.5 s after boot" in v.message
    assert "reboot" in v.remediation.lower() and v.measured["critical"].value == 1
    gpu0 = verdicts[0]  # Xid 13: application level, warned with count and first/last seen
    assert gpu0.status is Status.WARN and gpu0.measured["xid_events"].value == 2
    assert "Xid 13 x2 (Graphics Engine Exception; NVIDIA: restart the application), first 1300.1 s after boot, " \
           "last 1301.1 s after boot" in gpu0.message
    assert {v.status for i, v in enumerate(verdicts) if i not in (0, 3)} == {Status.PASS}


XID_DATA = Path(__file__).resolve().parent / "data" / "xid"


def xid_log(name):
    return (XID_DATA / name).read_text()


def test_xid_catalog_policy_on_an_8_gpu_kernel_log():
    """13/31/43 warn, 79/95 fail, 94 warns (application level), 63 is informational, an Xid the catalog does not
    know warns on its PCI address, and an NVSwitch SXid is not a GPU Xid."""
    snap = probe_nvml(FakeNVML(healthy_node(8)))
    verdicts = by_subject(judges.judge_xids(judges.parse_xids(xid_log("dmesg_uptime_8gpu.txt")), snap.gpus, "dmesg"))
    got = {subject: v.status for subject, v in verdicts.items()}
    assert got == {"gpu0": Status.WARN, "gpu1": Status.WARN, "gpu2": Status.WARN, "gpu3": Status.FAIL,
                   "gpu4": Status.WARN, "gpu5": Status.FAIL, "gpu6": Status.PASS, "gpu7": Status.PASS,
                   "pci:0000:a1:00": Status.WARN}
    assert "Xid 43 x1 (GPU stopped processing; NVIDIA: none, then CONTACT_SUPPORT)" in verdicts["gpu2"].message
    assert "Xid 94 x2 (Contained memory error" in verdicts["gpu4"].message
    assert "first 3021.12 s after boot, last 3650.5 s after boot" in verdicts["gpu4"].message
    assert "Xid 95 x1 (Uncontained memory error; NVIDIA: reset the GPU)" in verdicts["gpu5"].message
    assert "reset the GPU" in verdicts["gpu5"].remediation
    assert "Xid 63 x1 (GPU memory remapping event" in verdicts["gpu6"].message  # reported, not judged
    unknown = verdicts["pci:0000:a1:00"]
    assert unknown.gpu is None and "Xid 199 x1 (not in NVIDIA's Xid catalog)" in unknown.message
    assert "PCI 0000:a1:00 (not a GPU NVML sees here)" in unknown.message and "catalog" in unknown.remediation
    assert all(v.gpu.index == int(s[3:]) for s, v in verdicts.items() if s.startswith("gpu"))
    assert "12028" not in " ".join(v.message for v in verdicts.values())  # the SXid line


def test_xid_wall_clock_stamps_and_the_worst_xid_wins():
    snap = probe_nvml(FakeNVML(healthy_node(2)))
    [gpu0, gpu1] = judges.judge_xids(judges.parse_xids(xid_log("dmesg_T_dbe_remap.txt")), snap.gpus, "dmesg")
    assert gpu1.status is Status.PASS and gpu0.status is Status.FAIL
    assert gpu0.message.index("Xid 48") < gpu0.message.index("Xid 45") < gpu0.message.index("Xid 63")
    assert "first Thu May  2 10:04:11 2024" in gpu0.message
    assert gpu0.measured["first_seen"].value == "Thu May  2 10:04:11 2024"
    assert gpu0.measured["last_seen"].value == "Thu May  2 10:04:12 2024"
    assert gpu0.measured["xid_events"].value == 3 and gpu0.measured["critical"].value == 1
    assert "row remaps" in gpu0.remediation


def test_xid_154_follows_what_it_changed_to_and_gsp_timeouts_fail():
    snap = probe_nvml(FakeNVML(healthy_node(8)))
    v = by_subject(judges.judge_xids(judges.parse_xids(xid_log("journal_short_gsp_154.txt")), snap.gpus,
                                     "journalctl -k -b"))
    assert v["gpu1"].status is Status.FAIL
    assert "Xid 119 x2 (GSP RPC Timeout; NVIDIA: reset the GPU)" in v["gpu1"].message
    assert "first May 02 10:11:12, last May 02 10:11:19" in v["gpu1"].message
    assert v["gpu2"].status is Status.FAIL and "NVIDIA: reboot the node" in v["gpu2"].message
    assert v["gpu3"].status is Status.PASS  # changed back to "None"
    assert v["gpu4"].status is Status.WARN and "High single-bit ECC error rate" in v["gpu4"].message


def test_unreadable_xid_lines_warn_and_mig_addresses_map_to_their_gpu():
    snap = probe_nvml(FakeNVML(healthy_node(3)))
    events = judges.parse_xids(xid_log("mig_and_unreadable.txt"))
    assert [(e.pci, e.xid) for e in events] == [("0000:18:00", 31), ("0000:28:00", None), (None, None),
                                                ("0000:38:00", 63)]
    v = by_subject(judges.judge_xids(events, snap.gpus, "dmesg"))
    assert v["gpu0"].status is Status.WARN and "Xid 31" in v["gpu0"].message
    assert v["gpu1"].status is Status.WARN and "1 Xid line(s) that could not be read" in v["gpu1"].message
    assert v["pci:unknown"].status is Status.WARN and v["pci:unknown"].gpu is None
    assert v["gpu2"].status is Status.PASS


def test_xid_catalog_covers_every_documented_code_with_a_known_action():
    from checks.gpu import xid_catalog as xc

    assert sorted(xc.CATALOG) == list(range(1, 173))  # 1-172: every row of NVIDIA's catalog
    for xid, info in xc.CATALOG.items():
        assert info.immediate in xc.BUCKET_ACTION or info.ours is not None, xid
        assert isinstance(info.action, xc.Action)
    fails = {x for x in xc.CATALOG if xc.status_for(x) is Status.FAIL}
    assert {48, 62, 64, 74, 79, 95, 109, 119, 120, 140, 143, 144, 150, 151} <= fails
    assert {xc.status_for(x) for x in (13, 31, 43, 94, 45, 68)} == {Status.WARN}
    assert {xc.status_for(x) for x in (63, 106, 107)} == {Status.PASS}
    assert xc.status_for(10_000) is Status.WARN and xc.action_for(10_000) is None  # not in the catalog
    assert xc.action_for(154, "changed from 0x0 (None) to 0x1 (GPU Reset Required)") is xc.Action.RESET_GPU
    assert xc.action_for(154, "garbled") is xc.Action.RESET_GPU


def test_xid_parser_and_judge_never_raise_and_never_pass_an_unreadable_number():
    """A seeded fuzz loop: every Xid sample shuffled, cut at every line and inside lines, mixed with random
    bytes; the parser and the judge never raise. A readable log whose only Xid is informational passes;
    the same log with that Xid's number made unreadable never does."""
    import random

    rng = random.Random(1111)
    gpus = probe_nvml(FakeNVML(healthy_node(8))).gpus
    texts = [xid_log(p.name) for p in sorted(XID_DATA.glob("*.txt"))]
    if (SAMPLES / "dmesg_xid_48_63_dbe_page_retire.txt").exists():
        texts.append((SAMPLES / "dmesg_xid_48_63_dbe_page_retire.txt").read_text())
    started = time.monotonic()
    for text in texts:
        lines = text.splitlines(keepends=True)
        variants = ["".join(lines[:i]) for i in range(len(lines) + 1)]  # truncated at every line
        variants += [text[:rng.randrange(len(text) + 1)] for _ in range(20)]  # and inside a line
        for _ in range(20):
            shuffled = lines[:]
            rng.shuffle(shuffled)
            variants.append("".join(shuffled))
        for _ in range(20):
            noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).decode("latin-1")
            at = rng.randrange(len(text) + 1)
            variants.append(text[:at] + noise + text[at:])
        for variant in variants:
            verdicts = judges.judge_xids(judges.parse_xids(variant), gpus, "dmesg")
            assert verdicts and all(isinstance(v, judges.Verdict) for v in verdicts)
    benign = "[  815.5] NVRM: Xid (PCI:0000:38:00): 63, Row Remapper: New row marked for remapping.\n"
    assert {v.status for v in judges.judge_xids(judges.parse_xids(benign), gpus, "dmesg")} == {Status.PASS}
    for _ in range(200):
        junk = rng.choice(["6x3", "63a", "0x3f", "-63", "six", "6 3", "", "99999999999", "\uff16\uff13"])
        junk += "".join(rng.choice("xyz!?.") for _ in range(rng.randrange(3)))
        bad = benign.replace(": 63,", f": {junk},")
        verdicts = judges.judge_xids(judges.parse_xids(bad), gpus, "dmesg")
        assert any(v.status is not Status.PASS for v in verdicts), junk
    assert time.monotonic() - started < 20


def test_xid_check_reads_the_kernel_log(monkeypatch, node_ctx):
    monkeypatch.setattr(health, "probe_kernel_log", lambda: (OWN_LOG, "dmesg"))
    use(monkeypatch, FakeNVML(healthy_node(8)))
    verdicts = health.gpu_xid(node_ctx)
    assert [v.status for v in verdicts] == [Status.WARN, Status.PASS, Status.PASS, Status.FAIL] + [Status.PASS] * 4
    assert verdicts[3].message.startswith("GPU 3 (NVIDIA H100 80GB HBM3): PCI 0000:48:00: ")
    assert all(v.measured["source"].value == "dmesg" for v in verdicts)
    monkeypatch.setattr(health, "probe_kernel_log", lambda: (None, "dmesg: Operation not permitted"))
    assert health.gpu_xid(node_ctx).status is Status.WARN
    # without NVML the Xids are still judged, per PCI address
    monkeypatch.setattr(health, "probe_kernel_log", lambda: (OWN_LOG, "dmesg"))
    use(monkeypatch, FakeNVML([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    verdicts = health.gpu_xid(node_ctx)
    assert [(v.subject, v.status, v.gpu) for v in verdicts] == [("pci:0000:18:00", Status.WARN, None),
                                                                ("pci:0000:48:00", Status.FAIL, None)]


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
    [v] = judges.judge_xids(events, [], "dmesg")
    assert v.status is Status.FAIL and "Xid 48" in v.message and "Xid 63" in v.message
    assert v.subject == "pci:0000:8a:00" and "first Mon Oct 29 12:07:39 2018" in v.message


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
