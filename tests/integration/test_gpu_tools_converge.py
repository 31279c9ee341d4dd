"""The dcgm role for real in a booted Debian bookworm systemd container: a package file installed with
apt, its host engine unit enabled and started by systemd, a second run that changes nothing, and the
repo method's failure naming the packages and the repository they come from.

DCGM itself cannot run without an NVIDIA driver, and NVIDIA's package cannot be fetched here: the test
builds a stand-in ``datacenter-gpu-manager`` 1:3.3.9 with ``dpkg-deb --build`` — ``/usr/bin/dcgmi``
answering ``--version`` like DCGM 3.x, ``/usr/bin/nv-hostengine`` that only sleeps, and
``nvidia-dcgm.service`` running it as DCGM's unit does — and serves it through the artifact path
(controller directory, sha256 in the stack, offline). Nothing here starts JupyterLab.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration import container as ct

pytestmark = pytest.mark.converge

VERSION = "3.3.9"
DEB = f"datacenter-gpu-manager_{VERSION}_all.deb"
FILES = {
    "DEBIAN/control": f"""\
Package: datacenter-gpu-manager
Version: 1:{VERSION}
Architecture: all
Maintainer: peftnode tests <tests@localhost>
Description: stand-in for NVIDIA DCGM {VERSION} (peftnode converge test)
""",
    "usr/bin/dcgmi": f"""\
#!/bin/sh
# stand-in dcgmi: DCGM 3.x prints its version like this
if [ "$1" = --version ]; then printf '\\ndcgmi  version: {VERSION}\\n\\n'; exit 0; fi
echo "stand-in dcgmi: only --version" >&2; exit 1
""",
    "usr/bin/nv-hostengine": "#!/bin/sh\n# stand-in host engine: stays up until stopped\nexec sleep infinity\n",
    "usr/lib/systemd/system/nvidia-dcgm.service": """\
[Unit]
Description=stand-in NVIDIA DCGM host engine (peftnode converge test)

[Service]
ExecStart=/usr/bin/nv-hostengine -n --service-account nvidia-dcgm
Restart=on-abort

[Install]
WantedBy=multi-user.target
""",
}
RESULTS: dict = {}


def build_deb(directory: Path) -> Path:
    root = directory / "pkg"
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if "/bin/" in f"/{name}" else 0o644)
    out = directory / "artifacts" / DEB
    out.parent.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(out)], check=True,
                   capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def dcgm_inputs(node, tmp_path_factory):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is needed to build the stand-in DCGM package")
    d = tmp_path_factory.mktemp("dcgm")
    deb = build_deb(d)

    def stack(version: str = VERSION) -> Path:
        from checks.stack import validate_stack

        data = yaml.safe_load((ct.ROOT / "stacks" / "cu117.yml").read_text())
        data["name"] = "gpu-tools-converge"
        data["dcgm"] = {"version": version, "artifact": {"file": deb.name, "sha256": ct.sha256_file(deb)}}
        path = d / f"stack-{version}.yml"
        path.write_text(yaml.safe_dump(validate_stack(data, "dcgm converge stack"), sort_keys=False))
        return path

    yield {"artifact_dir": deb.parent, "stack": stack}
    print(f"\n[converge] dcgm summary: {RESULTS}")


def converge(node, inputs, label: str, **overrides) -> ct.AnsibleRun:
    extra = {"peftnode_stack_name": str(inputs["stack"]()), "peftnode_artifact_dir": str(inputs["artifact_dir"]),
             "peftnode_offline": True, "peftnode_dcgm_method": "artifact", **overrides}
    run = ct.playbook(node, ct.ROOT / "site.yml", extra, label=label, timeout=600, extra_args=("--tags", "dcgm"))
    RESULTS[f"{label}_s"] = run.seconds
    RESULTS[f"{label}_recap"] = run.recap()
    return run


def test_the_package_artifact_is_installed_and_its_host_engine_runs(node, dcgm_inputs):
    first = converge(node, dcgm_inputs, "dcgm-artifact")
    assert first.rc == 0, first.tail()
    done = first.changed_tasks()
    assert "peftnode_artifact : Copy the artifact to the node" in done
    assert "peftnode_dcgm : Install the DCGM package file with apt" in done
    assert "peftnode_dcgm : Enable and start the DCGM host engine (nvidia-dcgm)" in done
    assert "peftnode_dcgm : Restart the DCGM host engine" in done  # the handler after an install

    state = node.ssh("systemctl is-active nvidia-dcgm; systemctl is-enabled nvidia-dcgm; dcgmi --version; "
                     "dpkg-query -W -f='${Version}\\n' datacenter-gpu-manager").stdout.split()
    assert state == ["active", "enabled", "dcgmi", "version:", VERSION, f"1:{VERSION}"], state

    second = converge(node, dcgm_inputs, "dcgm-artifact-again")
    assert second.rc == 0, second.tail()
    assert second.recap()["changed"] == 0, second.changed_tasks()

    # the repo method on the same node: DCGM is at the stack's version already, so nothing to do
    repo = converge(node, dcgm_inputs, "dcgm-repo-current", peftnode_dcgm_method="repo")
    assert repo.rc == 0, repo.tail()
    assert repo.recap()["changed"] == 0, repo.changed_tasks()


def test_the_repo_method_without_nvidias_repository_fails_naming_the_packages(node, dcgm_inputs):
    run = converge(node, dcgm_inputs, "dcgm-repo-missing", peftnode_dcgm_method="repo",
                   peftnode_stack_name=str(dcgm_inputs["stack"]("3.3.8")))
    assert run.rc != 0
    text = " ".join(run.output.replace("''", "'").split())  # YAML doubles a quote inside quotes
    assert "DCGM 3.3.8 could not be installed from the node's repositories (datacenter-gpu-manager=1:3.3.8*)" in text
    assert "These packages come from NVIDIA's CUDA repository" in text
    # what was installed stays as it was
    assert node.ssh("dpkg-query -W -f='${Version}' datacenter-gpu-manager; echo; systemctl is-active nvidia-dcgm"
                    ).stdout.split() == [f"1:{VERSION}", "active"]
