"""NCCL all-reduce across the node's GPUs: torch.distributed (always) and nccl-tests (when installed).

``nccl.allreduce`` returns two verdicts from one call. ``torch``: one process per visible GPU
(``python -c``, rendezvous on a free loopback port, ``init_process_group`` with a timeout as the
watchdog) checks the reduced values (rank r sends r+1, every element must come back as n(n+1)/2) and
measures one large all-reduce the way nccl-tests does: ``algbw = bytes / seconds`` and
``busbw = algbw x 2(n-1)/n``. One size, not a sweep: nccl-tests' "Avg bus bandwidth" averages every
size of a sweep and reads far below the large-message figure. ``nccl-tests``: ``all_reduce_perf``
(NVIDIA/nccl-tests) at the same size and rank count when it is on PATH or where the nccl_tests role
installs it (``/usr/local/nccl-tests/bin``; a skip when neither), judged
with the torch busbw of the same call beside its own. The preconditions (0 or 1 GPU expected, no
CUDA, fewer than 2 devices) are one verdict; without CUDA but with ``all_reduce_perf`` on PATH,
all_reduce_perf runs anyway to say what is wrong in its own words.

Defaults: 1 GiB full (node.perf.allreduce_bytes overrides), 256 MiB with ``--quick`` (at most
node.perf.allreduce_bytes). 256 MiB reads ~10 % under 1 GiB on NVSwitch nodes (the shared H100
sample: 434 vs 470 GB/s), inside the 0.8 floor. Timing: warm-up 3 (quick) / 5 all-reduces, then the
median of 3 / 5 batches of 5 / 20; the time of an all-reduce is the slowest rank's.

Time on an 8-GPU node with ``--quick``: starting 8 rank processes (torch import, in parallel) ~3-5 s,
NCCL communicator set-up 2-10 s, 1 + 3 + 15 + 1 all-reduces of 256 MiB at 2-4 ms ~0.1 s: ~10-15 s;
nccl-tests at one size ~5 s more. With perf's ~20 s, the quick perf + nccl groups take ~35-40 s. Full:
1 GiB, 1 + 5 + 100 + 1 all-reduces at 5-9 ms ~1 s more.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from checks.figures import GPU_TABLE, Expectation, ModelFigures, expected_figure, thresholds
from checks.registry import Context, check
from checks.result import Status, Value, Verdict
from checks.timing import cuda_status, first_line, judge_no_cuda, time_per_op

MiB = 1 << 20
DEFAULT_BYTES = 1024 * MiB
QUICK_BYTES = 256 * MiB
TABLE_RANKS = 8  # the table's all-reduce figures are for 8-GPU nodes
DEADLINE_S = 240.0  # the whole torch measurement, and all_reduce_perf's own limit
INIT_TIMEOUT_S = 120.0  # init_process_group / NCCL watchdog
CHECK_TIMEOUT_S = 2 * DEADLINE_S + 60  # both measurements; the check's own timeout is the last resort


# --- arithmetic ---------------------------------------------------------------------------------------


def algbw_gbps(nbytes: int, seconds: float) -> float:
    """nccl-tests' algorithm bandwidth: bytes / seconds, in GB/s (1e9)."""
    return nbytes / seconds / 1e9


def allreduce_busbw(algbw: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth for all-reduce: algbw x 2(n-1)/n."""
    return algbw * 2.0 * (ranks - 1) / ranks


def expected_sum(ranks: int) -> float:
    """What every element holds after ranks 0..n-1 each contribute rank+1: n(n+1)/2."""
    return ranks * (ranks + 1) / 2


def measurement_bytes(node: dict, quick: bool) -> int:
    perf = node.get("perf") if isinstance(node, dict) else node.perf.given()
    configured = (perf or {}).get("allreduce_bytes")
    size = int(configured) if configured else DEFAULT_BYTES
    return min(size, QUICK_BYTES) if quick else size


def expected_busbw(device_name: str | None, ranks: int, node_perf: dict | None,
                   table: dict[str, ModelFigures] = GPU_TABLE) -> Expectation:
    """node.perf.allreduce_busbw_gbps, else the table's figure when the node has 8 GPUs of a known model."""
    if (node_perf or {}).get("allreduce_busbw_gbps") is not None:
        return Expectation(float(node_perf["allreduce_busbw_gbps"]), "node.perf.allreduce_busbw_gbps")
    if ranks != TABLE_RANKS:
        return Expectation(None, f"the table's figures are for {TABLE_RANKS}-GPU nodes and this run has {ranks}")
    return expected_figure("allreduce_busbw_gbps", device_name, None, table)


REMEDIATION_NCCL = (
    "Rerun with NCCL_DEBUG=INFO to see the transport NCCL picks; check NVLink (`nvidia-smi nvlink -s`, "
    "`nvidia-smi topo -m`), that nvidia-fabricmanager runs on NVSwitch systems (HGX/DGX), P2P/ACS settings "
    "(`nvidia-smi topo -p2p r`), and that no other job uses the GPUs.")


def _fabric_hint(text: str) -> str:
    if "system not yet initialized" in text:
        return ("CUDA reports 'system not yet initialized' on NVSwitch systems until nvidia-fabricmanager runs "
                "with the driver's exact version: `systemctl status nvidia-fabricmanager`. ")
    return ""


def _judge_busbw(busbw: float, exp: Expectation, floor_ratio: float, what: str,
                 measured: dict, expected: dict) -> Verdict:
    if exp.value is None or exp.value <= 0:
        return Verdict(Status.PASS, f"{what}: busbw {busbw:.4g} GB/s (not judged: {exp.source}; set "
                                    "node.perf.allreduce_busbw_gbps from a known-good node)", measured, expected)
    r = busbw / exp.value
    measured["busbw_ratio"] = Value(round(r, 3))
    expected["busbw"] = Value(exp.value, "GB/s")
    expected["busbw_floor"] = Value(round(exp.value * floor_ratio, 3), "GB/s")
    if r < floor_ratio:
        return Verdict(Status.FAIL, f"{what}: busbw {busbw:.4g} GB/s is {r:.2f}x the expected {exp.value:.4g} GB/s "
                                    f"({exp.source}; floor {floor_ratio:g}x)", measured, expected, REMEDIATION_NCCL)
    return Verdict(Status.PASS, f"{what}: busbw {busbw:.4g} GB/s ({r:.2f}x the expected {exp.value:.4g} GB/s, "
                                f"{exp.source})", measured, expected)


# --- torch.distributed probe --------------------------------------------------------------------------


@dataclass
class AllreduceProbe:
    ranks: int
    nbytes: int
    backend: str = "nccl"
    device: str | None = None  # rank 0's device name
    seconds: float | None = None  # one all-reduce, slowest rank's median
    wrong: int = 0  # elements that came back wrong (first and last check together)
    max_abs_error: float | None = None
    errors: list[str] = field(default_factory=list)  # "rank 3: ..."
    timed_out: bool = False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, cfg: dict, out_dir: str) -> None:
    """One rank: runs in its own spawned process; writes rank<N>.json whatever happens."""
    os.environ.setdefault("NCCL_ASYNC_ERROR_HANDLING", "1")  # torch < 2.2: honour the timeout on hangs
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # torch >= 2.2
    if cfg["backend"] == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result: dict = {"rank": rank, "ok": False}
    dist = None
    try:
        import torch
        import torch.distributed as dist

        if cfg["backend"] == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
            result["device"] = torch.cuda.get_device_name(rank)
        else:  # gloo on CPU: the same orchestration, testable without a GPU
            device = torch.device("cpu")
            result["device"] = "cpu"
        world = cfg["world"]
        dist.init_process_group(cfg["backend"], init_method=cfg["init_method"], world_size=world, rank=rank,
                                timeout=timedelta(seconds=cfg["init_timeout_s"]))
        want = expected_sum(world)
        buf = torch.full((cfg["nbytes"] // 4,), float(rank + 1), dtype=torch.float32, device=device)

        def verify() -> tuple[int, float]:
            buf.fill_(float(rank + 1))
            dist.all_reduce(buf)
            diff = (buf - want).abs()
            return int((diff != 0).sum().item()), float(diff.max().item())

        wrong_first, err_first = verify()
        buf.zero_()
        seconds = time_per_op(lambda i: dist.all_reduce(buf), device, warmup_ops=cfg["warmup"], warmup_s=0.0,
                              repeats=cfg["repeats"], iters=cfg["iters"])
        wrong_last, err_last = verify()  # after sustained traffic too
        result.update(ok=True, seconds=seconds, wrong=wrong_first + wrong_last, max_abs_error=max(err_first, err_last))
    except Exception as exc:
        result["error"] = first_line(exc)
    finally:
        try:
            if dist is not None and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        tmp = Path(out_dir, f"rank{rank}.json.tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, Path(out_dir, f"rank{rank}.json"))


def _read_rank(out_dir: str, rank: int) -> dict | None:
    try:
        return json.loads(Path(out_dir, f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def rank_entry(argv: list[str]) -> None:
    """``python -c 'from checks.nccl import rank_entry; rank_entry(sys.argv[1:])' RANK CFG.json OUT_DIR``."""
    rank, cfg_path, out_dir = argv
    _rank_main(int(rank), json.loads(Path(cfg_path).read_text()), out_dir)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def probe_allreduce(ranks: int, nbytes: int, *, backend: str = "nccl", warmup: int = 5, repeats: int = 5,
                    iters: int = 20, deadline_s: float = DEADLINE_S, init_timeout_s: float = INIT_TIMEOUT_S,
                    grace_s: float = 10.0, launch: int | None = None) -> AllreduceProbe:
    """Start ``ranks`` processes, all-reduce ``nbytes`` of float32, collect what each rank saw.

    Ranks are plain ``python -c`` processes (not multiprocessing: nothing depends on the parent's
    ``__main__``). A rank that fails leaves the others waiting in a collective: ``grace_s`` after the
    first failure (or at ``deadline_s``) the rest are killed. ``launch`` starts fewer ranks than
    ``ranks`` (to test the deadline: the started ones wait for peers that never come)."""
    probe = AllreduceProbe(ranks, nbytes, backend)
    cfg = {"world": ranks, "backend": backend, "nbytes": nbytes, "warmup": warmup, "repeats": repeats,
           "iters": iters, "init_timeout_s": init_timeout_s, "init_method": f"tcp://127.0.0.1:{free_port()}"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "import sys; from checks.nccl import rank_entry; rank_entry(sys.argv[1:])"
    with tempfile.TemporaryDirectory(prefix="peftnode-allreduce-") as out_dir:
        cfg_path = Path(out_dir, "cfg.json")
        cfg_path.write_text(json.dumps(cfg))
        procs: list[subprocess.Popen] = []
        try:
            for r in range(ranks if launch is None else launch):
                with open(Path(out_dir, f"rank{r}.log"), "wb") as log:
                    procs.append(subprocess.Popen([sys.executable, "-c", code, str(r), str(cfg_path), out_dir],
                                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env))
            deadline = time.monotonic() + deadline_s
            while any(p.poll() is None for p in procs):
                for r, p in enumerate(procs):
                    if p.poll() is not None:
                        got = _read_rank(out_dir, r)
                        if got is None or not got.get("ok"):
                            deadline = min(deadline, time.monotonic() + grace_s)
                if time.monotonic() > deadline:
                    probe.timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        results = {r: _read_rank(out_dir, r) for r in range(len(procs))}
        logs = {r: _last_line(Path(out_dir, f"rank{r}.log")) for r in range(len(procs))}
    waited = f"{deadline_s:g} s" if probe.timed_out else "its exit"
    for r, p in enumerate(procs):
        got = results[r]
        if got is None:
            how = "killed at the deadline" if p.returncode == -9 and probe.timed_out else f"exit code {p.returncode}"
            tail = f": {logs[r]}" if logs[r] else ""
            probe.errors.append(f"rank {r}: no result ({how}; waited {waited}){tail}")
        elif not got.get("ok"):
            probe.errors.append(f"rank {r}: {got.get('error', 'failed')}")
    if launch is not None and launch < ranks:
        probe.errors.append(f"ranks {launch}..{ranks - 1} were not started (launch={launch})")
    rank0 = results.get(0) or {}
    probe.device = rank0.get("device")
    done = [g for g in results.values() if g and g.get("ok")]
    if done and not probe.errors:
        probe.seconds = max(g["seconds"] for g in done)
        probe.wrong = sum(g["wrong"] for g in done)
        probe.max_abs_error = max(g["max_abs_error"] for g in done)
    return probe


def judge_allreduce(probe: AllreduceProbe, node_perf: dict | None,
                    table: dict[str, ModelFigures] = GPU_TABLE) -> Verdict:
    unit = "GPUs" if probe.backend == "nccl" else f"{probe.backend} ranks"
    what = f"all-reduce of {probe.nbytes / MiB:g} MiB across {probe.ranks} {unit}"
    measured: dict = {"ranks": probe.ranks, "bytes": Value(probe.nbytes, "B")}
    if probe.device:
        measured["device"] = probe.device
    expected: dict = {"sum": expected_sum(probe.ranks)}
    if probe.errors:
        text = "; ".join(probe.errors[:3]) + (f"; and {len(probe.errors) - 3} more" if len(probe.errors) > 3 else "")
        head = "did not finish" if probe.timed_out else "failed"
        return Verdict(Status.FAIL, f"{what} {head}: {text}", measured, expected,
                       _fabric_hint(text) + REMEDIATION_NCCL)
    if probe.seconds is None or probe.seconds <= 0:
        return Verdict(Status.ERROR, f"{what}: no timing came back", measured, expected)
    measured["wrong_elements"] = probe.wrong
    if probe.max_abs_error is not None:
        measured["max_abs_error"] = probe.max_abs_error
    if probe.wrong:
        return Verdict(Status.FAIL, f"{what} returned wrong values: {probe.wrong} element(s) differ from "
                                    f"{expected_sum(probe.ranks):g} (max error {probe.max_abs_error:g})",
                       measured, expected,
                       "Data corruption between GPUs: run `dcgmi diag -r 3` and nccl-tests with -c 1; check "
                       "for Xid errors in `dmesg` and NVLink error counters (`nvidia-smi nvlink -e`).")
    algbw = algbw_gbps(probe.nbytes, probe.seconds)
    busbw = allreduce_busbw(algbw, probe.ranks)
    measured.update(time=Value(round(probe.seconds * 1e6, 2), "us"), algbw=Value(round(algbw, 3), "GB/s"),
                    busbw=Value(round(busbw, 3), "GB/s"))
    exp = expected_busbw(probe.device, probe.ranks, node_perf, table)
    return _judge_busbw(busbw, exp, thresholds(node_perf)[0], what, measured, expected)


def _preconditions(ctx: Context, what: str) -> Verdict | None:
    gpus = ctx.node.gpus
    if gpus == 0:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have no GPUs", {}, {"gpus": 0})
    if gpus == 1:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have 1 GPU and an all-reduce needs at "
                                    "least 2", {}, {"gpus": 1})
    return None


# --- nccl-tests ---------------------------------------------------------------------------------------


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
                       _fabric_hint(first) + REMEDIATION_NCCL)
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
    verdict = _judge_busbw(row.busbw, exp, floor_ratio, what, measured, expected)
    if report.warnings and verdict.status is Status.PASS:
        verdict.status = Status.WARN
        verdict.message += f"; NCCL warned: {report.warnings[0]}"
        verdict.remediation = REMEDIATION_NCCL
    return verdict


def run_all_reduce_perf(binary: str, nbytes: int, gpus: int, quick: bool, timeout_s: float) -> tuple[int | None, str]:
    cmd = [binary, "-b", str(nbytes), "-e", str(nbytes), "-f", "2", "-g", str(gpus)]
    if quick:
        cmd += ["-w", "3", "-n", "10"]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else (exc.output or "")
        return None, out + f"\nError: all_reduce_perf did not finish within {timeout_s:g} s and was killed"
    return done.returncode, done.stdout


def torch_busbw(probe: AllreduceProbe) -> float | None:
    """The probe's busbw in GB/s, or None when the measurement failed (errors, no timing, wrong sums)."""
    if probe.seconds is None or probe.seconds <= 0 or probe.errors or probe.wrong:
        return None
    return allreduce_busbw(algbw_gbps(probe.nbytes, probe.seconds), probe.ranks)


def nccl_tests_verdict(ctx: Context, binary: str, gpus: int, nbytes: int, torch_figure: float | None) -> Verdict:
    """Run ``all_reduce_perf`` at ``nbytes`` on ``gpus`` GPUs and judge it, the torch figure beside it."""
    rc, text = run_all_reduce_perf(binary, nbytes, gpus, ctx.quick, DEADLINE_S)
    report = parse_nccl_tests(text)
    device = report.devices[0][1] if report.devices else ctx.node.gpu_model
    exp = expected_busbw(device, report.ranks or gpus, ctx.node.perf.given())
    verdict = judge_nccl_tests(report, rc, exp, thresholds(ctx.node.perf.given())[0], torch_figure, text[-2000:])
    verdict.measured["command"] = Value(f"all_reduce_perf -b {nbytes} -e {nbytes} -g {gpus}")
    verdict.subject = "nccl-tests"
    return verdict


# Where the nccl_tests role installs nccl-tests: a stable link to /usr/local/nccl-tests-<version>
# (roles/peftnode_nccl_tests, peftnode_nccl_tests_link). Looked in after PATH.
NCCL_TESTS_DIRS: tuple[str, ...] = ("/usr/local/nccl-tests/bin",)

NO_NCCL_TESTS = "all_reduce_perf (NVIDIA nccl-tests) is not on PATH; the torch figure stands alone"


def find_all_reduce_perf(dirs: tuple[str, ...] | None = None) -> str | None:
    """``all_reduce_perf`` on PATH, else in the nccl_tests role's directories (NCCL_TESTS_DIRS)."""
    found = shutil.which("all_reduce_perf")
    for directory in (NCCL_TESTS_DIRS if dirs is None else dirs):
        if found:
            break
        found = shutil.which("all_reduce_perf", path=directory)
    return found


@check("nccl.allreduce", "NCCL all-reduce across the node's GPUs: torch.distributed (right sums, bus bandwidth) "
                         "and nccl-tests all_reduce_perf beside it when installed",
       worker="torch", exclusive=True, needs=("gpu.driver", "cuda.torch"),
       needs_gpus=True, timeout_s=CHECK_TIMEOUT_S)
def nccl_allreduce(ctx: Context) -> Verdict | list[Verdict]:
    what = "the NCCL all-reduce"
    skip = _preconditions(ctx, what)
    if skip:
        return skip
    gpus = ctx.node.gpus
    binary = find_all_reduce_perf()
    nbytes = measurement_bytes(ctx.node, ctx.quick)
    usable, count, reason = cuda_status()
    if not usable:
        no_cuda = judge_no_cuda(reason, gpus, what)
        if binary is None:
            return no_cuda
        no_cuda.subject = "torch"  # all_reduce_perf on the expected GPUs says what is wrong in its own words
        return [no_cuda, nccl_tests_verdict(ctx, binary, gpus, nbytes, None)]
    if count < 2:
        return Verdict(Status.FAIL, f"only {count} CUDA device visible to torch; this node is expected to have "
                                    f"{gpus}, and an all-reduce needs at least 2", {"cuda_devices": count},
                       {"gpus": gpus}, "See the GPU inventory checks; check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`.")
    timing = {"warmup": 3, "repeats": 3, "iters": 5} if ctx.quick else {"warmup": 5, "repeats": 5, "iters": 20}
    probe = probe_allreduce(count, nbytes, **timing)
    if probe.device is None and ctx.node.gpu_model:
        probe.device = ctx.node.gpu_model
    torch_verdict = judge_allreduce(probe, ctx.node.perf.given())
    torch_verdict.subject = "torch"
    if binary is None:
        tests = Verdict(Status.SKIP, NO_NCCL_TESTS, {}, {}, subject="nccl-tests")
    else:
        tests = nccl_tests_verdict(ctx, binary, count, nbytes, torch_busbw(probe))
    return [torch_verdict, tests]
