"""roles/peftnode_dcgm: its decisions as pure functions, and the role and both GPU-tool preflights run
through site.yml in check mode on this machine (connection=local, every node path under tmp_path).

Installing DCGM for real needs a package manager and systemd as PID 1; this machine has neither to
spare (its PID 1 is not systemd). The real install of a package file, the service and the second
run are the converge tier's (tests/integration/test_gpu_tools_converge.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_roles_static import (  # noqa: E402
    ANSIBLE_PLAYBOOK,
    REPO,
    explain,
    playbook,
    preflight_problems,
    recap,
    results,
    sha256,
    write_yaml,
)

sys.path.insert(0, str(REPO / "filter_plugins"))
import peftnode_dcgm as f  # noqa: E402

from checks.stack import load_stack  # noqa: E402

CU117 = load_stack("cu117").data
CU124 = load_stack("cu124").data


# --- packages per DCGM major, CUDA major and OS family -------------------------------------------


def test_dcgm_3_is_one_package_pinned_in_each_family_spelling():
    assert f.dcgm_package_names("3.3.9", "11.7.1") == ["datacenter-gpu-manager"]
    assert f.dcgm_packages("3.3.9", "11.7.1", "Debian") == ["datacenter-gpu-manager=1:3.3.9*"]
    assert f.dcgm_packages("3.3.9", "11.7.1", "RedHat") == ["datacenter-gpu-manager-3.3.9"]
    # 3.x is the same single package whatever the CUDA major
    assert f.dcgm_packages("3.3.9", "12.4.1", "RedHat") == ["datacenter-gpu-manager-3.3.9"]


@pytest.mark.parametrize("cuda, suffix", [("11.7.1", "cuda11"), ("12.4.1", "cuda12"), ("13.0.0", "cuda13")])
def test_dcgm_4_is_core_plus_the_package_for_the_stacks_cuda_major(cuda, suffix):
    assert f.dcgm_package_names("4.2.3", cuda) == ["datacenter-gpu-manager-4-core",
                                                    f"datacenter-gpu-manager-4-{suffix}"]
    assert f.dcgm_packages("4.2.3", cuda, "Debian") == ["datacenter-gpu-manager-4-core=1:4.2.3*",
                                                        f"datacenter-gpu-manager-4-{suffix}=1:4.2.3*"]
    assert f.dcgm_packages("4.2.3", cuda, "RedHat") == ["datacenter-gpu-manager-4-core-4.2.3",
                                                        f"datacenter-gpu-manager-4-{suffix}-4.2.3"]


def test_extra_packages_are_pinned_to_the_same_version_and_not_repeated():
    extra = ["datacenter-gpu-manager-4-proprietary", "datacenter-gpu-manager-4-core"]
    assert f.dcgm_packages("4.2.3", "12.4.1", "Debian", extra) == [
        "datacenter-gpu-manager-4-core=1:4.2.3*", "datacenter-gpu-manager-4-cuda12=1:4.2.3*",
        "datacenter-gpu-manager-4-proprietary=1:4.2.3*"]


@pytest.mark.parametrize("version, cuda, family, words", [
    ("2.4.8", "11.7.1", "Debian", "DCGM 3.x or 4.x"),
    ("5.0.0", "12.4.1", "Debian", "DCGM 3.x or 4.x"),
    ("3.3", "11.7.1", "Debian", "MAJOR.MINOR.PATCH"),
    ("4.2.3", "10.2.89", "Debian", "none for CUDA 10"),
    ("3.3.9", "11.7.1", "Suse", "OS family 'Suse'"),
])
def test_what_cannot_be_installed_is_refused_with_the_reason(version, cuda, family, words):
    with pytest.raises(AnsibleFilterError, match=words):
        f.dcgm_packages(version, cuda, family)


@pytest.mark.parametrize("installed, wanted, removed", [
    ("3.3.9", "4.2.3", ["datacenter-gpu-manager"]),  # 4.x replaces the 3.x package
    ("", "4.2.3", []),  # nothing installed
    ("3.3.8", "3.3.9", []),  # same package, another version
    ("4.1.1", "4.2.3", []),
])
def test_dcgm_3_is_removed_before_4_replaces_it(installed, wanted, removed):
    assert f.dcgm_remove_first(installed, wanted) == removed


@pytest.mark.parametrize("output, version", [
    ("\ndcgmi  version: 3.3.9\n\n", "3.3.9"),  # DCGM 3.x
    ("dcgmi version: 4.2.3\n", "4.2.3"),
    ("Version : 3.1.8\nBuild ID : 14\n", "3.1.8"),
    ("", ""),  # dcgmi missing: the command module gives no stdout
    ("Error: unable to establish a connection to the host engine", ""),
])
def test_the_installed_version_is_read_from_dcgmi(output, version):
    assert f.dcgm_probe_version(output) == version


# --- what the preflight reports -------------------------------------------------------------------


def with_dcgm(stack: dict, dcgm) -> dict:
    out = {**stack}
    if dcgm is None:
        out.pop("dcgm", None)
    else:
        out["dcgm"] = dcgm
    return out


def test_the_shipped_stacks_take_dcgm_3_3_9_from_the_repository():
    for stack in (CU117, CU124):
        assert stack["dcgm"] == {"version": "3.3.9"}
        for family in ("Debian", "RedHat"):
            assert f.dcgm_problems(stack, "repo", family) == []
    assert f.dcgm_packages(CU117["dcgm"]["version"], CU117["cuda"]["version"], "RedHat") == [
        "datacenter-gpu-manager-3.3.9"]


def test_problems_name_the_fix():
    deb = {"version": "3.3.9", "artifact": {"file": "datacenter-gpu-manager_3.3.9_amd64.deb", "sha256": None}}
    assert f.dcgm_problems(with_dcgm(CU117, None), "repo", "Debian") == [
        "dcgm: the stack has no dcgm section (dcgm.version, optionally dcgm.artifact): add one, or set "
        "peftnode_dcgm_enabled: false"]
    assert f.dcgm_problems(with_dcgm(CU117, deb), "artifact", "Debian") == []
    [wrong] = f.dcgm_problems(with_dcgm(CU117, deb), "artifact", "RedHat")
    assert wrong == ("dcgm: dcgm.artifact datacenter-gpu-manager_3.3.9_amd64.deb is not a .rpm package, which "
                     "this RedHat node needs")
    [none] = f.dcgm_problems(CU117, "artifact", "Debian")
    assert "has no artifact; add dcgm.artifact (a .deb or .rpm) or use peftnode_dcgm_method: repo" in none
    old_driver = {**CU117, "nvidia_driver": {**CU117["nvidia_driver"], "version": "440.33.01"}}
    assert f.dcgm_problems(old_driver, "repo", "Debian") == [
        "dcgm: DCGM 3.3.9 needs driver R450 or later (>= 450.80.02); the stack's driver is 440.33.01"]
    [cuda10] = f.dcgm_problems(with_dcgm({**CU117, "cuda": {"version": "10.2.89"}}, {"version": "4.2.3"}),
                               "repo", "Debian")
    assert cuda10.startswith("dcgm: DCGM 4.2.3 ships datacenter-gpu-manager-4-cuda11|12|13, none for CUDA 10")
    assert f.dcgm_problems(CU117, "apt", "Debian") == ["dcgm: peftnode_dcgm_method 'apt' is not repo or artifact"]


# --- the role through site.yml, in check mode --------------------------------------------------------

ansible = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                             reason=f"ansible-playbook not installed next to {sys.executable}")


def changed_tasks(stdout: str) -> list[str]:
    return [r["task"] for r in results(stdout) if r["status"] == "changed"]


def task_result(stdout: str, task: str) -> dict:
    found = [r for r in results(stdout) if r["task"] == task]
    assert found, f"no result for {task!r}"
    return found[-1]


@pytest.fixture
def gpu_tools(tmp_path):
    """site.yml --check --tags dcgm,nccl_tests on this machine, with a stack of the caller's making."""
    if (Path("/usr/bin/dcgmi")).exists():
        pytest.skip("this machine has dcgmi: the not-installed path cannot be exercised here")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()

    def run(dcgm=None, nccl_tests=None, *extra: str, **variables):
        data = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
        data["name"] = "gpu-tools"
        if dcgm is not None:
            data["dcgm"] = dcgm
        if nccl_tests is not None:
            data["nccl_tests"] = nccl_tests
        stack = write_yaml(tmp_path / "stack.yml", data)
        load_stack(str(stack))
        values = write_yaml(tmp_path / "vars.yml", {
            "ansible_python_interpreter": sys.executable,
            "peftnode_stack_name": str(stack),
            "peftnode_offline": True,
            "peftnode_artifact_dir": str(artifacts),
            "peftnode_cache_dir": str(tmp_path / "node" / "cache"),
            "peftnode_nccl_tests_prefix": str(tmp_path / "node" / "nccl-tests-2.13.9"),
            "peftnode_nccl_tests_link": str(tmp_path / "node" / "nccl-tests"),
            **variables,
        })
        return playbook(tmp_path, "site.yml", "--check", "-i", "localhost,", "-c", "local",
                        "--tags", "dcgm,nccl_tests", "-e", f"@{values}", *extra)

    return artifacts, run


@ansible
@pytest.mark.slow
def test_check_mode_says_which_packages_the_repo_method_installs(gpu_tools):
    _, run = gpu_tools
    proc = run(peftnode_nccl_tests_enabled=False)
    assert proc.returncode == 0, explain(proc)
    assert changed_tasks(proc.stdout) == ["peftnode_dcgm : Report the install check mode skips"]
    msg = " ".join(task_result(proc.stdout, "peftnode_dcgm : Report the install check mode skips")["result"]["msg"]
                   .split())
    assert msg == "DCGM 3.3.9 would be installed from the configured CUDA repository: datacenter-gpu-manager=1:3.3.9*"
    # nothing to start yet in check mode, and no artifact needed
    assert task_result(proc.stdout, "peftnode_dcgm : Enable and start the DCGM host engine (nvidia-dcgm)")[
        "status"] == "skipping"
    assert "peftnode_artifact" not in " ".join(r["task"] for r in results(proc.stdout))


@ansible
@pytest.mark.slow
def test_check_mode_with_a_package_artifact_and_the_nccl_tests_source_from_the_controller(gpu_tools, tmp_path):
    artifacts, run = gpu_tools
    deb = artifacts / "datacenter-gpu-manager_3.3.9_amd64.deb"
    deb.write_bytes(b"stand-in package\n")
    src = artifacts / "nccl-tests-2.13.9.tar.gz"
    src.write_bytes(b"stand-in source\n")
    proc = run({"version": "3.3.9", "artifact": {"file": deb.name, "sha256": sha256(deb)}},
               {"version": "2.13.9", "artifact": {"file": src.name, "sha256": sha256(src)}},
               peftnode_dcgm_method="artifact")
    assert proc.returncode == 0, explain(proc)
    shown = task_result(proc.stdout, "peftnode_preflight : Show where each artifact will come from")["result"]["msg"]
    assert shown == [f"dcgm: {deb.name}: from the controller ({deb})",
                     f"nccl_tests: {src.name}: from the controller ({src})"]
    done = changed_tasks(proc.stdout)
    assert "peftnode_dcgm : Report the install check mode skips" in done
    assert "peftnode_nccl_tests : Report the build check mode skips" in done
    msg = " ".join(task_result(proc.stdout, "peftnode_nccl_tests : Report the build check mode skips")["result"][
        "msg"].split())
    assert "with `make MPI=0 CUDA_HOME=/usr/local/cuda-11.7 NCCL_HOME=/usr/local/nccl-2.14.3 -j" in msg
    assert not (tmp_path / "node" / "cache").exists()  # check mode: nothing copied


@ansible
@pytest.mark.slow
def test_preflight_lists_every_gpu_tool_problem_before_any_change(gpu_tools, tmp_path):
    _, run = gpu_tools
    proc = run({"version": "3.3.9", "artifact": {"file": "datacenter-gpu-manager-3.3.9-1-x86_64.rpm",
                                                  "sha256": None}},
               None,  # cu117's nccl_tests: sha256 null, and not in the (empty) artifact directory
               peftnode_dcgm_method="artifact")
    problems = preflight_problems(proc)
    assert ("dcgm: dcgm.artifact datacenter-gpu-manager-3.3.9-1-x86_64.rpm is not a .deb package, which this "
            "Debian node needs") in problems
    assert any(p.startswith("dcgm: datacenter-gpu-manager-3.3.9-1-x86_64.rpm: no sha256 in the stack")
               for p in problems), problems
    assert any(p.startswith("nccl_tests: nccl-tests-2.13.9.tar.gz: no sha256 in the stack") for p in problems)
    assert any(p.startswith("nccl_tests: nccl-tests-2.13.9.tar.gz: missing") for p in problems), problems
    assert "PLAY [Provision the node]" not in proc.stdout


@ansible
@pytest.mark.slow
def test_disabled_dcgm_does_nothing(gpu_tools):
    _, run = gpu_tools
    proc = run(peftnode_dcgm_enabled=False, peftnode_nccl_tests_enabled=False)
    assert proc.returncode == 0, explain(proc)
    assert recap(proc.stdout)["localhost"]["changed"] == 0
    said = task_result(proc.stdout, "peftnode_dcgm : Say DCGM is left out")
    assert "gpu.dcgm_diag will skip" in said["result"]["msg"]
