"""``peftnode-fleet-report`` / ``invoke fleet-report DIR`` on report files made by real ``peftnode-verify`` runs.

The session fixture runs verify five times side by side, each a node of a stand-in fleet, and writes the
run directory verify.yml would leave (run.json, <host>.json, <host>.junit.xml, a <host>.noreport.json, a
host with nothing). The nodes' GPUs are tests/helpers/fakegpu (NVML and torch's CUDA view stood in at
their probe boundaries; the judges and the report writers are the real ones):

    node01, node02  healthy (stand-in H100s at their table figures)
    node03          slow: every figure 0.85x (above the 0.8 floor, so its own perf checks pass)
    node04          another stack (driver 535.183.01, which its NVML reports) and 2 uncorrectable ECC errors on GPU 1
    node05          5 uncorrectable ECC errors on GPU 0
    node06          no report: unreachable (<host>.noreport.json)
    node07          in run.json, no file at all

Slurm cannot run here: a stand-in ``scontrol``/``sinfo`` (one script, two names) on PATH answers from a
state file and records every call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from checks.fleet.judge import normalise
from checks.fleet.slurm import REASON_MAX, drain_reason, parse_sinfo
from tests.test_console import _in_pty
from tests.test_junit import assert_valid, schemas  # noqa: F401  (schemas: the session fixture)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VERIFY = BIN / "peftnode-verify"
FLEET = BIN / "peftnode-fleet-report"
INVOKE = BIN / "invoke"
DATA = ROOT / "tests" / "data" / "fleet"
FAKEGPU = ROOT / "tests" / "helpers" / "fakegpu"
ONLY = "gpu.driver,gpu.inventory,gpu.ecc,python.packages,perf,nccl"
HOSTS = [f"node0{i}" for i in range(1, 8)]
NODES = {  # host: (stack file, stand-in GPU state)
    "node01": ("fleet-test.yml", {}),
    "node02": ("fleet-test.yml", {}),
    "node03": ("fleet-test.yml", {"scale": 0.85}),
    "node04": ("fleet-test-535.yml", {"driver": "535.183.01", "nvml": {"1": {"ecc_uncorrected": 2}}}),
    "node05": ("fleet-test.yml", {"nvml": {"0": {"ecc_uncorrected": 5}}}),
}
UNREACHABLE = "ssh: connect to host node06 port 22: No route to host"


def _script(path: Path, module_entry: str) -> list[str]:
    """The installed console script, else the same entry through the interpreter."""
    if path.exists():
        return [str(path)]
    return [sys.executable, "-c", f"import sys; from checks.cli import {module_entry}; sys.exit({module_entry}())"]


def _verify_node(run_dir: Path, host: str) -> subprocess.CompletedProcess:
    stack, state = NODES[host]
    env = {**os.environ, "PYTHONPATH": str(FAKEGPU), "PEFTNODE_TEST_FAKE_GPU": json.dumps(state)}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run([*_script(VERIFY, "main"), "--stack", str(DATA / stack), "--quick", "--no-progress",
                           "--only", ONLY, "--json", str(run_dir / f"{host}.json"),
                           "--junit", str(run_dir / f"{host}.junit.xml")],
                          cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """The run directory of the stand-in fleet (read-only for the tests: copy it to change it)."""
    out = tmp_path_factory.mktemp("fleet") / "run"
    out.mkdir()
    with ThreadPoolExecutor(max_workers=len(NODES)) as pool:
        done = dict(zip(NODES, pool.map(lambda h: _verify_node(out, h), NODES), strict=True))
    for host, proc in done.items():
        want = 1 if host in ("node04", "node05") else 0
        assert proc.returncode == want, (host, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    (out / "node06.noreport.json").write_text(json.dumps(  # as verify.yml writes it for an unreachable host
        {"schema": "peftnode.fleet.noreport/1", "host": "node06", "kind": "unreachable", "reason": UNREACHABLE,
         "rc": None, "stderr_tail": ""}))
    (out / "run.json").write_text(json.dumps(
        {"schema": "peftnode.fleet.run/1", "run_id": "test-run", "started_at": "2026-01-01T00:00:00Z",
         "stack": "fleet-test", "hosts": HOSTS}))
    return out


def fleet(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "GITHUB_STEP_SUMMARY")}
    return subprocess.run([*_script(FLEET, "fleet_main"), *args], cwd=cwd, env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def _report(run_dir: Path, host: str) -> dict:
    return json.loads((run_dir / f"{host}.json").read_text())


def _fleet_json(run_dir: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "fleet.json"
    proc = fleet(str(run_dir), "--json", str(out), *args, cwd=tmp_path)
    return proc, json.loads(out.read_text())


# --- the stand-in fleet is what it claims ------------------------------------------------------------------

@pytest.mark.slow
def test_the_stand_in_gpus_measure_healthy_and_slow_and_fail_where_told(run_dir):
    def figures(host):
        return {(r["name"], k): m["value"] for r in _report(run_dir, host)["results"]
                for k, m in r["measured"].items() if k in ("gemm_tflops", "copy_tbps", "h2d_gbps", "d2h_gbps", "busbw")}

    healthy, slow = figures("node01"), figures("node03")
    assert len(healthy) == 9 and healthy.keys() == slow.keys()  # 4 per-GPU figures x 2 GPUs, and the busbw
    for key, value in healthy.items():
        assert slow[key] == pytest.approx(0.85 * value, rel=1e-3), key
    # the slow node's own checks passed: above the floor, and its GPUs all alike
    assert {r["status"] for r in _report(run_dir, "node03")["results"] if r["group"] == "perf"} == {"pass"}
    bad = {r["name"]: r for r in _report(run_dir, "node05")["results"] if r["status"] == "fail"}
    assert list(bad) == ["gpu.ecc[gpu0]"]
    assert _report(run_dir, "node04")["stack"]["name"] == "fleet-test-535"


# --- the report ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_fleet_table_names_every_node_its_worst_status_and_the_causes(run_dir, tmp_path):
    proc, doc = _fleet_json(run_dir, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    status = {n["host"]: n["status"] for n in doc["nodes"]}
    assert status == {"node01": "pass", "node02": "pass", "node03": "warn", "node04": "fail", "node05": "fail",
                      "node06": "no report", "node07": "no report"}
    assert doc["counts"] == {"nodes": 7, "pass": 2, "warn": 1, "fail": 2, "error": 0, "no report": 2,
                             "pairs": 0, "pairs_failed": 0}
    assert (doc["verdict"], doc["exit_code"]) == ("UNHEALTHY", 1)
    nodes = {n["host"]: n for n in doc["nodes"]}
    assert nodes["node04"]["groups"]["gpu"] == "fail" and nodes["node04"]["groups"]["perf"] == "pass"
    assert nodes["node06"]["reason"] == f"no report: unreachable: {UNREACHABLE}"
    assert nodes["node07"]["reason"] == "no report: missing from the run directory"
    assert nodes["node01"]["report"] == "node01.json" and nodes["node06"]["report"] is None

    ecc = doc["causes"][0]  # the biggest cause first: one cause across two nodes and two different GPUs
    assert ecc["check"] == "gpu.ecc" and ecc["hosts"] == ["node04", "node05"]
    assert ecc["cause"] == ("gpu.ecc: GPU N (NVIDIA H100 80GB HBM3): N uncorrectable ECC error(s) since the driver "
                            "loaded")
    assert "RMA" in ecc["remediation"] and len(ecc["examples"]) == 2
    assert {c["cause"] for c in doc["causes"][1:]} == {
        "no report: missing from the run directory",
        "no report: unreachable: ssh: connect to host <host> port N: No route to host"}

    lines = proc.stdout.splitlines()
    row = {line.split()[0]: line.split() for line in lines if line[:6] in HOSTS}
    assert row["node04"][1] == "FAIL" and row["node06"][1:3] == ["NO", "REPORT"] and row["node01"][1] == "pass"
    assert "2 nodes: gpu.ecc: GPU N (NVIDIA H100 80GB HBM3): N uncorrectable ECC error(s) since the driver loaded" \
        in lines
    assert "  node04, node05" in lines
    assert lines[-1] == "7 nodes: 2 pass, 1 warn, 2 fail, 0 error, 2 no report -> UNHEALTHY (exit 1)"


@pytest.mark.slow
def test_a_slow_node_is_an_outlier_though_its_own_checks_passed(run_dir, tmp_path):
    _, doc = _fleet_json(run_dir, tmp_path)
    got = {(o["host"], o["metric"], o["gpu"]) for o in doc["outliers"]}
    per_gpu = {("node03", m, g) for m in ("gemm_tflops", "copy_tbps", "h2d_gbps", "d2h_gbps") for g in ("0", "1")}
    assert got == per_gpu | {("node03", "allreduce_busbw_gbps", None)}
    gemm = next(o for o in doc["outliers"] if o["metric"] == "gemm_tflops")
    assert gemm["ratio"] == pytest.approx(0.85) and gemm["threshold"] == 0.9
    assert gemm["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert doc["nodes"][0]["metrics"]["gemm_tflops"] == {"0": gemm["median"], "1": gemm["median"]}
    # 0.85 is not below 0.8 x the median
    _, loose = _fleet_json(run_dir, tmp_path, "--outlier-ratio", "0.8")
    assert loose["outliers"] == [] and {n["host"]: n["status"] for n in loose["nodes"]}["node03"] == "pass"
    text = fleet(str(run_dir), cwd=tmp_path).stdout
    assert "node03 gpu1: gemm_tflops 654.5 TFLOP/s = 0.85x the median 770 (NVIDIA H100 80GB HBM3)" in text


@pytest.mark.slow
def test_drift_from_the_majority_and_from_a_stack(run_dir, tmp_path):
    _, doc = _fleet_json(run_dir, tmp_path)
    assert doc["drift"] == [{"host": "node04", "component": "driver", "value": "535.183.01",
                             "majority": "550.54.15", "stack": None}]
    assert {n["host"]: n["versions"]["driver"] for n in doc["nodes"]}["node01"] == "550.54.15"
    _, seed = _fleet_json(run_dir, tmp_path, "--stack", "cu117")  # the seed stack pins driver 515.65.01
    drifted = {(d["host"], d["component"]): d for d in seed["drift"]}
    assert set(drifted) == {(h, "driver") for h in NODES}
    assert drifted[("node01", "driver")]["stack"] == "515.65.01"
    assert drifted[("node01", "driver")]["majority"] == "550.54.15"
    text = fleet(str(run_dir), "--stack", "cu117", cwd=tmp_path).stdout
    assert "node04: driver 535.183.01 (majority 550.54.15; stack 515.65.01)" in text


@pytest.mark.slow
def test_junit_one_suite_per_node_valid_against_the_xsd(run_dir, tmp_path, schemas):  # noqa: F811
    out = tmp_path / "fleet.xml"
    assert fleet(str(run_dir), "--junit", str(out), cwd=tmp_path).returncode == 1
    xml = out.read_text()
    assert_valid(schemas, xml)
    root = ET.fromstring(xml)
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == HOSTS
    for host in NODES:
        assert len(suites[host].findall("testcase")) == len(_report(run_dir, host)["results"])
    failed = [c.get("name") for c in suites["node05"].findall("testcase") if c.find("failure") is not None]
    assert failed == ["gpu.ecc[gpu0]"]
    (case,) = suites["node06"].findall("testcase")
    assert case.find("error").get("message") == f"no report: unreachable: {UNREACHABLE}"
    assert root.get("errors") == "2" and root.get("failures") == "2"


@pytest.mark.slow
def test_a_healthy_fleet_exits_0(run_dir, tmp_path):
    for host in ("node01", "node02"):
        shutil.copy(run_dir / f"{host}.json", tmp_path / f"{host}.json")
    proc = fleet(str(tmp_path), cwd=tmp_path)  # no run.json: the hosts are the reports found
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "2 nodes: 2 pass, 0 warn, 0 fail, 0 error, 0 no report -> HEALTHY (exit 0)"


@pytest.mark.slow
@pytest.mark.parametrize("content, why", [
    ('{"schema": "peftnode.verify.report/1", "results": [', "not JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    ('{"schema": "something else"}', "schema is 'something else'"),
    ("[1, 2]", "not a JSON object"),
])
def test_an_unreadable_report_is_that_nodes_no_report_not_a_traceback(run_dir, tmp_path, content, why):
    for host in ("node01", "node02"):
        shutil.copy(run_dir / f"{host}.json", tmp_path / f"{host}.json")
    bad = tmp_path / "node02.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc, doc = _fleet_json(tmp_path, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    node = {n["host"]: n for n in doc["nodes"]}["node02"]
    assert node["status"] == "no report"
    assert node["reason"].startswith(f"no report: unreadable node02.json: {why}"), node["reason"]


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/run"], "/nonexistent/run is not a directory"),
    ([], "the following arguments are required: DIR"),
    (["{tmp}", "--outlier-ratio", "0"], "--outlier-ratio: '0' is not a number above 0"),
    (["{tmp}", "--apply"], "--apply runs what --drain or --resume prints"),
    (["{tmp}", "--json", "{tmp}"], "is a directory"),
    (["{tmp}"], "holds no run.json and no <host>.json reports"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, args, needle):
    proc = fleet(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftnode fleet-report: error: ") and needle in lines[0], lines


# --- the terminal -----------------------------------------------------------------------------------------

def _wide_fleet(run_dir: Path, out: Path, copies: int) -> None:
    """``copies`` nodes made of the real reports (renamed), with more groups than fit at 80 columns."""
    sources = list(NODES)
    for i in range(copies):
        shutil.copy(run_dir / f"{sources[i % len(sources)]}.json", out / f"gpu-node-{i:03d}.json")


@pytest.mark.slow
@pytest.mark.parametrize("copies", [0, 60])
def test_the_table_fits_80_columns_in_a_real_terminal(run_dir, tmp_path, copies):
    target = run_dir
    if copies:
        target = tmp_path / "wide"
        target.mkdir()
        _wide_fleet(run_dir, target, copies)
        report = json.loads((target / "gpu-node-000.json").read_text())
        for group in ("system", "python-extra", "cuda", "finetune", "jupyter", "dcgm"):  # every verify group, and more
            report["results"].append({**report["results"][0], "name": f"{group}.x", "group": group})
        (target / "gpu-node-000.json").write_text(json.dumps(report))
    code, lines = _in_pty([*_script(FLEET, "fleet_main"), str(target)], 80, rows=200)
    assert code == 1
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    hosts = [f"gpu-node-{i:03d}" for i in range(copies)] if copies else HOSTS
    for host in hosts:  # every node's name whole at the start of its row
        assert any(line.startswith(host + " ") for line in lines), host
    if copies:
        assert any(line.startswith("groups: ") and "syst=system" in line for line in lines)


# --- Slurm: a stand-in scontrol/sinfo --------------------------------------------------------------------------

STAND_IN = textwrap.dedent('''\
    #!{python}
    """Stand-in for Slurm's scontrol and sinfo (tests/test_fleet.py): records argv, answers from a state file."""
    import json, os, sys
    name = os.path.basename(sys.argv[0])
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
    state = json.load(open(os.environ["FAKE_SLURM_STATE"]))
    if name == "sinfo":
        assert sys.argv[1:] == ["-h", "-N", "-o", "%N|%t|%E"], sys.argv
        for node, (st, reason) in state.items():
            print(f"{{node}}|{{st}}|{{reason or 'none'}}")
            print(f"{{node}}|{{st}}|{{reason or 'none'}}")  # a second partition lists it again
    elif sys.argv[1:2] == ["update"]:
        sys.exit(0 if sys.argv[2].split("=", 1)[1] in state else 1)
    else:
        sys.exit(2)
''')


@pytest.fixture
def slurm(tmp_path):
    """(env with the stand-in first on PATH, the state file, a function returning the recorded calls)."""
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(0o755)
    (bindir / "sinfo").symlink_to("scontrol")
    state, log = tmp_path / "slurm-state.json", tmp_path / "slurm-log.jsonl"
    state.write_text(json.dumps({
        "node01": ["drain", "bios update, ticket 123"],  # passes; held by someone else: never resumed
        "node02": ["drain", "peftnode: gpu.ecc: GPU 3 (NVIDIA H100 80GB HBM3): 1 uncorrectable"],  # passes now
        "node03": ["idle", ""], "node04": ["mix", ""],
        "node05": ["down*", "Not responding"],  # fails; held by someone else: not drained over it
        "node06": ["idle", ""], "node07": ["alloc", ""],
    }))
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_STATE": str(state),
           "FAKE_SLURM_LOG": str(log)}

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


@pytest.mark.slow
def test_drain_prints_nhc_style_lines_and_leaves_others_reasons_alone(run_dir, tmp_path, slurm):
    env, calls = slurm
    proc = fleet(str(run_dir), "--drain", cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    drains = [line for line in out if line.startswith("scontrol ")]
    assert drains == [
        "scontrol update NodeName=node04 State=DRAIN "
        "'Reason=peftnode: gpu.ecc: GPU 1 (NVIDIA H100 80GB HBM3): 2 uncorrect...'",
        "scontrol update NodeName=node06 State=DRAIN "
        "'Reason=peftnode: no report: unreachable: ssh: connect to host node06...'",
        "scontrol update NodeName=node07 State=DRAIN 'Reason=peftnode: no report: missing from the run directory'",
    ]
    assert any(line.startswith("# node05: left alone: Slurm shows it down for someone else's reason (Not responding)")
               for line in out), out
    assert [c[0] for c in calls()] == ["sinfo"]  # printed, not run


@pytest.mark.slow
def test_drain_apply_runs_scontrol_with_a_reason_of_at_most_64_characters(run_dir, tmp_path, slurm):
    env, calls = slurm
    proc = fleet(str(run_dir), "--drain", "--apply", cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr
    updates = [c for c in calls() if c[0] == "scontrol"]
    assert [c[1:4] for c in updates] == [["update", f"NodeName={h}", "State=DRAIN"] for h in ("node04", "node06",
                                                                                            "node07")]
    for call in updates:
        reason = call[4].removeprefix("Reason=")
        assert reason.split(" ", 1)[0] == "peftnode:" and len(reason) <= REASON_MAX, reason
    assert updates[0][4] == "Reason=peftnode: gpu.ecc: GPU 1 (NVIDIA H100 80GB HBM3): 2 uncorrect..."


@pytest.mark.slow
def test_resume_only_the_nodes_peftnode_drained_that_now_pass(run_dir, tmp_path, slurm):
    env, calls = slurm
    proc = fleet(str(run_dir), "--resume", cwd=tmp_path, env=env)
    out = proc.stdout.splitlines()
    assert [line for line in out if line.startswith("scontrol ")] == [
        "scontrol update NodeName=node02 State=RESUME"]
    assert any(line.startswith("# node01: passes, but Slurm shows it drain for someone else's reason") for line in out)
    proc = fleet(str(run_dir), "--resume", "--apply", cwd=tmp_path, env=env)
    assert [c for c in calls() if c[0] == "scontrol"] == [["scontrol", "update", "NodeName=node02", "State=RESUME"]]
    assert proc.returncode == 1  # the fleet still has failing nodes


@pytest.mark.slow
def test_node_names_from_the_reports_hostname(run_dir, tmp_path, slurm):
    env, _ = slurm
    hostname = _report(run_dir, "node04")["host"]["hostname"].split(".")[0]
    out = fleet(str(run_dir), "--drain", "--node-names", "hostname", cwd=tmp_path, env=env).stdout
    # the stand-in nodes all ran on this machine: their reports name it, which the stand-in Slurm does not know
    assert f"# {hostname}: not known to Slurm (sinfo does not list it): not drained" in out.splitlines()
    assert "# node07: not known" not in out and "NodeName=node07" in out  # no report: the inventory name


@pytest.mark.slow
def test_apply_or_resume_without_slurm_is_a_usage_error(run_dir, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {"PATH": str(empty)}
    for args, needle in ((["--drain", "--apply"], "--apply: scontrol not found on PATH"),
                         (["--resume"], "sinfo not found on PATH")):
        proc = fleet(str(run_dir), *args, cwd=tmp_path, env=env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [f"peftnode fleet-report: error: {proc.stderr.split('error: ')[1]}"
                                                    .strip()]
        assert needle in proc.stderr
    proc = fleet(str(run_dir), "--drain", cwd=tmp_path, env=env)  # printing only: said, then every failing node
    assert proc.returncode == 1 and "warning: sinfo not found" in proc.stderr
    assert proc.stdout.count("State=DRAIN") == 4


# --- invoke -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_invoke_fleet_report_is_the_console_script(run_dir, tmp_path):
    out = tmp_path / "via-invoke.json"
    proc = subprocess.run([str(INVOKE), "-r", str(ROOT), "fleet-report", str(run_dir), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["counts"]["no report"] == 2
    bad = subprocess.run([str(INVOKE), "-r", str(ROOT), "fleet-report", str(run_dir), "--outlier-ratio", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--outlier-ratio: '2'" in bad.stderr


# --- pure parts ---------------------------------------------------------------------------------------------

def test_normalise_strips_what_differs_between_gpus_and_nodes_but_keeps_the_xid():
    a = normalise("GPU 3 (00000000:3B:00.0, GPU-12345678-1234-1234-1234-123456789abc): Xid 79 on gpu-a01, 4 times",
                  ["gpu-a01"])
    b = normalise("GPU 0 (00000000:18:00.0, GPU-87654321-1234-1234-1234-123456789abc): Xid 79 on gpu-b17, 1 times",
                  ["gpu-b17"])
    assert a == b == "GPU N (<pci>, GPU-<uuid>): Xid 79 on <host>, N times"
    assert normalise("Xid 48 on gpu0") != normalise("Xid 79 on gpu0")
    assert normalise("H100 80GB 1.5 TB/s") == "H100 80GB N TB/s"  # digits inside words stay


def test_drain_reason_is_one_printable_line_of_at_most_64_characters():
    long = drain_reason("gpu.ecc", "x" * 200 + "\nsecond line")
    assert len(long) == REASON_MAX and long.endswith("...") and "\n" not in long
    assert drain_reason("gpu.xid", "Xid 79: GPU fell off the bus") == "peftnode: gpu.xid: Xid 79: GPU fell off the bus"
    assert drain_reason("a", "é\tb") == "peftnode: a: ? b"


def test_sinfo_states_drop_flags_and_keep_the_held_partition():
    got = parse_sinfo("n1|idle|none\nn1|drain*|peftnode: gpu.ecc: x|y\nn2|mix~|(null)\nbad line\n")
    assert (got["n1"].state, got["n1"].reason) == ("drain", "peftnode: gpu.ecc: x|y")
    assert (got["n2"].state, got["n2"].reason) == ("mix", "")


def _pair(a: str, b: str, status: str, busbw: float) -> dict:
    return {"schema": "peftnode.fleet.pair/1", "hosts": [a, b], "backend": "nccl", "world_size": 16,
            "nproc_per_node": 8, "status": status, "message": f"busbw {busbw} GB/s", "busbw_gbps": busbw,
            "algbw_gbps": busbw * 16 / 30, "expected_gbps": 40.0, "floor_ratio": 0.7, "sizes": [],
            "started_at": "2026-12-02T16:00:00Z", "duration_s": 3.0}


@pytest.mark.slow
def test_a_failing_pair_makes_the_fleet_unhealthy_and_the_node_in_two_is_the_suspect(run_dir, tmp_path):
    hosts = ["n1", "n2", "n3", "n4"]
    for host in hosts:  # four healthy nodes: only the pairs can make this fleet unhealthy
        shutil.copy(run_dir / "node01.json", tmp_path / f"{host}.json")
    (tmp_path / "pairs").mkdir()
    ring = [("n1", "n2", "pass", 41.0), ("n2", "n3", "fail", 9.0), ("n3", "n4", "fail", 8.5),
            ("n4", "n1", "pass", 40.2)]
    for a, b, status, bw in ring[:1] + ring[3:]:
        (tmp_path / "pairs" / f"{a}--{b}.json").write_text(json.dumps(_pair(a, b, status, bw)))
    healthy = fleet(str(tmp_path), cwd=tmp_path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "0 of 2 pairs failing" in healthy.stdout.splitlines()[-1]
    for a, b, status, bw in ring[1:3]:
        (tmp_path / "pairs" / f"{a}--{b}.json").write_text(json.dumps(_pair(a, b, status, bw)))
    proc, data = _fleet_json(tmp_path, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert data["counts"]["pairs_failed"] == 2 and data["verdict"] == "UNHEALTHY"
    assert data["pair_suspects"] == [{"host": "n3", "failing_pairs": 2}]
    assert "Likely link fault (NIC, cable, switch port) at: n3 (2 failing pairs)" in proc.stdout
    assert "n2 + n3: FAIL" in proc.stdout


@pytest.mark.slow
def test_the_fleet_json_written_into_the_run_directory_is_not_read_as_a_node(run_dir, tmp_path):
    for host in ("node01", "node02"):
        shutil.copy(run_dir / f"{host}.json", tmp_path / f"{host}.json")
    first = fleet(str(tmp_path), "--json", str(tmp_path / "fleet.json"), cwd=tmp_path)  # as verify.yml does
    assert first.returncode == 0, first.stdout + first.stderr
    (tmp_path / "out").mkdir()
    again, data = _fleet_json(tmp_path, tmp_path / "out")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [n["host"] for n in data["nodes"]] == ["node01", "node02"]


def test_a_cause_keeps_a_subject_that_is_not_a_gpu():
    from checks.fleet.judge import cause_check

    gpu = {"index": 1, "uuid": "GPU-1", "pci_bus_id": "00000000:3B:00.0", "serial": "1"}
    assert cause_check({"check": "gpu.ecc[gpu1]", "gpu": gpu}) == "gpu.ecc"
    assert cause_check({"check": "system.disk[data]", "gpu": None}) == "system.disk[data]"
    assert cause_check({"check": "python.packages[torch]"}) == "python.packages[torch]"


def _hosts_the_slow_way(text: str, hosts: list[str]) -> str:
    """The rule as a regex per host, longest first: what the one-pass replacement must agree with."""
    import re

    for host in sorted((h for h in hosts if h), key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", "<host>", text)
    return text


def test_host_names_are_replaced_in_one_pass_as_a_regex_per_host_would():
    import random

    from checks.fleet.judge import _host_replacer

    hosts = ["node01", "node1", "gpu-a01", "gpu-a01.cluster.example", "10.0.0.7", "n:odd", "node01x"]
    replace = _host_replacer(tuple(hosts))
    assert replace("ssh to node01.cluster failed; node01. xnode01 node01x node1-b") == \
        "ssh to <host>.cluster failed; <host>. xnode01 <host> node1-b"
    assert replace("gpu-a01.cluster.example and gpu-a01.other and 10.0.0.7:22 and n:odd") == \
        "<host> and <host>.other and <host>:22 and <host>"
    rng = random.Random(9)
    pieces = hosts + ["x", ".", "-", " ", ":", "(", ")", "GPU 3", "node", "01", "a01", "cluster", "_"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        assert replace(text) == _hosts_the_slow_way(text, hosts), text
