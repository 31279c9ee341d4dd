"""Judges of the system checks (OS, disk) on captured data, plus the probes on this real machine."""

import platform
from pathlib import Path

import pytest

from checks.registry import Context
from checks.result import Status
from checks.system import (
    DiskProbe,
    host_facts,
    judge_disk,
    judge_os,
    parse_os_release,
    probe_disk,
    probe_os,
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
    ('', "x86_64", "linux is not a distribution"),  # os-release(5): ID defaults to "linux"
])
def test_os_unsupported_is_a_warning_with_reason(text, arch, reason):
    v = judge_os(facts(text, arch))
    assert v.status is Status.WARN and reason in v.message


def test_os_rhel_and_ubuntu_releases():
    assert judge_os(facts('ID="rhel"\nVERSION_ID="8.9"\n')).status is Status.PASS  # the major is listed
    assert judge_os(facts("ID=ubuntu\nVERSION_ID=22.04\n")).status is Status.PASS


def test_os_release_rules():
    parsed = parse_os_release("# a comment\nNAME='Some OS'\nPRETTY_NAME=\"A \\\"quoted\\\" \\$name\"\nBROKEN LINE\n"
                              "VERSION_ID=1.2\nEMPTY=\n")
    assert parsed["NAME"] == "Some OS" and parsed["PRETTY_NAME"] == 'A "quoted" $name'
    assert parsed["VERSION_ID"] == "1.2" and parsed["EMPTY"] == "" and parsed["ID"] == "linux"
    assert "BROKEN LINE" not in " ".join(parsed)


def test_os_release_parsed_like_the_standard_library_on_this_machine():
    """The path parameter parses by the rules platform.freedesktop_os_release() applies."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if Path(path).is_file():
            break
    else:
        pytest.skip("this machine has no os-release file")
    assert parse_os_release(Path(path).read_text()) == platform.freedesktop_os_release()
    assert {k: v for k, v in probe_os(path).items() if k not in ("kernel", "arch")} == \
        platform.freedesktop_os_release()


def test_os_probe_of_a_given_file_and_of_none(tmp_path):
    (tmp_path / "os-release").write_text(CENTOS7)
    f = probe_os(tmp_path / "os-release")
    assert (f["ID"], f["VERSION_ID"], f["arch"]) == ("centos", "7", platform.machine())
    absent = probe_os(tmp_path / "absent")
    assert "ID" not in absent and absent["kernel"] == platform.release()
    v = judge_os(absent)
    assert v.status is Status.WARN and "no /etc/os-release" in v.message


def test_os_probe_on_this_machine():
    f = probe_os()
    assert f["kernel"] and f["arch"]
    assert judge_os(f).status in (Status.PASS, Status.WARN)
    assert host_facts()["os"] == f["PRETTY_NAME"]


def test_disk_judge():
    ok = judge_disk(DiskProbe("/data", "/data", 50 * 1024**3, 100 * 1024**3), "data", 20)
    assert ok.status is Status.PASS and ok.measured["free"].value == 50.0 and ok.measured["free"].unit == "GiB"
    low = judge_disk(DiskProbe("/data/models/x", "/", 2 * 1024**3, 100 * 1024**3), "model", 5)
    assert low.status is Status.FAIL and "needs 5 GiB" in low.message and "measured on /" in low.message


def test_disk_probe_walks_up_to_an_existing_parent(tmp_path):
    probe = probe_disk(str(tmp_path / "not" / "yet"))
    assert probe.measured_at == str(tmp_path) and probe.free_bytes > 0


def test_disk_check_uses_node_thresholds(cu117, tmp_path):
    stack = {**cu117.data, "model": {**cu117.data["model"], "path": str(tmp_path / "m")}}
    ctx = Context(stack, {**cu117.expectations(), "data_path": str(tmp_path),
                          "min_free_gib": {"model": 0, "data": 1e9}})
    model, data = system_disk(ctx)
    assert (model.subject, model.status) == ("model", Status.PASS)
    assert (data.subject, data.status) == ("data", Status.FAIL)
    assert data.expected["free"].value == 1e9


def test_disk_check_defaults_without_node_thresholds(cu117, tmp_path):
    ctx = Context(cu117.data, {"data_path": str(tmp_path)})
    model, data = system_disk(ctx)
    assert (model.expected["free"].value, data.expected["free"].value) == (5.0, 20.0)
