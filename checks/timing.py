"""Timing GPU work from torch, and what to say when torch sees no CUDA device.

Used by every measurement that runs torch: perf.* (per-GPU benchmarks), nccl.allreduce's ranks and
the distributed fine-tune. Importing this module is cheap; torch is imported inside the functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from checks.figures import median
from checks.result import Status, Verdict


def cuda_status() -> tuple[bool, int, str | None]:
    """(usable, device count, why not): what torch sees, with the reason when it sees nothing."""
    try:
        import torch
    except ImportError as exc:
        return False, 0, f"torch is not importable here: {exc}"
    if torch.version.cuda is None:
        return False, 0, f"torch {torch.__version__} is a CPU-only build"
    import os

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}): torch.cuda.is_available() is False"
        try:
            torch.cuda.init()
        except Exception as exc:  # the driver's own reason, e.g. "Found no NVIDIA driver on your system"
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}): {str(exc).splitlines()[0]}"
        if hidden is not None:
            why += f"; CUDA_VISIBLE_DEVICES={hidden!r}"
        return False, 0, why
    count = torch.cuda.device_count()
    if count == 0:
        return False, 0, "torch sees 0 CUDA devices" + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden else "")
    return True, count, None


def time_per_op(op: Callable[[int], None], device, *, warmup_ops: int, warmup_s: float, repeats: int,
                iters: int) -> float:
    """Median seconds per op over ``repeats`` batches of ``iters`` ops, after a warm-up of at least
    ``warmup_ops`` ops and ``warmup_s`` seconds. ``op(i)`` runs op number i (it picks its buffers by i, so
    inputs rotate). Collectives must pass ``warmup_s=0``: every rank then runs the same number of ops."""
    import torch

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    i = 0
    started = time.perf_counter()
    while True:  # warm-up: at least warmup_ops ops and warmup_s seconds (clocks ramp up from idle)
        for _ in range(warmup_ops):
            op(i)
            i += 1
        sync()
        if time.perf_counter() - started >= warmup_s or i >= 1000 * max(warmup_ops, 1):
            break
    samples = []
    stream = torch.cuda.current_stream(device) if cuda else None  # explicit: callers time devices from threads
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(iters):
                op(i)
                i += 1
            end.record(stream)
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:  # the CPU path exists so the probe logic is tested on machines without a GPU
            t0 = time.perf_counter()
            for _ in range(iters):
                op(i)
                i += 1
            seconds = time.perf_counter() - t0
        samples.append(seconds / iters)
    return median(samples)


def judge_no_cuda(reason: str | None, expected_gpus: int, what: str, on_cpu: str | None = None) -> Verdict:
    """CUDA not usable from torch on a node expected to have GPUs: a failure. (A node expected to have
    none never gets here: the runner skips checks registered with ``needs_gpus=True`` there.) ``on_cpu``: how
    to run the same thing on the CPU instead, said in the message and the remediation."""
    expected = {"gpus": expected_gpus}
    cpu = f" To run it on this node's CPUs instead: {on_cpu}." if on_cpu else ""
    return Verdict(
        Status.FAIL,
        f"no CUDA device visible to torch ({reason or 'unknown reason'}); this node is expected to have "
        f"{expected_gpus} GPU(s), so {what} could not run" + (f" (on the CPU: {on_cpu})" if on_cpu else ""),
        {"cuda_devices": 0}, expected,
        "Check the driver first (gpu.driver); then that the venv's torch is a CUDA build for the stack's CUDA "
        "(`python -c 'import torch; print(torch.version.cuda, torch.cuda.is_available())'`), and that "
        "CUDA_VISIBLE_DEVICES does not hide the GPUs." + cpu)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (CUDA errors carry long multi-line hints)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
