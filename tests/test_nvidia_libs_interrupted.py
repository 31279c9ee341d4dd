"""The cuda (redist), nccl and cudnn (archive) roles after an interrupted or foreign install, run for
real on this machine under tmp_path with the small NVIDIA-like archives of test_nvidia_libs_roles.py.

Each prefix carries the install-state protocol (filter_plugins/peftnode_state.py): a marker written
before anything is unpacked, a stamp written last. These tests leave a prefix as a killed run, an
older peftnode or another stack would, and check what the next run does: install again from an
empty prefix (a stray file does not survive), adopt a correct unstamped prefix (the stamp only,
once), and then change nothing. A prefix shared with the node (/usr/local) is refused.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from tests import test_nvidia_libs_roles
from tests.helpers.ansible_env import results
from tests.test_nvidia_libs_roles import _explain, _preflight, recap

local = test_nvidia_libs_roles.local  # the fixture: the three roles run on this machine, under tmp_path

STAMP = ".peftnode-stamp.json"
MARKER = ".peftnode-incomplete"


def _changed(proc) -> list[str]:
    return [r["task"] for r in results(proc.stdout) if r["status"] == "changed"]


def _expected_stamps(node: Path, pieces: dict, manifest: dict) -> dict[str, dict]:
    cuda_manifest = pieces["cuda"]["redist"]["manifest"]
    return {
        "cuda-11.7": {"component": "cuda", "version": "11.7.1", "prefix": str(node / "cuda-11.7"), "method": "redist",
                      "manifest": cuda_manifest["file"], "manifest_sha256": cuda_manifest["sha256"],
                      "components": ["cuda_cudart", "cuda_nvcc"],
                      "archives": {c: manifest[c]["linux-x86_64"]["sha256"] for c in ("cuda_cudart", "cuda_nvcc")}},
        "nccl-2.14.3": {"component": "nccl", "version": "2.14.3", "prefix": str(node / "nccl-2.14.3"),
                        "method": "archive", "artifact": pieces["nccl"]["artifact"]["file"],
                        "sha256": pieces["nccl"]["artifact"]["sha256"]},
        "cudnn-8.8.1.3": {"component": "cudnn", "version": "8.8.1.3", "prefix": str(node / "cudnn-8.8.1.3"),
                          "method": "archive", "artifact": pieces["cudnn"]["artifact"]["file"],
                          "sha256": pieces["cudnn"]["artifact"]["sha256"]},
    }


def _assert_complete(node: Path, stamps: dict[str, dict]) -> None:
    for prefix, want in stamps.items():
        assert json.loads((node / prefix / STAMP).read_text()) == want, prefix
        assert not (node / prefix / MARKER).exists(), prefix
    assert (node / "nccl-2.14.3" / "lib" / "libnccl.so.2").resolve().is_file()
    assert (node / "cudnn-8.8.1.3" / "lib" / "libcudnn.so.8").resolve().is_file()
    assert (node / "cuda-11.7" / "bin" / "ptxas").is_file()
    assert (node / "cuda-11.7" / "lib64").readlink() == Path("lib")
    assert (node / "cuda").readlink() == node / "cuda-11.7"


@pytest.mark.slow
def test_interrupted_outdated_and_unstamped_prefixes_are_repaired_then_left_alone(local, tmp_path):
    node, pieces, run = local
    first = run("--tags", "apply")
    assert first.returncode == 0, _explain(first)
    manifest = json.loads((tmp_path / "artifacts" / "redistrib_11.7.1.json").read_text())
    stamps = _expected_stamps(node, pieces, manifest)
    _assert_complete(node, stamps)

    # CUDA: killed while unpacking its second component (the marker is there, nvcc's files are not).
    cuda = node / "cuda-11.7"
    (cuda / MARKER).write_text("left by a killed run\n")
    (cuda / STAMP).unlink()
    shutil.rmtree(cuda / "bin")
    (cuda / "stray-from-the-killed-run").write_text("x")
    # cuDNN: stamped by a run of another stack (another version).
    cudnn = node / "cudnn-8.8.1.3"
    (cudnn / STAMP).write_text(json.dumps({**stamps["cudnn-8.8.1.3"], "version": "8.8.0.121"}))
    (cudnn / "stray-from-the-old-install").write_text("x")
    # NCCL: complete and correct, but made before stamps existed.
    nccl = node / "nccl-2.14.3"
    (nccl / STAMP).unlink()
    (nccl / "kept-by-adoption").write_text("x")

    pre = _preflight(run("--tags", "preflight"))
    assert pre["problems"] == []
    assert {a["component"]: a["needed"] for a in pre["artifacts"]} == {"cuda": True, "nccl": False, "cudnn": True}

    check = run("--tags", "apply", "--check")
    assert check.returncode == 0, _explain(check)
    assert (cuda / MARKER).exists() and not (nccl / STAMP).exists() and (cudnn / "stray-from-the-old-install").exists()

    repair = run("--tags", "apply")
    assert repair.returncode == 0, _explain(repair)
    changed = _changed(repair)
    assert "peftnode_cuda : Empty the CUDA prefix, whose install is incomplete" in changed, changed
    assert "peftnode_cudnn : Empty the cuDNN prefix, whose install is outdated" in changed, changed
    assert [t for t in changed if t.startswith("peftnode_nccl")] == [
        f"peftnode_nccl : Adopt, by stamping it, the NCCL already in {nccl}"], changed
    _assert_complete(node, stamps)
    assert not (cuda / "stray-from-the-killed-run").exists() and not (cudnn / "stray-from-the-old-install").exists()
    assert (nccl / "kept-by-adoption").exists()  # adoption only stamps

    again = run("--tags", "apply")
    assert again.returncode == 0 and recap(again.stdout)["localhost"]["changed"] == 0, _changed(again)

    # Round two: NCCL half unpacked with no marker and no stamp (unusable: installed again); CUDA
    # complete but unstamped (adopted: the redist stamp needs the manifest's archive sha256s).
    (nccl / STAMP).unlink()
    (nccl / "lib" / "libnccl.so.2.14.3").unlink()
    (cuda / STAMP).unlink()
    repair = run("--tags", "apply")
    assert repair.returncode == 0, _explain(repair)
    changed = _changed(repair)
    assert "peftnode_nccl : Empty the NCCL prefix, whose install is unstamped" in changed, changed
    assert "peftnode_cuda : Stamp the CUDA prefix with what it holds" in changed, changed
    # (the loader entries under /etc are this machine's, which other tests share: not looked at)
    assert not [t for t in changed if "Unpack" in t and "NCCL" not in t or t.startswith("peftnode_cudnn : Empty")], \
        changed
    _assert_complete(node, stamps)
    assert not (nccl / "kept-by-adoption").exists()
    again = run("--tags", "apply")
    assert again.returncode == 0 and recap(again.stdout)["localhost"]["changed"] == 0, _changed(again)


@pytest.mark.slow
def test_a_prefix_shared_with_the_node_is_refused_and_nothing_is_removed(local, tmp_path):
    node, _, run = local
    variables = json.loads((tmp_path / "vars.json").read_text())
    variables["peftnode_nccl_prefix"] = "/usr/local"
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    pre = _preflight(run("--tags", "preflight"))
    assert "nccl: peftnode_nccl_prefix is /usr/local, a directory shared with the rest of the node; the archive " \
           "method empties its prefix to install again, so it needs one of its own, like /usr/local/nccl-2.14.3" \
           in pre["problems"], pre
    check = run("--tags", "apply", "--check")
    assert check.returncode != 0 and "peftnode_nccl_prefix is /usr/local, a directory shared" in check.stdout

    # A real run, against a top-level directory of our own (also shared: directly under /), so that
    # a failure of the refusal cannot cost this machine its /usr/local.
    shared = Path(f"/peftnode-test-{uuid.uuid4().hex[:8]}")
    try:
        shared.mkdir()
    except OSError:
        pytest.skip("cannot create a directory under / here")
    try:
        (shared / "precious").write_text("x")
        for role in ("cuda", "cudnn"):
            variables[f"peftnode_{role}_prefix"] = str(shared)
            variables["peftnode_nccl_prefix"] = str(node / "nccl-2.14.3")
            (tmp_path / "vars.json").write_text(json.dumps(variables))
            proc = run("--tags", "apply")
            assert proc.returncode != 0, _explain(proc)
            assert f"peftnode_{role}_prefix is {shared}, a directory shared with the rest of the node" in proc.stdout
            assert (shared / "precious").read_text() == "x"
            assert sorted(p.name for p in shared.iterdir()) == ["precious"]
            variables[f"peftnode_{role}_prefix"] = str(node / ("cuda-11.7" if role == "cuda" else "cudnn-8.8.1.3"))
    finally:
        shutil.rmtree(shared)
