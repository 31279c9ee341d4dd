"""What this node is expected to have: the stack's ``node:`` section, the manifest's overrides and
``--gpus``/``--expect``, merged once by the stack loader into one typed :class:`Node`.

Checks read ``ctx.node.gpus``, ``ctx.node.perf.floor_ratio``: no dict lookups with defaults spread
over the checks. The keys and their rules are the stack schema's ``node:`` section (checks/stack.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class PerfExpect:
    """Performance expectations overriding the GPU-model table (checks/figures.py); None = the table's."""

    gemm_tflops: float | None = None  # dense bf16 (fp16 where bf16 is absent) GEMM, per GPU
    copy_tbps: float | None = None  # device-to-device copy, bytes read + written, per GPU
    h2d_gbps: float | None = None  # pinned host -> device, per GPU
    d2h_gbps: float | None = None  # pinned device -> host, per GPU
    allreduce_busbw_gbps: float | None = None  # NCCL all-reduce bus bandwidth across the node's GPUs
    allreduce_bytes: int | None = None  # message size of the all-reduce measurement
    pair_busbw_gbps: float | None = None  # all-reduce bus bandwidth between two nodes (verify.yml's pairs)
    floor_ratio: float | None = None  # below expected x floor_ratio -> fail
    outlier_ratio: float | None = None  # below the node's median x outlier_ratio -> fail

    def given(self) -> dict[str, Any]:
        """Only the figures the stack or manifest set."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class MinFree:
    model: float = 5.0  # GiB free where the model goes
    data: float = 20.0  # GiB free under data_path


@dataclass(frozen=True)
class Node:
    gpus: int = 0  # GPUs this node must have; 0 = a node without GPUs (checks that need one skip)
    gpu_model: str | None = None  # substring of the NVML product name, e.g. "A800"
    data_path: str = "/data"
    min_free_gib: MinFree = field(default_factory=MinFree)
    jupyter_url: str | None = None  # default: from the stack's jupyterlab.bind/port
    mig: bool = False  # MIG mode every GPU must be in
    cuda_home: str | None = None
    nccl_home: str | None = None
    cudnn_home: str | None = None
    perf: PerfExpect = field(default_factory=PerfExpect)

    @classmethod
    def from_dict(cls, data: dict | None) -> Node:
        """From a validated ``node:`` mapping (unknown keys were refused by the schema)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown node key(s): {', '.join(unknown)}")
        if isinstance(data.get("min_free_gib"), dict):
            data["min_free_gib"] = MinFree(**{k: float(v) for k, v in data["min_free_gib"].items()})
        elif data.get("min_free_gib") is None:
            data.pop("min_free_gib", None)
        if isinstance(data.get("perf"), dict):
            data["perf"] = PerfExpect(**data["perf"])
        elif data.get("perf") is None:
            data.pop("perf", None)
        if data.get("gpus") is None:
            data.pop("gpus", None)
        else:
            data["gpus"] = int(data["gpus"])
        if "mig" in data:
            data["mig"] = bool(data["mig"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
