"""What a healthy GPU of each model measures, and the arithmetic that turns timings into figures.

The GPU-model table (with the source of every figure), node.perf overrides (a typed
:class:`checks.node.PerfExpect`), the floor and outlier ratios, and the unit conversions are shared by
perf.*, nccl.* and the fleet report; the reasons for the default ratios are in checks/perf.py's docstring.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from checks.node import PerfExpect

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


def expected_figure(metric: str, device_name: str | None, perf: PerfExpect | None,
                    table: dict[str, ModelFigures] = GPU_TABLE) -> Expectation:
    """node.perf overrides the table; an unknown model has no expectation (outlier judging only)."""
    override = getattr(perf, metric) if perf is not None else None
    if override is not None:
        return Expectation(float(override), f"node.perf.{metric}")
    key = match_model(device_name, table)
    if key is None:
        return Expectation(None, f"no table entry for {device_name or 'this GPU'!r}")
    value = getattr(table[key], metric)
    if value is None:
        return Expectation(None, f"the table has no {metric} figure for {key}")
    return Expectation(float(value), f"table: {key}")


def thresholds(perf: PerfExpect | None) -> tuple[float, float]:
    """(floor_ratio, outlier_ratio) from node.perf, else the defaults."""
    perf = perf or PerfExpect()
    return (float(perf.floor_ratio) if perf.floor_ratio is not None else DEFAULT_FLOOR_RATIO,
            float(perf.outlier_ratio) if perf.outlier_ratio is not None else DEFAULT_OUTLIER_RATIO)
