"""All-reduce between two nodes: the check that finds a bad NIC, cable or switch port.

No single-node check sees the network between nodes. This one runs the all-reduce across a *pair* of
nodes, the way a multi-node job would, and reports the inter-node bus bandwidth (nccl-tests' convention,
``busbw = algbw x 2(n-1)/n`` with n the world size) and whether every element came back right.

Two ways to run it, the same flags for both:

- as torchrun's module on each of the two nodes (the worker)::

    python -m torch.distributed.run --nnodes 2 --node-rank R --nproc-per-node G --master-addr A \\
        --master-port P -m checks.nccl.pairs --hosts a,b --json OUT [--backend auto|nccl|gloo] \\
        [--expect-gbps X] [--floor-ratio F] [--sizes 1M,64M] [--iters N] [--warmup N] [--timeout S]

  Global rank 0 (node-rank 0's local rank 0) writes the pair result (schema ``peftnode.fleet.pair/1``).
  torchrun's own rendezvous (the agents meet before any worker starts) waits 600 s for a node that never
  comes and then fails without starting this module, so nothing can write that a node is missing;

- directly, ``python -m checks.nccl.pairs --node-rank R --nproc-per-node G --master-addr A --master-port P
  --hosts a,b --json OUT ...`` (the launcher): runs that torchrun command with its rendezvous bounded
  by ``--timeout`` (``--rdzv-conf timeout=S``), under a deadline, and writes the error result naming the
  host that did not join when torchrun ends without one. This is the form to use from a playbook.

The worker: backend ``auto`` is NCCL when CUDA is available (local rank r on ``cuda:r``), else gloo on CPU
tensors. Every rank announces itself in torchrun's store, rank 0 waits ``--timeout`` for all of them (a
missing rank names its host), then the process group starts with the same timeout. Per size: every rank
contributes rank+1 and every element must come back as n(n+1)/2 (checked before and after the timed
loop); ``--warmup`` all-reduces, a barrier, ``--iters`` timed all-reduces; the time of one all-reduce is
the slowest rank's. Gloo binds the interface named by ``GLOO_SOCKET_IFNAME`` when set, else the one
that routes to the master address (on a host whose name resolves to 127.0.1.1, gloo's own choice is the
loopback); NCCL picks its own, and ``NCCL_SOCKET_IFNAME`` / ``NCCL_IB_HCA`` override it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from checks.figures import DEFAULT_FLOOR_RATIO
from checks.nccl.allreduce import algbw_gbps, allreduce_busbw, expected_sum
from checks.registry import UsageError

SCHEMA = "peftnode.fleet.pair/1"
PROG = "peftnode pairs"
MiB = 1 << 20
DEFAULT_SIZES = "1M,64M,256M"
DEFAULT_TIMEOUT_S = 120.0
MAX_BYTES = 16 << 30
STORE_PREFIX = "peftnode-pairs"
EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
# The launcher's last resort beyond the rendezvous and process-group timeouts: the measurement itself.
MEASURE_ALLOWANCE_S = 600.0

REMEDIATION_SLOW = (
    "The network between these two nodes is slow. Likely causes: a NIC or cable at fault (`ethtool <if>` "
    "speed and errors, `ibstat` / `ibv_devinfo` link state and rate), a bad or misconfigured switch port "
    "(counters, MTU, flow control), IB/RoCE configuration (NCCL falling back to TCP sockets: rerun with "
    "NCCL_DEBUG=INFO and look for NET/IB; RoCE needs PFC/ECN and the right GID index), or the wrong "
    "interface: set NCCL_SOCKET_IFNAME (and NCCL_IB_HCA) to the fabric's. Run the pair again with each "
    "node against a known-good one to tell which node is at fault.")
REMEDIATION_CORRUPT = (
    "Values were corrupted in transit between the nodes: check the NICs and cables (`ethtool -S <if>` / "
    "`perfquery` error counters, symbol errors), switch port errors, and the GPUs' Xid errors in `dmesg`; "
    "pair each node with a known-good one to find the bad one.")
REMEDIATION_ERROR = (
    "Check that both nodes can reach the master address and port (firewall), that the same peftnode and "
    "torch are installed on both, and that GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name an interface both "
    "nodes share.")


# --- pure parts: flags, arithmetic, judging ---------------------------------------------------------------

_SIZE = re.compile(r"(\d+)([KMG]?)(I?B?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """``1M,64M`` -> bytes (binary units K/M/G, optional ``iB``/``B``); each a multiple of 4 (float32)."""
    sizes = []
    for item in text.split(","):
        tok = item.strip()
        m = _SIZE.fullmatch(tok)
        if not m:
            raise UsageError(f"--sizes: {tok!r} is not a size (e.g. 4096, 512K, 64M, 1G)")
        nbytes = int(m.group(1)) * _UNITS[m.group(2).upper()]
        if nbytes < 4 or nbytes % 4 or nbytes > MAX_BYTES:
            raise UsageError(f"--sizes: {tok!r} must be a multiple of 4 bytes from 4 to 16G")
        sizes.append(nbytes)
    return sizes


def parse_hosts(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",")]
    if len(hosts) != 2 or not all(hosts):
        raise UsageError(f"--hosts: {text!r} must name exactly two hosts, comma-separated (node-rank 0's first)")
    if hosts[0] == hosts[1]:
        raise UsageError(f"--hosts: {text!r} names the same host twice")
    return hosts


def size_row(nbytes: int, seconds: float, world: int) -> dict:
    algbw = algbw_gbps(nbytes, seconds)
    return {"bytes": nbytes, "time_s": seconds, "algbw_gbps": algbw, "busbw_gbps": allreduce_busbw(algbw, world)}


def best_row(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["busbw_gbps"]) if rows else None


def judge_pair(hosts: list[str], busbw: float, expected: float | None, floor_ratio: float,
               wrong: int = 0) -> tuple[str, str, str | None]:
    """(status, message, remediation) of a finished measurement: wrong values fail first; then busbw
    against expected x floor_ratio; without an expected figure the value is reported, not judged."""
    pair = f"{hosts[0]} <-> {hosts[1]}"
    if wrong:
        return ("fail", f"data corruption between {hosts[0]} and {hosts[1]}: {wrong} element(s) of the all-reduce "
                        "came back wrong", REMEDIATION_CORRUPT)
    if expected is None or expected <= 0:
        return ("warn", f"{pair}: all-reduce busbw {busbw:.4g} GB/s (not judged: no expected figure; set "
                        "node.perf.pair_busbw_gbps from a known-good pair)", None)
    ratio = busbw / expected
    floor = expected * floor_ratio
    if busbw < floor:
        return ("fail", f"{pair}: all-reduce busbw {busbw:.4g} GB/s is {ratio:.2f}x the expected {expected:.4g} GB/s "
                        f"(floor {floor_ratio:g}x = {floor:.4g} GB/s)", REMEDIATION_SLOW)
    return ("pass", f"{pair}: all-reduce busbw {busbw:.4g} GB/s ({ratio:.2f}x the expected {expected:.4g} GB/s)",
            None)


def node_of_rank(rank: int, node0_ranks: int) -> int:
    """torchrun gives node-rank 0 the first global ranks, node-rank 1 the rest."""
    return 0 if rank < node0_ranks else 1


def missing_message(hosts: list[str], missing: list[int], world: int, node0_ranks: int, timeout_s: float) -> str:
    nodes = sorted({node_of_rank(r, node0_ranks) for r in missing})
    who = " and ".join(hosts[n] for n in nodes)
    return (f"host {who} did not join within {timeout_s:g} s ({len(missing)} of {world} ranks missing: "
            f"{', '.join(map(str, missing))})")


def result(hosts: list[str], *, status: str, message: str, backend: str | None = None, world_size: int = 0,
           nproc_per_node: int = 0, rows: list[dict] | None = None, expected: float | None = None,
           floor_ratio: float = DEFAULT_FLOOR_RATIO, remediation: str | None = None, started_at: str = "",
           duration_s: float = 0.0) -> dict:
    rows = rows or []
    best = best_row(rows)
    return {"schema": SCHEMA, "hosts": list(hosts), "backend": backend, "world_size": world_size,
            "nproc_per_node": nproc_per_node, "status": status, "message": message,
            "busbw_gbps": best["busbw_gbps"] if best else None, "algbw_gbps": best["algbw_gbps"] if best else None,
            "expected_gbps": expected, "floor_ratio": floor_ratio, "sizes": rows, "remediation": remediation,
            "started_at": started_at, "duration_s": round(duration_s, 3)}


def exit_code(status: str) -> int:
    return EXIT_OK if status in ("pass", "warn") else EXIT_UNHEALTHY


def write_result(path: str, data: dict) -> None:
    """Atomic: a reader (the playbook's fetch) sees the old file or the whole new one."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, target)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --- flags ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="All-reduce bus bandwidth between two nodes (run by torchrun, or as "
                                       "the launcher that runs torchrun).")
    p.add_argument("--hosts", required=True, metavar="A,B", help="the two nodes, node-rank 0's first")
    p.add_argument("--json", required=True, metavar="FILE", help="where node-rank 0 writes the pair result")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="auto: nccl when CUDA is available, else gloo on CPU")
    p.add_argument("--expect-gbps", type=float, metavar="X", help="expected busbw (node.perf.pair_busbw_gbps)")
    p.add_argument("--floor-ratio", type=float, default=DEFAULT_FLOOR_RATIO, metavar="F",
                   help=f"fail below expected x F (default {DEFAULT_FLOOR_RATIO:g})")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"message sizes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=int, default=20, metavar="N", help="timed all-reduces per size (default 20)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed all-reduces per size (default 5)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"rendezvous / process-group / collective timeout (default {DEFAULT_TIMEOUT_S:g})")
    launcher = p.add_argument_group("launcher (outside torchrun only)")
    launcher.add_argument("--node-rank", type=int, choices=(0, 1), metavar="R")
    launcher.add_argument("--nproc-per-node", type=int, metavar="G")
    launcher.add_argument("--master-addr", metavar="A")
    launcher.add_argument("--master-port", type=int, metavar="P")
    return p


LAUNCHER_FLAGS = ("node_rank", "nproc_per_node", "master_addr", "master_port")


def parse_args(argv: list[str], under_torchrun: bool, writes_json: bool = True) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.host_list = parse_hosts(args.hosts)
    args.size_list = parse_sizes(args.sizes)
    for flag, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"{flag}: {value} must be at least {low}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout: {args.timeout:g} must be a positive number of seconds")
    if not 0 < args.floor_ratio <= 1:
        raise UsageError(f"--floor-ratio: {args.floor_ratio:g} must be in (0, 1]")
    if args.expect_gbps is not None and not args.expect_gbps > 0:
        raise UsageError(f"--expect-gbps: {args.expect_gbps:g} must be positive")
    if not args.json or Path(args.json).is_dir():
        raise UsageError(f"--json: {args.json!r} is not a file path")
    parent = Path(args.json).parent
    if writes_json and not parent.is_dir():
        raise UsageError(f"--json: cannot write {args.json!r}: directory {str(parent)!r} does not exist")
    given = [f"--{f.replace('_', '-')}" for f in LAUNCHER_FLAGS if getattr(args, f) is not None]
    if under_torchrun and given:
        raise UsageError(f"{', '.join(given)}: torchrun's own options; give them to torchrun, not to the module")
    if not under_torchrun:
        missing = [f"--{f.replace('_', '-')}" for f in LAUNCHER_FLAGS if getattr(args, f) is None]
        if missing:
            raise UsageError(f"not started by torchrun: give {', '.join(missing)} to launch it "
                             "(or run it as torchrun's module)")
        if args.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node: {args.nproc_per_node} must be at least 1")
    return args


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The module's own flags, as the launcher hands them to torchrun."""
    out = ["--hosts", ",".join(args.host_list), "--json", str(Path(args.json).resolve()), "--backend", args.backend,
           "--floor-ratio", repr(args.floor_ratio), "--sizes", args.sizes, "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--timeout", repr(args.timeout)]
    if args.expect_gbps is not None:
        out += ["--expect-gbps", repr(args.expect_gbps)]
    return out


# --- the worker (one per rank, under torchrun) -------------------------------------------------------------


def route_interface(addr: str, port: int) -> str | None:
    """The name of the local interface whose address routes to ``addr`` (no packet is sent)."""
    try:
        import psutil

        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        target = socket.getaddrinfo(addr, port, family, socket.SOCK_DGRAM)[0][4]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(target)
            local = s.getsockname()[0]
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address.split("%")[0] == local for a in addrs):
                return name
    except Exception:
        return None
    return None


def fill_contribution(buf, rank: int) -> None:
    """What this rank contributes to the checked all-reduce (every element rank+1)."""
    buf.fill_(float(rank + 1))


def progress(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Rank 0's result dict (status pass/warn/fail); the other ranks' is the same minus the file.
    Raises on errors (the caller turns them into an error result)."""
    import torch
    import torch.distributed as dist

    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    hosts, timeout = args.host_list, timedelta(seconds=args.timeout)
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("--backend nccl: CUDA is not available here (use gloo, or auto)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device = torch.device("cpu")
        if "GLOO_SOCKET_IFNAME" not in os.environ:
            ifname = route_interface(env["MASTER_ADDR"], int(env["MASTER_PORT"]))
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
    # torchrun's store (on the master node): every rank announces itself, rank 0 names who never came
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
    prefix = f"{STORE_PREFIX}/{env.get('TORCHELASTIC_RUN_ID', 'none')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.PrefixStore(prefix, store)
    store.set(f"joined/{rank}", socket.gethostname())
    node0_ranks = local_world if node_of_rank(rank, local_world) == 0 else world - local_world
    if rank == 0:
        keys = [f"joined/{r}" for r in range(world)]
        try:
            store.wait(keys, timeout)
        except Exception:
            missing = [r for r in range(world) if not store.check([keys[r]])]
            if missing:
                raise RuntimeError(missing_message(hosts, missing, world, node0_ranks, args.timeout)) from None
            raise
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timeout)
    try:
        def barrier():
            if backend == "nccl":
                dist.barrier(device_ids=[local_rank])
                torch.cuda.synchronize(device)
            else:
                dist.barrier()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        want = expected_sum(world)
        rows, wrong = [], 0
        for i, nbytes in enumerate(args.size_list):
            buf = torch.empty(nbytes // 4, dtype=torch.float32, device=device)

            def check(buf=buf) -> int:
                fill_contribution(buf, rank)
                dist.all_reduce(buf)
                return int((buf != want).sum().item())

            bad = check()
            buf.zero_()  # zeros stay zeros: the timed loop cannot overflow
            for _ in range(args.warmup):
                dist.all_reduce(buf)
            sync()
            barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                dist.all_reduce(buf)
            sync()
            elapsed = torch.tensor([(time.perf_counter() - t0) / args.iters], dtype=torch.float64, device=device)
            bad += check()  # after sustained traffic too
            counts = torch.tensor([float(bad)], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            dist.all_reduce(counts)
            wrong += int(counts.item())
            row = size_row(nbytes, float(elapsed.item()), world)
            rows.append(row)
            if rank == 0:
                progress(f"{hosts[0]} <-> {hosts[1]} ({backend}, {world} ranks): {nbytes / MiB:g} MiB "
                         f"{row['time_s'] * 1e3:.3f} ms, algbw {row['algbw_gbps']:.4g} GB/s, busbw "
                         f"{row['busbw_gbps']:.4g} GB/s ({i + 1}/{len(args.size_list)})"
                         + (f", {int(counts.item())} wrong" if counts.item() else ""))
        status, message, remediation = judge_pair(hosts, best_row(rows)["busbw_gbps"], args.expect_gbps,
                                                  args.floor_ratio, wrong)
        code = torch.tensor([float(exit_code(status))], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)  # both nodes exit alike
    finally:
        dist.destroy_process_group()
    return {"status": status, "message": message, "remediation": remediation, "backend": backend, "rows": rows,
            "world": world, "nproc": local_world}


def worker_main(args: argparse.Namespace, env: dict[str, str]) -> int:
    rank = int(env["RANK"])
    started_at, t0 = now_iso(), time.monotonic()
    common = {"expected": args.expect_gbps, "floor_ratio": args.floor_ratio, "started_at": started_at}
    try:
        got = measure(args, env)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        message = text[0] if text else type(exc).__name__
        if rank == 0:
            progress(f"error: {message}")
            write_result(args.json, result(
                args.host_list, status="error", message=f"{args.host_list[0]} <-> {args.host_list[1]}: {message}",
                world_size=int(env["WORLD_SIZE"]), nproc_per_node=int(env["LOCAL_WORLD_SIZE"]),
                remediation=REMEDIATION_ERROR, duration_s=time.monotonic() - t0,
                backend=None if args.backend == "auto" else args.backend, **common))
        else:
            print(f"{PROG}: rank {rank}: {message}", file=sys.stderr, flush=True)
        return EXIT_UNHEALTHY
    if rank == 0:
        write_result(args.json, result(args.host_list, status=got["status"], message=got["message"],
                                       backend=got["backend"], world_size=got["world"], nproc_per_node=got["nproc"],
                                       rows=got["rows"], remediation=got["remediation"],
                                       duration_s=time.monotonic() - t0, **common))
        progress(f"{got['status']}: {got['message']}")
    return exit_code(got["status"])


# --- the launcher (one per node, outside torchrun) ------------------------------------------------------------


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    from checks.finetune.launch import _SHIM  # runs torchrun, killed with the launcher
    from checks.proc import python_argv

    rdzv_timeout = math.ceil(args.timeout)
    return python_argv("-c", _SHIM, "--nnodes", "2", "--node-rank", str(args.node_rank), "--nproc-per-node",
                       str(args.nproc_per_node), "--master-addr", args.master_addr, "--master-port",
                       str(args.master_port), "--max-restarts", "0", "--rdzv-conf", f"timeout={rdzv_timeout}",
                       "-m", "checks.nccl.pairs", *worker_argv(args))


def launcher_message(hosts: list[str], node_rank: int, tail: str, timed_out: bool, deadline_s: float,
                     timeout_s: float, addr: str, port: int) -> str:
    """Why torchrun ended without a pair result, from its log's end."""
    other = hosts[1 - node_rank]
    if "clients joined" in tail or "waiting for clients" in tail:
        return f"host {other} did not join within {timeout_s:g} s (torchrun's rendezvous on {addr}:{port})"
    if "trying to connect" in tail or "Connection refused" in tail:
        return (f"host {other} did not start the rendezvous on {addr}:{port} within {timeout_s:g} s "
                "(is torchrun running there, is the port open?)")
    if timed_out:
        return f"torchrun did not finish within {deadline_s:g} s"
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return f"torchrun failed: {(errors or lines or ['no output'])[-1][:300]}"


def launcher_main(args: argparse.Namespace) -> int:
    from checks.finetune.launch import rank_env
    from checks.proc import Process

    json_path = Path(args.json)
    started_at, t0 = now_iso(), time.monotonic()
    deadline_s = 2 * args.timeout + MEASURE_ALLOWANCE_S
    before = json_path.stat().st_mtime_ns if json_path.exists() else None
    log = Path(json_path.parent, f".{json_path.name}.torchrun.log")
    p = Process(torchrun_argv(args), env=rank_env(), log_path=log)
    shown = 0
    try:
        while p.alive() and time.monotonic() - t0 < deadline_s:
            shown = _echo_log(log, shown)
            time.sleep(0.2)
        timed_out = p.alive()
        ended = p.finish(timed_out=timed_out)
        _echo_log(log, shown)
        tail = log.read_text(errors="replace")[-16384:]
    finally:
        if p.alive():
            p.finish(timed_out=True)
        log.unlink(missing_ok=True)
    wrote = json_path.exists() and json_path.stat().st_mtime_ns != before
    if args.node_rank == 0 and wrote:
        try:
            return exit_code(json.loads(json_path.read_text()).get("status", "error"))
        except (OSError, ValueError):
            pass
    if ended.code == 0 and not timed_out:
        return EXIT_OK  # node-rank 1: its ranks finished; node-rank 0 wrote the result
    message = launcher_message(args.host_list, args.node_rank, tail, timed_out, deadline_s, args.timeout,
                               args.master_addr, args.master_port)
    progress(f"error: {message}")
    if args.node_rank == 0 or "did not start the rendezvous" in message:
        write_result(args.json, result(args.host_list, status="error",
                                       message=f"{args.host_list[0]} <-> {args.host_list[1]}: {message}",
                                       backend=None if args.backend == "auto" else args.backend,
                                       world_size=2 * args.nproc_per_node, nproc_per_node=args.nproc_per_node,
                                       expected=args.expect_gbps, floor_ratio=args.floor_ratio,
                                       remediation=REMEDIATION_ERROR, started_at=started_at,
                                       duration_s=time.monotonic() - t0))
    return EXIT_UNHEALTHY


def _echo_log(log: Path, offset: int) -> int:
    """Pass torchrun's output on to this process's stderr as it comes (progress lines included)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    if data:
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()
    return offset + len(data)


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    under_torchrun = all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"))
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, under_torchrun,
                          writes_json=not under_torchrun or env.get("RANK") == "0")
    except UsageError as exc:
        if not under_torchrun or env.get("LOCAL_RANK") == "0":  # once per node, not once per rank
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return worker_main(args, env) if under_torchrun else launcher_main(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # run the imported module's main, not this __main__ copy: one module object
    from checks.nccl import pairs

    sys.exit(pairs.main())
