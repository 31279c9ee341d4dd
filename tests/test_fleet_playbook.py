"""playbooks/verify.yml without a node: which pairs the ring makes (filter_plugins/peftnode_fleet.py), and
that site.yml runs the fleet verify only when asked with -t verify. The playbook itself runs for real
against two containers in tests/integration/test_fleet_converge.py."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "filter_plugins"))

import peftnode_fleet as pf  # noqa: E402


@pytest.mark.parametrize("n", range(0, 12))
def test_the_rounds_cover_the_ring_once_and_never_use_a_node_twice_at_once(n):
    hosts = [f"node{i:02d}" for i in range(n)]
    rounds = pf.pair_rounds(reversed(hosts))  # any order in, sorted out
    pairs = [tuple(p) for r in rounds for p in r]
    if n < 2:
        assert rounds == []
        return
    if n == 2:
        assert rounds == [[["node00", "node01"]]]
        return
    ring = {frozenset((hosts[i], hosts[(i + 1) % n])) for i in range(n)}
    assert [frozenset(p) for p in pairs].count(next(iter(ring))) == 1
    assert {frozenset(p) for p in pairs} == ring and len(pairs) == n  # each edge of the ring exactly once
    for r in rounds:
        members = [h for p in r for h in p]
        assert len(members) == len(set(members)), f"a node twice in one round: {r}"
    assert len(rounds) == (2 if n % 2 == 0 else 3)
    for host in hosts:  # every node meets both neighbours
        assert sum(host in p for p in pairs) == 2


def test_pair_of_names_the_peer_the_rank_and_the_rendezvous():
    rounds = pf.pair_rounds(["c", "a", "b", "d"])
    assert rounds == [[["a", "b"], ["c", "d"]], [["b", "c"], ["d", "a"]]]
    assert pf.pair_of(rounds, 0, "a") == {"peer": "b", "node_rank": 0, "master": "a", "hosts": ["a", "b"]}
    assert pf.pair_of(rounds, 1, "a") == {"peer": "d", "node_rank": 1, "master": "d", "hosts": ["d", "a"]}
    assert pf.pair_of(rounds, 2, "a") == {}
    assert pf.pair_of(rounds, 0, "zz") == {}
    for r, host in itertools.product(range(2), "abcd"):
        got = pf.pair_of(rounds, r, host)
        assert got["hosts"][got["node_rank"]] == host and got["master"] == got["hosts"][0]


def _list_tasks(*args: str) -> str:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "--list-tasks",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_site_yml_runs_the_fleet_verify_only_with_the_verify_tag():
    plain = _list_tasks("site.yml")
    tagged = _list_tasks("site.yml", "-t", "verify")
    marker = "Run invoke verify within its time limit"
    assert marker not in plain
    assert marker in tagged and "Fetch the reports" in tagged and "Put the fleet report together" in tagged
    # -t verify provisions nothing: of the installing roles only Ansible's own argument checks are listed
    installing = re.compile(r"peftnode_(openssl|python|venv|cuda|nccl|cudnn|nvidia_driver|jupyterlab|model) : "
                            r"(?!Validating arguments)")
    assert not [ln for ln in tagged.splitlines() if installing.search(ln)]
    assert [ln for ln in plain.splitlines() if installing.search(ln)], "the pattern no longer finds role tasks"
    standalone = _list_tasks("playbooks/verify.yml")
    assert marker in standalone
