"""Judges of the python.* checks on captured data, plus the probes on this interpreter."""

import ssl
import sys

import pytest

from checks.python import (
    PackageProbe,
    PythonProbe,
    judge_openssl,
    judge_package,
    judge_python,
    probe_package,
    python_packages,
    python_version,
)
from checks.registry import Context, all_checks
from checks.result import Status


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
    ("accelerate==0.18.0", PackageProbe("not a version", None), Status.FAIL, "invalid version 'not a version'"),
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


def test_python_version_check_reads_this_interpreter(ctx):
    v = python_version(ctx)
    assert v.measured["executable"].value == sys.executable


def test_packages_check_judges_each_requirement_against_this_environment(cu117):
    import packaging

    stack = {**cu117.data, "venv": {**cu117.data["venv"], "requirements": [
        f"packaging=={packaging.__version__}", "packaging<1", "surely-not-installed-pkg-xyz"]}}
    ok, old, absent = python_packages(Context(stack, cu117.expectations()))
    assert ok.status is Status.PASS and old.status is Status.FAIL and "does not satisfy <1" in old.message
    assert absent.status is Status.FAIL and "not installed" in absent.message


def test_python_group_lives_in_checks_python():
    specs = [s for s in all_checks() if s.group == "python"]
    assert {s.name for s in specs} == {"python.version", "python.openssl", "python.packages"}
    assert {s.target.partition(":")[0] for s in specs} == {"checks.python"}
