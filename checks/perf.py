"""Per-GPU performance: bf16 GEMM, device memory copy, pinned host<->device transfers, on every GPU.

Each check runs a thin torch probe in a worker process (``isolate=True``) and hands what it measured
to pure judges. A GPU fails when it is below its model's expected figure x ``floor_ratio`` or below
the node's median (same model) x ``outlier_ratio``; the second rule catches the one slow GPU of a
node even for a model the table does not know.

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
  after a warm-up of at least ``warmup_ops`` ops and ``warmup_s`` seconds (clocks ramp from idle).

Time on an 8-GPU node (A100/H100 figures; GPUs are measured one after another). ``--quick``: per
GPU, GEMM >= 0.1 s warm-up + 3 x 5 ops of 1.4-4.3 ms ~ 0.2 s; copy 0.1 s + 15 x 0.3-1.3 ms ~ 0.12 s;
host transfers 2 x (0.1 s + 15 x 1.3-2.6 ms) ~ 0.3 s; plus ~0.3 s of CUDA context per GPU and
~3 s of torch import per worker: gemm ~7 s, memory ~6 s, pcie ~8 s, ~20 s for the group (most of
it process and context start-up, not measuring). Full (1 s warm-up, 5 x 20 ops, 1 GiB copies,
256 MiB transfers): gemm ~15 s, memory ~12 s, pcie ~35 s, ~1 min for the group.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from checks.registry import Context, check
from checks.result import Status, Value, Verdict

DEFAULT_FLOOR_RATIO = 0.8
DEFAULT_OUTLIER_RATIO = 0.9

# --- arithmetic (pure, unit-tested against hand-computed values) -----------------------------------


def tflops(m: int, n: int, k: int, seconds: float) -> float:
    """TFLOP/s of an (m x k) @ (k x n) matrix product that took ``seconds``: 2mnk / s / 1e12."""
    return 2.0 * m * n * k / seconds / 1e12


def copy_tbps(nbytes: int, seconds: float) -> float:
    """Device copy bandwidth in TB/s, counting the bytes read and the bytes written: 2 x bytes / s."""
    return 2.0 * nbytes / seconds / 1e12


def transfer_gbps(nbytes: int, seconds: float) -> float:
    """One-way transfer bandwidth (host<->device) in GB/s (1e9 bytes, as nvbandwidth and nccl-tests)."""
    return nbytes / seconds / 1e9


def ratio(measured: float, reference: float) -> float:
    return measured / reference


def median(values) -> float:
    return float(statistics.median(values))


# --- what each GPU model should measure -------------------------------------------------------------


@dataclass(frozen=True)
class ModelFigures:
    """What a healthy GPU of one model measures with these probes (None: no trustworthy figure)."""

    gemm_tflops: float | None
    copy_tbps: float | None
    h2d_gbps: float | None
    d2h_gbps: float | None
    allreduce_busbw_gbps: float | None  # 8 GPUs of this model in one node (HGX/DGX), NCCL all-reduce


# Keys match the CUDA/NVML device name as a whole word (case-insensitive); the longest matching key
# wins, so "A100 80GB PCIe" beats "A100". "derived" marks a figure computed, not measured: where the
# vendor gives only a memory peak, 0.78 x peak is used (the A100-80GB measured/peak ratio, 1.6/2.04).
GPU_TABLE: dict[str, ModelFigures] = {
    # A100 SXM4 80GB, FACTS.md (Azure AI-benchmarking-guide): fp16 GEMM ~255 TFLOP/s, HBM 1.6-1.75 TB/s
    # (low end), H2D ~26 GB/s. D2H: FACTS gives 6-26 GB/s, too wide to set a floor -> outlier-only.
    # 8x A100 SXM all-reduce busbw ~230 GB/s (FACTS; Azure threshold 228).
    "A100": ModelFigures(255, 1.6, 26, None, 230),
    # A100 40GB SXM4: GEMM as A100 (same compute); HBM derived: 1.555 TB/s x 0.78 ~ 1.2.
    "A100-SXM4-40GB": ModelFigures(255, 1.2, 26, None, 230),
    # A100 PCIe (300 W): no measured GEMM figure -> none; HBM derived (40GB 1.555, 80GB 1.935 TB/s x 0.78);
    # no NVSwitch -> no all-reduce figure.
    "A100-PCIE-40GB": ModelFigures(None, 1.2, 26, None, None),
    "A100 80GB PCIe": ModelFigures(None, 1.5, 26, None, None),
    # A800: an A100 with NVLink cut to 400 GB/s (FACTS); per-GPU figures as A100 80GB. All-reduce: no public
    # figure; FACTS: "expect ~2/3 of A100" -> 230 x 2/3 ~ 153 (derived; measure a known-good node and set
    # node.perf.allreduce_busbw_gbps).
    "A800": ModelFigures(255, 1.6, 26, None, 153),
    "A800 80GB PCIe": ModelFigures(None, 1.5, 26, None, None),
    # H100 SXM, FACTS.md (Azure): HBM 2.9-3.2 TB/s (low end), H2D ~51 GB/s. GEMM derived from the H200
    # measured here (770-800 TFLOP/s bf16 at 8192^3): same GH100 compute (132 SMs, clocks, 700 W).
    # 8x H100 all-reduce ~370 GB/s ring / ~480 NVLS (FACTS): ring, since NCCL < 2.17 (the seed's 2.14.3)
    # has no NVLS; a node on a newer NCCL can set node.perf.allreduce_busbw_gbps: 460 (Azure).
    "H100": ModelFigures(770, 2.9, 51, None, 370),
    # H100 PCIe / NVL: lower power and clocks, no measured GEMM figure -> none; HBM derived (2.0 / 3.9 TB/s).
    "H100 PCIe": ModelFigures(None, 1.5, 51, None, None),
    "H100 NVL": ModelFigures(None, 3.0, 51, None, None),
    # H800: an H100 SXM with NVLink cut to 400 GB/s: per-GPU figures as H100; all-reduce: no public figure.
    "H800": ModelFigures(770, 2.9, 51, None, None),
    # H200 SXM, FACTS.md (one H200 measured here): device copy ~4.3 TB/s, bf16 8192^3 770-800 TFLOP/s
    # (low end). H2D: PCIe Gen5 x16 as H100 -> 51 (derived). 8x H200 all-reduce ~475 GB/s (FACTS; Azure 431).
    "H200": ModelFigures(770, 4.3, 51, None, 475),
    # H200 NVL (600 W): GEMM not measured -> none; same HBM3e as H200 SXM.
    "H200 NVL": ModelFigures(None, 4.3, 51, None, None),
    # L40S (GDDR6 864 GB/s), A10 (GDDR6 600 GB/s), RTX 4090 (GDDR6X 1008 GB/s): copy derived from the vendor
    # peak; GEMM none (vendor peaks are boost-clock figures these power-limited cards do not sustain, and no
    # measured figure is at hand); L40S/A10 H2D: PCIe Gen4 x16 as A100 (26, derived); RTX 4090: none
    # (consumer boards often wire x8 or share lanes). No NVSwitch: no all-reduce figure.
    "L40S": ModelFigures(None, 0.67, 26, None, None),
    "A10": ModelFigures(None, 0.47, 26, None, None),
    "RTX 4090": ModelFigures(None, 0.79, None, None, None),
}


def match_model(device_name: str | None, table: dict[str, ModelFigures] = GPU_TABLE) -> str | None:
    """The table key naming this device: the longest key found in the name as a whole word."""
    if not device_name:
        return None
    found = [key for key in table
             if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)]
    return max(found, key=len) if found else None


@dataclass(frozen=True)
class Expectation:
    value: float | None
    source: str  # "node.perf.gemm_tflops", "table: H200", or why there is none


def expected_figure(metric: str, device_name: str | None, node_perf: dict | None,
                    table: dict[str, ModelFigures] = GPU_TABLE) -> Expectation:
    """node.perf overrides the table; an unknown model has no expectation (outlier judging only)."""
    node_perf = node_perf or {}
    if node_perf.get(metric) is not None:
        return Expectation(float(node_perf[metric]), f"node.perf.{metric}")
    key = match_model(device_name, table)
    if key is None:
        return Expectation(None, f"no table entry for {device_name or 'this GPU'!r}")
    value = getattr(table[key], metric)
    if value is None:
        return Expectation(None, f"the table has no {metric} figure for {key}")
    return Expectation(float(value), f"table: {key}")


def thresholds(node_perf: dict | None) -> tuple[float, float]:
    """(floor_ratio, outlier_ratio) from node.perf, else the defaults."""
    node_perf = node_perf or {}
    floor = node_perf.get("floor_ratio")
    outlier = node_perf.get("outlier_ratio")
    return (float(floor) if floor is not None else DEFAULT_FLOOR_RATIO,
            float(outlier) if outlier is not None else DEFAULT_OUTLIER_RATIO)


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


@dataclass
class PerfProbe:
    available: bool
    reason: str | None = None  # why CUDA is not usable, when not available
    samples: list[GpuSample] = field(default_factory=list)


def judge_no_cuda(reason: str | None, expected_gpus: int, what: str) -> Verdict:
    """CUDA not usable from torch: a failure on a GPU node, a skip on a node without GPUs."""
    expected = {"gpus": expected_gpus}
    if expected_gpus == 0:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have no GPUs "
                                    f"({reason or 'no CUDA device visible to torch'})", {}, expected)
    return Verdict(
        Status.FAIL,
        f"no CUDA device visible to torch ({reason or 'unknown reason'}); this node is expected to have "
        f"{expected_gpus} GPU(s), so {what} could not run",
        {"cuda_devices": 0}, expected,
        "Check the driver first (gpu.driver); then that the venv's torch is a CUDA build for the stack's CUDA "
        "(`python -c 'import torch; print(torch.version.cuda, torch.cuda.is_available())'`), and that "
        "CUDA_VISIBLE_DEVICES does not hide the GPUs.")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (CUDA errors carry long multi-line hints)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def judge_gpus(samples: list[GpuSample], metrics: list[str], node_perf: dict | None,
               expected_gpus: int | None = None, table: dict[str, ModelFigures] = GPU_TABLE) -> list[Verdict]:
    """One verdict per GPU (subject ``gpuN``), judging each metric against the floor and the node median.

    The median is taken over the GPUs of the same device name, so a mixed node compares like with like.
    """
    floor_ratio, outlier_ratio = thresholds(node_perf)
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
        measured: dict[str, object] = {"device": sample.name, **sample.detail}
        expected: dict[str, object] = {}
        if sample.error is not None:
            labels = ", ".join(METRICS[m].label for m in metrics)
            verdicts.append(Verdict(
                Status.FAIL, f"GPU {sample.index} ({sample.name}): the {labels} probe failed: {sample.error}",
                measured, expected,
                "Run the probe alone on this GPU; look for Xid errors in `dmesg`, memory held by other processes "
                "(`nvidia-smi`), and run `dcgmi diag -r 2`.", subject))
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
            exp = expected_figure(metric, sample.name, node_perf, table)
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
                                                  "figures", measured, expected, subject=subject))
            continue
        head = f"GPU {sample.index} ({sample.name}): "
        if status is Status.FAIL:
            verdicts.append(Verdict(status, head + "; ".join(problems), measured, expected,
                                    " ".join(dict.fromkeys(remedies)), subject))
        else:
            verdicts.append(Verdict(status, head + "; ".join(parts), measured, expected, subject=subject))
    if expected_gpus and 0 < len(samples) < expected_gpus:
        verdicts.append(Verdict(
            Status.WARN, f"torch sees {len(samples)} of the {expected_gpus} expected GPUs; only those were measured",
            {"cuda_devices": len(samples)}, {"gpus": expected_gpus},
            "See the GPU inventory checks; check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`.", "node"))
    return verdicts


def judge_perf(probe: PerfProbe, metrics: list[str], node_perf: dict | None, expected_gpus: int,
               what: str, table: dict[str, ModelFigures] = GPU_TABLE) -> list[Verdict]:
    if not probe.available or not probe.samples:
        return [judge_no_cuda(probe.reason, expected_gpus, what)]
    return judge_gpus(probe.samples, metrics, node_perf, expected_gpus, table)


# --- probing (torch; runs in a worker process) -------------------------------------------------------


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
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                op(i)
                i += 1
            end.record()
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


def _timed(op: Callable[[int], None], device, s: Settings) -> float:
    return time_per_op(op, device, warmup_ops=s.warmup_ops, warmup_s=s.warmup_s, repeats=s.repeats, iters=s.iters)


def gemm_dtype(device):
    """bf16 where the GPU has it (compute capability 8.0+), else fp16; bf16 on CPU."""
    import torch

    if device.type != "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def measure_gemm(device, s: Settings) -> tuple[float, dict]:
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
    return tflops(n, n, n, seconds), {"dtype": str(dtype).replace("torch.", ""), "gemm_size": n}


def measure_copy(device, s: Settings) -> tuple[float, dict]:
    import torch

    bufs = [torch.ones(s.copy_bytes, dtype=torch.uint8, device=device) for _ in range(s.copy_buffers)]

    def op(i):
        bufs[(i + 1) % len(bufs)].copy_(bufs[i % len(bufs)])

    seconds = _timed(op, device, s)
    return copy_tbps(s.copy_bytes, seconds), {"copy_bytes": s.copy_bytes}


def measure_host(device, s: Settings, pinned: bool = True) -> tuple[float, float, dict]:
    """(H2D GB/s, D2H GB/s) with pinned host buffers; ``pinned=False`` only for the CPU self-test."""
    import torch

    host = [torch.ones(s.host_bytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(s.host_buffers)]
    dev = [torch.ones(s.host_bytes, dtype=torch.uint8, device=device) for _ in range(s.host_buffers)]

    def h2d(i):
        dev[i % len(dev)].copy_(host[i % len(host)], non_blocking=True)

    def d2h(i):
        host[i % len(host)].copy_(dev[(i + 1) % len(dev)], non_blocking=True)

    up = transfer_gbps(s.host_bytes, _timed(h2d, device, s))
    down = transfer_gbps(s.host_bytes, _timed(d2h, device, s))
    return up, down, {"transfer_bytes": s.host_bytes}


def probe_gpus(bench: str, quick: bool) -> PerfProbe:
    """Run one benchmark ("gemm", "memory" or "pcie") on every GPU torch sees, one GPU at a time."""
    usable, count, reason = cuda_status()
    if not usable:
        return PerfProbe(False, reason)
    import torch

    s = settings_for(quick)
    samples = []
    for index in range(count):
        device = torch.device("cuda", index)
        try:
            name = torch.cuda.get_device_name(index)
        except Exception as exc:
            name = f"unknown ({exc})"
        sample = GpuSample(index, name)
        try:
            with torch.cuda.device(index):
                if bench == "gemm":
                    value, sample.detail = measure_gemm(device, s)
                    sample.values["gemm_tflops"] = value
                elif bench == "memory":
                    value, sample.detail = measure_copy(device, s)
                    sample.values["copy_tbps"] = value
                elif bench == "pcie":
                    up, down, sample.detail = measure_host(device, s)
                    sample.values.update(h2d_gbps=up, d2h_gbps=down)
                else:
                    raise ValueError(f"unknown benchmark {bench!r}")
        except Exception as exc:
            sample.error = first_line(exc)
        finally:
            torch.cuda.empty_cache()
        samples.append(sample)
    return PerfProbe(True, None, samples)


# --- checks ------------------------------------------------------------------------------------------

BENCHES = {
    "gemm": (["gemm_tflops"], "the GEMM benchmark"),
    "memory": (["copy_tbps"], "the device memory copy benchmark"),
    "pcie": (["h2d_gbps", "d2h_gbps"], "the host<->device transfer benchmark"),
}


def run_bench(ctx: Context, bench: str) -> list[Verdict]:
    metrics, what = BENCHES[bench]
    expected_gpus = int(ctx.node.get("gpus", 0))
    if expected_gpus == 0:
        return [Verdict(Status.SKIP, f"{what}: this node is expected to have no GPUs", {}, {"gpus": 0})]
    return judge_perf(probe_gpus(bench, ctx.quick), metrics, ctx.node.get("perf"), expected_gpus, what)


@check("perf.gemm", "Dense bf16 GEMM TFLOP/s on every GPU vs the model's figure and the node median",
       isolate=True, timeout_s=300)
def perf_gemm(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "gemm")


@check("perf.memory", "Device memory copy bandwidth on every GPU vs the model's figure and the node median",
       isolate=True, timeout_s=300)
def perf_memory(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "memory")


@check("perf.pcie", "Pinned host<->device bandwidth on every GPU vs the model's figure and the node median",
       isolate=True, timeout_s=300)
def perf_pcie(ctx: Context) -> list[Verdict]:
    return run_bench(ctx, "pcie")
