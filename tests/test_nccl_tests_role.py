"""roles/peftnode_nccl_tests for real on this machine, confined to tmp_path.

The real nccl-tests source cannot be fetched here and there is no nvcc (NVIDIA's nvcc wheel ships
ptxas but no nvcc binary), so the test writes a stand-in SOURCE tarball with nccl-tests' interface:
a top directory ``nccl-tests-<version>/`` whose Makefile honours MPI, CUDA_HOME, NCCL_HOME and
BUILDDIR, compiles one C program per collective with ``$(CUDA_HOME)/bin/nvcc`` and
``-I$(NCCL_HOME)/include``, and leaves ``build/<collective>_perf``. The stand-in CUDA prefix's
``bin/nvcc`` is a shell script that logs its arguments and make's MAKEFLAGS and runs cc; the
stand-in NCCL prefix has an ``include/nccl.h`` with NCCL 2.14.3's version macros. The programs print
an nccl-tests result table (their version and NCCL's, from the headers they were compiled against).

site.yml runs with ``--tags nccl_tests`` and connection=local, every path under tmp_path, proving:
the make arguments, the install location and the stable link, the stamp, a second run that changes
nothing, check mode that agrees, a rebuild when the artifact's sha256 changes, a clear failure when
nvcc is missing, and that verify's nccl.allreduce finds all_reduce_perf behind the link.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_roles_static import (  # noqa: E402
    ANSIBLE_PLAYBOOK,
    REPO,
    explain,
    playbook,
    recap,
    results,
    sha256,
    write_yaml,
)

from checks import nccl  # noqa: E402
from checks.registry import Context  # noqa: E402
from checks.result import Status  # noqa: E402
from checks.stack import load_stack  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                       reason=f"ansible-playbook not installed next to {sys.executable}"),
    pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                       reason="the stand-in nccl-tests source needs make and cc"),
]

VERSION = "2.13.9"
TOP = f"nccl-tests-{VERSION}"
ARTIFACT = f"{TOP}.tar.gz"
COLLECTIVES = ["all_reduce", "all_gather", "broadcast", "reduce_scatter", "reduce", "alltoall", "scatter",
               "gather", "sendrecv", "hypercube"]  # what nccl-tests 2.13 builds
COMPILE = "peftnode_nccl_tests : Compile nccl-tests with "

MAKEFILE = """\
# Stand-in for NVIDIA nccl-tests' Makefile: same variables, same outputs.
CUDA_HOME ?= /usr/local/cuda
NCCL_HOME ?= ""
MPI ?= 0
BUILDDIR ?= $(abspath ./build)
NVCC = $(CUDA_HOME)/bin/nvcc
COLLECTIVES = {collectives}
BIN_FILES = $(COLLECTIVES:%=$(BUILDDIR)/%_perf)

ifneq ($(NCCL_HOME), "")
NVCUFLAGS += -I$(NCCL_HOME)/include/
endif
ifeq ($(MPI), 1)
NVCUFLAGS += -DMPI_SUPPORT -I$(MPI_HOME)/include
endif

default: src.build
src.build: $(BIN_FILES)

$(BUILDDIR)/%_perf: src/perf.c
\t@mkdir -p $(BUILDDIR)
\t$(NVCC) -o $@ $(NVCUFLAGS) -DCOLLECTIVE='"$*"' -DREVISION={revision} $<
"""

PERF_C = r"""/* Stand-in for an nccl-tests program: prints a result table like all_reduce_perf's. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <nccl.h>
#ifdef MPI_SUPPORT
#error "the stand-in is built with MPI=0 only"
#endif

int main(int argc, char **argv) {
    long bytes = 268435456; int gpus = 1;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "-b")) bytes = atol(argv[i + 1]);
        if (!strcmp(argv[i], "-g")) gpus = atoi(argv[i + 1]);
    }
    printf("# nccl-tests version %s nccl-headers=%d nccl-library=%d\n", "VERSION_STRING", NCCL_VERSION_CODE,
           NCCL_VERSION_CODE);
    printf("# stand-in %s_perf, revision %d\n", COLLECTIVE, REVISION);
    printf("# nThread 1 nGpus %d minBytes %ld maxBytes %ld step: 2(factor) warmup iters: 5 iters: 20 "
           "agg iters: 1 validation: 1 graph: 0\n#\n# Using devices\n", gpus, bytes, bytes);
    for (int r = 0; r < gpus; r++)
        printf("#  Rank %2d Group  0 Pid  1000 on  localhost device %2d [0x%02x] Stand-in GPU\n", r, r, r);
    printf("#\n#       size         count      type   redop    root     time   algbw   busbw #wrong"
           "     time   algbw   busbw #wrong\n");
    printf("#        (B)    (elements)                               (us)  (GB/s)  (GB/s)       "
           "     (us)  (GB/s)  (GB/s)       \n");
    printf("%12ld  %12ld     float     sum      -1   1000.0  268.44  469.77      0   1000.0  268.44  469.77      0\n",
           bytes, bytes / 4);
    printf("# Out of bounds values : 0 OK\n# Avg bus bandwidth    : 469.77\n#\n");
    return 0;
}
"""

NCCL_H = """\
#ifndef NCCL_H_
#define NCCL_H_
#define NCCL_MAJOR 2
#define NCCL_MINOR 14
#define NCCL_PATCH 3
#define NCCL_VERSION_CODE 21403
#endif
"""

NVCC = """\
#!/bin/sh
# Stand-in nvcc: log the call (and make's MAKEFLAGS) next to this script, then compile with cc.
printf '%s | MAKEFLAGS=%s\\n' "$*" "$MAKEFLAGS" >> "$(dirname "$0")/../nvcc.log"
exec cc "$@"
"""


def source_tarball(path: Path, revision: int) -> Path:
    """A stand-in nccl-tests source tarball; a different revision gives different bytes (sha256)."""
    files = {
        f"{TOP}/Makefile": MAKEFILE.format(collectives=" ".join(COLLECTIVES), revision=revision),
        f"{TOP}/src/perf.c": PERF_C.replace("VERSION_STRING", VERSION),
        f"{TOP}/README.md": f"stand-in nccl-tests {VERSION}, revision {revision}\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return path


def changed_tasks(stdout: str) -> list[str]:
    return [r["task"] for r in results(stdout) if r["status"] == "changed"]


@pytest.fixture
def nccl_tests_node(tmp_path):
    cuda, nccl_home, node, artifacts = (tmp_path / "cuda-11.7", tmp_path / "nccl-2.14.3", tmp_path / "node",
                                        tmp_path / "artifacts")
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text(NVCC)
    (cuda / "bin" / "nvcc").chmod(0o755)
    (nccl_home / "include").mkdir(parents=True)
    (nccl_home / "include" / "nccl.h").write_text(NCCL_H)

    def stack(revision: int, section: bool = True) -> Path:
        tarball = source_tarball(artifacts / ARTIFACT, revision)
        data = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
        data["name"] = "nccl-tests-local"
        data["nccl_tests"] = {"version": VERSION, "artifact": {"file": ARTIFACT, "sha256": sha256(tarball)}}
        if not section:
            del data["nccl_tests"]
        path = write_yaml(tmp_path / "stack.yml", data)
        load_stack(str(path))  # still a valid stack
        return path

    variables = write_yaml(tmp_path / "vars.yml", {
        "ansible_python_interpreter": sys.executable,
        "peftnode_stack_name": str(tmp_path / "stack.yml"),
        "peftnode_offline": True,
        "peftnode_artifact_dir": str(artifacts),
        "peftnode_cache_dir": str(node / "cache"),
        "peftnode_build_jobs": 2,
        "peftnode_cuda_prefix": str(cuda),
        "peftnode_nccl_prefix": str(nccl_home),
        "peftnode_nccl_tests_prefix": str(node / f"nccl-tests-{VERSION}"),
        "peftnode_nccl_tests_link": str(node / "nccl-tests"),
    })

    def run(*extra: str):
        return playbook(tmp_path, "site.yml", "-i", "localhost,", "-c", "local", "--tags", "nccl_tests",
                        "-e", f"@{variables}", *extra)

    return {"cuda": cuda, "nccl": nccl_home, "node": node, "stack": stack, "run": run}


def test_builds_installs_links_then_changes_nothing_and_rebuilds_for_a_new_sha256(nccl_tests_node, monkeypatch):
    n = nccl_tests_node
    node, cuda, nccl_home, run = n["node"], n["cuda"], n["nccl"], n["run"]
    prefix, link = node / f"nccl-tests-{VERSION}", node / "nccl-tests"
    n["stack"](1)

    first = run()
    assert first.returncode == 0, explain(first)
    done = changed_tasks(first.stdout)
    make = f"make MPI=0 CUDA_HOME={cuda} NCCL_HOME={nccl_home} -j2"
    assert COMPILE + make in done, done
    assert "peftnode_artifact : Copy the artifact to the node" in done
    assert "peftnode_nccl_tests : Write the stamp of this build" in done
    assert "peftnode_nccl_tests : Point the stable link at this nccl-tests" in done

    # make got exactly those variables on its command line, and nvcc the NCCL headers' directory
    log = (cuda / "nvcc.log").read_text().splitlines()
    assert len(log) == len(COLLECTIVES), log
    for line in log:
        flags = line.split("MAKEFLAGS=", 1)[1]
        assert f"CUDA_HOME={cuda}" in flags and f"NCCL_HOME={nccl_home}" in flags and "MPI=0" in flags, flags
        assert "-j2" in flags or "j2" in flags.split(), flags
        assert f"-I{nccl_home}/include/" in line

    # the programs, in the versioned prefix behind the stable link, and the stamp
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == sorted(f"{c}_perf" for c in COLLECTIVES)
    assert link.readlink() == prefix
    stamp = json.loads((prefix / "peftnode-build.json").read_text())
    assert stamp == {"version": VERSION, "artifact": ARTIFACT,
                     "artifact_sha256": sha256(node.parent / "artifacts" / ARTIFACT),
                     "cuda_home": str(cuda), "nccl_home": str(nccl_home), "make_options": []}
    assert not (node / "cache" / "build" / f"nccl-tests-{VERSION}").exists()  # source tree removed

    # verify's nccl.allreduce finds all_reduce_perf behind the link, PATH or not, and runs it
    defaults = yaml.safe_load((REPO / "roles" / "peftnode_nccl_tests" / "defaults" / "main.yml").read_text())
    assert nccl.NCCL_TESTS_DIRS == (defaults["peftnode_nccl_tests_link"] + "/bin",)  # the role's default link
    with monkeypatch.context() as m:  # PATH without it: only the link can lead verify there
        m.setattr(nccl, "NCCL_TESTS_DIRS", (str(link / "bin"),))
        m.setenv("PATH", str(node / "empty"))
        assert nccl.find_all_reduce_perf() == str(link / "bin" / "all_reduce_perf")
        m.setattr(nccl, "cuda_status", lambda: (False, 0, "torch (CPU build): no NVIDIA driver"))
        cu117 = load_stack("cu117")
        torch_v, tests_v = nccl.nccl_allreduce(Context(cu117.data, {**cu117.expectations(), "gpus": 2}, quick=True))
        assert torch_v.subject == "torch" and torch_v.status is Status.FAIL
        measured = {k: getattr(v, "value", v) for k, v in tests_v.measured.items()}
        assert tests_v.subject == "nccl-tests" and measured["nccl_tests"] == VERSION
        assert measured["busbw"] == pytest.approx(469.77) and measured["ranks"] == 2
        assert tests_v.status is Status.PASS, tests_v.message

    # a second run changes nothing; check mode on the built node agrees
    second = run()
    assert second.returncode == 0, explain(second)
    assert recap(second.stdout)["localhost"]["changed"] == 0, changed_tasks(second.stdout)
    check = run("--check", "--diff")
    assert check.returncode == 0, explain(check)
    assert recap(check.stdout)["localhost"]["changed"] == 0, changed_tasks(check.stdout)

    # another source tarball (another sha256 in the stack): check mode says it would rebuild, a run rebuilds
    n["stack"](2)
    check = run("--check")
    assert check.returncode == 0, explain(check)
    assert "peftnode_nccl_tests : Report the build check mode skips" in changed_tasks(check.stdout)
    third = run()
    assert third.returncode == 0, explain(third)
    assert COMPILE + make in changed_tasks(third.stdout)
    assert json.loads((prefix / "peftnode-build.json").read_text())["artifact_sha256"] == sha256(
        node.parent / "artifacts" / ARTIFACT)
    out = subprocess.run([str(link / "bin" / "all_reduce_perf"), "-b", "8", "-e", "8", "-g", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "revision 2" in out and "nccl-headers=21403" in out


def test_without_nvcc_the_build_stops_naming_what_is_missing(nccl_tests_node):
    n = nccl_tests_node
    (n["cuda"] / "bin" / "nvcc").unlink()
    n["stack"](1)
    proc = n["run"]()
    assert proc.returncode != 0
    [fatal] = [r for r in results(proc.stdout) if r["status"] == "fatal"]
    assert fatal["task"] == "peftnode_nccl_tests : Check the CUDA toolkit and NCCL are there to build against"
    msg = " ".join(fatal["result"]["msg"].split())
    assert f"{n['cuda']}/bin/nvcc is missing: apply the cuda and nccl roles first" in msg, msg
    assert not (n["node"] / f"nccl-tests-{VERSION}").exists()


def test_disabled_or_absent_from_the_stack_builds_nothing(nccl_tests_node):
    n = nccl_tests_node
    n["stack"](1)
    proc = n["run"]("-e", "peftnode_nccl_tests_enabled=false")
    assert proc.returncode == 0, explain(proc)
    assert recap(proc.stdout)["localhost"]["changed"] == 0
    said = [r for r in results(proc.stdout) if r["task"] == "peftnode_nccl_tests : Say nccl-tests is left out"]
    assert said and "peftnode_nccl_tests_enabled is false" in said[0]["result"]["msg"]
    assert not (n["node"] / f"nccl-tests-{VERSION}").exists()

    n["stack"](1, section=False)  # no nccl_tests in the stack: off by default
    proc = n["run"]()
    assert proc.returncode == 0, explain(proc)
    assert recap(proc.stdout)["localhost"]["changed"] == 0
    said = [r for r in results(proc.stdout) if r["task"] == "peftnode_nccl_tests : Say nccl-tests is left out"]
    assert said and "(the stack has no nccl_tests)" in said[0]["result"]["msg"]
