"""Prometheus textfile-collector output (for node_exporter's ``--collector.textfile.directory``).

Written with ``prometheus_client`` the way exporters are: one gauge family per measured quantity, its
unit in the name in base units (``peftnode_gpu_gemm_flops``, ``..._bytes_per_second``, ``..._seconds``),
the check and the GPU as labels, and the status as a StateSet-style family (one 0/1 series per state).

Families (``P`` is ``peftnode_`` for ``peftnode verify``, ``peftnode_finetune_`` for ``peftnode finetune``):

- ``P<quantity>_<unit>{check,gpu,UUID,pci_bus_id}``: a measured number, converted to the base unit
  (:data:`UNITS`); the quantity's name comes from :data:`QUANTITIES` or, for anything not listed there,
  from the check's group and the measured key (:func:`fallback_name`).
- ``Pcheck_status{check,gpu,UUID,pci_bus_id,state}``: 1 for the check's state, 0 for the four others.
- ``Pcheck_duration_seconds{check,gpu,UUID,pci_bus_id}``.
- ``Pnode_healthy``: 1 healthy (no fail, no error), else 0 (also 0 for a run Ctrl-C interrupted).
- ``peftnode_verify_last_run_timestamp_seconds`` / ``peftnode_finetune_last_run_timestamp_seconds``.
- ``peftnode_verify_info{stack,version}`` / ``peftnode_finetune_info{stack,version}``: always 1.

``gpu``, ``UUID`` and ``pci_bus_id`` are dcgm-exporter's label names, with the same values (the NVML
index, ``GPU-...`` UUID and ``00000000:3B:00.0`` bus id), so a PromQL ``on(UUID)`` joins a peftnode
series with the GPU's DCGM series; every per-check family carries them, empty for a result that is not
about one GPU (Prometheus drops an empty label, so those series simply have none).

The two commands never share a family name: verify's names never start with ``peftnode_finetune_``
(its ``finetune`` group's quantities are ``peftnode_train_*``) and finetune's always do, so both files
can sit in one textfile directory (node_exporter drops every series it collects twice from two files,
and the duplicate it keeps is not necessarily the newer one). :func:`check_prom_target` refuses to let
one command overwrite the other's file.

The metrics are a snapshot of one run, so they are handed to ``prometheus_client`` as a collector that
yields families from the report (not as live ``Gauge`` objects, which would turn into per-process files
if ``PROMETHEUS_MULTIPROC_DIR`` happened to be set), in a registry of their own. ``prometheus_client``
does the exposition format (escaping, NaN, HELP/TYPE) and the atomic write: ``write_to_textfile`` writes
``<path>.<pid>.<thread>`` beside the target and renames it over the target, so node_exporter (which reads
only ``*.prom``) never sees half a file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import GaugeMetricFamily

import checks
from checks.report import Report
from checks.result import Result, Status, Value

FILE_MODE = 0o644  # node_exporter usually runs as another user and must be able to read the file
FINETUNE_TITLE = "peftnode finetune"  # Report.title of `invoke finetune` (checks.cli.FINETUNE_PROG)

# dcgm-exporter's label names for the GPU, so that `on(UUID)` / `on(pci_bus_id)` join without relabelling.
GPU_LABELS = ["gpu", "UUID", "pci_bus_id"]
CHECK_LABELS = ["check", *GPU_LABELS]
STATES = [s.label for s in Status]  # pass, skip, warn, error, fail


# --- units -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    suffix: str  # the family name's unit suffix ("" for a plain number)
    factor: float  # multiply the measured value by this to get the base unit
    text: str  # how the HELP text names the base unit


_RATE = "bytes_per_second"
# Every unit a check reports (``grep -rn 'Value(' checks``), to the base unit Prometheus names use.
UNITS: dict[str | None, Unit] = {
    None: Unit("", 1, ""),
    "": Unit("", 1, ""),
    "TFLOP/s": Unit("flops", 1e12, "FLOP/s"),
    "GFLOP/s": Unit("flops", 1e9, "FLOP/s"),
    "TB/s": Unit(_RATE, 1e12, "bytes/s"),
    "GB/s": Unit(_RATE, 1e9, "bytes/s"),
    "MB/s": Unit(_RATE, 1e6, "bytes/s"),
    "GiB": Unit("bytes", 2**30, "bytes"),
    "MiB": Unit("bytes", 2**20, "bytes"),
    "KiB": Unit("bytes", 2**10, "bytes"),
    "GB": Unit("bytes", 1e9, "bytes"),
    "MB": Unit("bytes", 1e6, "bytes"),
    "B": Unit("bytes", 1, "bytes"),
    "s": Unit("seconds", 1, "seconds"),
    "ms": Unit("seconds", 1e-3, "seconds"),
    "us": Unit("seconds", 1e-6, "seconds"),
    "ns": Unit("seconds", 1e-9, "seconds"),
    "C": Unit("celsius", 1, "degrees Celsius"),
    "W": Unit("watts", 1, "watts"),
    "lanes": Unit("lanes", 1, "PCIe lanes"),
    "steps/s": Unit("steps_per_second", 1, "optimizer steps/s"),
    "tokens/s": Unit("tokens_per_second", 1, "tokens/s"),
}

# Name parts promtool's linter rejects or that would misname the unit once the value is converted.
_ABBREVIATIONS = {"s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d",
                  "kib", "mib", "gib", "tflops", "gflops", "gbps", "tbps", "mbps"}
_TYPE_WORDS = {"gauge", "counter", "histogram", "summary", "untyped"}
_RESERVED_ENDINGS = ("_total", "_count", "_sum", "_bucket", "_created")
_PREFIXED_UNIT = re.compile(r"^(pico|nano|micro|milli|centi|deci|deca|hecto|kilo|kibi|mega|mebi|giga|gibi|tera|tebi"
                            r"|peta|pebi)(seconds|bytes|meters|metres|grams|joules|volts|amperes)$")


def _words(text: str) -> list[str]:
    return [w for w in re.sub(r"[^a-z0-9]+", "_", text.lower()).split("_") if w]


def unit_of(unit: str | None) -> Unit:
    """The base unit a check's unit converts to; an unknown unit stays as it is, spelled as a name part
    (``errors`` -> ``errors``, ``req/s`` -> ``req_per_second``)."""
    if unit in UNITS:
        return UNITS[unit]
    per = str(unit).rsplit("/", 1)
    words = _words(per[0]) + (["per", "second"] if len(per) == 2 and per[1].strip() == "s" else
                              (["per", *_words(per[1])] if len(per) == 2 else []))
    words = [w for w in words if w not in _ABBREVIATIONS or w == "per"] or ["units"]
    return Unit("_".join(words), 1, str(unit))


# --- quantities --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    stem: str  # the family name without the prefix and without the unit suffix
    help: str


def _perf(stem: str, what: str) -> dict[str, Quantity]:
    return {
        "": Quantity(f"gpu_{stem}", f"{what} measured on the GPU"),
        "_ratio": Quantity(f"gpu_{stem}_expected_ratio", f"{what}: measured / the model's expected figure "
                                                         "(the check fails below floor_ratio, 0.8 by default)"),
        "_vs_median": Quantity(f"gpu_{stem}_node_median_ratio", f"{what}: measured / the median of the node's GPUs "
                                                                "of the same model (fails below 0.9 by default)"),
    }


_PERF = {"gemm_tflops": _perf("gemm", "perf.gemm: dense bf16 GEMM throughput"),
         "copy_tbps": _perf("memory_copy", "perf.memory: device memory copy bandwidth"),
         "h2d_gbps": _perf("host_to_device", "perf.pcie: pinned host-to-device copy bandwidth"),
         "d2h_gbps": _perf("device_to_host", "perf.pcie: pinned device-to-host copy bandwidth")}

_ALLREDUCE = "nccl.allreduce (torch) and nccl.allreduce[nccl-tests] (all_reduce_perf):"

# (check group, measured key) -> the quantity. Keys a check reports that are not here still export,
# named by fallback_name; strings and booleans never do (they are not quantities).
QUANTITIES: dict[tuple[str, str], Quantity] = {
    **{("perf", metric + tail): q for metric, by_tail in _PERF.items() for tail, q in by_tail.items()},
    ("nccl", "busbw"): Quantity("nccl_allreduce_busbw", f"{_ALLREDUCE} bus bandwidth (what NVLink/IB carries)"),
    ("nccl", "algbw"): Quantity("nccl_allreduce_algbw", f"{_ALLREDUCE} algorithm bandwidth (size / time)"),
    ("nccl", "busbw_in_place"): Quantity("nccl_allreduce_busbw_in_place", f"{_ALLREDUCE} in-place bus bandwidth"),
    ("nccl", "torch_busbw"): Quantity("nccl_allreduce_torch_busbw",
                                      f"{_ALLREDUCE} the torch probe's bus bandwidth, beside nccl-tests' own"),
    ("nccl", "busbw_ratio"): Quantity("nccl_allreduce_busbw_expected_ratio",
                                      f"{_ALLREDUCE} busbw / the expected figure (fails below floor_ratio)"),
    ("nccl", "time"): Quantity("nccl_allreduce_duration", f"{_ALLREDUCE} time of one all-reduce"),
    ("nccl", "bytes"): Quantity("nccl_allreduce_message_size", f"{_ALLREDUCE} size of the reduced buffer"),
    ("nccl", "ranks"): Quantity("nccl_allreduce_ranks", f"{_ALLREDUCE} ranks (GPUs) taking part"),
    ("nccl", "wrong_elements"): Quantity("nccl_allreduce_wrong_elements",
                                         f"{_ALLREDUCE} elements that came back with a wrong sum"),
    ("gpu", "temperature"): Quantity("gpu_temperature", "gpu.throttle: GPU temperature"),
    ("gpu", "gen"): Quantity("gpu_pcie_link_generation", "gpu.pcie: current PCIe link generation"),
    ("gpu", "width"): Quantity("gpu_pcie_link_width", "gpu.pcie: current PCIe link width"),
    ("gpu", "memory_used"): Quantity("gpu_memory_used", "gpu.processes: GPU memory in use"),
    ("gpu", "processes"): Quantity("gpu_processes", "gpu.processes: compute processes on the GPU"),
    ("gpu", "uncorrected_volatile"): Quantity("gpu_ecc_volatile_uncorrected_errors",
                                              "gpu.ecc: uncorrectable ECC errors since the last driver load"),
    ("gpu", "corrected_volatile"): Quantity("gpu_ecc_volatile_corrected_errors",
                                            "gpu.ecc: corrected ECC errors since the last driver load"),
    **{("gpu", f"{where}{kind}_aggregate"): Quantity(
        f"gpu_ecc_aggregate_{where}{kind}_errors",
        f"gpu.ecc: {kind} ECC errors{' in ' + where.rstrip('_').upper() if where else ''} over the board's "
        f"lifetime (they survive a reset)")
       for where in ("", "sram_", "dram_") for kind in ("uncorrected", "corrected")},
    ("nccl", "out_of_bounds_values"): Quantity("nccl_allreduce_out_of_bounds_values",
                                               f"{_ALLREDUCE} values nccl-tests found out of bounds (data "
                                               f"corruption)"),
    ("gpu", "retired_pages"): Quantity("gpu_retired_pages", "gpu.memory_errors: retired memory pages"),
    ("gpu", "remapped_rows_uncorrectable"): Quantity("gpu_remapped_rows_uncorrectable",
                                                     "gpu.memory_errors: rows remapped after uncorrectable errors"),
    ("gpu", "links_active"): Quantity("gpu_nvlink_links_active", "gpu.nvlink: NVLink links up"),
    ("gpu", "links"): Quantity("gpu_nvlink_links", "gpu.nvlink: NVLink links the GPU has"),
    ("gpu", "gpus"): Quantity("gpu_devices", "gpu.inventory: GPUs NVML sees"),
    ("gpu", "xid_events"): Quantity("gpu_xid_events", "gpu.xid: Xid events in the kernel log since boot"),
    ("gpu", "critical"): Quantity("gpu_xid_critical_events", "gpu.xid: Xid events that take a node out of service"),
    ("gpu", "nvswitches"): Quantity("gpu_nvswitches", "gpu.fabricmanager: NVSwitches on the PCI bus"),
    ("cuda", "device_count"): Quantity("cuda_torch_devices", "cuda.torch: CUDA devices torch sees"),
    ("cuda", "nvml_count"): Quantity("cuda_nvml_devices", "cuda.torch: GPUs NVML sees, beside torch's count"),
    ("cuda", "max_abs_err"): Quantity("cuda_matmul_max_abs_error", "cuda.torch: largest error of the test matmul"),
    ("system", "free"): Quantity("disk_free", "system.disk: free space where the models/data live"),
    ("system", "total"): Quantity("disk_size", "system.disk: size of that file system"),
    ("finetune", "steps_per_s"): Quantity("train", "fine-tune throughput (per method, or per rank)"),
    ("finetune", "tokens_per_s"): Quantity("train", "fine-tune throughput (per method, or per rank)"),
    ("finetune", "steps_per_s_slowest_rank"): Quantity("train_slowest_rank", "distributed fine-tune: slowest rank"),
    ("finetune", "tokens_per_s_all_ranks"): Quantity("train_all_ranks", "distributed fine-tune: all ranks together"),
    ("finetune", "wall_s"): Quantity("train_wall_time", "fine-tune: wall time of the method (or worker pool, launch)"),
    ("finetune", "train_s"): Quantity("train_loop", "fine-tune: time in the training loop"),
    ("finetune", "load_s"): Quantity("train_model_load", "fine-tune: time to load the model"),
    ("finetune", "import_s"): Quantity("train_import", "fine-tune: time the worker took to import torch/peft"),
    ("finetune", "peak_memory"): Quantity("train_peak_memory", "fine-tune: peak memory of the method"),
    ("finetune", "trainable_params"): Quantity("train_trainable_parameters", "fine-tune: the adapter's trainable "
                                                                             "parameters"),
    ("finetune", "model_params"): Quantity("train_model_parameters", "fine-tune: parameters of the base model"),
    ("finetune", "world_size"): Quantity("train_world_size", "distributed fine-tune: ranks"),
    ("finetune", "killed_processes"): Quantity("train_killed_processes",
                                               "distributed fine-tune: processes left behind and killed"),
    ("*", "elapsed"): Quantity("check_elapsed", "how long a check ran before it timed out"),
}


def _group_word(group: str) -> str:
    """The group as the name's first word; ``finetune`` reads ``train`` so that no verify family can ever
    start with ``peftnode_finetune_`` (the prefix of `invoke finetune`'s own families)."""
    words = _words(group) or ["check"]
    if words[0] == "finetune":
        words[0] = "train"
    return "_".join(words)


def fallback_name(group: str, key: str) -> str:
    """A promtool-clean stem for a measured key no :data:`QUANTITIES` entry names: the group, then the
    key's words without unit abbreviations (the converted unit is appended after it)."""
    key = re.sub(r"(_per)?_(s|sec|ms|us|ns)$", "", key.lower())
    words = [w for w in _words(key) if w not in _ABBREVIATIONS and w not in _TYPE_WORDS
             and not _PREFIXED_UNIT.match(w)]
    return "_".join([_group_word(group), *(words or ["value"])])


def _base_check(name: str) -> str:
    return name.split("[", 1)[0]


def quantity_of(result: Result, key: str, value: Value) -> tuple[str, str]:
    """(family name without the prefix, HELP) of one measured value."""
    unit = unit_of(value.unit)
    q = QUANTITIES.get((result.group, key)) or QUANTITIES.get(("*", key))
    if q is None:
        stem = fallback_name(result.group, key)
        help_text = f"{_base_check(result.name)}: measured '{key}'"
    else:
        stem, help_text = q.stem, q.help
    if unit.suffix and not (stem == unit.suffix or stem.endswith("_" + unit.suffix)):
        stem = f"{stem}_{unit.suffix}"
    if stem.endswith(_RESERVED_ENDINGS):  # promtool: those endings belong to counters and histograms
        stem += "_value"
    where = f" ({value.unit} converted)" if unit.factor != 1 else ""
    in_unit = f", in {unit.text}{where}" if unit.text else ""
    return stem, help_text + in_unit + "."


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- the two commands' names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    command: str
    prefix: str  # every per-check and measured family: prefix + stem
    timestamp: str
    info: str

    @property
    def status(self) -> str:
        return self.prefix + "check_status"

    @property
    def duration(self) -> str:
        return self.prefix + "check_duration_seconds"

    @property
    def healthy(self) -> str:
        return self.prefix + "node_healthy"

    def owns(self, family: str) -> bool:
        """Whether a family of this name is one this command writes."""
        theirs = family.startswith(FINETUNE.prefix)
        return family.startswith("peftnode_") and (theirs if self is FINETUNE else not theirs)


VERIFY = Names("invoke verify", "peftnode_", "peftnode_verify_last_run_timestamp_seconds", "peftnode_verify_info")
FINETUNE = Names("invoke finetune", "peftnode_finetune_", "peftnode_finetune_last_run_timestamp_seconds",
                 "peftnode_finetune_info")


def names_for(title: str) -> Names:
    """The family names of the command that made a report (its ``Report.title``)."""
    return FINETUNE if title == FINETUNE_TITLE else VERIFY


# --- the collector -----------------------------------------------------------------------------------


def _gpu_labels(result: Result) -> list[str]:
    g = result.gpu
    if g is None:
        return ["", "", ""]
    return [str(g.index), g.uuid or "", g.pci_bus_id or ""]


def _one_per_name(results: list[Result]) -> list[Result]:
    """One result per check name (a repeated series makes node_exporter drop the whole file): where a
    name repeats, its worst result stands."""
    kept: dict[str, Result] = {}
    for result in results:
        old = kept.get(result.name)
        if old is None or result.status > old.status:
            kept[result.name] = result
    return list(kept.values())


class ReportCollector:
    """The families of one report; ``collect`` yields them fresh on every scrape or write."""

    def __init__(self, report: Report):
        self.report = report
        self.names = names_for(report.title)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report, n = self.report, self.names
        what = f"`{n.command}`"
        status = GaugeMetricFamily(
            n.status, f"State of a peftnode check in the last {what} run: 1 for its state (pass, skip, warn, error, "
                      "fail), 0 for the others (StateSet).", labels=[*CHECK_LABELS, "state"])
        duration = GaugeMetricFamily(n.duration, f"How long the check took in the last {what} run, in seconds.",
                                     labels=CHECK_LABELS)
        fixed = {n.status, n.duration, n.healthy, n.timestamp, n.info}
        measured: dict[str, GaugeMetricFamily] = {}
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for result in _one_per_name(report.results):
            labels = [result.name, *_gpu_labels(result)]
            for state in STATES:
                status.add_metric([*labels, state], 1 if result.status.label == state else 0)
            duration.add_metric(labels, float(result.duration_s))
            for key, value in result.measured.items():
                if not _is_number(value.value):
                    continue
                stem, help_text = quantity_of(result, key, value)
                name = n.prefix + stem
                if name in fixed:
                    name += "_value"
                if (name, tuple(labels)) in seen:  # two keys of one check named alike: the first stands
                    continue
                seen.add((name, tuple(labels)))
                family = measured.get(name)
                if family is None:
                    family = measured[name] = GaugeMetricFamily(name, help_text, labels=CHECK_LABELS)
                number = float(value.value)
                factor = unit_of(value.unit).factor
                family.add_metric(labels, number * factor if math.isfinite(number) else number)
        yield status
        yield duration
        yield from (measured[name] for name in sorted(measured))

        healthy = GaugeMetricFamily(n.healthy, f"1 if the last {what} run was healthy (no fail or error), else 0.")
        healthy.add_metric([], 1 if report.exit_code == 0 else 0)
        finished = GaugeMetricFamily(n.timestamp, f"Unix time at which the last {what} run finished.")
        finished.add_metric([], report.finished_at.timestamp())
        info = GaugeMetricFamily(n.info, f"Stack and peftnode version of the last {what} run; always 1.",
                                 labels=["stack", "version"])
        info.add_metric([report.stack.get("name") or "", checks.__version__], 1)
        yield from (healthy, finished, info)


def registry_of(report: Report) -> CollectorRegistry:
    """A registry of its own holding the report's families (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(report))
    return registry


def render_prom(report: Report) -> str:
    """The report in Prometheus text exposition format (all gauges)."""
    return generate_latest(registry_of(report)).decode("utf-8")


def write_prom(report: Report, path: str | os.PathLike) -> Path:
    """Write the metrics atomically to ``path`` (e.g. /var/lib/node_exporter/textfile/peftnode.prom),
    readable by every user (``write_to_textfile`` leaves the mode to the umask)."""
    target = Path(path)
    write_to_textfile(str(target), registry_of(report))
    os.chmod(target, FILE_MODE)
    return target


# --- whose file is it ----------------------------------------------------------------------------------

_FAMILY_LINE = re.compile(r"^(?:#\s*(?:HELP|TYPE)\s+)?(peftnode_[A-Za-z0-9_:]*)")


def families_in(text: str) -> set[str]:
    """The peftnode family names a textfile holds (from its HELP/TYPE lines and sample lines)."""
    out = set()
    for line in text.splitlines():
        m = _FAMILY_LINE.match(line.strip())
        if m:
            out.add(m.group(1))
    return out


def check_prom_target(path: str | os.PathLike, title: str) -> None:
    """Refuse (ValueError, one line) to write the ``title`` command's metrics over a file the other
    command wrote: both belong in one textfile directory, but each in a file of its own. A missing,
    unreadable or foreign file is left to the writer."""
    mine = names_for(title)
    other = VERIFY if mine is FINETUNE else FINETUNE
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    theirs = sorted(f for f in families_in(text) if other.owns(f))
    if theirs:
        suggestion = "peftnode-finetune.prom" if mine is FINETUNE else "peftnode.prom"
        raise ValueError(f"--prom {path} holds `{other.command}`'s metrics ({theirs[0]}, ...); `{mine.command}` "
                         f"writes its own families ({mine.prefix}*) and would replace them: give it a file of its "
                         f"own in the same directory, e.g. {Path(path).parent / suggestion}")
