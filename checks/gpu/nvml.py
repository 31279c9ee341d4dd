"""The NVML probe: one snapshot of every GPU, taken through nvidia-ml-py (``pynvml``).

Thin on purpose: it reads values and records what the driver does not support as ``None``; every
rule about those values lives in :mod:`checks.gpu.judges`. The ``nvml`` argument is the module to
talk to, so tests can put a fake at exactly this boundary (a machine without a GPU has no NVML).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GpuSnapshot:
    index: int
    name: str
    uuid: str | None = None
    bus_id: str | None = None  # "00000000:3B:00.0"
    serial: str | None = None  # the board serial (an RMA ticket asks for it); None where NVML has none
    vbios: str | None = None
    ecc_enabled: bool | None = None  # None: no ECC on this board
    ecc_pending: bool | None = None
    ecc_volatile_uncorrected: int | None = None
    ecc_volatile_corrected: int | None = None
    # Aggregate (lifetime, kept in the InfoROM: survives GPU resets and reboots); None where not supported.
    ecc_aggregate_uncorrected: int | None = None
    ecc_aggregate_corrected: int | None = None
    ecc_aggregate_dram_uncorrected: int | None = None
    ecc_aggregate_dram_corrected: int | None = None
    ecc_aggregate_sram_uncorrected: int | None = None  # NVML_MEMORY_LOCATION_SRAM, else L1+L2+RF+texture (old boards)
    ecc_aggregate_sram_corrected: int | None = None
    retired_sbe: int | None = None  # pages retired for multiple single-bit errors (pre-Ampere)
    retired_dbe: int | None = None  # pages retired for double-bit errors (pre-Ampere)
    retired_pending: bool | None = None
    remap_corrected_rows: int | None = None  # Ampere and newer: row remapping instead of page retirement
    remap_uncorrected_rows: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    throttle_reasons: int | None = None  # bitmask, nvmlClocksThrottleReason*
    temperature_c: int | None = None
    slowdown_temp_c: int | None = None
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    persistence: bool | None = None
    mig_enabled: bool | None = None  # None: MIG not supported
    nvlink_active: list[bool] | None = None  # per existing link; None: no NVLink
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    processes: list[dict] = field(default_factory=list)  # [{"pid": int, "used_mib": float | None}]


@dataclass
class NodeSnapshot:
    driver: str | None
    cuda_driver: str | None  # highest CUDA version the driver supports, e.g. "11.7"
    gpus: list[GpuSnapshot]
    error: str | None = None  # why NVML could not be used at all

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_nvml():
    """The real binding; ImportError when nvidia-ml-py is not installed."""
    import pynvml

    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# SRAM locations boards before Turing report one by one (Turing and newer: NVML_MEMORY_LOCATION_SRAM).
_OLD_SRAM_LOCATIONS = ("NVML_MEMORY_LOCATION_L1_CACHE", "NVML_MEMORY_LOCATION_L2_CACHE",
                       "NVML_MEMORY_LOCATION_REGISTER_FILE", "NVML_MEMORY_LOCATION_TEXTURE_MEMORY",
                       "NVML_MEMORY_LOCATION_TEXTURE_SHM", "NVML_MEMORY_LOCATION_CBU")


def _read_aggregate_ecc(nvml, h, g: GpuSnapshot, opt) -> None:
    """The aggregate ECC counters: totals, and DRAM / SRAM apart (nvmlDeviceGetMemoryErrorCounter)."""
    agg = nvml.NVML_AGGREGATE_ECC
    unc, cor = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    g.ecc_aggregate_uncorrected = opt(nvml.nvmlDeviceGetTotalEccErrors, h, unc, agg)
    g.ecc_aggregate_corrected = opt(nvml.nvmlDeviceGetTotalEccErrors, h, cor, agg)
    dram = nvml.NVML_MEMORY_LOCATION_DRAM  # the same value as NVML_MEMORY_LOCATION_DEVICE_MEMORY
    g.ecc_aggregate_dram_uncorrected = opt(nvml.nvmlDeviceGetMemoryErrorCounter, h, unc, agg, dram)
    g.ecc_aggregate_dram_corrected = opt(nvml.nvmlDeviceGetMemoryErrorCounter, h, cor, agg, dram)

    def sram(kind) -> int | None:
        if hasattr(nvml, "NVML_MEMORY_LOCATION_SRAM"):
            value = opt(nvml.nvmlDeviceGetMemoryErrorCounter, h, kind, agg, nvml.NVML_MEMORY_LOCATION_SRAM)
            if value is not None:
                return int(value)
        parts = [opt(nvml.nvmlDeviceGetMemoryErrorCounter, h, kind, agg, getattr(nvml, name))
                 for name in _OLD_SRAM_LOCATIONS if hasattr(nvml, name)]
        parts = [int(p) for p in parts if p is not None]
        return sum(parts) if parts else None

    g.ecc_aggregate_sram_uncorrected = sram(unc)
    g.ecc_aggregate_sram_corrected = sram(cor)


def probe_nvml(nvml) -> NodeSnapshot:
    """Snapshot every GPU. An NVML that does not initialise gives a snapshot with ``error`` set."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return NodeSnapshot(None, None, [], f"NVML did not initialise: {exc}")
    try:
        def opt(fn, *args):
            """A value the driver may not support on this board: None instead of an error."""
            try:
                return fn(*args)
            except nvml.NVMLError:
                return None

        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = opt(nvml.nvmlSystemGetCudaDriverVersion)
        cuda_text = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(index)
            g = GpuSnapshot(index=index, name=_text(nvml.nvmlDeviceGetName(h)))
            g.uuid = _text(opt(nvml.nvmlDeviceGetUUID, h) or "") or None
            pci = opt(nvml.nvmlDeviceGetPciInfo, h)
            g.bus_id = _text(pci.busId) if pci is not None else None
            g.serial = _text(opt(nvml.nvmlDeviceGetSerial, h) or "") or None
            g.vbios = _text(opt(nvml.nvmlDeviceGetVbiosVersion, h) or "") or None
            ecc = opt(nvml.nvmlDeviceGetEccMode, h)
            if ecc is not None:
                g.ecc_enabled, g.ecc_pending = bool(ecc[0]), bool(ecc[1])
                g.ecc_volatile_uncorrected = opt(nvml.nvmlDeviceGetTotalEccErrors, h,
                                                 nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
                g.ecc_volatile_corrected = opt(nvml.nvmlDeviceGetTotalEccErrors, h,
                                               nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)
                _read_aggregate_ecc(nvml, h, g, opt)
            sbe = opt(nvml.nvmlDeviceGetRetiredPages, h, nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)
            dbe = opt(nvml.nvmlDeviceGetRetiredPages, h, nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
            g.retired_sbe = len(sbe) if sbe is not None else None
            g.retired_dbe = len(dbe) if dbe is not None else None
            pending = opt(nvml.nvmlDeviceGetRetiredPagesPendingStatus, h)
            g.retired_pending = bool(pending) if pending is not None else None
            remap = opt(nvml.nvmlDeviceGetRemappedRows, h)
            if remap is not None:
                corr, unc, is_pending, failed = remap
                g.remap_corrected_rows, g.remap_uncorrected_rows = int(corr), int(unc)
                g.remap_pending, g.remap_failure = bool(is_pending), bool(failed)
            g.throttle_reasons = opt(nvml.nvmlDeviceGetCurrentClocksThrottleReasons, h)
            g.temperature_c = opt(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
            g.slowdown_temp_c = opt(nvml.nvmlDeviceGetTemperatureThreshold, h,
                                    nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            g.pcie_gen = opt(nvml.nvmlDeviceGetCurrPcieLinkGeneration, h)
            g.pcie_gen_max = opt(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h)
            g.pcie_width = opt(nvml.nvmlDeviceGetCurrPcieLinkWidth, h)
            g.pcie_width_max = opt(nvml.nvmlDeviceGetMaxPcieLinkWidth, h)
            persistence = opt(nvml.nvmlDeviceGetPersistenceMode, h)
            g.persistence = bool(persistence) if persistence is not None else None
            mig = opt(nvml.nvmlDeviceGetMigMode, h)
            g.mig_enabled = bool(mig[0]) if mig is not None else None
            links = []
            for link in range(nvml.NVML_NVLINK_MAX_LINKS):
                state = opt(nvml.nvmlDeviceGetNvLinkState, h, link)
                if state is None:
                    break  # past the last link this GPU has (or no NVLink at all)
                links.append(bool(state))
            g.nvlink_active = links or None
            mem = opt(nvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                g.memory_used_mib, g.memory_total_mib = mem.used / 2**20, mem.total / 2**20
            for proc in opt(nvml.nvmlDeviceGetComputeRunningProcesses, h) or []:
                used = getattr(proc, "usedGpuMemory", None)
                g.processes.append({"pid": int(proc.pid), "used_mib": used / 2**20 if used else None})
            gpus.append(g)
        return NodeSnapshot(driver, cuda_text, gpus)
    except nvml.NVMLError as exc:
        return NodeSnapshot(None, None, [], f"NVML query failed: {exc}")
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
