"""A fake NVML at exactly the boundary the probe talks to (``checks.gpu.nvml.probe_nvml(nvml)``).

A machine without a GPU has no libnvidia-ml, so the probe is driven through this stand-in. It uses the
real binding's constants and error classes, and each GPU is a dict of the values the driver would
report; a value of None makes the call raise NVML_ERROR_NOT_SUPPORTED, as old boards do.

ECC counters: ``ecc_uncorrected`` / ``ecc_corrected`` are the volatile totals; ``agg_locations`` maps an
NVML memory location's name (``DRAM``, ``SRAM``; older boards ``DEVICE_MEMORY``, ``L1_CACHE``,
``L2_CACHE``, ``REGISTER_FILE`` ...) to its aggregate ``(corrected, uncorrected)`` counts. A location
not in it is not supported there, and the aggregate totals are the sum over the locations it has, as
the driver's are.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pynvml

HEALTHY_H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-00000000-0000-0000-0000-000000000000",
    "bus_id": "00000000:18:00.0",
    "serial": "1650000000001",
    "vbios": "96.00.74.00.0C",
    "ecc": (1, 1),
    "ecc_uncorrected": 0,
    "ecc_corrected": 0,
    "agg_locations": {"DRAM": (0, 0), "SRAM": (0, 0)},  # (corrected, uncorrected) since manufacture
    "retired_sbe": [],
    "retired_dbe": [],
    "retired_pending": 0,
    "remap": (0, 0, 0, 0),
    "throttle": 0x1,  # idle
    "temperature": 31,
    "slowdown": 87,
    "pcie": (1, 5, 16, 16),  # idle: gen1 of gen5, x16 of x16
    "persistence": 1,
    "mig": (0, 0),
    "nvlinks": [1] * 18,
    "memory": (80 * 1024 * 2**20, 512 * 2**20),  # total, used (reserved memory counts as used)
    "processes": [],
}


def healthy_node(n: int = 8, **overrides) -> list[dict]:
    gpus = []
    for i in range(n):
        g = copy.deepcopy(HEALTHY_H100)
        g["uuid"] = f"GPU-{i:08d}-0000-0000-0000-000000000000"
        g["bus_id"] = f"00000000:{0x18 + 0x10 * i:02X}:00.0"
        g["serial"] = f"16500000{i:05d}"
        g.update(copy.deepcopy(overrides))
        gpus.append(g)
    return gpus


class FakeNVML:
    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[dict], driver: str = "515.65.01", cuda: int = 11070, init_error: int | None = None):
        self.gpus = gpus
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.initialised = 0
        for name in dir(pynvml):
            if name.startswith("NVML_"):
                setattr(self, name, getattr(pynvml, name))

    # -- helpers --
    def _g(self, handle) -> dict:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return self.gpus[handle]

    def _val(self, handle, key):
        value = self._g(handle).get(key)
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    # -- the calls the probe makes --
    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self):
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if i >= len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetName(self, h):
        return self._val(h, "name")

    def nvmlDeviceGetUUID(self, h):
        return self._val(h, "uuid")

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self._val(h, "bus_id"))

    def nvmlDeviceGetSerial(self, h):
        return self._val(h, "serial")

    def nvmlDeviceGetVbiosVersion(self, h):
        return self._val(h, "vbios")

    def nvmlDeviceGetEccMode(self, h):
        return list(self._val(h, "ecc"))

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        unc = kind == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        if counter == pynvml.NVML_AGGREGATE_ECC:
            locations = self._val(h, "agg_locations")
            if not locations:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return sum(pair[1 if unc else 0] for pair in locations.values())
        assert counter == pynvml.NVML_VOLATILE_ECC, counter
        return self._val(h, "ecc_uncorrected" if unc else "ecc_corrected")

    def nvmlDeviceGetMemoryErrorCounter(self, h, kind, counter, location):
        assert counter == pynvml.NVML_AGGREGATE_ECC, "the probe reads only the aggregate counters per location"
        locations = self._val(h, "agg_locations")
        for name, pair in locations.items():
            if getattr(pynvml, f"NVML_MEMORY_LOCATION_{name}") == location:
                return pair[1 if kind == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 0]
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetRetiredPages(self, h, cause):
        key = "retired_dbe" if cause == pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR else "retired_sbe"
        return list(self._val(h, key))

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._val(h, "retired_pending")

    def nvmlDeviceGetRemappedRows(self, h):
        return tuple(self._val(h, "remap"))

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._val(h, "throttle")

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._val(h, "temperature")

    def nvmlDeviceGetTemperatureThreshold(self, h, kind):
        assert kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return self._val(h, "slowdown")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._val(h, "pcie")[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._val(h, "pcie")[1]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._val(h, "pcie")[2]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._val(h, "pcie")[3]

    def nvmlDeviceGetPersistenceMode(self, h):
        return self._val(h, "persistence")

    def nvmlDeviceGetMigMode(self, h):
        return list(self._val(h, "mig"))

    def nvmlDeviceGetNvLinkState(self, h, link):
        links = self._val(h, "nvlinks")
        if link >= len(links):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    def nvmlDeviceGetMemoryInfo(self, h):
        total, used = self._val(h, "memory")
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p["used"]) for p in self._val(h, "processes")]
