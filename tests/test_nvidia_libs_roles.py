"""The cuda, nccl and cudnn roles: their pure decisions (filter_plugins/peftnode_nvidia_libs.py), and
the roles run for real on this machine, confined to tmp_path.

The local run uses small archives in NVIDIA's exact layouts and names (redistrib_11.7.1.json with
two component archives, the NCCL txz, the cuDNN tar.xz: headers with the real version defines,
library files with NVIDIA's symlink chains) so that every role decision is exercised in seconds:
the redist manifest read with its sha256s, the merge into one prefix, lib64 -> lib, version.json,
symlinks kept, the version probes, a second run with changed=0, check mode, preflight's artifact
list. The real libraries (ncclGetVersion, cudnnGetVersion, ptxas, ldconfig) are the converge test's
job (tests/integration/test_converge.py), in a booted container.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from filter_plugins.peftnode_nvidia_libs import (
    RedistError,
    cuda_installed,
    header_version,
    redist_artifacts,
    redist_check,
    redist_version_json,
    version_matches,
)
from tests.helpers.ansible_env import ansible_env, results

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
RECAP_LINE = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def recap(stdout: str) -> dict[str, dict[str, int]]:
    return {m.group(1): {"ok": int(m.group(2)), "changed": int(m.group(3)), "failed": int(m.group(5))}
            for line in stdout.splitlines() if (m := RECAP_LINE.match(line))}

MANIFEST = {
    "release_date": "2022-08-03",
    "cuda_cudart": {"name": "CUDA Runtime (cudart)", "license": "CUDA Toolkit", "version": "11.7.99",
                    "linux-x86_64": {"relative_path": "cuda_cudart/linux-x86_64/"
                                                      "cuda_cudart-linux-x86_64-11.7.99-archive.tar.xz",
                                     "sha256": "a" * 64, "md5": "b" * 32, "size": "123"},
                    "linux-sbsa": {"relative_path": "cuda_cudart/linux-sbsa/x.tar.xz", "sha256": "c" * 64}},
    "cuda_nvcc": {"name": "CUDA NVCC", "license": "CUDA Toolkit", "version": "11.7.99",
                  "linux-x86_64": {"relative_path": "cuda_nvcc/linux-x86_64/"
                                                    "cuda_nvcc-linux-x86_64-11.7.99-archive.tar.xz",
                                   "sha256": "D" * 64, "md5": "e" * 32, "size": "456"}},
    "nvidia_driver": {"name": "NVIDIA Linux Driver", "version": "515.65.01",
                      "linux-x86_64": {"relative_path": "nvidia_driver/x.tar.xz", "sha256": "f" * 64}},
}
URL = "https://example.invalid/compute/cuda/redist/redistrib_11.7.1.json"


# --- pure decisions ------------------------------------------------------------------------------


def test_redist_artifacts_name_file_sha_and_url_per_component():
    got = redist_artifacts(MANIFEST, ["cuda_nvcc", "cuda_cudart"], URL)
    assert [a["component"] for a in got] == ["cuda_nvcc", "cuda_cudart"]  # the stack's order
    assert got[0] == {"file": "cuda_nvcc-linux-x86_64-11.7.99-archive.tar.xz", "sha256": "d" * 64,
                      "url": "https://example.invalid/compute/cuda/redist/cuda_nvcc/linux-x86_64/"
                             "cuda_nvcc-linux-x86_64-11.7.99-archive.tar.xz",
                      "component": "cuda_nvcc", "version": "11.7.99"}
    assert redist_artifacts(json.dumps(MANIFEST), ["cuda_cudart"])[0]["url"] is None  # no manifest url


def test_redist_artifacts_refuse_what_the_manifest_cannot_give():
    with pytest.raises(RedistError, match="libcublas: not in the manifest.*cuda_cudart, cuda_nvcc, nvidia_driver"):
        redist_artifacts(MANIFEST, ["cuda_cudart", "libcublas"])
    with pytest.raises(RedistError, match="cuda_cudart: no linux-ppc64le archive"):
        redist_artifacts(MANIFEST, ["cuda_cudart"], platform="linux-ppc64le")
    broken = {"cuda_cudart": {"linux-x86_64": {"relative_path": "x.tar.xz", "sha256": "not-hex"}}}
    with pytest.raises(RedistError, match="not 64 hex digits"):
        redist_artifacts(broken, ["cuda_cudart"])
    with pytest.raises(RedistError, match="not a JSON object"):
        redist_artifacts([], ["cuda_cudart"])
    check = redist_check(MANIFEST, ["libcublas"])
    assert check["artifacts"] == [] and "libcublas: not in the manifest" in check["problems"][0]
    assert redist_check(MANIFEST, ["cuda_cudart"])["artifacts"][0].keys() == {"file", "sha256", "url"}


def test_version_json_is_nvidias_format():
    assert redist_version_json(MANIFEST, ["cuda_cudart", "cuda_nvcc"], "11.7.1") == {
        "cuda": {"name": "CUDA SDK", "version": "11.7.1"},
        "cuda_cudart": {"name": "CUDA Runtime (cudart)", "version": "11.7.99"},
        "cuda_nvcc": {"name": "CUDA NVCC", "version": "11.7.99"},
    }


@pytest.mark.parametrize("version_json, nvcc, method, components, want", [
    ({"cuda": {"version": "11.7.1"}}, "", "runfile", [], True),
    ({"cuda": {"version": "11.7.0"}}, "release 11.7, V11.7.64", "runfile", [], False),  # version.json wins
    ({"cuda": {"version": "11.7.1"}, "cuda_cudart": {"version": "11.7.99"}}, "", "redist", ["cuda_cudart"], True),
    ({"cuda": {"version": "11.7.1"}, "cuda_cudart": {}}, "", "redist", ["cuda_cudart", "cuda_nvcc"], False),
    ("", "Cuda compilation tools, release 11.7, V11.7.99", "runfile", [], True),
    ("", "Cuda compilation tools, release 11.7, V11.7.99", "repo", [], True),
    ("", "Cuda compilation tools, release 11.7, V11.7.99", "redist", [], False),  # no version.json: unfinished
    ("", "Cuda compilation tools, release 11.8, V11.8.89", "runfile", [], False),
    ("{not json", "", "runfile", [], False),
    ("", "", "runfile", [], False),
])
def test_cuda_installed(version_json, nvcc, method, components, want):
    text = json.dumps(version_json) if isinstance(version_json, dict) else version_json
    assert cuda_installed(text, nvcc, "11.7.1", method, components) is want


def test_header_versions():
    nccl = "#define NCCL_MAJOR 2\n#define NCCL_MINOR 14\n#define NCCL_PATCH 3\n#define NCCL_SUFFIX \"\"\n"
    assert header_version(nccl, "nccl") == "2.14.3"
    cudnn = "#define CUDNN_MAJOR 8\n#define CUDNN_MINOR 8\n#define CUDNN_PATCHLEVEL 1\n"
    assert header_version(cudnn, "cudnn") == "8.8.1"
    assert header_version("#define CUDART_VERSION 11070\n", "cudart") == "11.7"
    assert header_version("", "nccl") is None and header_version(None, "cudnn") is None
    assert header_version("#define NCCL_MAJOR 2\n", "nccl") is None


@pytest.mark.parametrize("found, wanted, want", [
    ("8.8.1", "8.8.1.3", True), ("8.8.0", "8.8.1.3", False), ("2.14.3", "2.14.3", True),
    ("2.14", "2.14.3", False), (None, "2.14.3", False), ("9.1.0", "9.1.0.70", True),
])
def test_version_matches(found, wanted, want):
    assert version_matches(found, wanted) is want


# --- the roles, for real, under tmp_path ---------------------------------------------------------


def _tar_xz(path: Path, top: str, files: dict[str, bytes], links: dict[str, str]) -> str:
    """A tar.xz with one top directory, like NVIDIA's; returns its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        dirs = {str(p) for name in [*files, *links] for p in Path(name).parents if str(p) != "."}
        for d in sorted(dirs | {""}):
            ti = tarfile.TarInfo(f"{top}/{d}".rstrip("/"))
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size, ti.mode = len(data), 0o755 if name.startswith("bin/") or ".so" in name else 0o644
            tar.addfile(ti, io.BytesIO(data))
        for name, target in links.items():
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _chain(lib: str, major: str, full: str) -> tuple[dict[str, bytes], dict[str, str]]:
    return ({f"lib/{lib}.so.{full}": b"\x7fELF stand-in\n"},
            {f"lib/{lib}.so.{major}": f"{lib}.so.{full}", f"lib/{lib}.so": f"{lib}.so.{major}"})


def nvidia_like_artifacts(d: Path) -> dict:
    """Small archives in NVIDIA's layouts under their real names; returns the stack's cuda/nccl/cudnn."""
    d.mkdir()
    cudart_files, cudart_links = _chain("libcudart", "11.0", "11.7.99")
    cudart = "cuda_cudart-linux-x86_64-11.7.99-archive"
    nvcc = "cuda_nvcc-linux-x86_64-11.7.99-archive"
    shas = {
        cudart: _tar_xz(d / f"{cudart}.tar.xz", cudart,
                        {"include/cuda_runtime_api.h": b"#define CUDART_VERSION 11070\n", **cudart_files,
                         "LICENSE": b"x"},
                        cudart_links),
        nvcc: _tar_xz(d / f"{nvcc}.tar.xz", nvcc,
                      {"bin/ptxas": b"#!/bin/sh\necho 'Cuda compilation tools, release 11.7, V11.7.99'\n",
                       "nvvm/lib64/libnvvm.so": b"\x7fELF", "include/crt/host_config.h": b"/* */\n", "LICENSE": b"y"},
                      {}),
    }
    manifest = {"release_date": "2022-08-03"}
    for comp, top in (("cuda_cudart", cudart), ("cuda_nvcc", nvcc)):
        manifest[comp] = {"name": comp, "license": "CUDA Toolkit", "version": "11.7.99",
                          "linux-x86_64": {"relative_path": f"{comp}/linux-x86_64/{top}.tar.xz", "sha256": shas[top],
                                           "md5": "0" * 32, "size": str((d / f"{top}.tar.xz").stat().st_size)}}
    (d / "redistrib_11.7.1.json").write_text(json.dumps(manifest, indent=4))
    nccl_top = "nccl_2.14.3-1+cuda11.7_x86_64"
    nccl_files, nccl_links = _chain("libnccl", "2", "2.14.3")
    nccl_sha = _tar_xz(d / f"{nccl_top}.txz", nccl_top,
                       {"include/nccl.h": b"#define NCCL_MAJOR 2\n#define NCCL_MINOR 14\n#define NCCL_PATCH 3\n",
                        **nccl_files}, nccl_links)
    cudnn_top = "cudnn-linux-x86_64-8.8.1.3_cuda11-archive"
    files, links = {"include/cudnn_version.h": b"#define CUDNN_MAJOR 8\n#define CUDNN_MINOR 8\n"
                                               b"#define CUDNN_PATCHLEVEL 1\n",
                    "include/cudnn.h": b"#include \"cudnn_version.h\"\n"}, {}
    for lib in ("libcudnn", "libcudnn_ops_infer", "libcudnn_cnn_infer"):
        f, ln = _chain(lib, "8", "8.8.1")
        files.update(f)
        links.update(ln)
    cudnn_sha = _tar_xz(d / f"{cudnn_top}.tar.xz", cudnn_top, files, links)
    manifest_sha = hashlib.sha256((d / "redistrib_11.7.1.json").read_bytes()).hexdigest()
    return {
        "cuda": {"version": "11.7.1", "artifact": {"file": "cuda_11.7.1_515.65.01_linux.run", "sha256": None},
                 "redist": {"manifest": {"file": "redistrib_11.7.1.json", "sha256": manifest_sha},
                            "components": ["cuda_cudart", "cuda_nvcc"]}},
        "nccl": {"version": "2.14.3", "package": "2.14.3-1+cuda11.7",
                 "artifact": {"file": f"{nccl_top}.txz", "sha256": nccl_sha}},
        "cudnn": {"version": "8.8.1.3", "artifact": {"file": f"{cudnn_top}.tar.xz", "sha256": cudnn_sha}},
    }


PLAY = """\
- name: The cuda, nccl and cudnn roles, and their preflight
  hosts: all
  gather_facts: true
  vars:
    peftnode_stack: "{{ lookup('peftnode_stack', peftnode_stack_name) }}"
  tasks:
    - name: Preflight of each role
      ansible.builtin.include_role:
        name: "peftnode_{{ item }}"
        tasks_from: preflight
        apply:
          tags: [preflight]
      loop: [cuda, nccl, cudnn]
      tags: [preflight]
    - name: Show what preflight collected
      ansible.builtin.debug:
        msg: "PREFLIGHT {{ {'problems': peftnode_preflight_problems | default([]),
                            'artifacts': peftnode_preflight_artifacts | default([])} | to_json }}"
      tags: [preflight]
    - name: Apply the roles
      ansible.builtin.include_role:
        name: "peftnode_{{ item }}"
        apply:
          tags: [apply]
      loop: [cuda, nccl, cudnn]
      tags: [apply]
"""


@pytest.fixture
def local(tmp_path):
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"ansible-playbook not installed next to {sys.executable}")
    node = tmp_path / "node"
    artifacts = tmp_path / "artifacts"
    pieces = nvidia_like_artifacts(artifacts)
    stack = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text())
    stack.update(name="nvidia-local", **pieces)
    (tmp_path / "stack.yml").write_text(yaml.safe_dump(stack, sort_keys=False))
    (tmp_path / "play.yml").write_text(PLAY)
    variables = {
        "ansible_python_interpreter": sys.executable,
        "peftnode_stack_name": str(tmp_path / "stack.yml"),
        "peftnode_offline": True,
        "peftnode_artifact_dir": str(artifacts),
        "peftnode_cache_dir": str(node / "cache"),
        "peftnode_cuda_method": "redist",
        "peftnode_cuda_prefix": str(node / "cuda-11.7"),
        "peftnode_cuda_link": str(node / "cuda"),
        "peftnode_cuda_profile": False,  # /etc/profile.d and /etc/ld.so.conf.d are the converge test's
        "peftnode_cuda_ldconfig": False,
        "peftnode_nccl_prefix": str(node / "nccl-2.14.3"),
        "peftnode_nccl_ldconfig": False,
        "peftnode_cudnn_prefix": str(node / "cudnn-8.8.1.3"),
        "peftnode_cudnn_ldconfig": False,
        "peftnode_step_poll": 1,  # an async step is polled every second, not every 10 s
    }
    (tmp_path / "vars.json").write_text(json.dumps(variables))

    def run(*extra: str) -> subprocess.CompletedProcess:
        argv = [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local", "-e", f"@{tmp_path / 'vars.json'}",
                str(tmp_path / "play.yml"), *extra]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600,
                              env=ansible_env(tmp_path, ANSIBLE_PIPELINING="True",
                                              ANSIBLE_ASYNC_DIR=str(tmp_path / "async")))

    return node, pieces, run


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def _preflight(proc: subprocess.CompletedProcess) -> dict:
    for r in results(proc.stdout):
        msg = (r.get("result") or {}).get("msg")
        if isinstance(msg, str) and msg.startswith("PREFLIGHT "):
            return json.loads(msg[len("PREFLIGHT "):])
    raise AssertionError(_explain(proc))


@pytest.mark.slow
def test_roles_install_nvidia_layouts_then_change_nothing(local):
    node, pieces, run = local
    before = run("--tags", "preflight")
    assert before.returncode == 0, _explain(before)
    pre = _preflight(before)
    assert pre["problems"] == []
    assert [(a["component"], a["artifact"]["file"], a["needed"]) for a in pre["artifacts"]] == [
        ("cuda", "redistrib_11.7.1.json", True),
        ("cuda", "cuda_cudart-linux-x86_64-11.7.99-archive.tar.xz", True),  # read from the controller's manifest
        ("cuda", "cuda_nvcc-linux-x86_64-11.7.99-archive.tar.xz", True),
        ("nccl", "nccl_2.14.3-1+cuda11.7_x86_64.txz", True),
        ("cudnn", "cudnn-linux-x86_64-8.8.1.3_cuda11-archive.tar.xz", True),
    ]
    manifest = json.loads((node.parent / "artifacts" / "redistrib_11.7.1.json").read_text())
    assert pre["artifacts"][1]["artifact"]["sha256"] == manifest["cuda_cudart"]["linux-x86_64"]["sha256"]

    first = run("--tags", "apply")
    assert first.returncode == 0, _explain(first)
    cuda = node / "cuda-11.7"
    assert (node / "cuda").readlink() == cuda
    assert (cuda / "lib64").readlink() == Path("lib")
    assert (cuda / "lib64" / "libcudart.so.11.0").resolve() == cuda / "lib" / "libcudart.so.11.7.99"
    assert (cuda / "bin" / "ptxas").stat().st_mode & 0o111
    assert (cuda / "nvvm" / "lib64" / "libnvvm.so").is_file() and (cuda / "include" / "crt").is_dir()
    assert json.loads((cuda / "version.json").read_text()) == {
        "cuda": {"name": "CUDA SDK", "version": "11.7.1"},
        "cuda_cudart": {"name": "cuda_cudart", "version": "11.7.99"},
        "cuda_nvcc": {"name": "cuda_nvcc", "version": "11.7.99"}}
    nccl = node / "nccl-2.14.3"
    assert (nccl / "lib" / "libnccl.so").readlink() == Path("libnccl.so.2")
    assert (nccl / "lib" / "libnccl.so.2").readlink() == Path("libnccl.so.2.14.3")
    assert (nccl / "include" / "nccl.h").is_file()
    cudnn = node / "cudnn-8.8.1.3"
    assert (cudnn / "lib" / "libcudnn_cnn_infer.so.8").readlink() == Path("libcudnn_cnn_infer.so.8.8.1")
    assert sorted(p.name for p in (cudnn / "include").iterdir()) == ["cudnn.h", "cudnn_version.h"]

    second = run("--tags", "apply")
    assert second.returncode == 0, _explain(second)
    assert recap(second.stdout)["localhost"]["changed"] == 0, [r["task"] for r in results(second.stdout)
                                                                if r["status"] == "changed"]
    check = run("--tags", "apply", "--check")
    assert check.returncode == 0 and recap(check.stdout)["localhost"]["changed"] == 0, _explain(check)

    after = _preflight(run("--tags", "preflight"))
    assert after["problems"] == [] and [a["needed"] for a in after["artifacts"]] == [False, False, False]


@pytest.mark.slow
def test_check_mode_on_a_bare_node_reports_and_changes_nothing(local):
    node, _, run = local
    check = run("--tags", "apply", "--check")
    assert check.returncode == 0, _explain(check)
    reported = [r for r in results(check.stdout) if r["task"].endswith("Report what check mode would install")]
    assert [r["status"] for r in reported] == ["changed"] * 3
    assert not (node / "cuda-11.7").exists() and not (node / "nccl-2.14.3").exists()


@pytest.mark.slow
def test_preflight_reports_what_cannot_work(local, tmp_path):
    node, _, run = local
    variables = json.loads((tmp_path / "vars.json").read_text())
    manifest = json.loads((tmp_path / "artifacts" / "redistrib_11.7.1.json").read_text())
    del manifest["cuda_nvcc"]
    (tmp_path / "artifacts" / "redistrib_11.7.1.json").write_text(json.dumps(manifest))
    variables.update(peftnode_cuda_method="runfile", peftnode_cuda_runfile_options=["--driver", "--override"],
                     peftnode_nccl_method="repo", peftnode_nccl_repo_packages=["peftnode-no-such-package-nccl"])
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    pre = _preflight(run("--tags", "preflight"))
    assert any(p.startswith("cuda: peftnode_cuda_runfile_options holds --driver") for p in pre["problems"]), pre
    assert any(p.startswith("nccl: package peftnode-no-such-package-nccl is not offered") for p in pre["problems"]), pre
    assert [a["artifact"]["file"] for a in pre["artifacts"]][:1] == ["cuda_11.7.1_515.65.01_linux.run"]
    # the redist method with a manifest that lacks a listed component
    variables.update(peftnode_cuda_method="redist", peftnode_cuda_runfile_options=[], peftnode_nccl_method="archive")
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    pre = _preflight(run("--tags", "preflight"))
    assert [p for p in pre["problems"] if "cuda_nvcc: not in the manifest" in p], pre
    # the repo method cannot honour another prefix: NVIDIA's packages install into /usr/local/cuda-X.Y
    variables.update(peftnode_cuda_method="repo", peftnode_cuda_repo_packages=["peftnode-no-such-package-cuda"])
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    pre = _preflight(run("--tags", "preflight"))
    assert [p for p in pre["problems"] if p.startswith("cuda: peftnode_cuda_method is repo, whose packages install "
                                                       "into /usr/local/cuda-11.7, but peftnode_cuda_prefix is ")], pre
    assert "cuda: package peftnode-no-such-package-cuda is not offered by any repository configured on the node; " \
           "configure the NVIDIA CUDA repository, or use peftnode_cuda_method runfile or redist" in pre["problems"]


# --- verify's side: the versioned prefixes are searched by default --------------------------------


def test_verify_looks_in_the_versioned_prefixes_before_the_cuda_prefix():
    from checks.cuda.prefixes import cudnn_homes, nccl_homes
    from checks.node import Node

    assert nccl_homes(Node(), "11.7.1", "2.14.3") == (
        ["/usr/local/nccl-2.14.3", "/usr/local/cuda-11.7", "/usr/local/cuda"], True)
    assert cudnn_homes(Node(), "11.7.1", "8.8.1.3") == (
        ["/usr/local/cudnn-8.8.1.3", "/usr/local/cuda-11.7", "/usr/local/cuda"], True)
    # what node_verify writes into the manifest wins, alone (no loader fallback)
    assert nccl_homes(Node(nccl_home="/opt/nccl"), "11.7.1", "2.14.3") == (["/opt/nccl"], False)
    assert cudnn_homes(Node(cudnn_home="/opt/cudnn"), "11.7.1", "8.8.1.3") == (["/opt/cudnn"], False)
    assert nccl_homes(Node(), "12.4.1") == (["/usr/local/cuda-12.4", "/usr/local/cuda"], True)
    # an explicit cuda_home means NCCL and cuDNN were copied into that toolkit (the seed's way)
    assert cudnn_homes(Node(cuda_home="/opt/cuda"), "11.7.1", "8.8.1.3") == (["/opt/cuda"], True)
