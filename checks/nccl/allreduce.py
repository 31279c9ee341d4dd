"""The torch.distributed all-reduce: one rank process per GPU, right sums and bus bandwidth.

The launcher (the nccl.allreduce check, in the run's shared torch worker) starts one ``python -c``
rank per visible GPU through :mod:`checks.proc` (own session, deadline, whole-tree kill, exit and log
tail). The ranks meet through a rendezvous file in their temporary directory (no port to pick, none to
race for), initialise the process group with a timeout as the watchdog, check the reduced values (rank r
sends r+1, every element must come back as n(n+1)/2) and time one large all-reduce the way nccl-tests
does: ``algbw = bytes / seconds``, ``busbw = algbw x 2(n-1)/n``. Each rank writes what it saw to
``rank<N>.json`` whatever happens; a rank that fails leaves its peers waiting in a collective, so
``grace_s`` after the first failure (or at the deadline) the rest are killed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from checks.figures import GPU_TABLE, Expectation, ModelFigures, expected_figure, thresholds
from checks.node import PerfExpect
from checks.proc import Exit, Process, child_env, python_argv
from checks.registry import current_progress
from checks.result import Status, Value, Verdict
from checks.timing import first_line, time_per_op

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


def measurement_bytes(perf: PerfExpect, quick: bool) -> int:
    """node.perf.allreduce_bytes (default 1 GiB); ``--quick`` caps it at 256 MiB."""
    size = int(perf.allreduce_bytes) if perf.allreduce_bytes else DEFAULT_BYTES
    return min(size, QUICK_BYTES) if quick else size


def expected_busbw(device_name: str | None, ranks: int, perf: PerfExpect | None,
                   table: dict[str, ModelFigures] = GPU_TABLE) -> Expectation:
    """node.perf.allreduce_busbw_gbps, else the table's figure when the node has 8 GPUs of a known model."""
    if perf is not None and perf.allreduce_busbw_gbps is not None:
        return Expectation(float(perf.allreduce_busbw_gbps), "node.perf.allreduce_busbw_gbps")
    if ranks != TABLE_RANKS:
        return Expectation(None, f"the table's figures are for {TABLE_RANKS}-GPU nodes and this run has {ranks}")
    return expected_figure("allreduce_busbw_gbps", device_name, None, table)


REMEDIATION_NCCL = (
    "Rerun with NCCL_DEBUG=INFO to see the transport NCCL picks; check NVLink (`nvidia-smi nvlink -s`, "
    "`nvidia-smi topo -m`), that nvidia-fabricmanager runs on NVSwitch systems (HGX/DGX), P2P/ACS settings "
    "(`nvidia-smi topo -p2p r`), and that no other job uses the GPUs.")


def fabric_hint(text: str) -> str:
    if "system not yet initialized" in text:
        return ("CUDA reports 'system not yet initialized' on NVSwitch systems until nvidia-fabricmanager runs "
                "with the driver's exact version: `systemctl status nvidia-fabricmanager`. ")
    return ""


def judge_busbw(busbw: float, exp: Expectation, floor_ratio: float, what: str,
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
    timed_out: bool = False  # ranks were still running at the deadline (or the grace after a failure)
    leftover: list[int] = field(default_factory=list)  # pids that survived the kill (there should be none)


RANK_CODE = "import sys; from checks.nccl.allreduce import rank_entry; rank_entry(sys.argv[1:])"


def _rank_main(rank: int, cfg: dict, out_dir: str) -> None:
    """One rank: runs in its own process; writes rank<N>.json whatever happens."""
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


def rank_entry(argv: list[str]) -> None:
    """``python -c RANK_CODE RANK CFG.json OUT_DIR``."""
    rank, cfg_path, out_dir = argv
    _rank_main(int(rank), json.loads(Path(cfg_path).read_text()), out_dir)


def _read_rank(out_dir: str, rank: int) -> dict | None:
    try:
        return json.loads(Path(out_dir, f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def probe_allreduce(ranks: int, nbytes: int, *, backend: str = "nccl", warmup: int = 5, repeats: int = 5,
                    iters: int = 20, deadline_s: float = DEADLINE_S, init_timeout_s: float = INIT_TIMEOUT_S,
                    grace_s: float = 10.0) -> AllreduceProbe:
    """Start ``ranks`` processes, all-reduce ``nbytes`` of float32, collect what each rank saw.

    Ranks are plain ``python -c`` processes (not multiprocessing: nothing depends on the launcher's
    ``__main__``, and nothing of its CUDA state is inherited). Whatever happens, every rank's process
    tree is gone when this returns."""
    probe = AllreduceProbe(ranks, nbytes, backend)
    with tempfile.TemporaryDirectory(prefix="peftnode-allreduce-") as out_dir:
        cfg = {"world": ranks, "backend": backend, "nbytes": nbytes, "warmup": warmup, "repeats": repeats,
               "iters": iters, "init_timeout_s": init_timeout_s,
               "init_method": Path(out_dir, "rendezvous").as_uri()}  # a FileStore: no port to pick
        cfg_path = Path(out_dir, "cfg.json")
        cfg_path.write_text(json.dumps(cfg))
        env = child_env()
        procs: list[Process] = []
        exits: list[Exit] = []
        why_killed = f"killed at the deadline, {deadline_s:g} s after the start"
        emit = current_progress()
        ended: set[int] = set()

        def report_ended() -> None:
            for r, p in enumerate(procs):
                if r not in ended and not p.alive():
                    ended.add(r)
                    got = _read_rank(out_dir, r)
                    if got and got.get("ok") and isinstance(got.get("seconds"), (int, float)):
                        how = f"{got['seconds'] * 1e3:.2f} ms per all-reduce"
                    else:
                        how = f"failed: {got.get('error', '?')}" if got else "ended without a result"
                    emit(f"rank {r}: {how} ({len(ended)}/{ranks} done)", key=f"rank {r}", final=True)

        try:
            for r in range(ranks):
                procs.append(Process(python_argv("-c", RANK_CODE, str(r), str(cfg_path), out_dir), env=env,
                                     log_path=Path(out_dir, f"rank{r}.log")))
            emit(f"all-reduce of {nbytes / MiB:g} MiB: {ranks} {backend} ranks started", done=0, total=ranks)
            deadline = time.monotonic() + deadline_s
            while any(p.alive() for p in procs):
                for r, p in enumerate(procs):
                    got = None if p.alive() else _read_rank(out_dir, r)
                    if not p.alive() and not (got and got.get("ok")) and time.monotonic() + grace_s < deadline:
                        deadline = time.monotonic() + grace_s  # its peers wait for it in a collective
                        why_killed = f"killed {grace_s:g} s after rank {r} ended without a result"
                report_ended()
                if time.monotonic() > deadline:
                    probe.timed_out = True
                    break
                time.sleep(0.05)
            report_ended()
        finally:  # also on Ctrl-C or an error here: no rank outlives the probe
            exits = [p.finish(timed_out=p.alive()) for p in procs]
        results = {r: _read_rank(out_dir, r) for r in range(len(procs))}
    probe.leftover = sorted({pid for ex in exits for pid in ex.leftover})
    for r, ex in enumerate(exits):
        got = results[r]
        if got is None:
            how = why_killed if ex.timed_out else ex.describe()
            line = ex.last_line()
            probe.errors.append(f"rank {r}: no result ({how})" + (f": {line}" if line else ""))
        elif not got.get("ok"):
            probe.errors.append(f"rank {r}: {got.get('error', 'failed')}")
    if probe.leftover:
        probe.errors.append(f"rank processes outlived the kill: pids {', '.join(map(str, probe.leftover))}")
    rank0 = results.get(0) or {}
    probe.device = rank0.get("device")
    done = [g for g in results.values() if g and g.get("ok")]
    if done and not probe.errors:
        probe.seconds = max(g["seconds"] for g in done)
        probe.wrong = sum(g["wrong"] for g in done)
        probe.max_abs_error = max(g["max_abs_error"] for g in done)
    return probe


def judge_allreduce(probe: AllreduceProbe, perf: PerfExpect | None,
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
                       fabric_hint(text) + REMEDIATION_NCCL)
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
    exp = expected_busbw(probe.device, probe.ranks, perf, table)
    return judge_busbw(busbw, exp, thresholds(perf)[0], what, measured, expected)


def torch_busbw(probe: AllreduceProbe) -> float | None:
    """The probe's busbw in GB/s, or None when the measurement failed (errors, no timing, wrong sums)."""
    if probe.seconds is None or probe.seconds <= 0 or probe.errors or probe.wrong:
        return None
    return allreduce_busbw(algbw_gbps(probe.nbytes, probe.seconds), probe.ranks)
