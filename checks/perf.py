"""Per-GPU performance: bf16 GEMM, device memory copy, pinned host<->device transfers, on every GPU.

The checks run in the run's one torch worker (``worker="torch"``: torch imported and the CUDA contexts
created once per run, shared with cuda.torch and nccl.allreduce) and hand what they measured to pure
judges. A GPU fails when it is below its model's expected figure x ``floor_ratio`` or below the node's
median (same model) x ``outlier_ratio``; the second rule catches the one slow GPU of a node even for a
model the table does not know.

All GPUs at once, then a short serial phase:

- GEMM and device memory copy run on every GPU at the same time, one thread per device (CUDA work on
  different devices runs in parallel and waiting on it releases the GIL). Each GPU computes on its own
  SMs out of its own HBM, so a neighbour's load does not change its figure; measured side by side they
  are what a training job sees, power and cooling of a fully loaded node included.
- Pinned host<->device transfers (perf.pcie) run one GPU at a time: the GPUs share the host's memory
  bandwidth and, on HGX boards, a PCIe switch per pair and the CPU's root ports, so GPUs measured
  together would read the shared uplink, not their own link.
- The three checks are ``exclusive``: none runs beside another GPU benchmark.

Defaults and why:

- ``floor_ratio`` 0.8: the table holds figures *measured* on healthy GPUs with the same kind of
  probe (not vendor peaks), and the public ranges around them are narrow (A100 HBM 1.6-1.75 TB/s,
  H200 GEMM 770-800 TFLOP/s: +-5 %). 0.8 leaves room for clocks, power caps and older cuBLAS builds
  (the seed stack is CUDA 11.7), yet catches what matters: a PCIe link trained at Gen3 or x8 reads
  ~0.5, a GPU stuck in a thermal/power brake reads 0.3-0.7.
- ``outlier_ratio`` 0.9: GPUs of one model in one node measure within a few percent of each other;
  10 % under the node median marks a throttled or degraded part while riding out run-to-run noise.
- Sizes: GEMM 8192^3 in both modes (the size the table's figures were taken at; a smaller GEMM
  reads low and would need its own table), device copy 256 MiB quick / 1 GiB full (far beyond any
  L2: 40-60 MB), host transfers 64 MiB quick / 256 MiB full (PCIe saturates well below 64 MiB).
  Inputs rotate over several buffers so no repeat reuses what the last one left in cache.
- Timing: CUDA events around ``iters`` back-to-back ops, the median of ``repeats`` such batches,
  after a warm-up of at least ``warmup_ops`` ops and ``warmup_s`` seconds (clocks and PCIe link speed
  ramp up from idle).

Time on an 8-GPU node (A100/H100/H200 figures), on top of the run's one torch import (~3 s) and CUDA
contexts (~0.3 s per GPU, created side by side by the first benchmark). ``--quick``: GEMM on all GPUs
at once >= 0.1 s warm-up + 3 x 5 ops of 1.4-4.3 ms ~ 0.2 s; copy 0.1 s + 15 x 0.3-1.3 ms ~ 0.12 s;
host transfers per GPU 2 x (0.1 s + 15 x 1.3-2.6 ms) ~ 0.3 s, x 8 one after another ~ 2.5 s: ~3 s for
the group. Full (1 s warm-up, 5 x 20 ops, 1 GiB copies, 256 MiB transfers): GEMM ~1.5 s, copy ~1.1 s,
transfers 8 x 2 x (1 s + 100 x 5-10 ms) ~ 25-32 s: ~30-35 s, nearly all of it the serial phase.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from checks.figures import (
    GPU_TABLE,
    ModelFigures,
    copy_tbps,
    expected_figure,
    median,
    ratio,
    tflops,
    thresholds,
    transfer_gbps,
)
from checks.node import PerfExpect
from checks.registry import Context, check, current_progress
from checks.result import GpuId, Status, Value, Verdict
from checks.timing import cuda_status, first_line, judge_no_cuda, time_per_op

NEEDS = ("gpu.driver", "cuda.torch")  # no driver or no CUDA torch: nothing to measure

# --- judging -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str  # node.perf key and the measured key
    label: str
    unit: str
    remediation: str


METRICS: dict[str, Metric] = {
    "gemm_tflops": Metric(
        "gemm_tflops", "dense GEMM", "TFLOP/s",
        "Look for throttling: `nvidia-smi -q -d PERFORMANCE,CLOCK,POWER,TEMPERATURE` (HW slowdown, power brake, "
        "thermal); a lowered power limit (`nvidia-smi -q -d POWER`); other processes on the GPU (`nvidia-smi`). "
        "A GPU that stays slow when idle and cool needs a reset or replacement."),
    "copy_tbps": Metric(
        "copy_tbps", "device memory copy", "TB/s",
        "Check memory clocks and throttling (`nvidia-smi -q -d CLOCK,PERFORMANCE`), ECC/row-remap state "
        "(`nvidia-smi -q -d ECC,ROW_REMAPPER`) and other processes on the GPU; run `dcgmi diag -r 2`."),
    "h2d_gbps": Metric(
        "h2d_gbps", "host-to-device (pinned)", "GB/s",
        "Check the PCIe link: `nvidia-smi -q -d PCI` (current vs max link generation and width; a Gen3 or x8 "
        "link halves the figure), IOMMU/ACS settings, and NUMA placement (`nvidia-smi topo -m`)."),
    "d2h_gbps": Metric(
        "d2h_gbps", "device-to-host (pinned)", "GB/s",
        "Check the PCIe link: `nvidia-smi -q -d PCI` (current vs max link generation and width), IOMMU/ACS "
        "settings, and NUMA placement (`nvidia-smi topo -m`)."),
}


@dataclass
class GpuSample:
    """What the probe measured on one GPU: figures by metric key, or why it could not."""

    index: int
    name: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    detail: dict[str, object] = field(default_factory=dict)  # dtype, sizes: reported as measured
    gpu: GpuId | None = None  # UUID and PCI bus id as torch reads them, where this torch has them


@dataclass
class PerfProbe:
    available: bool
    reason: str | None = None  # why CUDA is not usable, when not available
    samples: list[GpuSample] = field(default_factory=list)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def judge_gpus(samples: list[GpuSample], metrics: list[str], perf: PerfExpect | None,
               expected_gpus: int | None = None, table: dict[str, ModelFigures] = GPU_TABLE) -> list[Verdict]:
    """One verdict per GPU (subject ``gpuN``), judging each metric against the floor and the node median.

    The median is taken over the GPUs of the same device name, so a mixed node compares like with like.
    """
    floor_ratio, outlier_ratio = thresholds(perf)
    medians: dict[tuple[str, str], float] = {}
    for metric in metrics:
        for name in {s.name for s in samples}:
            vals = [s.values[metric] for s in samples
                    if s.name == name and s.error is None and s.values.get(metric) is not None]
            if len(vals) >= 2:
                medians[(name, metric)] = median(vals)

    verdicts: list[Verdict] = []
    for sample in samples:
        subject = f"gpu{sample.index}"
        gid = sample.gpu or GpuId(sample.index)
        measured: dict[str, object] = {"device": sample.name, **sample.detail}
        expected: dict[str, object] = {}
        if sample.error is not None:
            labels = ", ".join(METRICS[m].label for m in metrics)
            verdicts.append(Verdict(
                Status.FAIL, f"GPU {sample.index} ({sample.name}): the {labels} probe failed: {sample.error}",
                measured, expected,
                "Run the probe alone on this GPU; look for Xid errors in `dmesg`, memory held by other processes "
                "(`nvidia-smi`), and run `dcgmi diag -r 2`.", subject, gid))
            continue
        status = Status.PASS
        parts: list[str] = []
        problems: list[str] = []
        remedies: list[str] = []
        for metric in metrics:
            info = METRICS[metric]
            value = sample.values.get(metric)
            if value is None:
                continue
            measured[metric] = Value(round(value, 3), info.unit)
            exp = expected_figure(metric, sample.name, perf, table)
            text = f"{info.label} {_fmt(value)} {info.unit}"
            bad: list[str] = []
            if exp.value is not None and exp.value > 0:
                r = ratio(value, exp.value)
                measured[f"{metric}_ratio"] = Value(round(r, 3))
                expected[metric] = Value(exp.value, info.unit)
                expected[f"{metric}_floor"] = Value(round(exp.value * floor_ratio, 3), info.unit)
                text += f" ({r:.2f}x the expected {_fmt(exp.value)}, {exp.source})"
                if r < floor_ratio:
                    bad.append(f"{info.label} {_fmt(value)} {info.unit} is {r:.2f}x the expected "
                               f"{_fmt(exp.value)} {info.unit} ({exp.source}; floor {floor_ratio:g}x)")
            else:
                text += f" ({exp.source}: judged against the node median only)"
            med = medians.get((sample.name, metric))
            if med is not None and med > 0:
                rm = ratio(value, med)
                measured[f"{metric}_vs_median"] = Value(round(rm, 3))
                expected[f"{metric}_min_vs_median"] = Value(outlier_ratio)
                if rm < outlier_ratio:
                    bad.append(f"{info.label} {_fmt(value)} {info.unit} is {rm:.2f}x the node median "
                               f"{_fmt(med)} {info.unit} (outlier below {outlier_ratio:g}x)")
            if bad:
                status = Status.FAIL
                problems.extend(bad)
                remedies.append(info.remediation)
            parts.append(text)
        if not parts:
            verdicts.append(Verdict(Status.ERROR, f"GPU {sample.index} ({sample.name}): the probe returned no "
                                                  "figures", measured, expected, subject=subject, gpu=gid))
            continue
        head = f"GPU {sample.index} ({sample.name}): "
        if status is Status.FAIL:
            verdicts.append(Verdict(status, head + "; ".join(problems), measured, expected,
                                    " ".join(dict.fromkeys(remedies)), subject, gid))
        else:
            verdicts.append(Verdict(status, head + "; ".join(parts), measured, expected, subject=subject, gpu=gid))
    if expected_gpus and 0 < len(samples) < expected_gpus:
        verdicts.append(Verdict(
            Status.WARN, f"torch sees {len(samples)} of the {expected_gpus} expected GPUs; only those were measured",
            {"cuda_devices": len(samples)}, {"gpus": expected_gpus},
            "See the GPU inventory checks; check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`.", "node"))
    return verdicts


def judge_perf(probe: PerfProbe, metrics: list[str], perf: PerfExpect | None, expected_gpus: int,
               what: str, table: dict[str, ModelFigures] = GPU_TABLE) -> list[Verdict]:
    if not probe.available or not probe.samples:
        return [judge_no_cuda(probe.reason, expected_gpus, what)]
    return judge_gpus(probe.samples, metrics, perf, expected_gpus, table)


# --- probing (torch; runs in the torch worker) ---------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    gemm_n: int  # square GEMM size
    gemm_buffers: int  # (A, B) pairs rotated
    copy_bytes: int
    copy_buffers: int  # ring of buffers: copy i -> i+1
    host_bytes: int
    host_buffers: int  # pinned host buffers and device buffers rotated
    warmup_ops: int
    warmup_s: float
    repeats: int
    iters: int  # ops per timed batch


MiB = 1 << 20
QUICK = Settings(gemm_n=8192, gemm_buffers=2, copy_bytes=256 * MiB, copy_buffers=3, host_bytes=64 * MiB,
                 host_buffers=2, warmup_ops=3, warmup_s=0.1, repeats=3, iters=5)
FULL = Settings(gemm_n=8192, gemm_buffers=4, copy_bytes=1024 * MiB, copy_buffers=3, host_bytes=256 * MiB,
                host_buffers=2, warmup_ops=5, warmup_s=1.0, repeats=5, iters=20)


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else FULL


def _timed(op: Callable[[int], None], device, s: Settings) -> float:
    return time_per_op(op, device, warmup_ops=s.warmup_ops, warmup_s=s.warmup_s, repeats=s.repeats, iters=s.iters)


def gemm_dtype(device):
    """bf16 where the GPU has it (compute capability 8.0+), else fp16; bf16 on CPU."""
    import torch

    if device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


Figures = tuple[dict[str, float], dict]  # (figures by metric key, detail reported beside them)


def measure_gemm(device, s: Settings) -> Figures:
    import torch

    n, dtype = s.gemm_n, gemm_dtype(device)
    gen = torch.Generator(device=device).manual_seed(0)
    # random inputs: all-zero operands draw less power and would flatter a power-limited GPU
    pairs = [(torch.randn(n, n, dtype=dtype, device=device, generator=gen),
              torch.randn(n, n, dtype=dtype, device=device, generator=gen)) for _ in range(s.gemm_buffers)]
    out = torch.empty(n, n, dtype=dtype, device=device)

    def op(i):
        a, b = pairs[i % len(pairs)]
        torch.matmul(a, b, out=out)

    seconds = _timed(op, device, s)
    return {"gemm_tflops": tflops(n, n, n, seconds)}, {"dtype": str(dtype).replace("torch.", ""), "gemm_size": n}


def measure_copy(device, s: Settings) -> Figures:
    import torch

    bufs = [torch.ones(s.copy_bytes, dtype=torch.uint8, device=device) for _ in range(s.copy_buffers)]

    def op(i):
        bufs[(i + 1) % len(bufs)].copy_(bufs[i % len(bufs)])

    seconds = _timed(op, device, s)
    return {"copy_tbps": copy_tbps(s.copy_bytes, seconds)}, {"copy_bytes": s.copy_bytes}


def measure_host(device, s: Settings, pinned: bool | None = None) -> Figures:
    """H2D and D2H GB/s with pinned host buffers (pageable on the CPU path: nothing to pin for)."""
    import torch

    pinned = device.type == "cuda" if pinned is None else pinned
    host = [torch.ones(s.host_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(s.host_buffers)]
    dev = [torch.ones(s.host_bytes, dtype=torch.uint8, device=device) for _ in range(s.host_buffers)]

    def h2d(i):
        dev[i % len(dev)].copy_(host[i % len(host)], non_blocking=True)

    def d2h(i):
        host[i % len(host)].copy_(dev[(i + 1) % len(dev)], non_blocking=True)

    up = transfer_gbps(s.host_bytes, _timed(h2d, device, s))
    down = transfer_gbps(s.host_bytes, _timed(d2h, device, s))
    return {"h2d_gbps": up, "d2h_gbps": down}, {"transfer_bytes": s.host_bytes}


@dataclass(frozen=True)
class Bench:
    metrics: tuple[str, ...]
    what: str
    concurrent: bool  # every GPU at once (own SMs and HBM), or one after another (shared host paths)
    measure: Callable[[Any, Settings], Figures]  # (device, settings) -> (figures, detail)


BENCHES: dict[str, Bench] = {
    "gemm": Bench(("gemm_tflops",), "the GEMM benchmark", True, measure_gemm),
    "memory": Bench(("copy_tbps",), "the device memory copy benchmark", True, measure_copy),
    "pcie": Bench(("h2d_gbps", "d2h_gbps"), "the host<->device transfer benchmark", False, measure_host),
}


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    handle: Any  # a torch.device: cuda:N, or cpu for the self-test
    gpu: GpuId | None = None


def torch_gpu_id(index: int) -> GpuId:
    """UUID and PCI bus id of CUDA device ``index`` in NVML's spelling (``GPU-…``, ``00000000:3B:00.0``), so a
    perf figure joins with the NVML checks and dcgm-exporter; None for what this torch does not expose."""
    import torch

    try:
        props = torch.cuda.get_device_properties(index)
    except Exception:
        return GpuId(index)
    uuid = getattr(props, "uuid", None)
    uuid_text = None if uuid is None else (str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}")
    bus = getattr(props, "pci_bus_id", None)
    pci = None
    if isinstance(bus, int):
        pci = f"{getattr(props, 'pci_domain_id', 0) or 0:08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0) or 0:02X}.0"
    return GpuId(index, uuid_text, pci)


def cuda_devices(count: int) -> list[Device]:
    import torch

    devices = []
    for index in range(count):
        try:
            name = torch.cuda.get_device_name(index)
        except Exception as exc:
            name = f"unknown ({first_line(exc)})"
        devices.append(Device(index, name, torch.device("cuda", index), torch_gpu_id(index)))
    return devices


def on_devices(devices: list[Device], work: Callable[[Device], GpuSample], concurrent: bool) -> list[GpuSample]:
    """``work`` on every device: all at once (one thread each) or one after another; results in device order."""
    if not concurrent or len(devices) < 2:
        return [work(d) for d in devices]
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="perf-gpu") as pool:
        return list(pool.map(work, devices))


def measure_one(bench: Bench, device: Device, s: Settings) -> GpuSample:
    """One device's figures, or the first line of what went wrong (the other devices carry on)."""
    sample = GpuSample(device.index, device.name, gpu=device.gpu)
    try:
        if device.handle.type == "cuda":
            import torch

            current = torch.cuda.device(device.index)  # events and the current stream are this thread's, on it
        else:
            current = nullcontext()
        with current:
            values, sample.detail = bench.measure(device.handle, s)
        sample.values.update(values)
    except Exception as exc:
        sample.error = first_line(exc)
    return sample


def probe_gpus(bench: str | Bench, quick: bool, *, devices: list[Device] | None = None,
               settings: Settings | None = None) -> PerfProbe:
    """Run one benchmark ("gemm", "memory" or "pcie") on every GPU torch sees: at once or one after another,
    as the benchmark says. ``devices`` (CPU stand-ins) and ``settings`` replace the GPUs and sizes in tests."""
    b = BENCHES[bench] if isinstance(bench, str) else bench
    s = settings or settings_for(quick)
    emit = current_progress()  # the check's, taken in its thread and handed to the per-GPU threads
    if devices is None:
        usable, count, reason = cuda_status()
        if not usable:
            return PerfProbe(False, reason)
        devices = cuda_devices(count)

    def measured(d: Device) -> GpuSample:
        if not b.concurrent:
            emit(f"gpu{d.index}: measuring", key=f"gpu{d.index}")
        sample = measure_one(b, d, s)
        figures = ", ".join(f"{METRICS[k].label} {v:.1f} {METRICS[k].unit}" for k, v in sample.values.items()
                            if k in METRICS and isinstance(v, (int, float)))
        emit(f"gpu{d.index}: {figures or 'done'}" + (f"; failed: {sample.error}" if sample.error else ""),
             key=f"gpu{d.index}", final=True)
        return sample

    if b.concurrent and len(devices) > 1:
        emit(f"{b.what} on {len(devices)} GPUs at once")
    try:
        samples = on_devices(devices, measured, b.concurrent)
    finally:
        if any(d.handle.type == "cuda" for d in devices):  # once, after every thread is done: frees synchronise
            import torch

            torch.cuda.empty_cache()
    return PerfProbe(True, None, samples)


# --- checks ------------------------------------------------------------------------------------------


def run_bench(ctx: Context, bench: str) -> list[Verdict]:
    b = BENCHES[bench]
    return judge_perf(probe_gpus(bench, ctx.quick), list(b.metrics), ctx.node.perf, ctx.node.gpus, b.what)


@check("perf.gemm", "Dense bf16 GEMM TFLOP/s on every GPU vs the model's figure and the node median",
       worker="torch", exclusive=True, needs=NEEDS, needs_gpus=True, timeout_s=300)
def perf_gemm(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "gemm")


@check("perf.memory", "Device memory copy bandwidth on every GPU vs the model's figure and the node median",
       worker="torch", exclusive=True, needs=NEEDS, needs_gpus=True, timeout_s=300)
def perf_memory(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "memory")


@check("perf.pcie", "Pinned host<->device bandwidth on every GPU vs the model's figure and the node median",
       worker="torch", exclusive=True, needs=NEEDS, needs_gpus=True, timeout_s=300)
def perf_pcie(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "pcie")
