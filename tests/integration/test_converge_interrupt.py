"""Tier 3: a converge interrupted as Ctrl-C does it, during each long step in turn, recovers.

One real bookworm container (tests/integration/container.py), site.yml with the real OpenSSL and
Python tarballs and the wheelhouse, the NVIDIA roles off (``peftnode_gpu: false``; their archives
follow the same install-state protocol and have tests of their own). The runs form a chain: each run
is interrupted with SIGINT to the whole ansible-playbook process group (what a terminal's Ctrl-C
sends) a few seconds into one long step, and the next run must get past that step (and is itself
interrupted at the next one):

  1. OpenSSL compile   2. Python compile   3. Python install (make altinstall)
  4. venv creation (ensurepip)   5. wheel install (pip install)

then a run that completes. The node must then be healthy: the built Python imports ssl, sqlite3,
ctypes, lzma, bz2 and zlib; the venv has pip; JupyterLab is serving from the current venv (its
process started after the venv was made, no deleted interpreter mapped); a further run reports
changed=0. Last, two plays at once: one started with ``peftnode_lock_wait: 0`` while another holds
the node fails naming the holder's ansible-playbook PID; one started with a wait finishes after it.

Timings per run are printed (run with -s) and kept in .cache/converge/interrupt-timings.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from tests.integration import container as ct
from tests.integration import materials as mt

pytestmark = pytest.mark.converge

PASSWORD = "converge-only-password"
JUPYTER = "http://127.0.0.1:9999"
PYTHON_PREFIX = f"/usr/local/python-{mt.PYTHON_VERSION}"
OPENSSL_PREFIX = f"/usr/local/openssl-{mt.OPENSSL_VERSION}"
PYTHON = f"{PYTHON_PREFIX}/bin/python{mt.PYTHON_VERSION.rsplit('.', 1)[0]}"
VENV_PY = f"{mt.VENV_PATH}/bin/python"
# The roles that need a GPU or a kernel module are off through peftnode_gpu: false.
SKIP_TAGS = "nvidia_driver,fabricmanager,cuda,nccl,cudnn,dcgm,nccl_tests"

# (label, the task banner that starts the step, seconds into the step before the SIGINT,
#  what the interruption leaves on the node that the next run must deal with)
STEPS = [
    ("openssl_compile", r"TASK \[peftnode_openssl : Compile OpenSSL", 20.0,
     f"test -e {OPENSSL_PREFIX}/.peftnode-incomplete"),
    ("python_compile", r"TASK \[peftnode_python : Compile Python", 40.0,
     f"test -e {PYTHON_PREFIX}/.peftnode-incomplete"),
    ("python_install", r"TASK \[peftnode_python : Install Python without touching python3", 12.0,
     f"test -e {PYTHON_PREFIX}/.peftnode-incomplete"),
    ("venv_create", r"TASK \[peftnode_venv : Create the virtualenv", 3.0,
     f"test -e {mt.VENV_PATH}/.peftnode-incomplete"),
    ("wheel_install", r"TASK \[peftnode_venv : Install the (stack's )?requirements", 20.0,
     f"test -e {mt.VENV_PATH}/.peftnode-pip-incomplete"),
]
# PEFTNODE_INTERRUPT_STEPS=<label>,<label>: a subset, in this order (.ci/run takes three to stay in
# CI's time limit; the whole set is the default).
_ONLY = [x.strip() for x in os.environ.get("PEFTNODE_INTERRUPT_STEPS", "").split(",") if x.strip()]
if _ONLY:
    _unknown = sorted(set(_ONLY) - {label for label, *_ in STEPS})
    if _unknown:
        raise ValueError(f"PEFTNODE_INTERRUPT_STEPS: unknown steps {_unknown}; known: {[s[0] for s in STEPS]}")
    STEPS = [step for step in STEPS if step[0] in _ONLY]
RESULTS: dict = {"runs": {}}


@pytest.fixture(scope="module")
def inputs(node, artifact_dir, wheelhouse_dir, tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    model_dir, model_files = tiny_model
    stack = mt.write_stack(d / "converge.yml", mt.converge_stack(model_files))
    extra = {
        "peftnode_stack_name": str(stack),
        "peftnode_artifact_dir": str(artifact_dir),
        "peftnode_offline": True,
        "peftnode_wheelhouse": str(wheelhouse_dir),
        "peftnode_model_source_dir": str(model_dir),
        "peftnode_jupyter_password_hash": mt.jupyter_password_hash(PASSWORD),
        "peftnode_gpu": False,
        # short polls: the test sees the steps start, and the runs end soon after the step does
        "peftnode_step_poll": 3,
    }
    yield SimpleNamespace(extra=extra)
    print(f"\n[interrupt] summary: {json.dumps(RESULTS, sort_keys=True)}")
    (ct.CACHE / "interrupt-timings.json").write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")


def _start(node, inputs, label: str, **overrides) -> ct.PlaybookProcess:
    return ct.start_playbook(node, ct.ROOT / "site.yml", {**inputs.extra, **overrides}, label=label,
                             timeout=2100, extra_args=("--skip-tags", SKIP_TAGS))


def _record(label: str, run: ct.AnsibleRun, **more) -> None:
    RESULTS["runs"][label] = {"s": run.seconds, "rc": run.rc, "recap": run.recap(), **more}
    print(f"\n[interrupt] {label}: rc={run.rc} in {run.seconds} s; recap {run.recap()} {more or ''}")


def _step_processes(node) -> str:
    """The build and install processes running on the node now (make, cc, pip, ensurepip)."""
    r = node.ssh("ps -eo pid,pgid,etimes,args --no-headers | grep -E ' (make|cc1|gcc|ld|pip|.*ensurepip)( |$)' "
                 "| grep -v grep || true", check=False)
    return r.stdout.strip()


@pytest.fixture(scope="module")
def chain(node, inputs):
    """Run the chain once for the module: {label: SimpleNamespace(run, left_behind, processes_after)}."""
    if ct.port_in_use(9999):
        pytest.fail("127.0.0.1:9999 is already taken on the host; the container's JupyterLab needs it")
    out = {}
    for label, banner, delay, left_probe in STEPS:
        p = _start(node, inputs, f"interrupt_{label}")
        line = p.wait_for(banner, timeout=1500)
        if line is None:
            run = p.wait()
            _record(f"interrupt_{label}", run)
            pytest.fail(f"{label}: the run ended without reaching {banner!r}:\n{run.tail(60)}")
        time.sleep(delay)
        p.interrupt(signal.SIGINT)
        run = p.wait(timeout=120)
        left = node.ssh(left_probe, check=False).returncode == 0
        procs = _step_processes(node)
        _record(f"interrupt_{label}", run, interrupted_after_s=p.interrupted_at, left_marker=left,
                still_running_after_interrupt=[line.strip()[:90] for line in procs.splitlines()][:6])
        out[label] = SimpleNamespace(run=run, left_behind=left, processes=procs)
    final = _start(node, inputs, "after_interrupts").wait()
    _record("after_interrupts", final)
    out["final"] = final
    return out


def test_each_interrupted_step_is_left_marked_incomplete(chain):
    """The SIGINT landed inside the step (the run did not finish) and the step's marker says so."""
    for label, *_ in STEPS:
        r = chain[label]
        assert r.run.rc != 0, f"{label}: the interrupted run exited 0:\n{r.run.tail(40)}"
        assert r.left_behind, f"{label}: no incomplete-marker after the interruption:\n{r.run.tail(40)}"


def test_the_run_after_the_interruptions_completes(chain):
    final = chain["final"]
    recap = final.recap()
    assert final.rc == 0 and recap.get("failed") == 0, final.tail(120)


def test_each_rerun_went_past_the_step_interrupted_before(chain):
    """The run after each interruption reached that step again and got beyond it: it was interrupted
    at a later step, or it completed."""
    labels = [label for label, *_ in STEPS]
    banners = {label: banner for label, banner, *_ in STEPS}
    for before, after in zip(labels, labels[1:] + ["final"], strict=True):
        output = chain[after].output if after == "final" else chain[after].run.output
        lines = output.splitlines()
        at = [i for i, line in enumerate(lines) if re.search(banners[before], line)]
        assert at, f"the run after the {before} interruption never reached that step"
        rest = "\n".join(lines[at[0]:])
        nxt = banners.get(after)
        assert (re.search(nxt, rest) if nxt else "PLAY RECAP" in rest), (
            f"the run after the {before} interruption did not get past it:\n" + "\n".join(lines[at[0]:][:60]))


def test_built_python_imports_its_modules(node, chain):
    code = "import ssl, sqlite3, ctypes, lzma, bz2, zlib; print(ssl.OPENSSL_VERSION)"
    out = node.ssh(f"{PYTHON} -c {shlex.quote(code)}").stdout
    assert f"OpenSSL {mt.OPENSSL_VERSION} " in out
    for prefix in (OPENSSL_PREFIX, PYTHON_PREFIX, mt.VENV_PATH):
        assert node.ssh(f"test -s {prefix}/.peftnode-stamp.json && ! test -e {prefix}/.peftnode-incomplete",
                        check=False).returncode == 0, f"{prefix}: stamp missing or marker left"


def test_venv_has_pip_and_its_packages(node, chain):
    assert node.ssh(f"{VENV_PY} -m pip --version").stdout.startswith("pip ")
    code = "import torch, jupyterlab, invoke, yaml; print(torch.__version__)"
    assert node.ssh(f"{VENV_PY} -c {shlex.quote(code)}", timeout=300).stdout.startswith("2.13.0")
    assert node.ssh(f"{VENV_PY} -m pip check", check=False, timeout=120).returncode == 0


def test_no_step_of_an_interrupted_run_is_left_running(node, chain):
    assert _step_processes(node) == ""
    assert node.ssh("ls /run/peftnode/steps 2>/dev/null | wc -l").stdout.strip() == "0"


def test_jupyterlab_serves_from_the_current_venv(node, chain):
    assert node.ssh("systemctl is-active jupyterlab", check=False).stdout.strip() == "active"
    pid = node.ssh("systemctl show -p MainPID --value jupyterlab").stdout.strip()
    assert pid not in ("", "0")
    exe = node.ssh(f"readlink /proc/{pid}/exe").stdout.strip()
    assert not exe.endswith("(deleted)"), f"JupyterLab runs a deleted interpreter: {exe}"
    deleted = node.ssh(f"grep -c '(deleted)' /proc/{pid}/maps || true").stdout.strip()
    assert deleted == "0", f"JupyterLab maps {deleted} deleted files"
    # it started after the venv it runs from was made
    started = float(node.ssh(f"stat -c %Y /proc/{pid}").stdout.strip())
    venv_made = float(node.ssh(f"stat -c %Y {mt.VENV_PATH}/.peftnode-stamp.json").stdout.strip())
    assert started >= venv_made - 1, (started, venv_made)
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{JUPYTER}/api/contents", timeout=5)
            pytest.fail("JupyterLab answered /api/contents without a login")
        except urllib.error.HTTPError as err:
            assert err.code == 403
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def settled(node, inputs, chain):
    if chain["final"].rc != 0:
        pytest.skip("the run after the interruptions failed")
    run = _start(node, inputs, "no_change").wait()
    _record("no_change", run, changed_tasks=run.changed_tasks())
    return run


def test_a_further_run_changes_nothing(settled):
    assert settled.rc == 0, settled.tail(80)
    assert settled.recap().get("changed") == 0, f"changed tasks: {settled.changed_tasks()}"


def test_two_plays_at_once_one_waits_or_fails_naming_the_other(node, inputs, settled):
    first = _start(node, inputs, "concurrent_holder")
    taken = first.wait_for(r"TASK \[peftnode_base", timeout=600)  # past the lock, into the roles
    assert taken, "the first play never got past the lock"
    refused = _start(node, inputs, "concurrent_nowait", peftnode_lock_wait=0).wait(timeout=600)
    waiting = _start(node, inputs, "concurrent_waiting", peftnode_lock_wait=900)
    holder = first.wait()
    waited = waiting.wait(timeout=900)
    _record("concurrent_holder", holder)
    _record("concurrent_nowait", refused)
    _record("concurrent_waiting", waited)
    assert holder.rc == 0, holder.tail(60)
    assert refused.rc != 0, "a second play ran while the first held the node"
    assert f"PID {first.pid}" in refused.output, refused.tail(40)
    assert waited.rc == 0, waited.tail(60)
    assert "waiting" in waited.output.lower(), waited.tail(60)
    assert node.ssh("systemctl is-active jupyterlab", check=False).stdout.strip() == "active"
    assert node.ssh(f"{VENV_PY} -m pip --version", check=False).returncode == 0
