"""NVIDIA nccl-tests' ``all_reduce_perf``: run it at one size through :mod:`checks.proc`, parse what it
prints (every layout since the ``error`` column), and judge its bus bandwidth beside the torch figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from checks import proc
from checks.figures import Expectation, thresholds
from checks.nccl.allreduce import REMEDIATION_NCCL, MiB, expected_busbw, fabric_hint, judge_busbw
from checks.node import Node
from checks.result import Status, Value, Verdict


@dataclass
class NcclTestsRow:
    size: int
    count: int
    type: str
    redop: str
    root: int | None
    time_us: float | None  # out-of-place
    algbw: float | None
    busbw: float | None
    wrong: int | None  # "#wrong" (None: "N/A" or the old "error" column)
    in_time_us: float | None
    in_algbw: float | None
    in_busbw: float | None
    in_wrong: int | None
    error: float | None = None  # old nccl-tests: max error instead of #wrong
    in_error: float | None = None


@dataclass
class NcclTestsReport:
    version: str | None = None  # "2.17.8" (newer nccl-tests print it)
    nccl_library: str | None = None  # "22902"
    n_threads: int | None = None
    n_gpus: int | None = None  # per thread
    min_bytes: int | None = None
    max_bytes: int | None = None
    warmup_iters: int | None = None
    iters: int | None = None
    devices: list[tuple[int, str]] = field(default_factory=list)  # (rank, device name)
    rows: list[NcclTestsRow] = field(default_factory=list)
    avg_busbw: float | None = None
    out_of_bounds: int | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # "NCCL WARN" lines (printed with NCCL_DEBUG=WARN/INFO)

    @property
    def ranks(self) -> int | None:
        if self.devices:
            return len(self.devices)
        if self.n_gpus is not None:
            return self.n_gpus * (self.n_threads or 1)
        return None


NEW_COLUMNS = ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
               "time", "algbw", "busbw", "#wrong"]
DEVICE_RX = re.compile(r"#\s*Rank\s+(\d+)\s+(?:Group\s+\d+\s+)?Pid\s+\d+\s+on\s+\S+\s+device\s+\d+\s+\[[^\]]*\]\s+(.+)")
ERROR_RX = re.compile(r"\b(failure|failed|error|abort(ed)?)\b|Segmentation fault", re.IGNORECASE)


def _num(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        return None


def _int_header(rx: str, text: str) -> int | None:
    m = re.search(rx, text)
    return int(m.group(1)) if m else None


def _row(tokens: list[str], columns: list[str]) -> NcclTestsRow | None:
    if len(tokens) != len(columns) or _num(tokens[0], int) is None or _num(tokens[1], int) is None:
        return None
    times = [i for i, c in enumerate(columns) if c == "time"]
    if len(times) != 2:
        return None
    lead = dict(zip(columns[:times[0]], tokens[:times[0]], strict=True))

    def side(start: int, end: int) -> tuple:
        cols = dict(zip(columns[start:end], tokens[start:end], strict=True))
        wrong = _num(cols["#wrong"], int) if "#wrong" in cols else None
        err = _num(cols["error"]) if "error" in cols else None
        return _num(cols.get("time", "")), _num(cols.get("algbw", "")), _num(cols.get("busbw", "")), wrong, err

    t, a, b, w, e = side(times[0], times[1])
    ti, ai, bi, wi, ei = side(times[1], len(columns))
    return NcclTestsRow(int(lead["size"]), int(lead["count"]), lead.get("type", ""), lead.get("redop", ""),
                        _num(lead["root"], int) if "root" in lead else None, t, a, b, w, ti, ai, bi, wi, e, ei)


def parse_nccl_tests(text: str) -> NcclTestsReport:
    """Parse nccl-tests output (all_reduce_perf and friends): header, devices, rows, average, errors.

    Columns are read from the table's own header line, so the older layout (``error`` instead of
    ``#wrong``, no ``root``) and the newer, wider one both parse; without a header line the newer layout
    is assumed. Error lines (``Test CUDA failure ...``, ``NCCL WARN``) are collected in order."""
    report = NcclTestsReport()
    columns = NEW_COLUMNS
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line.lstrip("#").strip()
            m = re.match(r"nccl-tests version\s+(\S+)", body)
            if m:
                report.version = m.group(1)
                lib = re.search(r"nccl-library=(\d+)", body)
                report.nccl_library = lib.group(1) if lib else None
            if re.match(r"nThread\s+\d+", body):
                report.n_threads = _int_header(r"nThread\s+(\d+)", body)
                report.n_gpus = _int_header(r"nGpus\s+(\d+)", body)
                report.min_bytes = _int_header(r"minBytes\s+(\d+)", body)
                report.max_bytes = _int_header(r"maxBytes\s+(\d+)", body)
                report.warmup_iters = _int_header(r"warmup iters:\s*(\d+)", body)
                report.iters = _int_header(r"(?<!warmup )(?<!agg )iters:\s*(\d+)", body)
            m = DEVICE_RX.match(line)
            if m:
                report.devices.append((int(m.group(1)), m.group(2).strip()))
            tokens = body.split()
            if tokens[:2] == ["size", "count"] and tokens.count("time") == 2:
                columns = tokens
            m = re.match(r"Avg bus bandwidth\s*:\s*([0-9.eE+-]+)", body)
            if m:
                report.avg_busbw = float(m.group(1))
            m = re.match(r"Out of bounds values\s*:\s*(\d+)\s*(\w*)", body)
            if m:
                report.out_of_bounds = int(m.group(1))
                if report.out_of_bounds:
                    report.errors.append(line)
            continue
        row = _row(line.split(), columns)
        if row is not None:
            report.rows.append(row)
        elif " NCCL WARN " in f" {line} ":
            report.warnings.append(line)
        elif " NCCL INFO " in f" {line} ":  # NCCL_DEBUG=INFO chatter ("Failed to find plugin ...") is not an error
            continue
        elif ERROR_RX.search(line):
            report.errors.append(line)
    return report


def judge_nccl_tests(report: NcclTestsReport, returncode: int | None, exp: Expectation, floor_ratio: float,
                     torch_busbw: float | None = None, output_tail: str = "") -> Verdict:
    measured: dict = {}
    if report.version:
        measured["nccl_tests"] = report.version
    if returncode is not None:
        measured["exit_code"] = returncode
    if torch_busbw is not None:
        measured["torch_busbw"] = Value(round(torch_busbw, 3), "GB/s")
    expected: dict = {}
    if report.errors:
        first = report.errors[0]
        return Verdict(Status.FAIL, f"all_reduce_perf failed: {first}", measured, expected,
                       fabric_hint(first) + REMEDIATION_NCCL)
    if not report.rows:
        last = output_tail.strip().splitlines()[-1] if output_tail.strip() else "no output"
        return Verdict(Status.FAIL, f"all_reduce_perf printed no results (exit code {returncode}): {last}",
                       measured, expected, REMEDIATION_NCCL)
    row = max(report.rows, key=lambda r: r.size)
    ranks = report.ranks or 0
    measured.update(ranks=ranks, bytes=Value(row.size, "B"))
    if row.time_us is not None:
        measured["time"] = Value(row.time_us, "us")
    if row.algbw is not None:
        measured["algbw"] = Value(row.algbw, "GB/s")
    if row.in_busbw is not None:
        measured["busbw_in_place"] = Value(row.in_busbw, "GB/s")
    wrong = sum(w for w in (row.wrong, row.in_wrong) if w)
    measured["wrong_elements"] = wrong
    if wrong or (returncode not in (0, None)):
        why = f"{wrong} wrong element(s) at {row.size} B" if wrong else f"exit code {returncode}"
        return Verdict(Status.FAIL, f"all_reduce_perf reported {why}", measured, expected,
                       "Data corruption or a failed run: check `dmesg` for Xid errors and NVLink counters "
                       "(`nvidia-smi nvlink -e`); run `dcgmi diag -r 3`.")
    if row.busbw is None:
        return Verdict(Status.ERROR, "all_reduce_perf printed a row without busbw", measured, expected)
    measured["busbw"] = Value(row.busbw, "GB/s")
    what = f"nccl-tests all_reduce_perf, {row.size / MiB:g} MiB across {ranks} GPUs"
    if torch_busbw is not None:
        what += f" (torch nccl.allreduce: {torch_busbw:.4g} GB/s)"
    verdict = judge_busbw(row.busbw, exp, floor_ratio, what, measured, expected)
    if report.warnings and verdict.status is Status.PASS:
        verdict.status = Status.WARN
        verdict.message += f"; NCCL warned: {report.warnings[0]}"
        verdict.remediation = REMEDIATION_NCCL
    return verdict


def run_all_reduce_perf(binary: str, nbytes: int, gpus: int, quick: bool, timeout_s: float) -> tuple[int | None, str]:
    """(exit code, all it printed). A timeout or a crash has no exit code and ends the output with an
    ``Error:`` line saying so, which the parser reports like any error line."""
    argv = [binary, "-b", str(nbytes), "-e", str(nbytes), "-f", "2", "-g", str(gpus)]
    if quick:
        argv += ["-w", "3", "-n", "10"]
    ended = proc.run(argv, timeout_s=timeout_s, keep_output=True)
    text = ended.output
    if ended.code is None:
        text += f"\nError: all_reduce_perf {ended.describe(timeout_s)}\n"
    return ended.code, text


def nccl_tests_verdict(binary: str, gpus: int, nbytes: int, quick: bool, node: Node, torch_figure: float | None,
                       timeout_s: float) -> Verdict:
    """Run ``all_reduce_perf`` at ``nbytes`` on ``gpus`` GPUs and judge it, the torch figure beside it."""
    rc, text = run_all_reduce_perf(binary, nbytes, gpus, quick, timeout_s)
    report = parse_nccl_tests(text)
    device = report.devices[0][1] if report.devices else node.gpu_model
    exp = expected_busbw(device, report.ranks or gpus, node.perf)
    verdict = judge_nccl_tests(report, rc, exp, thresholds(node.perf)[0], torch_figure, text[-2000:])
    verdict.measured["command"] = Value(f"all_reduce_perf -b {nbytes} -e {nbytes} -g {gpus}")
    verdict.subject = "nccl-tests"
    return verdict
