"""Results of checks: the one data shape every probe, judge, runner and renderer shares.

A judge returns a :class:`Verdict` (what it concluded); the runner turns it into a
:class:`Result` by adding the check's name, group and how long it took.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.IntEnum):
    """Outcome of a check, ordered by severity: the worst one wins.

    ``error`` means the check itself could not run (crash, bad probe); ``fail`` means it ran and
    the node is not what it should be. Both make the run unhealthy; a definite ``fail`` sorts first.
    """

    PASS = 0
    SKIP = 1
    WARN = 2
    ERROR = 3
    FAIL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Status:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown status {text!r}; expected one of {', '.join(s.label for s in cls)}") from None

    @property
    def healthy(self) -> bool:
        return self <= Status.WARN


def worst(statuses) -> Status:
    """The most severe status of an iterable; PASS for an empty one."""
    return max(statuses, default=Status.PASS)


@dataclass(frozen=True)
class Value:
    """A measured or expected value, with its unit where it has one."""

    value: Any
    unit: str | None = None

    def __str__(self) -> str:
        if isinstance(self.value, float):
            text = f"{self.value:.4g}"
        elif isinstance(self.value, (list, tuple)) and len(self.value) > 6:
            # a series (a loss per step): its length and ends, not hundreds of numbers on a console line
            ends = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (self.value[0], self.value[-1])]
            text = f"[{len(self.value)} values: {ends[0]} … {ends[1]}]"
        else:
            text = str(self.value)
        return f"{text} {self.unit}" if self.unit else text

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Value:
        return cls(data["value"], data.get("unit"))


@dataclass(frozen=True)
class GpuId:
    """Which physical GPU a result is about: what an RMA ticket needs (serial), what a fleet report and
    dcgm-exporter's series join on (UUID, PCI bus id). Any field the source could not read is None."""

    index: int
    uuid: str | None = None
    pci_bus_id: str | None = None  # NVML's form, e.g. "00000000:3B:00.0"
    serial: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "pci_bus_id": self.pci_bus_id, "serial": self.serial}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GpuId | None:
        if not data:
            return None
        return cls(int(data["index"]), data.get("uuid"), data.get("pci_bus_id"), data.get("serial"))


def _values(mapping: dict[str, Any] | None) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for key, val in (mapping or {}).items():
        out[key] = val if isinstance(val, Value) else Value(val)
    return out


@dataclass
class Verdict:
    """What a judge concluded. ``subject`` names the part judged (a GPU, a package) when a check
    returns one verdict per part."""

    status: Status
    message: str
    measured: dict[str, Value] = field(default_factory=dict)
    expected: dict[str, Value] = field(default_factory=dict)
    remediation: str | None = None
    subject: str | None = None
    gpu: GpuId | None = None  # the physical GPU this verdict is about, when it is about one

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        self.measured = _values(self.measured)
        self.expected = _values(self.expected)


@dataclass
class Result:
    """One reported line: a verdict plus the check it came from and its duration."""

    name: str
    group: str
    status: Status
    message: str
    measured: dict[str, Value] = field(default_factory=dict)
    expected: dict[str, Value] = field(default_factory=dict)
    remediation: str | None = None
    duration_s: float = 0.0
    gpu: GpuId | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        self.measured = _values(self.measured)
        self.expected = _values(self.expected)

    @classmethod
    def from_verdict(cls, name: str, group: str, verdict: Verdict, duration_s: float) -> Result:
        full = f"{name}[{verdict.subject}]" if verdict.subject else name
        return cls(
            name=full,
            group=group,
            status=verdict.status,
            message=verdict.message,
            measured=verdict.measured,
            expected=verdict.expected,
            remediation=verdict.remediation,
            duration_s=duration_s,
            gpu=verdict.gpu,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "status": self.status.label,
            "message": self.message,
            "measured": {k: v.to_dict() for k, v in self.measured.items()},
            "expected": {k: v.to_dict() for k, v in self.expected.items()},
            "remediation": self.remediation,
            "duration_s": round(self.duration_s, 6),
            "gpu": self.gpu.to_dict() if self.gpu else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(
            name=data["name"],
            group=data["group"],
            status=Status.parse(data["status"]),
            message=data["message"],
            measured={k: Value.from_dict(v) for k, v in data.get("measured", {}).items()},
            expected={k: Value.from_dict(v) for k, v in data.get("expected", {}).items()},
            remediation=data.get("remediation"),
            duration_s=float(data.get("duration_s", 0.0)),
            gpu=GpuId.from_dict(data.get("gpu")),
        )


def sort_worst_first(results: list[Result]) -> list[Result]:
    """Worst status first; within a status, by group then name (stable, readable)."""
    return sorted(results, key=lambda r: (-int(r.status), r.group, r.name))
