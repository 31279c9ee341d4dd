"""The venv role after a run was cut short, and the wheelhouse sent only when it changed.

site.yml for real on this machine (--tags venv, connection local, every path under tmp_path: the
fixture of test_roles_local.py): a virtualenv whose ensurepip was interrupted is made again, a pip
install that was interrupted is redone with --force-reinstall, an unstamped venv is adopted, and
the wheelhouse goes over again only when a wheel in it changed. Each repaired node then converges
with changed=0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_roles_local  # noqa: E402
from test_roles_local import DUMMY, changed_tasks, wheel  # noqa: E402
from test_roles_static import ANSIBLE_PLAYBOOK, explain, recap, results  # noqa: E402

converge = test_roles_local.converge  # the fixture: site.yml on this machine, under tmp_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                       reason=f"ansible-playbook not installed next to {sys.executable}"),
]

CREATE = "peftnode_venv : Create the virtualenv local-venv"
REMOVE = "peftnode_venv : Remove the virtualenv"
ADOPT = "peftnode_venv : Stamp the virtualenv found on the stack's Python"
PIP = "peftnode_venv : Install the stack's requirements and peftnode with pip"
SEND = "peftnode_venv : Send and unpack the wheelhouse on the node"
DRY_RUN = "peftnode_venv : Ask pip whether any requirement is missing (dry run)"


def venv_run(run, *extra: str) -> subprocess.CompletedProcess:
    proc = run("--tags", "venv", "-v", *extra)
    assert proc.returncode == 0, explain(proc)
    return proc


def changed(proc: subprocess.CompletedProcess) -> list[str]:
    # a task whose name carries a template (the reason of a removal) is matched by its start
    return [t.split(" (")[0] for t in changed_tasks(proc.stdout)]


def pip_works(venv: Path) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


def installed(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True, check=True).stdout


def test_a_venv_cut_short_in_ensurepip_is_made_again(converge):
    node, stack, run = converge
    venv = node / "venv"

    first = venv_run(run)
    assert CREATE in changed(first) and PIP in changed(first)
    stamp = json.loads((venv / ".peftnode-stamp.json").read_text())
    assert stamp["component"] == "venv" and stamp["path"] == str(venv)
    assert not (venv / ".peftnode-incomplete").exists() and not (venv / ".peftnode-pip-incomplete").exists()
    assert recap(venv_run(run).stdout)["localhost"]["changed"] == 0

    # Ctrl-C inside ensurepip: the marker is still there, pip is half there
    (venv / ".peftnode-incomplete").write_text("cut short\n")
    for pip in venv.glob("lib/python*/site-packages/pip*"):
        shutil.rmtree(pip) if pip.is_dir() else pip.unlink()
    assert not pip_works(venv)
    again = venv_run(run)
    assert {REMOVE, CREATE, PIP} <= set(changed(again)), changed(again)
    assert pip_works(venv) and f"{DUMMY}==1.0" in installed(venv)
    assert not (venv / ".peftnode-incomplete").exists()
    assert recap(venv_run(run).stdout)["localhost"]["changed"] == 0

    # a stamped venv whose pip is gone (no marker: damaged since) is made again as well
    for pip in venv.glob("lib/python*/site-packages/pip*"):
        shutil.rmtree(pip) if pip.is_dir() else pip.unlink()
    repaired = venv_run(run)
    assert {REMOVE, CREATE} <= set(changed(repaired)) and pip_works(venv)


def test_an_interrupted_pip_install_is_redone_with_force_reinstall(converge):
    node, stack, run = converge
    venv = node / "venv"
    venv_run(run)

    (venv / ".peftnode-pip-incomplete").write_text("cut short\n")
    again = venv_run(run)
    assert changed(again) == [PIP], changed(again)
    pip = [r for r in results(again.stdout) if r["task"] == PIP][0]
    assert "--force-reinstall" in pip["result"]["cmd"], pip["result"]["cmd"]
    assert f"Successfully installed {DUMMY}-1.0" in pip["result"]["stdout"]
    assert not (venv / ".peftnode-pip-incomplete").exists()

    # then a run that changes nothing: pip's dry run finds everything there, the install is not run
    calm = venv_run(run)
    assert recap(calm.stdout)["localhost"]["changed"] == 0
    dry = [r for r in results(calm.stdout) if r["task"] == DRY_RUN]
    assert dry and "Would install" not in dry[0]["result"]["stdout"], dry
    assert "--dry-run" in dry[0]["result"]["cmd"] and "--force-reinstall" not in dry[0]["result"]["cmd"]
    assert not [r for r in results(calm.stdout) if r["task"] == PIP and r["status"] != "skipping"], \
        "a run with nothing to install still ran pip install"


def test_an_unstamped_venv_on_the_stacks_python_is_adopted_once(converge):
    node, stack, run = converge
    venv = node / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # as an older peftnode made it

    first = venv_run(run)
    assert ADOPT in changed(first) and CREATE not in changed(first) and REMOVE not in changed(first)
    assert json.loads((venv / ".peftnode-stamp.json").read_text())["component"] == "venv"
    assert recap(venv_run(run).stdout)["localhost"]["changed"] == 0


def test_the_wheelhouse_goes_over_only_when_it_changed(converge, tmp_path):
    node, stack, run = converge
    wheelhouse, copy = tmp_path / "wheelhouse", node / "cache" / "wheelhouse"
    extra = wheel(wheelhouse, "peftnode-extra-wheel", "2.0")

    first = venv_run(run)
    assert SEND in changed(first)
    assert sorted(p.name for p in copy.iterdir()) == sorted([".peftnode-wheelhouse.sha256"]
                                                           + [p.name for p in wheelhouse.iterdir()])
    digest = (copy / ".peftnode-wheelhouse.sha256").read_text()

    same = venv_run(run)
    assert recap(same.stdout)["localhost"]["changed"] == 0
    assert [r["status"] for r in results(same.stdout) if r["task"] == SEND] == ["skipping"]

    # a wheel touched (same bytes, new mtime) is sent again
    stat = extra.stat()
    os.utime(extra, (stat.st_atime, stat.st_mtime + 60))
    touched = venv_run(run)
    assert changed(touched) == ["peftnode_venv : Remove the wheelhouse the node has",
                                "peftnode_venv : Create the wheelhouse directory on the node", SEND,
                                "peftnode_venv : Record the digest of the wheelhouse the node now has"]
    assert (copy / ".peftnode-wheelhouse.sha256").read_text() != digest

    # a wheel replaced by another and one taken away: the node's copy is the controller's again
    (wheelhouse / extra.name).unlink()
    newer = wheel(wheelhouse, "peftnode-extra-wheel", "2.1")
    replaced = venv_run(run)
    assert SEND in changed(replaced)
    assert (copy / newer.name).read_bytes() == newer.read_bytes() and not (copy / extra.name).exists()
    assert recap(venv_run(run).stdout)["localhost"]["changed"] == 0

    # a send cut short (no digest written) is sent again
    (copy / ".peftnode-wheelhouse.sha256").unlink()
    assert SEND in changed(venv_run(run))


def test_the_venv_topic_can_be_notified_without_the_jupyterlab_role(tmp_path, converge):
    """The peftnode role's no-op listener: a play with the venv role only may notify the topic."""
    node, stack, run = converge
    variables = next(tmp_path.glob("vars.yml"))
    play = tmp_path / "venv-only.yml"
    play.write_text(yaml.safe_dump([{
        "hosts": "all", "gather_facts": False,
        "pre_tasks": [{"name": "Load the stack", "ansible.builtin.set_fact": {
            "peftnode_stack": "{{ lookup('peftnode_stack', peftnode_stack_name) }}"}}],
        "roles": ["peftnode_venv"]}]))
    from test_roles_static import playbook

    proc = playbook(tmp_path, play, "-i", "localhost,", "-c", "local", "-e", f"@{variables}", "-v")
    assert proc.returncode == 0, explain(proc)
    assert CREATE in changed(proc)
    assert "RUNNING HANDLER [peftnode : Note that what the virtualenv runs on changed]" in proc.stdout
    assert "peftnode_jupyterlab" not in proc.stdout
