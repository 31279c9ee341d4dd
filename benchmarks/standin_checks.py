"""Stand-in checks for benchmarks/fake_gpus.py: what an 8-GPU node costs the runner, without GPUs.

Torch stand-ins (worker="torch"): the first one a process runs "initialises CUDA" (sleeps
CUDA_INIT_S, once per process, as creating a CUDA context on 8 GPUs does), then each does a few ms of
work per GPU. NVML stand-ins (worker="nvml"): the real gpu.* checks, run on tests/helpers/fake_nvml.py's
healthy 8-GPU node whose nvmlInit takes NVML_INIT_S the first time in a process (attaching to the
driver). Not a test and not production code: the benchmark's checks only.
"""

from __future__ import annotations

import os
import time

from checks.result import Status, Verdict

GPUS = 8
CUDA_INIT_S = 2.0  # a CUDA context on each of 8 GPUs; 1-3 s is what torch's first CUDA call takes there
PER_GPU_S = 0.005  # the measurement itself: a few ms per GPU
NVML_INIT_S = 0.5  # nvmlInit on 8 GPUs without persistence mode is slower still

_CUDA_INITS = 0  # per process: how often this process paid for CUDA
_NVML = None


def _cuda() -> int:
    global _CUDA_INITS
    if _CUDA_INITS == 0:
        time.sleep(CUDA_INIT_S)
        _CUDA_INITS = 1
    return _CUDA_INITS


def _torch_check(ctx) -> Verdict:
    _cuda()
    start = time.perf_counter()
    for _gpu in range(GPUS):
        time.sleep(PER_GPU_S)
    return Verdict(Status.PASS, f"{GPUS} GPUs measured",
                   {"pid": os.getpid(), "work_s": round(time.perf_counter() - start, 4)})


def gemm(ctx):
    return _torch_check(ctx)


def memory(ctx):
    return _torch_check(ctx)


def pcie(ctx):
    return _torch_check(ctx)


def torch_cuda(ctx):
    return _torch_check(ctx)


def allreduce(ctx):
    return _torch_check(ctx)


TORCH_CHECKS = ("gemm", "memory", "pcie", "torch_cuda", "allreduce")


def _fake_nvml():
    """One fake NVML per process, slow to initialise the first time, as a real one is."""
    global _NVML
    if _NVML is None:
        from tests.helpers.fake_nvml import FakeNVML, healthy_node

        class SlowInitNVML(FakeNVML):
            attached = False  # the first nvmlInit in a process loads the library and attaches to the driver

            def nvmlInit(self):
                if not self.attached:
                    time.sleep(NVML_INIT_S)
                    self.attached = True
                return super().nvmlInit()

        _NVML = SlowInitNVML(healthy_node(GPUS))
    return _NVML


def _real_nvml_check(name: str):
    def run(ctx):
        import checks.gpu.health as health

        health.load_nvml = _fake_nvml  # the real check, probe and judges; only the binding is fake
        return getattr(health, name)(ctx)

    run.__name__ = name
    return run


gpu_inventory = _real_nvml_check("gpu_inventory")
gpu_ecc = _real_nvml_check("gpu_ecc")
gpu_memory_errors = _real_nvml_check("gpu_memory_errors")
gpu_throttle = _real_nvml_check("gpu_throttle")
gpu_pcie = _real_nvml_check("gpu_pcie")

NVML_CHECKS = ("gpu_inventory", "gpu_ecc", "gpu_memory_errors", "gpu_throttle", "gpu_pcie")


# --- for benchmarks/verify_overhead.py: what the runner itself costs per check -------------------


def noop(ctx):
    return Verdict(Status.PASS, "nothing to do", {"pid": os.getpid()})


def hangs(ctx):
    time.sleep(3600)
