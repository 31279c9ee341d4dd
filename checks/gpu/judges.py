"""Pure rules over NVML snapshots: each function takes captured data and returns Verdicts.

Thresholds are named here with where they come from (../shared/FACTS.md lists the sources:
Azure azurehpc-health-checks, facebookresearch/gcm, imbue-ai/cluster-health, NVIDIA DCGM).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from checks.gpu.nvml import GpuSnapshot, NodeSnapshot
from checks.result import GpuId, Status, Value, Verdict

# Volatile correctable ECC errors above this since the driver loaded -> warn. Azure fails a node at
# 10,000 correctable SRAM errors; we warn at that count over all volatile correctable errors, since
# correctable DRAM errors alone are survivable but a rising count predicts row remaps.
ECC_CORRECTABLE_WARN = 10_000
# More retired pages than this -> fail (gcm's rule; NVIDIA's RMA guidance is in the same range).
RETIRED_PAGES_FAIL = 10
# Within this many degrees of the slowdown threshold -> warn; at or above it -> fail.
TEMP_MARGIN_C = 5
# GPU memory in use with no process of ours: drivers >= 510 report reserved memory as used through
# the v1 memory API (a few hundred MiB on H100), so gcm's 15 MiB rule would fire on idle GPUs; 1 GiB
# still catches a leftover job holding memory from another container.
LEFTOVER_MEMORY_WARN_MIB = 1024

# nvmlClocksThrottleReason* bits.
THROTTLE_BITS = {
    0x1: "GPU idle",
    0x2: "applications clocks setting",
    0x4: "SW power cap",
    0x8: "HW slowdown",
    0x10: "sync boost",
    0x20: "SW thermal slowdown",
    0x40: "HW thermal slowdown",
    0x80: "HW power brake slowdown",
    0x100: "display clock setting",
}
# Reasons that mean the hardware is protecting itself (fail); the rest are normal operation.
THROTTLE_FAIL = 0x8 | 0x20 | 0x40 | 0x80
THROTTLE_IDLE = 0x1

# XIDs that take a node out of service (Azure's list, FACTS.md).
CRITICAL_XIDS = frozenset({48, 56, 57, 58, 62, 63, 64, 65, 68, 69, 73, 74, 79, 80, 81, 92, 119, 120})


def _gpu(g: GpuSnapshot) -> str:
    return f"gpu{g.index}"


def gpu_id(g: GpuSnapshot) -> GpuId:
    return GpuId(g.index, g.uuid, g.bus_id, g.serial)


def _v(status, message, g: GpuSnapshot, measured=None, expected=None, remediation=None) -> Verdict:
    return Verdict(status, f"GPU {g.index} ({g.name}): {message}", measured or {}, expected or {}, remediation,
                   subject=_gpu(g), gpu=gpu_id(g))


# --- node-wide -----------------------------------------------------------------------------------

def judge_inventory(snap: NodeSnapshot, expected_gpus: int, expected_model: str | None) -> list[Verdict]:
    """GPU count and model as expected; one driver and one VBIOS per model across the node."""
    names = Counter(g.name for g in snap.gpus)
    measured = {"gpus": len(snap.gpus), "models": ", ".join(f"{n}x {m}" for m, n in names.items()) or "none"}
    expected = {"gpus": expected_gpus, "model": expected_model or "any"}
    out = []
    if len(snap.gpus) != expected_gpus:
        seen = ", ".join(f"{_gpu(g)} {g.bus_id or '?'}" for g in snap.gpus) or "none"
        out.append(Verdict(Status.FAIL, f"{len(snap.gpus)} GPU(s) visible, {expected_gpus} expected (seen: {seen})",
                           measured, expected,
                           "A GPU fell off the bus or is not bound to the driver: check `nvidia-smi -L`, "
                           "`lspci | grep -i nvidia`, and the kernel log for Xid 79; reseat or RMA."))
    wrong = [g for g in snap.gpus if expected_model and expected_model.lower() not in g.name.lower()]
    if wrong:
        out.append(Verdict(Status.FAIL, f"{len(wrong)} GPU(s) are not {expected_model}: "
                                        + ", ".join(f"{_gpu(g)} {g.name}" for g in wrong), measured, expected,
                           "The node is not the hardware its inventory entry says; fix node.gpu_model or the node."))
    by_model: dict[str, set[str]] = {}
    for g in snap.gpus:
        by_model.setdefault(g.name, set()).add(g.vbios or "?")
    mixed = {m: v for m, v in by_model.items() if len(v) > 1}
    if mixed:
        detail = "; ".join(f"{m}: {', '.join(sorted(v))}" for m, v in mixed.items())
        out.append(Verdict(Status.FAIL, f"mixed VBIOS versions across GPUs of one model ({detail})",
                           {**measured, "vbios": detail}, expected,
                           "Flash every GPU to the same VBIOS (vendor tool), so they behave alike."))
    if not out:
        vb = ", ".join(sorted({g.vbios or "?" for g in snap.gpus}))
        out.append(Verdict(Status.PASS, f"{measured['models']}, VBIOS {vb}, driver {snap.driver}",
                           {**measured, "vbios": vb}, expected))
    return out


# --- per GPU -------------------------------------------------------------------------------------

def judge_ecc(g: GpuSnapshot) -> Verdict:
    measured = {"uncorrected_volatile": g.ecc_volatile_uncorrected, "corrected_volatile": g.ecc_volatile_corrected}
    expected = {"ecc": "enabled", "uncorrected_volatile": 0, "corrected_volatile": f"<= {ECC_CORRECTABLE_WARN}"}
    if g.ecc_enabled is None:
        return _v(Status.SKIP, "no ECC on this board", g)
    if not g.ecc_enabled:
        return _v(Status.FAIL, "ECC is disabled" + (" (enabled after reboot)" if g.ecc_pending else ""), g,
                  measured, expected, "Enable it: `nvidia-smi -i N -e 1`, then reboot.")
    if (g.ecc_volatile_uncorrected or 0) > 0:
        return _v(Status.FAIL, f"{g.ecc_volatile_uncorrected} uncorrectable ECC error(s) since the driver loaded", g,
                  measured, expected, "Drain the node; reset the GPU or reboot, then look for Xid 48/63/64; "
                                      "repeated errors mean RMA.")
    if (g.ecc_volatile_corrected or 0) > ECC_CORRECTABLE_WARN:
        return _v(Status.WARN, f"{g.ecc_volatile_corrected} correctable ECC errors since the driver loaded", g,
                  measured, expected, "Watch the count; run `dcgmi diag -r 3` and plan a GPU swap if it grows.")
    return _v(Status.PASS, "ECC enabled, no uncorrectable errors", g, measured, expected)


def judge_memory_errors(g: GpuSnapshot) -> Verdict:
    retired = (g.retired_sbe or 0) + (g.retired_dbe or 0)
    measured = {"retired_pages": retired if g.retired_sbe is not None or g.retired_dbe is not None else None,
                "retired_pending": g.retired_pending, "remap_pending": g.remap_pending,
                "remap_failure": g.remap_failure, "remapped_rows_uncorrectable": g.remap_uncorrected_rows}
    measured = {k: v for k, v in measured.items() if v is not None}
    expected = {"retired_pages": f"<= {RETIRED_PAGES_FAIL}", "pending": False, "remap_failure": False}
    problems = []
    if g.remap_failure:
        problems.append("row remapping failed (no spare rows left)")
    if g.remap_pending:
        problems.append("a row remap is pending")
    if g.retired_pending:
        problems.append("a page retirement is pending")
    if retired > RETIRED_PAGES_FAIL:
        problems.append(f"{retired} retired pages (more than {RETIRED_PAGES_FAIL})")
    if problems:
        fix = ("Pending remaps/retirements take effect after a GPU reset: drain, `nvidia-smi -r` or reboot, "
               "then verify again; a remap failure or many retired pages means RMA.")
        return _v(Status.FAIL, "; ".join(problems), g, measured, expected, fix)
    if not measured:
        return _v(Status.SKIP, "no page retirement or row remapping data on this board", g)
    return _v(Status.PASS, "no pending or failed row remaps or page retirements", g, measured, expected)


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit] + (
        [f"unknown 0x{mask & ~sum(THROTTLE_BITS):x}"] if mask & ~sum(THROTTLE_BITS) else [])


def judge_throttle(g: GpuSnapshot) -> Verdict:
    measured: dict = {}
    if g.temperature_c is not None:
        measured["temperature"] = Value(g.temperature_c, "C")
    expected = {"slowdown_temperature": Value(g.slowdown_temp_c, "C")} if g.slowdown_temp_c else {}
    mask = g.throttle_reasons
    if mask is not None:
        measured["throttle_reasons"] = ", ".join(throttle_names(mask)) or "none"
    bad = throttle_names(mask & THROTTLE_FAIL) if mask else []
    if bad:
        return _v(Status.FAIL, f"clocks held down by {', '.join(bad)}", g, measured, expected,
                  "Check cooling (fans, airflow, inlet temperature) and power (PSUs, power brake signal); "
                  "`nvidia-smi -q -d PERFORMANCE` shows the active reasons.")
    if g.temperature_c is not None and g.slowdown_temp_c:
        if g.temperature_c >= g.slowdown_temp_c:
            return _v(Status.FAIL, f"{g.temperature_c} C, at or above the slowdown threshold {g.slowdown_temp_c} C",
                      g, measured, expected, "Check cooling before running jobs.")
        if g.temperature_c >= g.slowdown_temp_c - TEMP_MARGIN_C:
            return _v(Status.WARN, f"{g.temperature_c} C, within {TEMP_MARGIN_C} C of slowdown at "
                                   f"{g.slowdown_temp_c} C", g, measured, expected, "Check cooling.")
    if mask is None and g.temperature_c is None:
        return _v(Status.SKIP, "clock throttle reasons and temperature not readable on this board", g)
    return _v(Status.PASS, f"no hardware slowdown ({measured.get('throttle_reasons', 'reasons n/a')}), "
                           f"{g.temperature_c if g.temperature_c is not None else '?'} C", g, measured, expected)


def judge_pcie(g: GpuSnapshot) -> Verdict:
    if None in (g.pcie_gen, g.pcie_gen_max, g.pcie_width, g.pcie_width_max):
        return _v(Status.SKIP, "PCIe link not readable", g)
    measured = {"gen": g.pcie_gen, "width": Value(g.pcie_width, "lanes")}
    expected = {"gen": g.pcie_gen_max, "width": Value(g.pcie_width_max, "lanes")}
    if g.pcie_width < g.pcie_width_max:
        return _v(Status.FAIL, f"PCIe link x{g.pcie_width}, the GPU and slot support x{g.pcie_width_max}", g,
                  measured, expected, "A degraded link: reseat the GPU or riser, check the slot; "
                                      "`lspci -vv` LnkSta shows the same.")
    if g.pcie_gen < g.pcie_gen_max:
        idle = g.throttle_reasons is not None and g.throttle_reasons & THROTTLE_IDLE
        if idle:
            return _v(Status.PASS, f"PCIe gen{g.pcie_gen} x{g.pcie_width} while idle (gen{g.pcie_gen_max} under load; "
                                   "idle GPUs lower the link speed)", g, measured, expected)
        return _v(Status.WARN, f"PCIe gen{g.pcie_gen}, gen{g.pcie_gen_max} possible, and the GPU is not idle", g,
                  measured, expected, "Check BIOS PCIe settings and the slot; rerun under load to confirm.")
    return _v(Status.PASS, f"PCIe gen{g.pcie_gen} x{g.pcie_width}", g, measured, expected)


def judge_settings(g: GpuSnapshot, expect_mig: bool) -> Verdict:
    measured = {"persistence": g.persistence, "mig": g.mig_enabled}
    expected = {"persistence": True, "mig": expect_mig}
    if g.mig_enabled is None and expect_mig:
        return _v(Status.FAIL, "MIG expected but this GPU does not support it", g, measured, expected)
    if g.mig_enabled is not None and g.mig_enabled != expect_mig:
        state = "enabled" if g.mig_enabled else "disabled"
        return _v(Status.FAIL, f"MIG is {state}, the node expects it {'enabled' if expect_mig else 'disabled'}", g,
                  measured, expected, f"`nvidia-smi -i N -mig {1 if expect_mig else 0}` then reset the GPU.")
    if g.persistence is False:
        return _v(Status.WARN, "persistence mode is off (slow first CUDA call, state lost between jobs)", g,
                  measured, expected, "Enable nvidia-persistenced (the nvidia_driver role does).")
    return _v(Status.PASS, f"persistence {'on' if g.persistence else 'n/a'}, MIG "
                           f"{'n/a' if g.mig_enabled is None else ('on' if g.mig_enabled else 'off')}", g,
              measured, expected)


def judge_nvlink(g: GpuSnapshot) -> Verdict:
    if not g.nvlink_active:
        return _v(Status.SKIP, "no NVLink on this GPU", g)
    down = [i for i, up in enumerate(g.nvlink_active) if not up]
    measured = {"links_active": len(g.nvlink_active) - len(down), "links": len(g.nvlink_active)}
    expected = {"links_active": len(g.nvlink_active)}
    if down:
        return _v(Status.FAIL, f"NVLink link(s) {', '.join(map(str, down))} inactive "
                               f"({measured['links_active']}/{len(g.nvlink_active)} up)", g, measured, expected,
                  "Check `nvidia-smi nvlink -s`; a down link halves all-reduce bandwidth: reset the GPU, "
                  "check the NVSwitch/fabric manager, then RMA.")
    return _v(Status.PASS, f"all {len(g.nvlink_active)} NVLink links active", g, measured, expected)


def judge_processes(g: GpuSnapshot) -> Verdict:
    measured = {"processes": len(g.processes)}
    if g.memory_used_mib is not None:
        measured["memory_used"] = Value(round(g.memory_used_mib, 1), "MiB")
    expected = {"processes": 0, "memory_used": Value(f"<= {LEFTOVER_MEMORY_WARN_MIB}", "MiB")}
    if g.processes:
        pids = ", ".join(str(p["pid"]) for p in g.processes)
        return _v(Status.WARN, f"{len(g.processes)} process(es) already on the GPU (pid {pids})", g, measured, expected,
                  "A leftover job: stop it before handing the node out (`nvidia-smi` shows the owner).")
    if g.memory_used_mib is not None and g.memory_used_mib > LEFTOVER_MEMORY_WARN_MIB:
        return _v(Status.WARN, f"{g.memory_used_mib:.0f} MiB in use with no process visible here "
                               "(another container?)", g, measured, expected,
                  "Find the owner (`nvidia-smi`, `fuser -v /dev/nvidia*`) and stop it.")
    return _v(Status.PASS, "no leftover processes", g, measured, expected)


# --- kernel log ----------------------------------------------------------------------------------

XID_RX = re.compile(r"NVRM: Xid \(PCI:([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2})(?:\.\d)?\): (\d+),\s*(.*)")


@dataclass(frozen=True)
class XidEvent:
    pci: str  # normalised "0000:8a:00"
    xid: int
    text: str


def normalise_pci(address: str) -> str:
    """'00000000:3B:00.0' or '0000:3b:00' -> '0000:3b:00' (domain:bus:device)."""
    parts = address.lower().split(":")
    domain, bus, dev = parts[-3], parts[-2], parts[-1].split(".")[0]
    return f"{int(domain, 16):04x}:{bus}:{dev}"


def parse_xids(log_text: str) -> list[XidEvent]:
    out = []
    for line in log_text.splitlines():
        m = XID_RX.search(line)
        if m:
            out.append(XidEvent(normalise_pci(m.group(1)), int(m.group(2)), m.group(3).strip()))
    return out


def judge_xids(events: list[XidEvent], gpus: list[GpuSnapshot], source: str) -> Verdict:
    index = {normalise_pci(g.bus_id): g.index for g in gpus if g.bus_id}

    def where(e: XidEvent) -> str:
        return f"GPU {index[e.pci]} ({e.pci})" if e.pci in index else f"PCI {e.pci}"

    critical = [e for e in events if e.xid in CRITICAL_XIDS]
    other = Counter(e.xid for e in events if e.xid not in CRITICAL_XIDS)
    measured = {"xid_events": len(events), "critical": len(critical), "source": source}
    expected = {"critical": 0}
    if critical:
        seen = []
        for e in critical:
            item = f"{where(e)}: Xid {e.xid} ({e.text[:80]})"
            if item not in seen:
                seen.append(item)
        return Verdict(Status.FAIL, f"critical Xid since boot: {'; '.join(seen[:5])}"
                                    + (f" (+{len(seen) - 5} more)" if len(seen) > 5 else ""), measured, expected,
                       "Drain the node. Xid 48/63/64/94/95: memory errors (reset, then check row remaps); 79: GPU fell "
                       "off the bus (reseat/RMA); 74: NVLink error. See NVIDIA's Xid catalogue.")
    note = f"; non-critical Xids seen: {', '.join(f'{x} (x{n})' for x, n in sorted(other.items()))}" if other else ""
    return Verdict(Status.PASS, f"no critical Xid in the kernel log since boot{note}", measured, expected)
