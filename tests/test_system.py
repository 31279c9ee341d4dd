"""Judges of the system/python checks on captured data, plus the probes on this real machine."""

import ssl
import sys

import pytest

from checks.result import Status
from checks.system import (
    DiskProbe,
    PackageProbe,
    PythonProbe,
    judge_disk,
    judge_openssl,
    judge_os,
    judge_package,
    judge_python,
    parse_os_release,
    probe_disk,
    probe_os,
    probe_package,
    system_disk,
)

CENTOS7 = 'NAME="CentOS Linux"\nVERSION="7 (Core)"\nID="centos"\nID_LIKE="rhel fedora"\nVERSION_ID="7"\n' \
          'PRETTY_NAME="CentOS Linux 7 (Core)"\n'


def facts(text, arch="x86_64"):
    return {**parse_os_release(text), "kernel": "3.10.0-1160.el7.x86_64", "arch": arch}


def test_os_centos7_is_supported():
    v = judge_os(facts(CENTOS7))
    assert v.status is Status.PASS and "CentOS Linux 7" in v.message


@pytest.mark.parametrize("text, arch, reason", [
    ('ID=centos\nVERSION_ID="6"\n', "x86_64", "centos 6 is not a supported release"),
    ('ID=arch\n', "x86_64", "arch is not a distribution peftnode provisions"),
    ('ID=ubuntu\nVERSION_ID="23.10"\n', "x86_64", "ubuntu 23.10 is not a supported release"),
    ('ID=rocky\nVERSION_ID="9.3"\n', "aarch64", "architecture aarch64"),
    ('', "x86_64", "no /etc/os-release"),
])
def test_os_unsupported_is_a_warning_with_reason(text, arch, reason):
    v = judge_os(facts(text, arch))
    assert v.status is Status.WARN and reason in v.message


def test_os_probe_on_this_machine():
    f = probe_os()
    assert f["kernel"] and f["arch"]
    assert judge_os(f).status in (Status.PASS, Status.WARN)


def test_python_pass_in_the_stack_venv():
    p = PythonProbe("3.10.12", "/opt/v/peft-venv-py310-cu117/bin/python", "/opt/v/peft-venv-py310-cu117", "/usr/local")
    assert judge_python(p, "3.10.12", "peft-venv-py310-cu117").status is Status.PASS


@pytest.mark.parametrize("probe, status, text", [
    (PythonProbe("3.11.7", "/x/bin/python", "/x", "/usr"), Status.FAIL, "Python 3.11.7 runs this check"),
    (PythonProbe("3.10.11", "/v/bin/python", "/opt/peft-venv-py310-cu117", "/usr"), Status.WARN, "patch release"),
    (PythonProbe("3.10.12", "/usr/bin/python3", "/usr", "/usr"), Status.WARN, "not running inside a virtualenv"),
    (PythonProbe("3.10.12", "/o/bin/python", "/o/other-venv", "/usr"), Status.WARN, "'other-venv'"),
])
def test_python_faults(probe, status, text):
    v = judge_python(probe, "3.10.12", "peft-venv-py310-cu117")
    assert v.status is status and text in v.message
    assert v.remediation


def test_openssl_judge():
    assert judge_openssl("OpenSSL 1.1.1t  7 Feb 2023", "1.1.1t").status is Status.PASS
    wrong = judge_openssl("OpenSSL 1.0.2k-fips  26 Jan 2017", "1.1.1t")
    assert wrong.status is Status.FAIL and wrong.measured["openssl"].value == "1.0.2k"
    assert judge_openssl(None, "1.1.1t").status is Status.FAIL
    assert judge_openssl("LibreSSL 3.3.6", "1.1.1t").status is Status.FAIL


def test_openssl_of_this_interpreter_is_read():
    v = judge_openssl(ssl.OPENSSL_VERSION, "0.0.0z")
    assert v.status is Status.FAIL and v.measured["openssl"].value[0].isdigit()


@pytest.mark.parametrize("req, probe, status, text", [
    ("torch==1.13.1+cu117", PackageProbe("1.13.1+cu117", None), Status.PASS, "torch 1.13.1+cu117"),
    ("torch==1.13.1+cu117", PackageProbe("1.13.1+cu116", None), Status.FAIL, "does not satisfy"),
    ("torch==1.13.1+cu117", PackageProbe("2.13.0+cpu", None), Status.FAIL, "does not satisfy"),
    ("torch==1.13.1", PackageProbe("1.13.1+cu117", None), Status.PASS, ""),  # PEP 440: local label ignored
    ("datasets", PackageProbe(None, None), Status.FAIL, "datasets is not installed"),
    ("transformers>=4.27,<5", PackageProbe("5.24.0", None), Status.FAIL, "does not satisfy"),
    ("peft @ git+https://github.com/huggingface/peft.git@42ab106",
     PackageProbe("0.3.0.dev0", {"url": "https://github.com/huggingface/peft.git",
                                 "vcs_info": {"vcs": "git", "commit_id": "42ab10699b8a3fb0b4c8b5ed9e8c1c1e6b3a5d2f"}}),
     Status.PASS, "at commit 42ab10699b8a"),
    ("peft @ git+https://github.com/huggingface/peft.git@42ab106",
     PackageProbe("0.3.0.dev0", {"url": "https://github.com/huggingface/peft.git",
                                 "vcs_info": {"vcs": "git", "commit_id": "deadbeefdeadbeef"}}),
     Status.FAIL, "at commit deadbeefdead, the stack pins 42ab106"),
    ("peft @ git+https://github.com/huggingface/peft.git@42ab106", PackageProbe("0.21.2", None),
     Status.WARN, "revision cannot be confirmed"),
])
def test_package_judge(req, probe, status, text):
    v = judge_package(req, probe)
    assert v.status is status and text in v.message
    assert v.subject == req.split()[0].split("=")[0].split(">")[0]


def test_package_probe_reads_real_metadata():
    import packaging

    probe = probe_package("packaging")
    assert probe.version == packaging.__version__
    assert probe_package("surely-not-installed-pkg-xyz").version is None


def test_disk_judge():
    ok = judge_disk(DiskProbe("/data", "/data", 50 * 1024**3, 100 * 1024**3), "data", 20)
    assert ok.status is Status.PASS and ok.measured["free"].value == 50.0 and ok.measured["free"].unit == "GiB"
    low = judge_disk(DiskProbe("/data/models/x", "/", 2 * 1024**3, 100 * 1024**3), "model", 5)
    assert low.status is Status.FAIL and "needs 5 GiB" in low.message and "measured on /" in low.message


def test_disk_probe_walks_up_to_an_existing_parent(tmp_path):
    probe = probe_disk(str(tmp_path / "not" / "yet"))
    assert probe.measured_at == str(tmp_path) and probe.free_bytes > 0


def test_disk_check_uses_node_thresholds(ctx, tmp_path):
    ctx.stack = {**ctx.stack, "model": {**ctx.stack["model"], "path": str(tmp_path / "m")}}
    ctx.node = {**ctx.node, "data_path": str(tmp_path), "min_free_gib": {"model": 0, "data": 1e9}}
    model, data = system_disk(ctx)
    assert (model.subject, model.status) == ("model", Status.PASS)
    assert (data.subject, data.status) == ("data", Status.FAIL)


def test_python_version_check_reads_this_interpreter(ctx):
    from checks.system import python_version

    v = python_version(ctx)
    assert v.measured["executable"].value == sys.executable
