"""site.yml for real on this machine, confined to tmp_path: a second run changes nothing.

The roles that would change the system itself (base installs OS packages; jupyterlab adds a user
and a systemd unit) are skipped with --skip-tags; the others run for real with every path they
write under tmp_path:

- openssl and python find their component at the stack's version already (a stand-in OpenSSL
  prefix, and the Python running these tests) and skip the build; python still proves its modules
  import and that ssl reports the stack's OpenSSL;
- venv creates a real virtualenv and installs a real wheel from a wheelhouse with --no-index;
- model copies two files from a controller directory, sha256-checked;
- node_verify writes the manifest, which checks.stack.load_manifest then reads.

The real source builds, JupyterLab under systemd and the packages are the converge test's job
(tests/integration/, in a systemd container).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import platform
import ssl
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_roles_static import (  # noqa: E402  (the helpers of the check-mode tests)
    ANSIBLE_PLAYBOOK,
    REPO,
    explain,
    recap,
    results,
    sha256,
    write_yaml,
)

from checks.stack import load_manifest  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                       reason=f"ansible-playbook not installed next to {sys.executable}"),
]

PYTHON_VERSION = platform.python_version()
PYTHON_PREFIX = Path(sys.base_prefix)
PYTHON_BINARY = PYTHON_PREFIX / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
OPENSSL_VERSION = ssl.OPENSSL_VERSION.split()[1]  # what this Python's ssl module reports
REQUIRED = ["ssl", "_hashlib", "sqlite3", "ctypes", "lzma", "bz2", "zlib", "readline", "uuid"]
DUMMY = "peftnode-roles-test-dummy"
# base installs OS packages, jupyterlab adds a user and a unit; the NVIDIA roles have tests of their own
SKIPPED = "base,jupyterlab,nvidia_driver,fabricmanager,cuda,nccl,cudnn,dcgm,nccl_tests"


def missing_modules() -> list[str]:
    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def wheel(directory: Path, name: str = DUMMY, version: str = "1.0") -> Path:
    """A minimal, valid pure-Python wheel, so pip can install something without any index."""
    dist = name.replace("-", "_")
    files = {
        f"{dist}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: peftnode-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    record.append(f"{dist}-{version}.dist-info/RECORD,,")
    files[f"{dist}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_zip, data in files.items():
            archive.writestr(name_in_zip, data)
    return path


@pytest.fixture
def converge(tmp_path):
    if not PYTHON_BINARY.is_file():
        pytest.skip(f"{PYTHON_BINARY} does not exist (the python role probes <prefix>/bin/pythonX.Y)")
    if missing := missing_modules():
        pytest.skip(f"this Python lacks {', '.join(missing)}, which the python role requires")

    # a stand-in OpenSSL prefix whose bin/openssl reports the version this Python's ssl links
    fake_openssl = tmp_path / "openssl-prefix"
    (fake_openssl / "bin").mkdir(parents=True)
    (fake_openssl / "bin" / "openssl").write_text(f"#!/bin/sh\necho 'OpenSSL {OPENSSL_VERSION}  (stand-in)'\n")
    (fake_openssl / "bin" / "openssl").chmod(0o755)

    model_src, wheelhouse, empty = tmp_path / "model-src", tmp_path / "wheelhouse", tmp_path / "artifacts"
    for d in (model_src, wheelhouse, empty):
        d.mkdir()
    (model_src / "config.json").write_text('{"model_type": "bloom"}\n')
    (model_src / "weights").mkdir()
    (model_src / "weights" / "model.safetensors").write_bytes(bytes(range(256)) * 400)
    wheel(wheelhouse)

    node = tmp_path / "node"
    stack = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
    stack.update(
        name="local",
        openssl={"version": OPENSSL_VERSION, "artifact": {"file": "openssl-unused.tar.gz", "sha256": "0" * 64}},
        python={"version": PYTHON_VERSION, "artifact": {"file": "python-unused.tgz", "sha256": "1" * 64}},
        venv={"name": "local-venv", "path": str(node / "venv"), "requirements": [f"{DUMMY}==1.0"]},
        model={"name": "tiny", "path": str(node / "model"),
               "files": [{"file": "config.json", "sha256": sha256(model_src / "config.json")},
                         {"file": "weights/model.safetensors",
                          "sha256": sha256(model_src / "weights" / "model.safetensors")}]},
    )
    stack["jupyterlab"]["enabled"] = False
    stack_file = write_yaml(tmp_path / "local.yml", stack)
    variables = write_yaml(tmp_path / "vars.yml", {
        "ansible_python_interpreter": sys.executable,
        # async steps (pip install, venv creation, builds): with the private HOME of ansible_env, the
        # local connection's async_status looks under the real ~ while the job writes under HOME
        "ansible_async_dir": str(tmp_path / "async"),
        "peftnode_step_poll": 1,  # an async step (venv, pip) is polled every second, not every 10 s
        "peftnode_stack_name": str(stack_file),
        # nothing may come from anywhere but tmp_path: the source artifacts are not even there,
        # because OpenSSL and Python are at the stack's version already
        "peftnode_offline": True,
        "peftnode_artifact_dir": str(empty),
        "peftnode_model_source_dir": str(model_src),
        "peftnode_tasks_dir": str(node / "peftnode"),
        "peftnode_wheelhouse": str(wheelhouse),
        "peftnode_self_requirement": None,
        "peftnode_cache_dir": str(node / "cache"),
        "peftnode_openssl_prefix": str(fake_openssl),
        "peftnode_openssl_dir": str(node / "ssl"),
        "peftnode_openssl_link": str(node / "openssl"),
        "peftnode_python_prefix": str(PYTHON_PREFIX),
        "peftnode_manifest_path": str(node / "etc" / "manifest.yml"),
        "peftnode_lock_path": str(node / "lock" / "peftnode.lock"),
        "peftnode_lock_script": str(node / "lock" / "bin" / "peftnode-lock"),
        "peftnode_steps_dir": str(node / "lock" / "steps"),
        "peftnode_node_expectations": {"gpu_model": "H200", "min_free_gib": {"data": 1}},
    })

    def run(*extra: str) -> subprocess.CompletedProcess:
        from test_roles_static import playbook

        return playbook(tmp_path, "site.yml", "-i", "localhost,", "-c", "local", "--skip-tags", SKIPPED,
                        "-e", f"@{variables}", *extra)

    return node, stack, run


def changed_tasks(stdout: str) -> list[str]:
    return [r["task"] for r in results(stdout) if r["status"] == "changed"]


def test_site_converges_then_changes_nothing(converge):
    node, stack, run = converge

    first = run()
    assert first.returncode == 0, explain(first)
    done = changed_tasks(first.stdout)
    assert "peftnode_venv : Create the virtualenv local-venv" in done
    assert "peftnode_venv : Install the stack's requirements and peftnode with pip" in done
    assert "peftnode_node_verify : Write the node manifest" in done
    assert done.count("peftnode_artifact : Copy the artifact to the node") == 2  # the two model files
    assert not any("Report the build check mode skips" in t or "Compile" in t for t in done)  # nothing built
    proof = [r for r in results(first.stdout) if r["task"].startswith("peftnode_python : Check the Python imports")]
    assert proof[0]["status"] == "ok" and f"OpenSSL {OPENSSL_VERSION}" in proof[0]["result"]["msg"]

    # what the roles left behind
    assert (node / "openssl").readlink() == node.parent / "openssl-prefix"
    assert (node / "ssl" / "certs").is_symlink()
    pip_list = subprocess.run([str(node / "venv" / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                              capture_output=True, text=True, check=True).stdout
    assert f"{DUMMY}==1.0" in pip_list
    for f in stack["model"]["files"]:
        assert sha256(node / "model" / f["file"]) == f["sha256"]
    manifest = load_manifest(node / "etc" / "manifest.yml")
    assert manifest.data == yaml.safe_load((node.parent / "local.yml").read_text())
    assert manifest.node == {"gpu_model": "H200", "min_free_gib": {"data": 1}}
    assert manifest.expectations()["gpu_model"] == "H200"
    written = yaml.safe_load((node / "etc" / "manifest.yml").read_text())
    assert written["host"] == "localhost" and written["schema"] == 1 and written["written_at"]

    second = run()
    assert second.returncode == 0, explain(second)
    assert recap(second.stdout)["localhost"]["changed"] == 0, changed_tasks(second.stdout)
    assert yaml.safe_load((node / "etc" / "manifest.yml").read_text())["written_at"] == written["written_at"]

    # check mode on the converged node agrees: nothing to do (pip runs with --dry-run)
    check = run("--check", "--diff")
    assert check.returncode == 0, explain(check)
    assert recap(check.stdout)["localhost"]["changed"] == 0, changed_tasks(check.stdout)


def test_a_damaged_model_file_is_put_back_and_a_changed_expectation_rewrites_the_manifest(converge):
    node, stack, run = converge
    assert run("--tags", "model,node_verify").returncode == 0

    damaged = node / "model" / "weights" / "model.safetensors"
    damaged.write_bytes(b"truncated")
    again = run("--tags", "model,node_verify", "-e", '{"peftnode_node_expectations": {"gpus": 2}}')
    assert again.returncode == 0, explain(again)
    assert changed_tasks(again.stdout) == ["peftnode_artifact : Copy the artifact to the node",
                                           "peftnode_node_verify : Write the node manifest"]
    assert sha256(damaged) == stack["model"]["files"][1]["sha256"]
    assert load_manifest(node / "etc" / "manifest.yml").node == {"gpus": 2}
