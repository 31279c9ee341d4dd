"""Pure rules over NVML snapshots: each function takes captured data and returns Verdicts.

Thresholds are named here with where they come from (../shared/FACTS.md lists the sources:
Azure azurehpc-health-checks, facebookresearch/gcm, imbue-ai/cluster-health, NVIDIA DCGM).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from checks.gpu import xid_catalog
from checks.gpu.nvml import GpuSnapshot, NodeSnapshot
from checks.result import GpuId, Status, Value, Verdict

# Volatile correctable ECC errors above this since the driver loaded -> warn. Azure fails a node at
# 10,000 correctable SRAM errors; we warn at that count over all volatile correctable errors, since
# correctable DRAM errors alone are survivable but a rising count predicts row remaps.
ECC_CORRECTABLE_WARN = 10_000
# Aggregate (lifetime) counters, Azure's rules (azurehpc-health-checks customTests/azure_gpu_ecc.nhc with the
# `check_gpu_ecc 20000000 10000` of its H100/A100 confs, fault code NHC2019): any uncorrectable SRAM error
# -> fail (SRAM has no spare rows: RMA); correctable SRAM errors above 10,000 -> fail; DRAM errors of one
# kind above 20,000,000 -> fail. Uncorrectable DRAM errors below that are row-remapped (A100 and newer) or
# page-retired: gpu.memory_errors judges whether that worked.
SRAM_CORRECTABLE_FAIL = 10_000
DRAM_ERRORS_FAIL = 20_000_000
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

# Xids: the policy is NVIDIA's Xid catalog, in checks/gpu/xid_catalog.py (with its source and our mapping).


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
    """ECC mode, the volatile counters (since the driver loaded) and the aggregate ones (lifetime, in the
    InfoROM: a reset or reboot clears the volatile counters, never these)."""
    measured = {"uncorrected_volatile": g.ecc_volatile_uncorrected, "corrected_volatile": g.ecc_volatile_corrected}
    aggregate = {"uncorrected_aggregate": g.ecc_aggregate_uncorrected,
                 "corrected_aggregate": g.ecc_aggregate_corrected,
                 "sram_uncorrected_aggregate": g.ecc_aggregate_sram_uncorrected,
                 "sram_corrected_aggregate": g.ecc_aggregate_sram_corrected,
                 "dram_uncorrected_aggregate": g.ecc_aggregate_dram_uncorrected,
                 "dram_corrected_aggregate": g.ecc_aggregate_dram_corrected}
    measured.update({k: v for k, v in aggregate.items() if v is not None})
    expected = {"ecc": "enabled", "uncorrected_volatile": 0, "corrected_volatile": f"<= {ECC_CORRECTABLE_WARN}",
                "sram_uncorrected_aggregate": 0, "sram_corrected_aggregate": f"<= {SRAM_CORRECTABLE_FAIL}",
                "dram_aggregate": f"<= {DRAM_ERRORS_FAIL}"}
    if g.ecc_enabled is None:
        return _v(Status.SKIP, "no ECC on this board", g)
    problems: list[tuple[Status, str, str]] = []  # (status, what, remediation)
    if not g.ecc_enabled:
        problems.append((Status.FAIL, "ECC is disabled" + (" (enabled after reboot)" if g.ecc_pending else ""),
                         "Enable it: `nvidia-smi -i N -e 1`, then reboot."))
    if (g.ecc_aggregate_sram_uncorrected or 0) > 0:
        problems.append((Status.FAIL, f"{g.ecc_aggregate_sram_uncorrected} uncorrectable SRAM ECC error(s) in the "
                                      "GPU's lifetime (aggregate counter: a reset does not clear it)",
                         "SRAM cannot be remapped: this GPU needs an RMA. Drain the node and open a ticket with the "
                         f"board serial ({g.serial or 'nvidia-smi -q: Serial Number'}) and an nvidia-bug-report.sh "
                         "log."))
    if (g.ecc_volatile_uncorrected or 0) > 0:
        problems.append((Status.FAIL, f"{g.ecc_volatile_uncorrected} uncorrectable ECC error(s) since the driver "
                                      "loaded",
                         "Drain the node; reset the GPU or reboot, then look for Xid 48/63/64/94/95; repeated errors "
                         "mean RMA."))
    if (g.ecc_aggregate_sram_corrected or 0) > SRAM_CORRECTABLE_FAIL:
        problems.append((Status.FAIL, f"{g.ecc_aggregate_sram_corrected} correctable SRAM ECC errors in the GPU's "
                                      f"lifetime (more than {SRAM_CORRECTABLE_FAIL})",
                         "A failing SRAM block: drain the node, run `dcgmi diag -r 3`, and RMA the GPU."))
    dram = max(g.ecc_aggregate_dram_corrected or 0, g.ecc_aggregate_dram_uncorrected or 0)
    if dram > DRAM_ERRORS_FAIL:
        problems.append((Status.FAIL, f"{dram} DRAM ECC errors of one kind in the GPU's lifetime (more than "
                                      f"{DRAM_ERRORS_FAIL})",
                         "Worn HBM: drain the node, check row remapping (`nvidia-smi -q -d ROW_REMAPPER`) and RMA."))
    if (g.ecc_volatile_corrected or 0) > ECC_CORRECTABLE_WARN:
        problems.append((Status.WARN, f"{g.ecc_volatile_corrected} correctable ECC errors since the driver loaded",
                         "Watch the count; run `dcgmi diag -r 3` and plan a GPU swap if it grows."))
    if problems:
        status = max(p[0] for p in problems)
        fixes = list(dict.fromkeys(p[2] for p in problems if p[0] is status))
        return _v(status, "; ".join(p[1] for p in problems), g, measured, expected, " ".join(fixes))
    lifetime = ""
    if g.ecc_aggregate_uncorrected is not None or g.ecc_aggregate_sram_uncorrected is not None:
        lifetime = (f"; lifetime: {g.ecc_aggregate_uncorrected if g.ecc_aggregate_uncorrected is not None else '?'} "
                    f"uncorrectable, {g.ecc_aggregate_corrected if g.ecc_aggregate_corrected is not None else '?'} "
                    "correctable")
    return _v(Status.PASS, f"ECC enabled, no uncorrectable errors{lifetime}", g, measured, expected)


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

# "NVRM: Xid (PCI:0000:8a:00): 48, text"; MIG adds to the parenthesis ("(PCI:0000:3b:00 GPU-I:01)").
XID_RX = re.compile(r"NVRM: Xid \(PCI:([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2})(?:\.[0-9A-Fa-f])?[^)]{0,80}\):"
                    r"\s*(\d{1,9})\s*(?:,\s*(.*))?$", re.ASCII)
XID_MARK = "NVRM: Xid"
XID_PCI_RX = re.compile(r"PCI:([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2})")
# Kernel log time stamps, in the forms the two sources print: seconds since boot ("[ 1234.567890]", dmesg and
# journalctl -o short-monotonic), dmesg -T ("[Mon Oct 29 12:07:39 2018]"), ISO ("2024-05-01T12:07:39+0000",
# journalctl -o short-iso) and syslog ("Oct 29 12:07:39 host kernel:", journalctl -o short).
_UPTIME_RX = re.compile(r"\[\s*(\d{1,10}\.\d{1,9})\]", re.ASCII)
_CLOCK_RXS = (re.compile(r"\[([A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4})\]"),
              re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)"),
              re.compile(r"^([A-Z][a-z]{2} [ \d]?\d \d\d:\d\d:\d\d)"))


@dataclass(frozen=True)
class XidEvent:
    pci: str | None  # normalised "0000:8a:00"; None when the line's address could not be read
    xid: int | None  # None: a "NVRM: Xid" line whose number could not be read (never a silent pass)
    text: str
    stamp: str | None = None  # the time stamp as the log printed it
    uptime_s: float | None = None  # seconds since boot, where the stamp is one

    @property
    def when(self) -> str | None:
        if self.uptime_s is not None:
            return f"{self.uptime_s:g} s after boot"
        return self.stamp


def normalise_pci(address: str) -> str:
    """'00000000:3B:00.0' or '0000:3b:00' -> '0000:3b:00' (domain:bus:device)."""
    parts = address.lower().split(":")
    domain, bus, dev = parts[-3], parts[-2], parts[-1].split(".")[0]
    return f"{int(domain, 16):04x}:{bus}:{dev}"


def _stamp(prefix: str) -> tuple[str | None, float | None]:
    m = _UPTIME_RX.search(prefix)
    if m:
        return m.group(0).strip(), float(m.group(1))
    for rx in _CLOCK_RXS:
        m = rx.search(prefix)
        if m:
            return m.group(1), None
    return None, None


def parse_xids(log_text: str) -> list[XidEvent]:
    """Every ``NVRM: Xid`` line of a kernel log, in log order. A line that names an Xid but cannot be read
    whole comes back with ``xid=None`` (and the address if that much was readable), so that the judge warns
    about it instead of passing it by."""
    out = []
    for line in log_text.splitlines():
        at = line.find(XID_MARK)
        if at < 0:
            continue
        stamp, uptime = _stamp(line[:at])
        m = XID_RX.search(line, at)
        if m:
            out.append(XidEvent(normalise_pci(m.group(1)), int(m.group(2)), (m.group(3) or "").strip(),
                                stamp, uptime))
            continue
        pci = XID_PCI_RX.search(line, at)
        out.append(XidEvent(normalise_pci(pci.group(1)) if pci else None, None, line[at:].strip()[:200],
                            stamp, uptime))
    return out


def _xid_text(e: XidEvent) -> str:
    return e.text.replace("\n", " ")[:80]


def _judge_xid_group(events: list[XidEvent], where: str, source: str) -> tuple[Status, str, dict, str | None]:
    """One device's Xids: (status, message, measured, remediation). Each distinct Xid is reported once with
    its count, its first and last time stamps and what NVIDIA's catalog says to do."""
    by_xid: dict[int | None, list[XidEvent]] = {}
    for e in events:
        by_xid.setdefault(e.xid, []).append(e)
    items, fixes = [], {}
    worst = Status.PASS
    critical = 0
    for xid, seen in sorted(by_xid.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        first, last = seen[0], seen[-1]
        times = ""
        if first.when:
            times = f", first {first.when}" + (f", last {last.when}" if len(seen) > 1 and last.when else "")
        if xid is None:
            status = Status.WARN
            items.append((status, f"{len(seen)} Xid line(s) that could not be read{times}: {_xid_text(first)}"))
            fixes[status] = fixes.get(status, []) + ["Read the kernel log by hand (`journalctl -k -b | grep Xid`)."]
        else:
            statuses = [xid_catalog.status_for(xid, e.text) for e in seen]
            status = max(statuses)
            info = xid_catalog.lookup(xid)
            action = xid_catalog.action_for(xid, seen[statuses.index(status)].text)
            if info is None:
                what = "not in NVIDIA's Xid catalog"
            else:
                what = f"{info.name}; NVIDIA: {action.value}" + (
                    f", then {info.follow_up}" if status is Status.WARN and action is xid_catalog.Action.NONE else "")
            items.append((status, f"Xid {xid} x{len(seen)} ({what}){times}: {_xid_text(last)}"))
            fixes[status] = fixes.get(status, []) + [_xid_remedy(xid, action)]
            if status is Status.FAIL:
                critical += len(seen)
        worst = max(worst, status)
    items.sort(key=lambda item: -item[0])
    shown = [text for _, text in items[:5]] + ([f"+{len(items) - 5} more"] if len(items) > 5 else [])
    measured = {"xid_events": len(events), "critical": critical, "source": source,
                "xids": ", ".join(f"{x if x is not None else '?'} (x{len(v)})" for x, v in by_xid.items())}
    if events[0].when:
        measured["first_seen"] = events[0].when
        measured["last_seen"] = events[-1].when
    remedy = " ".join(dict.fromkeys(fixes.get(worst, []))) if worst is not Status.PASS else None
    verb = {Status.FAIL: "Xid errors that take the GPU out of service", Status.WARN: "Xid errors to look at",
            Status.PASS: "only informational Xids"}[worst]
    return worst, f"{where}: {verb} since boot: {'; '.join(shown)}", measured, remedy


def _xid_remedy(xid: int, action) -> str:
    A = xid_catalog.Action
    specific = {
        48: "Xid 48 (double-bit ECC): pending row remaps/page retirements take effect after a GPU reset; "
            "see gpu.memory_errors.",
        74: "Xid 74 (NVLink): check `nvidia-smi nvlink -e`, then reset the GPU; RMA if it repeats.",
        79: "Xid 79 (fallen off the bus): reboot; reseat the GPU, check its power and riser; RMA if it repeats.",
        94: "Xid 94 (contained memory error): the application was stopped; a row remap may be pending "
            "(gpu.memory_errors).",
        95: "Xid 95 (uncontained memory error): every application on the GPU was affected: reset the GPU.",
    }
    if xid in specific:
        return specific[xid]
    if action is None:
        return (f"Xid {xid} is not in the catalog this tool carries (a newer driver?): look it up in NVIDIA's Xid "
                "catalog (docs.nvidia.com/deploy/xid-errors).")
    return {A.RESET_GPU: "Drain the node; reset the GPU (`nvidia-smi -r -i <bus id>`) or reboot, then verify again; "
                         "contact support if it repeats.",
            A.REBOOT: "Drain the node and reboot it; contact support if it repeats.",
            A.CONTACT_SUPPORT: "Drain the node and contact NVIDIA support (or the vendor) with the board serial and "
                               "an nvidia-bug-report.sh log.",
            A.RESTART_APP: "Restart the application that hit it; if it repeats across jobs or on an idle node, run "
                           "`dcgmi diag -r 3`.",
            A.NONE: "Nothing to do now; if it repeats, collect nvidia-bug-report.sh and contact support."}[action]


def judge_xids(events: list[XidEvent], gpus: list[GpuSnapshot], source: str) -> list[Verdict]:
    """One verdict per GPU NVML sees (with its identity), one per other PCI address that logged an Xid, and
    one for Xid lines without a readable address; a single pass when there are neither GPUs nor Xids.
    Status per NVIDIA's Xid catalog (:mod:`checks.gpu.xid_catalog`): fail for reset/reboot/contact support,
    warn for application-level Xids, ones that need follow-up, unknown and unreadable ones."""
    groups: dict[str | None, list[XidEvent]] = {}
    for e in events:
        groups.setdefault(e.pci, []).append(e)
    expected = {"critical": 0, "policy": "NVIDIA Xid catalog"}
    out = []
    for g in sorted(gpus, key=lambda g: g.index):
        pci = normalise_pci(g.bus_id) if g.bus_id else None
        mine = groups.pop(pci, []) if pci else []
        if not mine:
            out.append(_v(Status.PASS, f"no Xid since boot (PCI {pci or '?'})", g,
                          {"xid_events": 0, "critical": 0, "source": source}, expected))
            continue
        status, message, measured, remedy = _judge_xid_group(mine, f"PCI {pci}", source)
        out.append(_v(status, message, g, measured, expected, remedy))
    for pci, mine in sorted(groups.items(), key=lambda kv: kv[0] or "~"):
        where = f"PCI {pci} (not a GPU NVML sees here)" if pci else "an unreadable PCI address"
        status, message, measured, remedy = _judge_xid_group(mine, where, source)
        out.append(Verdict(status, message, measured, expected, remedy, subject=f"pci:{pci or 'unknown'}"))
    if not out:
        out.append(Verdict(Status.PASS, "no Xid in the kernel log since boot", {"xid_events": 0, "critical": 0,
                                                                                "source": source}, expected))
    return out
