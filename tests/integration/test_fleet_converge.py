"""Tier 3, the fleet: playbooks/verify.yml run for real against two booted containers and a node that
cannot be reached, then `peftnode-fleet-report` on what came back.

Each container stands for a provisioned node: its stack venv is made from the container's own Python
3.11.2 (bookworm's, the version the converge stack pins) and the wheelhouse (torch CPU, invoke, ...),
which is all verify.yml expects of a node. verify.yml then does its whole job: builds the wheel of this
checkout once, copies it (sha256 checked on the node), installs it, writes the manifest, runs
`invoke verify --only system` on both nodes at once and fetches the reports. Node b is made to fail a real
check (its manifest expects more free disk than any disk has); node c does not exist (nothing listens on
its port). With peftnode_verify_pairs the two containers measure the all-reduce together, torchrun with
gloo on the host's loopback (the containers share its network namespace), rendezvous on node a.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration import container as ct
from tests.integration import materials as mt

pytestmark = pytest.mark.converge

ROOT = ct.ROOT
RUN_ID = "fleet-test"
VERIFY = ["--only", "system"]
# node a's manifest sets the pair's expected busbw and floor (node.perf): a low figure gloo on loopback clears
PAIR_PERF = {"pair_busbw_gbps": 0.001, "floor_ratio": 0.5}


def _provision_venv(node: ct.Container, wheelhouse: Path) -> None:
    """What site.yml's python and venv roles leave, the quick way: a venv of the node's Python with the
    wheels verify and torchrun need, offline from the wheelhouse."""
    inside = Path("/root/wheelhouse")
    target = node.tree / inside.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    for whl in wheelhouse.glob("*.whl"):
        try:
            os.link(whl, target / whl.name)
        except OSError:
            subprocess.run(["cp", str(whl), str(target / whl.name)], check=True)
    pip_wheel = next(inside / w.name for w in wheelhouse.glob("pip-*.whl"))
    venv = mt.VENV_PATH
    node.ssh(f"mkdir -p /data && python3 -m venv --without-pip {venv} && "
             f"{venv}/bin/python {pip_wheel}/pip install --quiet --disable-pip-version-check --no-index "
             f"--find-links {inside} pip torch invoke pyyaml packaging rich psutil prometheus_client",
             timeout=900)


@pytest.fixture(scope="module")
def nodes(rootfs_tarball, wheelhouse_dir):
    started: list[ct.Container] = []
    try:
        for _ in range(2):
            started.append(ct.Container().start(rootfs_tarball))
        errors: list[BaseException] = []

        def provision(c):
            try:
                _provision_venv(c, wheelhouse_dir)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=provision, args=(c,)) for c in started]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        yield started
    finally:
        for c in started:
            c.stop()


@pytest.fixture(scope="module")
def fleet_run(nodes, tiny_model, tmp_path_factory):
    a, b = nodes
    work = tmp_path_factory.mktemp("fleet")
    stack = mt.write_stack(work / "stack.yml", mt.converge_stack(tiny_model[1]))
    common = ("ansible_host=127.0.0.1 ansible_user=root ansible_python_interpreter=/usr/bin/python3 "
              "ansible_ssh_common_args='-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no' "
              "peftnode_pair_addr=127.0.0.1")
    inventory = work / "inventory.ini"
    inventory.write_text(
        "[fleet]\n"
        f"nodea ansible_port={a.port} ansible_ssh_private_key_file={a.key} {common} "
        f"peftnode_node_expectations='{json.dumps({'perf': PAIR_PERF})}'\n"
        f"nodeb ansible_port={b.port} ansible_ssh_private_key_file={b.key} {common} "
        "peftnode_node_expectations='{\"min_free_gib\": {\"data\": 900000}}'\n"
        f"nodec ansible_port={ct.free_port()} ansible_ssh_private_key_file={a.key} {common}\n"
    )
    extra = {
        "peftnode_stack_name": str(stack),
        "peftnode_gpu": False,
        "peftnode_verify_pairs": True,
        "peftnode_fleet_run_id": RUN_ID,
        "peftnode_fleet_reports_dir": str(work / "reports"),
        "peftnode_fleet_verify_args": VERIFY,
        "peftnode_fleet_verify_timeout": 600,
        "peftnode_fleet_pip_args": ["--no-index"],
        "peftnode_pair_port": ct.free_port(),
        "peftnode_pair_env": {"GLOO_SOCKET_IFNAME": "lo"},
        "peftnode_pair_join_timeout": 120,
    }
    vars_file = work / "vars.json"
    vars_file.write_text(json.dumps(extra))
    argv = [ct.ansible_bin("ansible-playbook"), "-i", str(inventory), "-e", f"@{vars_file}", "--forks", "5",
            str(ROOT / "playbooks" / "verify.yml")]
    run = ct.PlaybookProcess(a, argv, 1500, work / "verify.log").wait()
    return run, work / "reports" / RUN_ID


def _fleet_report(run_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "checks.fleet", str(run_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})


def test_verify_yml_fetches_both_reports_and_records_the_unreachable_node(fleet_run):
    run, run_dir = fleet_run
    print(run.tail(60))
    assert (run_dir / "run.json").is_file(), run.tail(80)
    covered = json.loads((run_dir / "run.json").read_text())
    assert covered["hosts"] == ["nodea", "nodeb", "nodec"]
    for host in ("nodea", "nodeb"):
        report = json.loads((run_dir / f"{host}.json").read_text())
        assert report["schema"] == "peftnode.verify.report/1"
        assert {r["group"] for r in report["results"]} == {"system"}, report["results"]
        assert (run_dir / f"{host}.junit.xml").read_text().lstrip().startswith("<?xml")
        assert not (run_dir / f"{host}.noreport.json").exists()
    a = json.loads((run_dir / "nodea.json").read_text())
    assert a["status"] in ("pass", "warn"), [(r["name"], r["status"], r["message"]) for r in a["results"]]
    b = json.loads((run_dir / "nodeb.json").read_text())
    failed = {r["name"] for r in b["results"] if r["status"] == "fail"}
    assert failed == {"system.disk[data]"}, b["results"]
    noreport = json.loads((run_dir / "nodec.noreport.json").read_text())
    assert noreport["kind"] == "unreachable" and noreport["host"] == "nodec", noreport
    assert noreport["reason"], noreport


def test_the_play_fails_naming_the_unhealthy_fleet(fleet_run):
    run, run_dir = fleet_run
    assert run.rc != 0, run.tail(60)
    assert "Unhealthy nodes in run fleet-test" in run.output, run.tail(60)
    assert (run_dir / "fleet.json").is_file(), run.tail(60)
    fleet = json.loads((run_dir / "fleet.json").read_text())
    by_host = {n["host"]: n for n in fleet["nodes"]}
    assert by_host["nodea"]["status"] in ("pass", "warn")
    assert by_host["nodeb"]["status"] == "fail"
    assert by_host["nodec"]["status"] == "no report"
    assert (run_dir / "fleet.html").is_file()


def test_the_wheel_installed_is_this_checkouts(nodes, fleet_run):
    run, run_dir = fleet_run
    wheel = next((run_dir / "wheel").glob("peftnode-*.whl"))
    for node in nodes:
        got = node.ssh(f"{mt.VENV_PATH}/bin/python -c 'import checks; print(checks.__version__)'").stdout.strip()
        assert wheel.name.startswith(f"peftnode-{got}-"), (got, wheel.name)
        manifest = node.ssh("cat /etc/peftnode/manifest.yml").stdout
        assert "schema: 1" in manifest and "host: node" in manifest, manifest[:400]


def test_the_pair_measured_the_all_reduce_over_loopback(fleet_run):
    run, run_dir = fleet_run
    pair_file = run_dir / "pairs" / "nodea--nodeb.json"
    assert pair_file.is_file(), run.tail(80)
    pair = json.loads(pair_file.read_text())
    print(f"\n[fleet] pair nodea--nodeb: {pair.get('backend')} busbw {pair.get('busbw_gbps')} GB/s: "
          f"{pair.get('status')} {pair.get('message')}")
    assert pair["hosts"] == ["nodea", "nodeb"]
    assert pair["backend"] == "gloo" and pair["world_size"] == 2, pair
    # the first node's manifest figures reached the pair (verify.yml passes node.perf to checks.nccl.pairs)
    assert (pair["expected_gbps"], pair["floor_ratio"]) == (0.001, 0.5), pair
    assert pair["status"] == "pass", pair
    assert pair["busbw_gbps"] > 0 and pair["sizes"], pair


def test_fleet_report_names_the_failing_node_and_check_and_drains_only_the_bad_ones(fleet_run, tmp_path):
    _, run_dir = fleet_run
    table = _fleet_report(run_dir)
    print(table.stdout[-4000:])
    assert table.returncode == 1, (table.stdout[-2000:], table.stderr[-2000:])
    assert "nodeb" in table.stdout and "system.disk[data]" in table.stdout
    assert "nodec" in table.stdout and "no report" in table.stdout
    log = tmp_path / "scontrol.log"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n")
    (fake / "scontrol").chmod(0o755)
    drain = _fleet_report(run_dir, "--drain", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    lines = [ln for ln in drain.stdout.splitlines() if ln.startswith("scontrol update")]
    assert len(lines) == 2, drain.stdout[-3000:]
    assert any("NodeName=nodeb" in ln and "State=DRAIN" in ln and "peftnode: system.disk" in ln for ln in lines)
    assert any("NodeName=nodec" in ln for ln in lines)
    assert not any("NodeName=nodea" in ln for ln in lines)
    assert not log.exists(), "--drain without --apply ran scontrol"
