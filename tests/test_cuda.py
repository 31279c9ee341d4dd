"""CUDA toolkit, NCCL, cuDNN and torch's view of them.

Pure decoders and judges are tested on numbers and hand-made probes. The probes are tested on a
CUDA-like prefix built from NVIDIA's real redistributable wheels (tests/helpers/cuda_prefix.py):
the checks load the real libnccl.so.2 and libcudnn.so.8 and call their version functions, which
work without a GPU. If the wheels cannot be downloaded these tests fail, unless PEFTNODE_OFFLINE=1
says the run is offline on purpose; then they skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from checks.cuda.libs import LibProbe, judge_cudnn, judge_nccl
from checks.cuda.prefixes import cuda_home_candidates, cudnn_homes, nccl_homes
from checks.cuda.toolkit import ToolkitProbe, judge_cuda_toolkit, probe_cuda_toolkit
from checks.cuda.torch_view import GpuCompute, TorchProbe, judge_torch_view, probe_torch
from checks.cuda.versions import (
    decode_cudart,
    decode_cudnn,
    decode_nccl,
    fmt,
    major_minor,
    parse_compiler_version,
    parse_cuda_runtime_header,
    parse_cudnn_header,
    parse_nccl_header,
    parse_version,
    parse_version_json,
    parse_version_txt,
    same,
)
from checks.node import Node
from checks.registry import _REGISTRY, Context, all_checks
from checks.result import Status
from checks.runner import run_checks
from checks.stack import load_stack
from tests.helpers import cuda_prefix

PTXAS_OUT = ("ptxas: NVIDIA (R) Ptx optimizing assembler\nCopyright (c) 2005-2022 NVIDIA Corporation\n"
             "Built on Wed_Jun__8_16:48:14_PDT_2022\nCuda compilation tools, release 11.7, V11.7.99\n"
             "Build cuda_11.7.r11.7/compiler.31442593_0\n")
NVCC_OUT = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131\n"


def context(stack: str = "cu117", **node) -> Context:
    s = load_stack(stack)
    return Context(s.data, {**s.expectations(), **node})


def run(name: str, ctx: Context):
    """The registered check function itself, called in this process; always a list of verdicts."""
    out = _REGISTRY[name].load()(ctx)
    return out if isinstance(out, list) else [out]


def real_prefix_or_report(env=os.environ) -> Path:
    try:
        return cuda_prefix.ensure_prefix().path
    except cuda_prefix.PrefixUnavailable as exc:
        if env.get("PEFTNODE_OFFLINE") == "1":
            pytest.skip(f"PEFTNODE_OFFLINE=1 and NVIDIA's wheels are not cached: {exc}")
        pytest.fail(f"{exc} (set PEFTNODE_OFFLINE=1 to skip the real-wheel tests on an offline machine)",
                    pytrace=False)


@pytest.fixture(scope="session")
def prefix() -> Path:
    return real_prefix_or_report()


@pytest.fixture
def at_prefix(prefix):
    """cu117 expectations pointing every home at the real prefix."""
    return context(cuda_home=str(prefix), nccl_home=str(prefix), cudnn_home=str(prefix))


# --- pure helpers --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, release", [
    ("8.8.1.3", (8, 8, 1, 3)), ("2.14.3", (2, 14, 3)), ("11.7.1", (11, 7, 1)), ("515.65.01", (515, 65, 1)),
    ("11.7", (11, 7)), (" 12.4 ", (12, 4)),
    ("1.13.1+cu117", None), ("11.8.0rc1", None), ("2.0.post1", None), ("1!2.0", None), ("", None), (None, None),
    ("eleven", None), ("11..7", None),
])
def test_parse_version_reads_plain_releases_only(text, release):
    assert parse_version(text) == release


def test_release_helpers():
    assert fmt((2, 14, 3)) == "2.14.3" and fmt(None) is None
    assert same((8, 8, 1), (8, 8, 1, 3), 3) and not same((8, 8, 1), (8, 8, 1, 3), 4) and not same(None, (1,), 1)
    assert same((11, 7), (11, 7, 1), 2) and not same((11, 8), (11, 7, 1), 2)
    assert major_minor("11.7.1") == "11.7" and major_minor("12.4") == "12.4"


def test_decode_nccl_both_encodings():
    assert decode_nccl(21403) == (2, 14, 3)
    assert decode_nccl(22105) == (2, 21, 5)
    assert decode_nccl(2708) == (2, 7, 8)  # before 2.9: major*1000 + minor*100 + patch
    assert decode_nccl(2804) == (2, 8, 4)
    assert decode_nccl(30001) == (3, 0, 1)


def test_decode_cudnn_both_encodings():
    assert decode_cudnn(8801) == (8, 8, 1)
    assert decode_cudnn(8500) == (8, 5, 0)
    assert decode_cudnn(7605) == (7, 6, 5)
    assert decode_cudnn(90100) == (9, 1, 0)  # cuDNN 9: major*10000 + minor*100 + patch
    assert decode_cudnn(91002) == (9, 10, 2)


def test_decode_cudart():
    assert decode_cudart(11070) == (11, 7)
    assert decode_cudart(12040) == (12, 4)
    assert decode_cudart(11080) == (11, 8)


def test_parse_compiler_version():
    assert parse_compiler_version(PTXAS_OUT) == (11, 7, 99)
    assert parse_compiler_version(NVCC_OUT) == (12, 4, 131)
    assert parse_compiler_version("Cuda compilation tools, release 10.2") == (10, 2)
    assert parse_compiler_version("bash: nvcc: command not found") is None


def test_parse_headers():
    assert parse_cuda_runtime_header("/* x */\n#define CUDART_VERSION  11070\n# define __CUDART_API_VERSION "
                                     "CUDART_VERSION\n") == (11, 7)
    assert parse_cuda_runtime_header("#define CUDART_VERSIONX 1\n") is None
    nccl_h = "#define NCCL_MAJOR 2\n#define NCCL_MINOR 14\n#define NCCL_PATCH 3\n#define NCCL_SUFFIX \"\"\n"
    assert parse_nccl_header(nccl_h) == (2, 14, 3)
    assert parse_nccl_header("#define NCCL_MAJOR 2\n") is None
    cudnn_h = "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 1\n#define CUDNN_PATCHLEVEL 0\n"
    assert parse_cudnn_header(cudnn_h) == (9, 1, 0)


def test_parse_version_files():
    text = ('{"cuda": {"name": "CUDA SDK", "version": "11.7.1"}, "cuda_cudart": {"name": "CUDA Runtime", '
            '"version": "11.7.99"}, "odd": 3}')
    assert parse_version_json(text) == {"cuda": "11.7.1", "cuda_cudart": "11.7.99"}
    assert parse_version_json("not json") == {}
    assert parse_version_txt("CUDA Version 10.2.89\n") == (10, 2, 89)


# --- where to look: the node's homes, else the roles' prefixes -----------------------------------

def test_prefixes_from_the_typed_node():
    assert cuda_home_candidates(Node(), "11.7.1") == ["/usr/local/cuda-11.7", "/usr/local/cuda"]
    assert cuda_home_candidates(Node(cuda_home="/opt/cuda"), "11.7.1") == ["/opt/cuda"]
    assert nccl_homes(Node(), "11.7.1", "2.14.3") == (
        ["/usr/local/nccl-2.14.3", "/usr/local/cuda-11.7", "/usr/local/cuda"], True)
    assert nccl_homes(Node(nccl_home="/opt/nccl", cuda_home="/opt/cuda"), "11.7.1", "2.14.3") == (["/opt/nccl"], False)
    assert cudnn_homes(Node(cuda_home="/opt/cuda"), "12.4.1", "9.1.0.70") == (["/opt/cuda"], True)
    # what a Context made from a plain mapping holds is the same Node
    assert cudnn_homes(context(cudnn_home="/opt/cudnn").node, "11.7.1", "8.8.1.3") == (["/opt/cudnn"], False)


# --- the compiler's version, through the process layer ------------------------------------------

def fake_tool(prefix: Path, name: str, body: str) -> None:
    """An executable bin/<name> in a toolkit-like prefix: this machine has no CUDA toolkit."""
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    tool = prefix / "bin" / name
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)


def test_compiler_version_read_from_nvcc_and_failures_named(tmp_path):
    fake_tool(tmp_path, "nvcc", f"cat <<'EOF'\n{NVCC_OUT}EOF\n")
    probe = probe_cuda_toolkit([str(tmp_path / "absent"), str(tmp_path)])
    assert probe.prefix == str(tmp_path) and probe.tried[0].endswith("absent")
    assert (probe.compiler_tool, probe.compiler_version, probe.compiler_error) == ("nvcc", "12.4.131", None)

    fake_tool(tmp_path, "nvcc", "echo 'nvcc fatal   : Unknown option' >&2\nexit 1\n")
    fake_tool(tmp_path, "ptxas", f"cat <<'EOF'\n{PTXAS_OUT}EOF\n")
    probe = probe_cuda_toolkit([str(tmp_path)])
    assert (probe.compiler_tool, probe.compiler_version) == ("ptxas", "11.7.99")
    assert probe.compiler_error == f"{tmp_path}/bin/nvcc --version exited with code 1: nvcc fatal   : Unknown option"


def test_a_hanging_compiler_is_killed_at_the_deadline(tmp_path):
    fake_tool(tmp_path, "nvcc", "sleep 30 &\nwait\n")  # and a child of its own, which must go too
    fake_tool(tmp_path, "ptxas", "echo 'no version here'\n")
    started = time.monotonic()
    probe = probe_cuda_toolkit([str(tmp_path)], timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert probe.compiler_version is None
    assert f"{tmp_path}/bin/nvcc --version timed out after 0.5 s and was killed" in probe.compiler_error
    assert "bin/ptxas --version printed no release line" in probe.compiler_error
    v = judge_cuda_toolkit(probe, "11.7.1")
    assert v.status is Status.FAIL and "no version.json" in v.message  # the prefix holds nothing else


# --- judges on hand-made probes --------------------------------------------------------------------

def toolkit(**kw) -> ToolkitProbe:
    base = dict(tried=["/usr/local/cuda-11.7"], prefix="/usr/local/cuda-11.7",
                version_json={"cuda": "11.7.1", "cuda_cudart": "11.7.99"}, header_version="11.7",
                compiler_tool="nvcc", compiler_version="11.7.99", cudart_libs=["/usr/local/cuda-11.7/lib64/x"])
    return ToolkitProbe(**{**base, **kw})


def test_toolkit_judge_pass_with_version_json_and_nvcc():
    v = judge_cuda_toolkit(toolkit(), "11.7.1")
    assert v.status is Status.PASS, v.message
    assert v.measured["runtime"].value == "11.7.1" and v.measured["compiler"].value == "11.7.99"


def test_toolkit_judge_patch_mismatch_warns_and_minor_mismatch_fails():
    v = judge_cuda_toolkit(toolkit(version_json={"cuda": "11.7.0"}), "11.7.1")
    assert v.status is Status.WARN and "version.json cuda says 11.7.0" in v.message
    v = judge_cuda_toolkit(toolkit(version_json={"cuda": "11.8.0"}, header_version="11.8"), "11.7.1")
    assert v.status is Status.FAIL and "is not 11.7" in v.message and "11.8.0" in v.message


def test_toolkit_judge_compiler_from_another_release_fails():
    v = judge_cuda_toolkit(toolkit(compiler_version="12.4.131"), "11.7.1")
    assert v.status is Status.FAIL and "bin/nvcc is release 12.4" in v.message


def test_toolkit_judge_without_any_version_source_fails():
    v = judge_cuda_toolkit(toolkit(version_json={}, header_version=None), "11.7.1")
    assert v.status is Status.FAIL and "no version.json" in v.message and "cuda role" in v.remediation


def test_toolkit_judge_without_compiler_warns():
    v = judge_cuda_toolkit(toolkit(compiler_tool=None, compiler_version=None, compiler_error="no bin/nvcc; no "
                                   "bin/ptxas"), "11.7.1")
    assert v.status is Status.WARN and "no bin/nvcc" in v.message and "nvcc" in v.message


def test_nccl_judge_rules():
    ok = LibProbe("/p/lib64/libnccl.so.2", 21403, None, "/p/include/nccl.h", "2.14.3")
    assert judge_nccl(ok, "2.14.3").status is Status.PASS
    v = judge_nccl(ok, "2.21.5")
    assert v.status is Status.FAIL and "NCCL 2.14.3 is loaded" in v.message and "2.21.5" in v.message
    old = LibProbe("/p/lib64/libnccl.so.2", 2708, None)
    assert judge_nccl(old, "2.7.8").status is Status.PASS
    mixed = LibProbe("/p/lib64/libnccl.so.2", 21403, None, "/usr/include/nccl.h", "2.12.12")
    v = judge_nccl(mixed, "2.14.3")
    assert v.status is Status.FAIL and "two installs are mixed" in v.message


def test_cudnn_judge_compares_three_components_and_says_so():
    ok = LibProbe("/p/lib64/libcudnn.so.8", 8801, None, "/p/include/cudnn_version.h", "8.8.1",
                  {"missing_sublibs": [], "cudart_code": 11080})
    v = judge_cudnn(ok, "8.8.1.3")
    assert v.status is Status.PASS
    assert "reports 3 components" in v.message and v.measured["built_for_cudart"].value == "11.8"
    v = judge_cudnn(ok, "9.1.0.70")
    assert v.status is Status.FAIL and "cuDNN 8.8.1 is loaded" in v.message
    lacking = LibProbe("/p/lib64/libcudnn.so.8", None, "not called", "/p/include/cudnn_version.h", "8.8.1",
                       {"missing_sublibs": ["libcudnn_cnn_infer.so.8"]})
    v = judge_cudnn(lacking, "8.8.1.3")
    assert v.status is Status.FAIL and "lacks libcudnn_cnn_infer.so.8" in v.message and "cp -P" in v.remediation
    assert v.measured["header"].value == "8.8.1"


def gpu_probe(n=8, **kw) -> TorchProbe:
    base = dict(torch_version="1.13.1+cu117", cuda="11.7", cudnn_code=8801, cuda_available=True,
                device_count=n, nccl="2.14.3", nvml_count=n,
                compute=[GpuCompute(i, "NVIDIA A800-SXM4-80GB", 3e-6, True) for i in range(n)])
    return TorchProbe(**{**base, **kw})


def judge_view(probe, gpus=8, stack=("11.7.1", "8.8.1.3", "2.14.3")):
    return {v.subject: v for v in judge_torch_view(probe, *stack, gpus, "torch==1.13.1+cu117")}


def test_torch_view_all_matching_passes_on_every_gpu():
    verdicts = judge_view(gpu_probe())
    assert set(verdicts) == {"build", "devices", *(f"gpu{i}" for i in range(8))}
    assert all(v.status is Status.PASS for v in verdicts.values()), [v.message for v in verdicts.values()]
    assert verdicts["build"].measured["nccl"].value == "2.14.3"


def test_torch_view_cuda_and_nccl_mismatches_fail():
    v = judge_view(gpu_probe(cuda="11.8", nccl="2.15.5"))["build"]
    assert v.status is Status.FAIL
    assert "built for CUDA 11.8" in v.message and "NCCL is 2.15.5" in v.message


def test_torch_view_own_cudnn_differing_from_the_system_one_warns():
    # torch 1.13.1+cu117 carries cuDNN 8.5.0 while the seed's system cuDNN is 8.8.1.3
    v = judge_view(gpu_probe(cudnn_code=8500))["build"]
    assert v.status is Status.WARN and "own cuDNN 8.5.0" in v.message


def test_torch_view_device_count_mismatch_fails():
    v = judge_view(gpu_probe(n=7, nvml_count=7), gpus=8)["devices"]
    assert v.status is Status.FAIL and "torch sees 7 GPU(s)" in v.message
    v = judge_view(gpu_probe(nvml_count=9), gpus=8)["devices"]
    assert v.status is Status.FAIL and "NVML counts 9" in v.message


def test_torch_view_numerical_mismatch_and_gpu_error_fail():
    compute = [GpuCompute(i, "A800", 3e-6, True) for i in range(8)]
    compute[3] = GpuCompute(3, "A800", 0.25, False)
    compute[5] = GpuCompute(5, "A800", None, False, "RuntimeError: CUDA error: uncorrectable ECC error encountered")
    verdicts = judge_view(gpu_probe(compute=compute))
    assert verdicts["gpu3"].status is Status.FAIL and "differs from the CPU by up to 0.25" in verdicts["gpu3"].message
    assert verdicts["gpu5"].status is Status.FAIL and "ECC" in verdicts["gpu5"].message
    assert verdicts["gpu0"].status is Status.PASS


def test_torch_view_cuda_unavailable_fails_with_reason():
    verdicts = judge_view(gpu_probe(cuda_available=False, cuda_error="RuntimeError: Found no NVIDIA driver",
                                    device_count=None, compute=[]))
    assert verdicts["devices"].status is Status.FAIL and "Found no NVIDIA driver" in verdicts["devices"].message


def test_torch_view_cpu_build_and_import_error():
    [v] = judge_torch_view(TorchProbe("2.13.0+cpu"), "11.7.1", "8.8.1.3", "2.14.3", 8)
    assert v.status is Status.FAIL and v.message.startswith("CPU-only torch build")
    [v] = judge_torch_view(TorchProbe(None, "ImportError: libcudnn.so.8: cannot open"), "11.7.1", "8.8.1.3",
                           "2.14.3", 8)
    assert v.status is Status.FAIL and "cannot be imported" in v.message


# --- the real wheels -----------------------------------------------------------------------------

def test_real_prefix_toolkit_is_11_7(at_prefix, prefix):
    [v] = run("cuda.toolkit", at_prefix)
    assert v.measured["runtime"].value == "11.7"
    assert v.measured["runtime_source"].value == "include/cuda_runtime_api.h"
    assert v.measured["compiler"].value == "11.7.99" and v.measured["compiler_tool"].value == "ptxas"
    # the wheels ship ptxas but no nvcc: healthy, with the reason it is not a plain pass
    assert v.status is Status.WARN and "bin/nvcc is absent" in v.message


def test_real_prefix_nccl_is_2_14_3(at_prefix, prefix):
    [v] = run("cuda.nccl", at_prefix)
    assert v.status is Status.PASS, v.message
    assert v.measured["version"].value == "2.14.3" and v.measured["code"].value == 21403
    assert v.measured["library"].value == str(prefix / "lib64" / "libnccl.so.2")
    assert v.measured["header"].value == "2.14.3"


def test_real_prefix_cudnn_is_8_8_1(at_prefix, prefix):
    [v] = run("cuda.cudnn", at_prefix)
    assert v.status is Status.PASS, v.message
    assert v.measured["version"].value == "8.8.1" and v.measured["code"].value == 8801
    assert v.measured["library"].value == str(prefix / "lib64" / "libcudnn.so.8")
    assert "reports 3 components" in v.message and "8.8.1.3" not in v.measured["version"].value


def test_real_prefix_against_the_cu124_stack_fails_everywhere(prefix):
    ctx = context("cu124", cuda_home=str(prefix), nccl_home=str(prefix), cudnn_home=str(prefix))
    [tk] = run("cuda.toolkit", ctx)
    assert tk.status is Status.FAIL and "is not 12.4" in tk.message
    [nccl] = run("cuda.nccl", ctx)
    assert nccl.status is Status.FAIL and "NCCL 2.14.3 is loaded" in nccl.message and "2.21.5" in nccl.message
    [cudnn] = run("cuda.cudnn", ctx)  # tries libcudnn.so.9 first, finds the 8
    assert cudnn.status is Status.FAIL and "cuDNN 8.8.1 is loaded" in cudnn.message and "9.1.0" in cudnn.message


def test_real_prefix_through_the_runner_in_worker_processes(at_prefix):
    names = ["cuda.toolkit", "cuda.nccl", "cuda.cudnn"]
    assert _REGISTRY["cuda.nccl"].isolate and _REGISTRY["cuda.cudnn"].isolate
    assert _REGISTRY["cuda.torch"].worker == "torch" and _REGISTRY["cuda.torch"].needs == ("gpu.driver",)
    results = {r.name: r for r in run_checks([_REGISTRY[n] for n in names], at_prefix)}
    assert results["cuda.toolkit"].measured["runtime"].value == "11.7"
    assert results["cuda.nccl"].status is Status.PASS and results["cuda.nccl"].measured["version"].value == "2.14.3"
    assert results["cuda.cudnn"].status is Status.PASS and results["cuda.cudnn"].measured["version"].value == "8.8.1"


def test_real_nccl_found_through_the_dynamic_loader(prefix, tmp_path, monkeypatch):
    # No nccl_home and no NCCL in the CUDA prefix: the worker finds it on LD_LIBRARY_PATH.
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{prefix / 'lib64'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    ctx = context(cuda_home=str(tmp_path / "empty-cuda"))
    [r] = run_checks([_REGISTRY["cuda.nccl"]], ctx)
    assert r.status is Status.PASS, r.message
    assert r.measured["library"].value == str(prefix / "lib64" / "libnccl.so.2")


def test_loader_fallback_reports_what_it_tried_and_a_broken_find(tmp_path, monkeypatch):
    import ctypes.util

    if ctypes.util.find_library("nccl"):
        pytest.skip("this machine has NCCL on the loader path")
    ctx = context(cuda_home=str(tmp_path / "empty-cuda"))
    [r] = run_checks([_REGISTRY["cuda.nccl"]], ctx)
    assert r.status is Status.FAIL and "NCCL not found" in r.message
    assert f"in {tmp_path / 'empty-cuda' / 'lib64'}, {tmp_path / 'empty-cuda' / 'lib'}, then the dynamic loader " \
           "for libnccl.so.2, libnccl.so" in r.message
    broken = tmp_path / "ld"
    broken.mkdir()
    (broken / "libnccl.so.2").write_text("not a library\n" * 20)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(broken))
    [r] = run_checks([_REGISTRY["cuda.nccl"]], ctx)
    assert r.status is Status.FAIL and "unusable" in r.message and "invalid ELF header" in r.message


def test_real_nccl_with_a_header_from_another_release_is_a_mixed_install(prefix, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "lib" / "libnccl.so.2").symlink_to(prefix / "lib64" / "libnccl.so.2")
    (tmp_path / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n#define NCCL_MINOR 12\n#define NCCL_PATCH 12\n")
    [r] = run_checks([_REGISTRY["cuda.nccl"]], context(nccl_home=str(tmp_path)))
    assert r.status is Status.FAIL and "two installs are mixed" in r.message and "2.12.12" in r.message
    assert r.measured["library"].value == str(tmp_path / "lib" / "libnccl.so.2")


def test_real_cudnn_without_its_sub_libraries_fails_instead_of_aborting(prefix, tmp_path):
    # cudnnGetVersion() of the real libcudnn.so.8 dlopens libcudnn_ops_infer.so.8 and calls abort()
    # when it is missing: the probe must not call it then.
    (tmp_path / "lib64").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "lib64" / "libcudnn.so.8").symlink_to(prefix / "lib64" / "libcudnn.so.8")
    shutil.copy(prefix / "include" / "cudnn_version.h", tmp_path / "include")
    # In a worker process, as verify runs it: in this one the real library is already loaded (same
    # file), and the loader would hand that copy back.
    [r] = run_checks([_REGISTRY["cuda.cudnn"]], context(cudnn_home=str(tmp_path)))
    assert r.status is Status.FAIL and r.measured["header"].value == "8.8.1", r.message
    assert "libcudnn_ops_infer.so.8" in r.message and "libcudnn_cnn_infer.so.8" in r.message
    assert r.measured["library"].value == str(tmp_path / "lib64" / "libcudnn.so.8")
    assert r.measured["library_file"].value == str((prefix / "lib64" / "libcudnn.so.8").resolve())


def test_a_library_without_the_version_symbol_is_named(prefix, tmp_path):
    (tmp_path / "lib64").mkdir()
    shutil.copy(prefix / "lib64" / "libcudart.so.11.0", tmp_path / "lib64" / "libnccl.so.2")
    [v] = run("cuda.nccl", context(nccl_home=str(tmp_path)))
    assert v.status is Status.FAIL and "has no ncclGetVersion()" in v.message


# --- missing and broken installs -----------------------------------------------------------------

def test_missing_prefix_fails_naming_the_paths(tmp_path):
    gone = str(tmp_path / "cuda-11.7")
    ctx = context(cuda_home=gone, nccl_home=str(tmp_path / "nccl"), cudnn_home=str(tmp_path / "cudnn"))
    [tk] = run("cuda.toolkit", ctx)
    assert tk.status is Status.FAIL and gone in tk.message and "cuda role" in tk.remediation
    [nccl] = run("cuda.nccl", ctx)
    assert nccl.status is Status.FAIL and "NCCL not found" in nccl.message and "nccl role" in nccl.remediation
    assert f"libnccl.so.2, libnccl.so in {tmp_path / 'nccl' / 'lib64'}, {tmp_path / 'nccl' / 'lib'})" in nccl.message
    [cudnn] = run("cuda.cudnn", ctx)  # the stack's major first
    assert cudnn.status is Status.FAIL and f"libcudnn.so.8, libcudnn.so.9, libcudnn.so in {tmp_path / 'cudnn'}" \
        in cudnn.message and "dynamic loader" not in cudnn.message  # an explicit home is the only place


def test_default_prefixes_on_this_machine():
    """Without node.cuda_home: /usr/local/cuda-11.7, then /usr/local/cuda (a symlink to another
    release on some machines, which must then fail with the version it holds)."""
    [v] = run("cuda.toolkit", context())
    if Path("/usr/local/cuda-11.7").exists():
        pytest.skip("this machine has /usr/local/cuda-11.7")
    assert v.status is Status.FAIL
    if not Path("/usr/local/cuda").exists():
        assert "none of /usr/local/cuda-11.7, /usr/local/cuda exists" in v.message
    else:
        assert v.message.startswith("CUDA at /usr/local/cuda") and "is not 11.7" in v.message


@pytest.mark.parametrize("check,name", [("cuda.nccl", "libnccl.so.2"), ("cuda.cudnn", "libcudnn.so.8")])
def test_a_corrupt_library_is_a_failure_with_the_reason_not_a_traceback(tmp_path, check, name):
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / name).write_text("this is a text file, not a shared library\n" * 20)
    ctx = context(nccl_home=str(tmp_path), cudnn_home=str(tmp_path))
    [v] = run(check, ctx)
    assert v.status is Status.FAIL and "is unusable: cannot load" in v.message and "invalid ELF header" in v.message
    [r] = run_checks([_REGISTRY[check]], ctx)  # the same through a worker process
    assert r.status is Status.FAIL and "Traceback" not in r.message and "invalid ELF header" in r.message


def test_a_truncated_library_is_named_too(tmp_path):
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libnccl.so.2").write_bytes(b"\x7fELF")
    [v] = run("cuda.nccl", context(nccl_home=str(tmp_path)))
    assert v.status is Status.FAIL and "file too short" in v.message


# --- torch on this machine -----------------------------------------------------------------------

def test_torch_view_cpu_only_torch_on_a_gpu_node_fails():
    import torch

    if torch.version.cuda is not None:
        pytest.skip(f"torch {torch.__version__} is a CUDA build")
    [v] = run("cuda.torch", context(gpus=8))
    assert v.status is Status.FAIL and v.message.startswith("CPU-only torch build") and "8 GPU(s)" in v.message
    assert "torch==1.13.1+cu117" in v.remediation


def test_torch_view_on_a_node_without_gpus_skips_with_the_reason():
    [r] = run_checks([_REGISTRY["cuda.torch"]], context(gpus=0))  # the runner's rule: needs_gpus
    assert r.status is Status.SKIP and "node.gpus = 0" in r.message


def test_torch_view_is_blocked_by_a_failing_driver_check():
    # A driver version no machine has: gpu.driver fails here (no driver) and on a GPU node (another
    # version) alike, and cuda.torch is not run but names the root cause.
    s = load_stack("cu117")
    stack = {**s.data, "nvidia_driver": {**s.data["nvidia_driver"], "version": "1.0.0"}}
    specs = [spec for spec in all_checks() if spec.name in ("gpu.driver", "cuda.torch")]
    driver, view = run_checks(specs, Context(stack, {**s.expectations(), "gpus": 8}))
    assert (driver.name, driver.status) == ("gpu.driver", Status.FAIL)
    assert view.name == "cuda.torch" and view.status is Status.SKIP
    assert view.message == f"blocked by gpu.driver ({driver.message})"


@pytest.mark.gpu
def test_torch_view_on_real_gpus():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU and a CUDA build of torch: torch.cuda.is_available() is False")
    probe = probe_torch()
    assert probe.device_count == torch.cuda.device_count() and len(probe.compute) == probe.device_count
    assert all(g.allclose and g.error is None for g in probe.compute), probe.compute
    if probe.nvml_count is not None:
        assert probe.nvml_count == probe.device_count


# --- the fixture's own rules ---------------------------------------------------------------------

def test_download_failure_skips_only_when_offline_is_declared(monkeypatch):
    def unavailable():
        raise cuda_prefix.PrefixUnavailable("pip download failed: no route to the index")

    monkeypatch.setattr(cuda_prefix, "ensure_prefix", unavailable)
    with pytest.raises(pytest.skip.Exception, match="no route"):
        real_prefix_or_report({"PEFTNODE_OFFLINE": "1"})
    with pytest.raises(pytest.fail.Exception, match="PEFTNODE_OFFLINE=1"):
        real_prefix_or_report({})


def test_a_failing_pip_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTNODE_NVIDIA_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_prefix, "WHEELS", [("nvidia-nccl-cu11", "0.0.0.999", "0" * 64, {})])
    with pytest.raises(cuda_prefix.PrefixUnavailable, match="nvidia-nccl-cu11==0.0.0.999"):
        cuda_prefix.ensure_prefix()


def test_invoke_verify_only_cuda_reports_the_three_versions(prefix, tmp_path):
    """Issue 3's 'done when': `invoke verify --only cuda` against the real-wheel prefix."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "r.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "invoke"), "verify", "--only", "cuda.toolkit,cuda.nccl,cuda.cudnn",
         "--expect", f"cuda_home={prefix}", "--json", str(report)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = {r["name"]: r for r in json.loads(report.read_text())["results"]}
    assert found["cuda.toolkit"]["measured"]["runtime"]["value"] == "11.7"
    assert found["cuda.nccl"]["measured"]["version"]["value"] == "2.14.3"
    assert found["cuda.cudnn"]["measured"]["version"]["value"] == "8.8.1"
