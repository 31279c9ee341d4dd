"""Tier 3: site.yml converges a real Debian bookworm node (systemd container), offline, from real
upstream sources, and the node then works: OpenSSL 1.1.1w and Python 3.11.2 built from the tarballs,
the venv from the wheelhouse, the model in place, JupyterLab as an unprivileged systemd service that
refuses unauthenticated calls; CUDA 11.7.1 (redist method), NCCL 2.14.3 and cuDNN 8.8.1.3 from
NVIDIA's archives (repacked from NVIDIA's wheels, tests/integration/nvidia_archives.py) in their
versioned prefixes, loadable through the loader's cache. The NVIDIA roles that need a real GPU or
kernel module (driver, fabric manager, DCGM, nccl-tests) are left out with --skip-tags. A second run
changes nothing; a run with a wrong checksum in the stack fails before touching the installed tree;
`invoke verify` inside the node passes, the cuda checks without any --expect.

Timings and changed counts are printed (run with -s) and kept in .cache/converge/timings.json.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
import yaml

from tests.integration import container as ct
from tests.integration import materials as mt

pytestmark = pytest.mark.converge

PASSWORD = "converge-only-password"
JUPYTER = "http://127.0.0.1:9999"  # the stack's bind/port; the container shares the host's loopback
OPENSSL_PREFIX = f"/usr/local/openssl-{mt.OPENSSL_VERSION}"
OPENSSL_LINK = "/usr/local/openssl"
PYTHON_PREFIX = f"/usr/local/python-{mt.PYTHON_VERSION}"
VENV_PY = f"{mt.VENV_PATH}/bin/python"
CUDA_PREFIX = "/usr/local/cuda-11.7"
NCCL_PREFIX = f"/usr/local/nccl-{mt.nv.NCCL_VERSION}"
CUDNN_PREFIX = f"/usr/local/cudnn-{mt.nv.CUDNN_VERSION}"
# The NVIDIA roles a container cannot run for real (a kernel module, a GPU); cuda, nccl and cudnn run.
SKIP_TAGS = "nvidia_driver,fabricmanager,dcgm,nccl_tests"
RESULTS: dict = {}  # timings and counts, printed at the end of the module


@pytest.fixture(scope="module")
def nvidia(converge_host):
    """NVIDIA's archives repacked from its wheels (built once, then cached in .cache/nvidia-archives)."""
    return mt.nvidia_artifacts()


@pytest.fixture(scope="module")
def inputs(node, artifact_dir, wheelhouse_dir, tiny_model, nvidia, tmp_path_factory):
    d = tmp_path_factory.mktemp("stack")
    model_dir, model_files = tiny_model
    good = mt.write_stack(d / "converge.yml", mt.converge_stack(model_files, nvidia=nvidia))
    bad = mt.write_stack(d / "converge-bad-sha.yml",
                         mt.converge_stack(model_files, wrong_sha_for="python", nvidia=nvidia))
    artifacts = mt.merged_artifact_dir(d / "artifacts", artifact_dir, nvidia.dir)
    extra = {
        "peftnode_stack_name": str(good),
        "peftnode_artifact_dir": str(artifacts),
        "peftnode_offline": True,
        "peftnode_wheelhouse": str(wheelhouse_dir),
        "peftnode_model_source_dir": str(model_dir),
        "peftnode_jupyter_password_hash": mt.jupyter_password_hash(PASSWORD),
        "peftnode_gpu": True,
        "peftnode_cuda_method": "redist",
    }
    print(f"\n[converge] artifacts: {sorted(p.name for p in artifacts.iterdir())}")
    print(f"[converge] wheelhouse: {len(list(wheelhouse_dir.glob('*.whl')))} wheels in {wheelhouse_dir}")
    print(f"[converge] stack: {good}")
    yield SimpleNamespace(stack=good, bad_stack=bad, extra=extra, model_files=model_files)
    RESULTS.update({k: v for k, v in ct.timings.items()})
    print(f"\n[converge] summary: {json.dumps(RESULTS, sort_keys=True)}")
    (ct.CACHE / "timings.json").write_text(json.dumps(RESULTS, indent=2, sort_keys=True) + "\n")


def _converge(node, inputs, label: str, timeout: float = 900, **overrides) -> ct.AnsibleRun:
    extra = {**inputs.extra, **overrides}
    run = ct.playbook(node, ct.ROOT / "site.yml", extra, label=label, timeout=timeout,
                      extra_args=("--skip-tags", SKIP_TAGS))
    recap = run.recap()
    RESULTS[f"{label}_s"] = run.seconds
    RESULTS[f"{label}_rc"] = run.rc
    RESULTS[f"{label}_recap"] = recap
    RESULTS[f"{label}_seconds_by_role"] = run.seconds_by_role()
    RESULTS[f"{label}_slowest_tasks"] = run.slowest_tasks()
    print(f"\n[converge] {label}: rc={run.rc} in {run.seconds} s; recap {recap}")
    print(f"[converge] {label}: seconds by role {run.seconds_by_role()}")
    return run


@pytest.fixture(scope="module")
def first(node, inputs):
    if ct.port_in_use(9999):
        pytest.fail("127.0.0.1:9999 is already taken on the host; the container's JupyterLab needs it")
    # ≈ 5-7 min on 2 cores (toolchain, OpenSSL and Python builds, venv); the tier must stay < 45 min.
    return _converge(node, inputs, "converge1", timeout=2100)


@pytest.fixture
def converged(first):
    if first.rc != 0:
        pytest.skip("the first converge failed (see test_first_converge)")
    return first


def test_first_converge(first):
    recap = first.recap()
    assert first.rc == 0 and recap.get("failed") == 0 and recap.get("unreachable") == 0, first.tail(120)
    assert recap.get("changed", 0) > 0, "a converge of a bare node changed nothing?"


def test_openssl_built_from_the_tarball(node, converged):
    out = node.ssh(f"{OPENSSL_LINK}/bin/openssl version").stdout
    assert f"OpenSSL {mt.OPENSSL_VERSION} " in out, out
    target = node.ssh(f"readlink -f {OPENSSL_LINK}").stdout.strip()
    assert target == OPENSSL_PREFIX


def test_venv_python_links_the_stack_openssl(node, converged):
    code = "import ssl, sys; print(sys.version.split()[0]); print(ssl.OPENSSL_VERSION); print(sys.prefix)"
    lines = node.ssh(f"{VENV_PY} -c {shlex.quote(code)}").stdout.splitlines()
    assert lines[0] == mt.PYTHON_VERSION
    assert f"OpenSSL {mt.OPENSSL_VERSION} " in lines[1], lines
    assert lines[2] == mt.VENV_PATH


def test_venv_packages_import(node, converged):
    code = ("import torch, jupyterlab, invoke, yaml, packaging, rich, checks; "
            "print(torch.__version__); print(float(torch.ones(2, 2).sum()))")
    lines = node.ssh(f"{VENV_PY} -c {shlex.quote(code)}", timeout=300).stdout.splitlines()
    assert lines[0].startswith("2.13.0"), lines
    assert lines[1] == "4.0"


def test_model_files_in_place(node, inputs, converged):
    out = node.ssh(f"cd {mt.MODEL_PATH} && sha256sum {' '.join(sorted(inputs.model_files))}").stdout
    got = {name: digest for digest, name in (line.split() for line in out.splitlines())}
    assert got == inputs.model_files


def test_nccl_and_cudnn_load_through_the_loader_and_report_their_versions(node, converged):
    # by soname, no LD_LIBRARY_PATH: the loader finds them through the roles' ld.so.conf.d entries
    code = ("import ctypes; n = ctypes.CDLL('libnccl.so.2'); v = ctypes.c_int(-1); "
            "assert n.ncclGetVersion(ctypes.byref(v)) == 0; print(v.value); "
            "c = ctypes.CDLL('libcudnn.so.8'); c.cudnnGetVersion.restype = ctypes.c_size_t; print(c.cudnnGetVersion())")
    for python in ("/usr/bin/python3", VENV_PY):
        assert node.ssh(f"env -u LD_LIBRARY_PATH {python} -c {shlex.quote(code)}").stdout.split() == ["21403", "8801"]


def test_ptxas_on_the_login_path_is_cuda_11_7(node, converged):
    out = node.ssh("bash -lc 'command -v ptxas; echo $CUDA_HOME; ptxas --version'").stdout
    lines = out.splitlines()
    assert lines[0] == "/usr/local/cuda/bin/ptxas" and lines[1] == "/usr/local/cuda", out
    assert "release 11.7, V11.7.99" in out


def test_ldconfig_resolves_the_libraries_from_the_installed_prefixes(node, converged):
    cache = node.ssh("ldconfig -p").stdout
    want = {"libnccl.so.2": f"{NCCL_PREFIX}/lib/", "libcudart.so.11.0": f"{CUDA_PREFIX}/lib64/",
            **{f"libcudnn{sub}.so.8": f"{CUDNN_PREFIX}/lib/"
               for sub in ("", "_ops_infer", "_ops_train", "_cnn_infer", "_cnn_train", "_adv_infer", "_adv_train")}}
    for lib, where in want.items():
        paths = [line.split("=>")[1].strip() for line in cache.splitlines() if line.strip().startswith(lib + " ")]
        assert paths and all(p.startswith(where) for p in paths), f"{lib}: {paths}"


def test_nvidia_layouts_and_the_manifest_homes(node, converged):
    links = {"/usr/local/cuda": CUDA_PREFIX, f"{CUDA_PREFIX}/lib64": "lib",
             f"{CUDA_PREFIX}/lib/libcudart.so.11.0": "libcudart.so.11.7.99",
             f"{NCCL_PREFIX}/lib/libnccl.so": "libnccl.so.2", f"{NCCL_PREFIX}/lib/libnccl.so.2": "libnccl.so.2.14.3",
             f"{CUDNN_PREFIX}/lib/libcudnn.so.8": "libcudnn.so.8.8.1",
             f"{CUDNN_PREFIX}/lib/libcudnn_cnn_infer.so": "libcudnn_cnn_infer.so.8"}
    out = node.ssh("; ".join(f"readlink {p}" for p in links)).stdout.split()
    assert dict(zip(links, out, strict=True)) == links
    version = json.loads(node.ssh(f"cat {CUDA_PREFIX}/version.json").stdout)
    assert version["cuda"]["version"] == "11.7.1" and version["cuda_nvcc"]["version"] == "11.7.99"
    manifest = yaml.safe_load(node.ssh("cat /etc/peftnode/manifest.yml").stdout)
    assert {k: manifest["node"].get(k) for k in ("cuda_home", "nccl_home", "cudnn_home")} == {
        "cuda_home": CUDA_PREFIX, "nccl_home": NCCL_PREFIX, "cudnn_home": CUDNN_PREFIX}


def test_verify_finds_cuda_nccl_and_cudnn_without_expect(node, converged):
    # cuda.torch is left out: the converge venv has CPU torch (node.gpus is 0, so it would only skip)
    only = "cuda.toolkit,cuda.nccl,cuda.cudnn"
    cmd = (f"cd /opt/peftnode && {mt.VENV_PATH}/bin/invoke verify --only {only} --json /tmp/verify-cuda.json "
           "--no-progress")
    run = node.ssh(cmd, check=False, timeout=300)
    report = json.loads(node.ssh("cat /tmp/verify-cuda.json").stdout)
    got = {r["name"]: r for r in report["results"]}
    summary = {name: f"{r['status']}: {r['message']}" for name, r in got.items()}
    print(f"\n[converge] verify --only {only}: exit {run.returncode}; {json.dumps(summary, indent=1)}")
    RESULTS["verify_cuda"] = {name: r["status"] for name, r in got.items()}
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert got["cuda.nccl"]["status"] == "pass" and NCCL_PREFIX in got["cuda.nccl"]["message"], summary
    assert got["cuda.cudnn"]["status"] == "pass" and CUDNN_PREFIX in got["cuda.cudnn"]["message"], summary
    toolkit = got["cuda.toolkit"]
    # NVIDIA's nvcc wheel has ptxas but no nvcc binary: the toolkit check warns about exactly that
    assert toolkit["status"] == "pass" or (toolkit["status"] == "warn" and "bin/nvcc is absent" in toolkit["message"]
                                           and "ptxas V11.7.99" in toolkit["message"]), summary


def test_jupyterlab_runs_unprivileged(node, converged):
    assert node.ssh("systemctl is-active jupyterlab", check=False).stdout.strip() == "active"
    user = node.ssh("systemctl show -p User --value jupyterlab").stdout.strip()
    assert user and user != "root", f"jupyterlab.service User={user!r}"
    pid = node.ssh("systemctl show -p MainPID --value jupyterlab").stdout.strip()
    uid = node.ssh(f"stat -c %u /proc/{pid}").stdout.strip()
    assert uid != "0", f"jupyterlab main process {pid} runs as uid 0"
    assert node.ssh(f"id -un {uid}").stdout.strip() == user


def _wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_jupyterlab_refuses_unauthenticated_api(converged):
    _wait_http(f"{JUPYTER}/login")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{JUPYTER}/api/contents", timeout=10)
    assert err.value.code == 403


def test_jupyterlab_accepts_the_password(converged):
    _wait_http(f"{JUPYTER}/login")
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{JUPYTER}/login", timeout=10).read()
    xsrf = next((c.value for c in jar if c.name == "_xsrf"), "")
    body = urllib.parse.urlencode({"password": PASSWORD, "_xsrf": xsrf}).encode()
    opener.open(urllib.request.Request(f"{JUPYTER}/login?next=%2F", data=body), timeout=10).read()
    with opener.open(f"{JUPYTER}/api/contents", timeout=10) as resp:
        assert resp.status == 200
        assert json.load(resp)["type"] == "directory"


def test_second_converge_changes_nothing(node, inputs, converged):
    second = _converge(node, inputs, "converge2")
    # the figure the README quotes (the goal is <= 10 %); measured, not asserted: the machine is shared
    RESULTS["no_change_ratio"] = round(second.seconds / converged.seconds, 3)
    print(f"[converge] no-change run: {second.seconds} s = {RESULTS['no_change_ratio']:.1%} of the first converge "
          f"({converged.seconds} s)")
    assert second.rc == 0, second.tail(120)
    assert second.recap().get("changed") == 0, f"changed tasks: {second.changed_tasks()}"


def _tree_fingerprint(node) -> str:
    """Every path, size, mode and mtime under the installed prefixes and the venv."""
    paths = " ".join([OPENSSL_PREFIX, PYTHON_PREFIX, mt.VENV_PATH, CUDA_PREFIX, NCCL_PREFIX, CUDNN_PREFIX])
    cmd = (f"find {paths} -xdev -printf '%p %s %m %T@ %l\\n' | sort | sha256sum; "
           f"readlink {OPENSSL_LINK} /usr/local/cuda")
    return node.ssh(cmd).stdout


def test_wrong_checksum_fails_before_changing_anything(node, inputs, converged):
    before = _tree_fingerprint(node)
    bad = _converge(node, inputs, "converge3_bad_sha", peftnode_stack_name=str(inputs.bad_stack))
    assert bad.rc != 0, "a stack whose python artifact has a wrong sha256 converged anyway"
    assert re.search(r"sha256|checksum", bad.output, re.I), bad.tail(60)
    assert _tree_fingerprint(node) == before, "the failed run changed the installed tree"
    assert node.ssh("systemctl is-active jupyterlab", check=False).stdout.strip() == "active"


def test_verify_passes_inside_the_node(node, converged):
    skip = "gpu,cuda,nccl,perf"
    # node_verify installs tasks.py in /opt/peftnode: `invoke verify` works there as in a checkout
    cmd = f"cd /opt/peftnode && {mt.VENV_PATH}/bin/invoke verify --skip {skip} --json /tmp/verify.json --no-progress"
    print(f"\n[converge] inside the node: {cmd}")
    run = node.ssh(cmd, check=False, timeout=600)
    print(run.stdout[-6000:], run.stderr[-2000:])
    report = json.loads(node.ssh("cat /tmp/verify.json").stdout)
    assert report["stack"]["source"] and "manifest" in report["stack"]["source"], report["stack"]
    by_group: dict[str, list] = {}
    for r in report["results"]:
        by_group.setdefault(r["group"], []).append(r)
    for group in ("system", "python", "jupyter"):
        results = by_group.get(group, [])
        assert results, f"no {group} checks ran"
        bad = [f"{r['name']}: {r['status']}: {r['message']}" for r in results if r["status"] in ("fail", "error")]
        assert not bad, bad
        assert any(r["status"] == "pass" for r in results), results
    RESULTS["verify_exit_code"] = run.returncode
    RESULTS["verify_counts"] = report["counts"]
    others = [f"{r['name']}: {r['status']}: {r['message'].splitlines()[0] if r['message'] else ''}"
              for r in report["results"] if r["status"] != "pass"]
    print(f"[converge] verify exit {run.returncode}; not passing (outside system/python/jupyter): {others}")
