"""The two-node all-reduce (checks/nccl/pairs.py): the judge and the flags in-process, then real torchrun.

Each "node" is its own torchrun launcher process (node-rank 0 and 1, master 127.0.0.1 on a free port),
started exactly as two nodes would start them; the ranks run gloo on CPU over loopback. Faults (a rank
that contributes a wrong value, a rank that never joins) are injected into the ranks from outside through
tests/helpers/faults/sitecustomize.py; production code carries no hook.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from checks.nccl import pairs
from checks.nccl.pairs import judge_pair, missing_message, parse_hosts, parse_sizes, size_row
from checks.proc import child_env
from checks.registry import UsageError
from tests.helpers.procs import default_sigint

FAULTS_DIR = Path(__file__).resolve().parent / "helpers" / "faults"
HOSTS = ["nodea", "nodeb"]
KEYS = {"schema", "hosts", "backend", "world_size", "nproc_per_node", "status", "message", "busbw_gbps",
        "algbw_gbps", "expected_gbps", "floor_ratio", "sizes", "remediation", "started_at", "duration_s"}
PROC_TIMEOUT_S = 240  # the test's own last resort; the code under test must end far sooner
MiB = 1 << 20

# --- the judge and the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("world, factor", [(2, 1.0), (4, 1.5), (16, 1.875)])
def test_busbw_is_algbw_times_2_n_minus_1_over_n(world, factor):
    row = size_row(64 * MiB, 0.05, world)
    assert row["algbw_gbps"] == pytest.approx(64 * MiB / 0.05 / 1e9, rel=1e-3)
    assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * factor, rel=1e-3)
    assert row["bytes"] == 64 * MiB and row["time_s"] == 0.05


def test_judge_boundaries():
    at_floor = judge_pair(HOSTS, 80.0, 100.0, 0.8)
    below = judge_pair(HOSTS, 79.99, 100.0, 0.8)
    assert at_floor[0] == "pass" and at_floor[2] is None
    assert below[0] == "fail"
    assert "79.99 GB/s is 0.80x the expected 100 GB/s" in below[1]
    for cause in ("NIC", "cable", "switch port", "RoCE", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA"):
        assert cause in below[2]
    assert judge_pair(HOSTS, 50.0, 100.0, 0.5)[0] == "pass"  # the floor ratio is the caller's
    assert judge_pair(HOSTS, 49.0, 100.0, 0.5)[0] == "fail"


def test_judge_without_expectation_reports_and_warns():
    status, message, remediation = judge_pair(HOSTS, 12.5, None, 0.8)
    assert status == "warn" and "12.5 GB/s" in message and "node.perf.pair_busbw_gbps" in message
    assert remediation is None


def test_judge_wrong_values_fail_whatever_the_speed():
    status, message, remediation = judge_pair(HOSTS, 1000.0, 1.0, 0.8, wrong=3)
    assert status == "fail"
    assert message.startswith("data corruption between nodea and nodeb")
    assert "3 element(s)" in message and "cable" in remediation


def test_missing_message_names_the_host_of_the_missing_ranks():
    assert missing_message(HOSTS, [2, 3], 4, 2, 10).startswith("host nodeb did not join within 10 s")
    assert missing_message(HOSTS, [1], 4, 2, 5).startswith("host nodea did not join")
    assert "host nodea and nodeb" in missing_message(HOSTS, [1, 3], 4, 2, 5)


def test_sizes_and_hosts_parse():
    assert parse_sizes("1M,64M") == [MiB, 64 * MiB]
    assert parse_sizes("4096, 512K,1G,2MiB") == [4096, 512 << 10, 1 << 30, 2 * MiB]
    assert parse_hosts(" a , b ") == ["a", "b"]
    for bad in ("", "1X", "3", "-4", "1M,,2M", "17G"):
        with pytest.raises(UsageError, match="--sizes"):
            parse_sizes(bad)


@pytest.mark.parametrize("argv, says", [
    (["--hosts", "a,b", "--json", "x.json", "--sizes", "64Q"], "--sizes: '64Q' is not a size"),
    (["--hosts", "a,b", "--json", "x.json", "--sizes", "6"], "multiple of 4"),
    (["--hosts", "a", "--json", "x.json"], "--hosts: 'a' must name exactly two hosts"),
    (["--hosts", "a,b,c", "--json", "x.json"], "exactly two hosts"),
    (["--hosts", "a,a", "--json", "x.json"], "the same host twice"),
    (["--hosts", "a,b", "--json", "x.json", "--iters", "0"], "--iters"),
    (["--hosts", "a,b", "--json", "x.json", "--floor-ratio", "2"], "--floor-ratio"),
    (["--hosts", "a,b"], "--json"),
    (["--hosts", "a,b", "--json", "/nonexistent/p.json"], "directory '/nonexistent' does not exist"),
    (["--hosts", "a,b", "--json", "x.json"], "not started by torchrun: give --node-rank"),
])
def test_usage_errors_are_one_line_exit_2(argv, says, capsys):
    assert pairs.main(argv, env={}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftnode pairs: error: ") and says in err


def test_launcher_flags_are_refused_under_torchrun(capsys):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "x"}
    assert pairs.main(["--hosts", "a,b", "--json", "x.json", "--node-rank", "0"], env=env) == 2
    assert "--node-rank: torchrun's own options" in capsys.readouterr().err


def test_usage_error_from_the_real_command_line(tmp_path):
    ended = subprocess.run([sys.executable, "-m", "checks.nccl.pairs", "--hosts", "a", "--json",
                            str(tmp_path / "p.json")], capture_output=True, text=True, env=child_env(), timeout=60)
    assert ended.returncode == 2
    assert ended.stderr.splitlines() == ["peftnode pairs: error: --hosts: 'a' must name exactly two hosts, "
                                         "comma-separated (node-rank 0's first)"]
    assert not (tmp_path / "p.json").exists()


# --- real torchrun, two "nodes" on loopback ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                                preexec_fn=default_sigint, start_new_session=True)


def _end(p: subprocess.Popen) -> int:
    try:
        return p.wait(timeout=PROC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(p.pid).children(recursive=True):
            child.kill()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"pid {p.pid} ({' '.join(p.args[-8:])}) did not end within {PROC_TIMEOUT_S} s")


def run_pair(tmp_path, *flags: str, nproc: int = 1, launcher: bool = False, nodes=(0, 1), faults: str = "",
             timeout: float = 15) -> dict:
    """Start one launcher process per node (torchrun itself, or pairs' own launcher) and wait for both.
    Returns node-rank 0's JSON (None when absent) with each node's exit status and output."""
    port = free_port()
    out = tmp_path / "pair.json"
    env = child_env({"OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env["PYTHONPATH"]])
    env.pop("GLOO_SOCKET_IFNAME", None)  # the module picks the interface that routes to the master
    if faults:
        env["PYTHONPATH"] = os.pathsep.join([str(FAULTS_DIR), env["PYTHONPATH"]])
        env["PEFTNODE_TEST_FAULTS"] = faults
    module = ["--hosts", ",".join(HOSTS), "--json", str(out), "--sizes", "1M,64M", "--iters", "5", "--warmup", "2",
              "--timeout", str(timeout), *flags]
    procs = {}
    started = time.monotonic()
    for node in sorted(nodes, reverse=True):  # node-rank 1 first: the master is the late one
        node_flags = ["--node-rank", str(node), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                      "--master-port", str(port)]
        if launcher:
            argv = [sys.executable, "-m", "checks.nccl.pairs", *node_flags, *module]
        else:
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", *node_flags,
                    "-m", "checks.nccl.pairs", *module]
        procs[node] = _start(argv, env, tmp_path / f"node{node}.log")
    codes = {node: _end(p) for node, p in procs.items()}
    got = json.loads(out.read_text()) if out.exists() else None
    return {"json": got, "codes": codes, "wall_s": time.monotonic() - started,
            "logs": {n: (tmp_path / f"node{n}.log").read_text(errors="replace") for n in procs}}


def assert_measured(got: dict, world: int, nproc: int) -> None:
    assert set(got) == KEYS
    assert got["schema"] == "peftnode.fleet.pair/1" and got["hosts"] == HOSTS
    assert got["backend"] == "gloo" and got["world_size"] == world and got["nproc_per_node"] == nproc
    assert [s["bytes"] for s in got["sizes"]] == [MiB, 64 * MiB]
    for row in got["sizes"]:
        assert row["time_s"] > 0 and row["busbw_gbps"] > 0
        assert row["algbw_gbps"] == pytest.approx(row["bytes"] / row["time_s"] / 1e9, rel=1e-3)
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * 2 * (world - 1) / world, rel=1e-3)
    assert got["busbw_gbps"] == max(s["busbw_gbps"] for s in got["sizes"]) > 0
    assert got["floor_ratio"] == 0.8
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["started_at"]) and got["duration_s"] > 0


@pytest.mark.slow
def test_pair_passes_above_the_floor_and_prints_progress(tmp_path):
    run = run_pair(tmp_path, "--expect-gbps", "0.001")
    got = run["json"]
    assert run["codes"] == {0: 0, 1: 0}, run["logs"]
    assert_measured(got, world=2, nproc=1)
    assert got["status"] == "pass" and got["expected_gbps"] == 0.001 and got["remediation"] is None
    assert got["message"].startswith("nodea <-> nodeb: all-reduce busbw ")
    progress = re.findall(r"peftnode pairs: nodea <-> nodeb \(gloo, 2 ranks\): (\d+) MiB .* busbw [\d.]+ GB/s "
                          r"\((\d)/2\)", run["logs"][0])
    assert progress == [("1", "1"), ("64", "2")]
    assert "peftnode pairs: nodea" not in run["logs"][1]  # rank 0 alone reports
    print("\ngloo loopback busbw: " + ", ".join(f"{s['bytes'] // MiB} MiB {s['busbw_gbps']:.3f} GB/s"
                                                 for s in got["sizes"]))


@pytest.mark.slow
def test_pair_below_the_floor_fails_with_remediation_through_the_launcher(tmp_path):
    run = run_pair(tmp_path, "--expect-gbps", "1e6", "--floor-ratio", "0.5", launcher=True)
    got = run["json"]
    assert run["codes"] == {0: 1, 1: 1}, run["logs"]  # both nodes agree on the outcome
    assert_measured({**got, "floor_ratio": 0.8}, world=2, nproc=1)
    assert got["status"] == "fail" and got["floor_ratio"] == 0.5 and got["expected_gbps"] == 1e6
    assert "is 0.00x the expected 1e+06 GB/s (floor 0.5x" in got["message"]
    assert "NCCL_SOCKET_IFNAME" in got["remediation"] and "switch port" in got["remediation"]
    assert "(2/2)" in run["logs"][0]  # the launcher passes torchrun's progress on


@pytest.mark.slow
def test_pair_without_expectation_warns_with_the_value(tmp_path):
    got = run_pair(tmp_path)["json"]
    assert_measured(got, world=2, nproc=1)
    assert got["status"] == "warn" and got["expected_gbps"] is None
    assert f"busbw {got['busbw_gbps']:.4g} GB/s (not judged" in got["message"]


@pytest.mark.slow
def test_two_ranks_per_node_make_a_world_of_four(tmp_path):
    run = run_pair(tmp_path, "--expect-gbps", "0.001", nproc=2)
    assert run["codes"] == {0: 0, 1: 0}, run["logs"]
    assert_measured(run["json"], world=4, nproc=2)
    assert run["json"]["status"] == "pass"


@pytest.mark.slow
def test_a_wrong_sum_is_data_corruption(tmp_path):
    run = run_pair(tmp_path, "--expect-gbps", "0.001", faults="pairs.rank1:corrupt")
    got = run["json"]
    assert run["codes"][0] == 1
    assert got["status"] == "fail"
    assert got["message"].startswith("data corruption between nodea and nodeb: ")
    assert "NICs and cables" in got["remediation"]
    assert len(got["sizes"]) == 2  # still measured


@pytest.mark.slow
def test_a_node_that_never_starts_is_named_by_the_launcher(tmp_path):
    run = run_pair(tmp_path, launcher=True, nodes=(0,), timeout=5)
    got = run["json"]
    assert run["codes"] == {0: 1}
    assert got["status"] == "error" and set(got) == KEYS and got["busbw_gbps"] is None and got["sizes"] == []
    assert re.fullmatch(r"nodea <-> nodeb: host nodeb did not join within 5 s \(torchrun's rendezvous on "
                        r"127\.0\.0\.1:\d+\)", got["message"])
    assert "peftnode pairs: error: host nodeb did not join" in run["logs"][0]
    # no hang: torchrun's own rendezvous would wait 600 s, past PROC_TIMEOUT_S (a test failure)


@pytest.mark.slow
def test_the_second_node_names_a_master_that_never_starts(tmp_path):
    run = run_pair(tmp_path, launcher=True, nodes=(1,), timeout=5)
    assert run["codes"] == {1: 1}
    assert run["json"]["status"] == "error"
    assert "host nodea did not start the rendezvous on 127.0.0.1:" in run["json"]["message"]


@pytest.mark.slow
def test_a_worker_that_never_joins_is_named_after_the_timeout(tmp_path):
    run = run_pair(tmp_path, faults="pairs.rank1:absent", timeout=8)
    got = run["json"]
    assert run["codes"][0] == 1 and run["codes"][1] != 0
    assert got["status"] == "error"
    assert got["message"] == "nodea <-> nodeb: host nodeb did not join within 8 s (1 of 2 ranks missing: 1)"
    assert "GLOO_SOCKET_IFNAME" in got["remediation"]
