"""Test-only stand-in GPUs for whole ``peftnode-verify`` runs on a machine without one (tests/test_fleet.py).

A machine without a GPU has no libnvidia-ml and no CUDA torch, so a verify run there produces no GPU
results and no performance figures, and the fleet report would have nothing to compare. This module,
put on the run's ``PYTHONPATH`` with ``PEFTNODE_TEST_FAKE_GPU`` set, replaces exactly the probe
boundaries (nothing else) in the run and in every worker it starts (checks.proc.child_env hands the
path on):

- NVML: ``checks.gpu.nvml.load_nvml`` (and the copy ``checks.gpu.health`` imported) returns
  tests/helpers/fake_nvml.FakeNVML, and ``checks.gpu.driver.probe_driver`` asks it, so gpu.driver,
  gpu.inventory, gpu.ecc ... judge the fake's GPUs with the real judges;
- torch's view of CUDA for perf.* and nccl.allreduce: ``cuda_status`` says the GPUs are there, each
  stand-in device "measures" its model's figure from checks/figures.GPU_TABLE times its ``scale``, and the
  all-reduce probe returns the timing that gives the model's 8-GPU busbw times the node's ``scale``. The
  real judges (floor, node median) and the real report writers see those figures.

``PEFTNODE_TEST_FAKE_GPU`` is JSON: ``{"gpus": 2, "name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15",
"scale": 1.0, "gpu_scale": {"1": 0.5}, "nvml": {"1": {"ecc_uncorrected": 2}}}`` (every key optional):
``scale`` slows every figure of the node (a healthy node: 1.0), ``gpu_scale`` one GPU's, ``nvml`` overrides
fake NVML fields per GPU index (tests/helpers/fake_nvml.HEALTHY_H100 lists them). Without the variable
this module does nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ENV = "PEFTNODE_TEST_FAKE_GPU"
SPEC = json.loads(os.environ[ENV]) if os.environ.get(ENV) else None
ROOT = Path(__file__).resolve().parents[3]


def _count() -> int:
    return int(SPEC.get("gpus", 2))


def _name() -> str:
    return SPEC.get("name", "NVIDIA H100 80GB HBM3")


def _scale(index: int | None) -> float:
    node = float(SPEC.get("scale", 1.0))
    if index is None:
        return node
    return node * float((SPEC.get("gpu_scale") or {}).get(str(index), 1.0))


def fake_nvml():
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from tests.helpers.fake_nvml import FakeNVML, healthy_node

    gpus = healthy_node(_count(), name=_name())
    for index, fields in (SPEC.get("nvml") or {}).items():
        gpus[int(index)].update(fields)
    return FakeNVML(gpus, driver=SPEC.get("driver", "550.54.15"))


def _figure(metric: str) -> float:
    from checks.figures import expected_figure

    got = expected_figure(metric, _name(), None).value
    if got is None and metric == "d2h_gbps":  # the table has no D2H figure: as H2D
        got = expected_figure("h2d_gbps", _name(), None).value
    return float(got if got is not None else 100.0)


def patch_nvml(module) -> None:
    module.load_nvml = fake_nvml


def patch_health(module) -> None:
    module.load_nvml = fake_nvml


def patch_driver(module) -> None:
    real = module.probe_driver
    module.probe_driver = lambda nvml=None: real(nvml if nvml is not None else fake_nvml())


def _gpu_id(index: int):
    from checks.result import GpuId

    nvml = fake_nvml()
    gpu = nvml.gpus[index]
    return GpuId(index, gpu["uuid"], gpu["bus_id"], gpu["serial"])


def patch_perf(module) -> None:
    def cuda_status():
        return True, _count(), None

    def cuda_devices(count):
        return [module.Device(i, _name(), SimpleNamespace(type="cpu", index=i), _gpu_id(i)) for i in range(count)]

    def stand_in(metrics):
        def measure(handle, settings):
            return ({m: _figure(m) * _scale(handle.index) for m in metrics},
                    {"dtype": "stand-in", "stand_in": "tests/helpers/fakegpu"})
        return measure

    module.cuda_status, module.cuda_devices = cuda_status, cuda_devices
    module.BENCHES = {key: module.Bench(b.metrics, b.what, b.concurrent, stand_in(b.metrics))
                      for key, b in module.BENCHES.items()}


def patch_nccl(module) -> None:
    from checks.nccl.allreduce import AllreduceProbe

    def probe_allreduce(ranks, nbytes, **_):
        busbw = _figure("allreduce_busbw_gbps") * _scale(None)
        algbw = busbw * ranks / (2 * (ranks - 1))
        return AllreduceProbe(ranks, nbytes, "nccl", device=_name(), seconds=nbytes / 1e9 / algbw, wrong=0,
                              max_abs_error=0.0)

    module.cuda_status = lambda: (True, _count(), None)
    module.probe_allreduce = probe_allreduce
    module.find_all_reduce_perf = lambda dirs=None: None


PATCHES = {"checks.gpu.nvml": patch_nvml, "checks.gpu.health": patch_health, "checks.gpu.driver": patch_driver,
           "checks.perf": patch_perf, "checks.nccl": patch_nccl}


if SPEC is not None:
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from tests.helpers.patch_on_import import install

    install(PATCHES)
