"""JUnit report: valid against the junit-10.xsd Jenkins' xunit plugin validates with (two revisions of it,
fetched from the package index by scripts/fetch-junit-xsd, never committed), one suite per check group,
no copied times on per-part results, the GPU named, and read back by junitparser (the JUnit library CI
reporters such as the publish-unit-test-result action build on)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from checks.cli import main
from checks.registry import Context
from checks.report import Report
from checks.report.junit import check_name, render_junit, to_junit_element, write_junit
from checks.result import GpuId, Result, Status, Value
from checks.runner import run_checks
from tests.helpers.fake_checks import driver_missing as _driver_missing
from tests.helpers.fake_checks import fine as _fine
from tests.helpers.fake_checks import nothing_to_do as _nothing_to_do
from tests.helpers.fake_checks import spec_of as _spec
from tests.helpers.tools import missing

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "scripts" / "fetch-junit-xsd"
STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
NASTY = 'driver said "no" | retry <now> & later\nsecond line'
GPUS = [GpuId(i, f"GPU-{i}1111111-2222-3333-4444-555555555555", f"00000000:{0x18 + i:02X}:00.0", f"165092300000{i}")
        for i in range(4)]


# --------------------------------------------------------------------------- the schemas and the consumer


@pytest.fixture(scope="session")
def schemas() -> dict:
    """name -> xmlschema.XMLSchema, for each junit-10.xsd revision the fetch script provides."""
    try:
        import xmlschema
    except ImportError:
        missing("xmlschema is not installed: it validates the JUnit report against the xunit plugin's XSD "
                "(pip install -e '.[test]')")
    try:
        proc = subprocess.run([sys.executable, str(FETCH)], env={**os.environ, "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        missing("scripts/fetch-junit-xsd did not finish in 600 s: the JUnit XSDs are not available")
    if proc.returncode != 0:
        missing(f"the JUnit XSDs are not available: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    out = {}
    for line in proc.stdout.split():
        path = Path(line)
        out[path.parent.name] = xmlschema.XMLSchema(str(path))
    assert len(out) == 2, proc.stdout
    for name, schema in out.items():
        assert {"testsuites", "testsuite", "testcase"} <= set(schema.elements), name
    return out


def _errors(schemas: dict, xml: str) -> dict[str, list[str]]:
    return {name: [f"{e.reason} at {e.path}" for e in schema.iter_errors(xml)] for name, schema in schemas.items()}


def assert_valid(schemas: dict, xml: str) -> None:
    errors = _errors(schemas, xml)
    assert errors == {name: [] for name in schemas}


@pytest.fixture(scope="session")
def junitparser():
    try:
        import junitparser
    except ImportError:
        missing("junitparser is not installed: it reads the report as CI reporters do (pip install -e '.[test]')")
    return junitparser


def _read_with_junitparser(junitparser, xml: str) -> list[dict]:
    """Per suite: what junitparser reads from the attributes, then what it recounts from the cases."""
    doc = junitparser.JUnitXml.fromstring(xml.encode("utf-8"))
    read = [{"name": s.name, "tests": s.tests, "failures": s.failures, "errors": s.errors, "skipped": s.skipped,
             "time": s.time, "hostname": s.hostname} for s in doc]
    for suite, seen in zip(doc, read, strict=True):
        seen["cases"] = [(c.name, c.classname, c.time, [type(r).__name__ for r in c.result]) for c in suite]
        suite.update_statistics()  # what a consumer that recounts gets
        seen["recounted"] = (suite.tests, suite.failures, suite.errors, suite.skipped)
    return read


# --------------------------------------------------------------------------- reports


def _report(results: list[Result]) -> Report:
    return Report(
        results=results,
        host={"hostname": "gpu-node-01", "os": "Ubuntu 22.04", "kernel": "5.15", "arch": "x86_64", "python": "3.11"},
        stack={"name": "cu124", "source": "stacks/cu124.yml", "description": "CUDA 12.4"},
        started_at=STARTED,
        finished_at=STARTED + timedelta(seconds=3.25),
        options={"only": None, "skip": [], "quick": True, "timeout": 60},
    )


def _every_status() -> list[Result]:
    """Every status, groups interleaved as a runner never would (the first appearance sets the order), a
    check with one result per GPU (one failing), a per-part warn, and a single-subject check."""
    ecc = [
        Result(f"gpu.ecc[gpu{g.index}]", "gpu", Status.FAIL if g.index == 2 else Status.PASS,
               NASTY if g.index == 2 else "no uncorrectable errors",
               measured={"uncorrectable": Value(3 if g.index == 2 else 0, "errors")},
               expected={"uncorrectable": Value(0, "errors")},
               remediation="reset GPU 2 (nvidia-smi -r -i 2), then rerun" if g.index == 2 else None,
               duration_s=0.8, gpu=g)
        for g in GPUS
    ]
    return [
        Result("system.os", "system", Status.PASS, "Ubuntu 22.04", duration_s=0.004),
        Result("gpu.driver", "gpu", Status.PASS, "driver 550.54", duration_s=0.25),
        *ecc,
        Result("python.torch", "python", Status.ERROR, "probe crashed: ImportError", remediation="Reinstall torch",
               duration_s=1.5),
        Result("gpu.throttle[gpu0]", "gpu", Status.WARN, "clocks throttled: HW slowdown", duration_s=0.3, gpu=GPUS[0],
               remediation="check cooling"),
        Result("gpu.throttle[gpu1]", "gpu", Status.PASS, "no throttling", duration_s=0.3, gpu=GPUS[1]),
        Result("gpu.pcie[gpu0]", "gpu", Status.PASS, "Gen4 x16", duration_s=0.05, gpu=GPUS[0]),  # one part only
        Result("perf.gemm[gpu3]", "perf", Status.SKIP, "not run: --quick", gpu=GPUS[3]),
        Result("cuda.driver", "cuda", Status.WARN, "driver 535.54 is older than recommended 550",
               measured={"version": Value("535.54")}, duration_s=0.2),
        Result("nccl.allreduce", "nccl", Status.SKIP, "single node; nothing to test",
               measured={"bandwidth": Value(float("nan"), "GB/s")}),
        Result("system.disk[model]", "system", Status.FAIL, "scratch too slow", duration_s=2.0,
               measured={"write": Value(180.25, "MB/s")}, remediation="Mount NVMe scratch at /scratch"),
        Result("system.disk[data]", "system", Status.PASS, "fast enough", duration_s=2.0),
    ]


def _suites(xml: str) -> dict[str, ET.Element]:
    return {s.get("name"): s for s in ET.fromstring(xml).findall("testsuite")}


def _cases(xml: str) -> dict[str, ET.Element]:
    return {c.get("name"): c for c in ET.fromstring(xml).iter("testcase")}


# --------------------------------------------------------------------------- a real run


def test_a_real_runs_file_validates_and_agrees_with_its_json(tmp_path, capsys, schemas, junitparser):
    xml_path, json_path = tmp_path / "r.xml", tmp_path / "r.json"
    started = time.monotonic()
    rc = main(["--quick", "--no-progress", "--junit", str(xml_path), "--json", str(json_path)])
    elapsed = time.monotonic() - started
    capsys.readouterr()
    doc = json.loads(json_path.read_text())
    assert rc == doc["exit_code"] and rc in (0, 1)
    assert elapsed < 60
    xml = xml_path.read_text(encoding="utf-8")
    assert_valid(schemas, xml)

    results = [Result.from_dict(r) for r in doc["results"]]
    groups = list(dict.fromkeys(r.group for r in results))
    assert len(groups) >= 8  # system, python, gpu, cuda, nccl, perf, jupyter, finetune (dcgm when installed)
    root = ET.fromstring(xml)
    assert "skipped" not in root.attrib
    assert root.get("tests") == str(len(results))
    assert [s.get("name") for s in root.findall("testsuite")] == [f"peftnode.{g}" for g in groups]

    parts = Counter(check_name(r) for r in results)
    assert max(parts.values()) > 1, "a quick run has per-part checks (system.disk, python.packages)"
    cases = _cases(xml)
    expected = []
    for group in groups:
        mine = [r for r in results if r.group == group]
        tally = Counter(r.status for r in mine)
        once = {check_name(r): r.duration_s for r in mine}
        expected.append({"name": f"peftnode.{group}", "tests": len(mine), "failures": tally[Status.FAIL],
                         "errors": tally[Status.ERROR], "skipped": tally[Status.SKIP], "time": sum(once.values())})
        for r in mine:
            if parts[check_name(r)] > 1:
                assert "time" not in cases[r.name].attrib, r.name
            else:
                assert float(cases[r.name].get("time")) == pytest.approx(r.duration_s, abs=0.0006), r.name

    read = _read_with_junitparser(junitparser, xml)
    for seen, want in zip(read, expected, strict=True):
        assert {k: seen[k] for k in ("name", "tests", "failures", "errors", "skipped")} == {
            k: want[k] for k in ("name", "tests", "failures", "errors", "skipped")}
        assert seen["time"] == pytest.approx(want["time"], abs=0.0006 * want["tests"])
        assert seen["recounted"] == (want["tests"], want["failures"], want["errors"], want["skipped"])
        assert seen["hostname"] == doc["host"]["hostname"]


# --------------------------------------------------------------------------- built reports


def test_every_status_with_gpus_validates_one_suite_per_group(schemas, junitparser):
    xml = render_junit(_report(_every_status()))
    assert_valid(schemas, xml)

    root = ET.fromstring(xml)
    assert root.attrib == {"name": "peftnode verify", "tests": "15", "failures": "2", "errors": "1", "time": "3.250"}
    suites = _suites(xml)
    assert list(suites) == ["peftnode.system", "peftnode.gpu", "peftnode.python", "peftnode.perf",
                            "peftnode.cuda", "peftnode.nccl"]
    counts = {name: {k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
              for name, s in suites.items()}
    assert counts == {
        # system.disk's two parts count their 2.0 s once
        "peftnode.system": {"tests": "3", "failures": "1", "errors": "0", "skipped": "0", "time": "2.004"},
        # driver 0.25 + ecc 0.8 (four parts) + throttle 0.3 (two parts) + pcie 0.05
        "peftnode.gpu": {"tests": "8", "failures": "1", "errors": "0", "skipped": "0", "time": "1.400"},
        "peftnode.python": {"tests": "1", "failures": "0", "errors": "1", "skipped": "0", "time": "1.500"},
        "peftnode.perf": {"tests": "1", "failures": "0", "errors": "0", "skipped": "1", "time": "0.000"},
        "peftnode.cuda": {"tests": "1", "failures": "0", "errors": "0", "skipped": "0", "time": "0.200"},
        "peftnode.nccl": {"tests": "1", "failures": "0", "errors": "0", "skipped": "1", "time": "0.000"},
    }
    for suite in suites.values():
        assert suite.get("hostname") == "gpu-node-01" and suite.get("timestamp") == "2024-05-01T12:00:00"
        props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
        assert props["stack"] == "cu124" and props["run_status"] == "fail" and props["run_exit_code"] == "1"
    assert [c.get("classname") for c in suites["peftnode.gpu"].findall("testcase")] == ["peftnode.gpu"] * 8

    read = _read_with_junitparser(junitparser, xml)
    assert [(s["name"], s["tests"], s["failures"], s["errors"], s["skipped"]) for s in read] == [
        (name, int(c["tests"]), int(c["failures"]), int(c["errors"]), int(c["skipped"])) for name, c in counts.items()]
    assert [s["recounted"] for s in read] == [(s["tests"], s["failures"], s["errors"], s["skipped"]) for s in read]
    gpu_cases = {name: (t, kinds) for name, _, t, kinds in read[1]["cases"]}
    assert gpu_cases["gpu.ecc[gpu2]"] == (None, ["Failure"])
    assert gpu_cases["gpu.driver"] == (0.25, [])


def test_per_part_cases_carry_no_copied_time_and_single_results_keep_theirs():
    cases = _cases(render_junit(_report(_every_status())))
    per_part = [n for n in cases if n.startswith(("gpu.ecc[", "gpu.throttle[", "system.disk["))]
    assert len(per_part) == 8
    for name in per_part:
        assert "time" not in cases[name].attrib, name
        check = name.split("[")[0]
        total = {"gpu.ecc": "0.800 s for its 4", "gpu.throttle": "0.300 s for its 2",
                 "system.disk": "2.000 s for its 2"}
        assert f"time: {check} took {total[check]} results together" in cases[name].find("system-out").text
    assert cases["gpu.pcie[gpu0]"].get("time") == "0.050"  # one part: the check's own time, no note
    assert cases["gpu.pcie[gpu0]"].find("system-out").text == "gpu 0: uuid GPU-01111111-2222-3333-4444-555555555555, " \
        "pci_bus_id 00000000:18:00.0, serial 1650923000000"
    assert cases["gpu.driver"].get("time") == "0.250" and cases["gpu.driver"].find("*") is None
    assert cases["python.torch"].get("time") == "1.500"


def test_the_failing_board_is_named_in_the_failure_and_every_gpu_case():
    cases = _cases(render_junit(_report(_every_status())))
    failure = cases["gpu.ecc[gpu2]"].find("failure")
    assert failure.get("type") == "fail" and failure.get("message") == NASTY  # quotes, <&>, | and newline survive
    body = failure.text.splitlines()
    assert body[:3] == ['driver said "no" | retry <now> & later', "second line",
                        "gpu 2: uuid GPU-21111111-2222-3333-4444-555555555555, pci_bus_id 00000000:1A:00.0, "
                        "serial 1650923000002"]
    assert "measured: uncorrectable=3 errors" in body and "expected: uncorrectable=0 errors" in body
    assert body[-1] == "remediation: reset GPU 2 (nvidia-smi -r -i 2), then rerun"
    for g in GPUS:
        assert f"serial {g.serial}" in cases[f"gpu.ecc[gpu{g.index}]"].find("system-out").text
    warn = cases["gpu.throttle[gpu0]"]
    assert warn.find("failure") is None and warn.find("error") is None
    assert warn.find("system-out").text.startswith("WARN: clocks throttled: HW slowdown\ngpu 0: uuid GPU-0")
    skip = cases["perf.gemm[gpu3]"]
    assert skip.find("skipped").get("message") == "not run: --quick"
    assert "serial 1650923000003" in skip.find("system-out").text
    assert cases["python.torch"].find("error").text == "probe crashed: ImportError\nremediation: Reinstall torch"
    assert cases["nccl.allreduce"].find("skipped").get("message") == "single node; nothing to test"
    assert cases["cuda.driver"].find("system-out").text.startswith("WARN: driver 535.54")


def test_a_gpu_with_unknown_identity_fields_validates(schemas):
    results = [Result("gpu.ecc[gpu5]", "gpu", Status.FAIL, "3 uncorrectable", duration_s=0.1, gpu=GpuId(5)),
               Result("perf.gemm", "perf", Status.PASS, "fast", duration_s=float("nan"))]
    xml = render_junit(_report(results))
    assert_valid(schemas, xml)
    cases = _cases(xml)
    assert cases["gpu.ecc[gpu5]"].find("failure").text.splitlines()[1] == "gpu 5"
    assert cases["perf.gemm"].get("time") == "0.000"  # a NaN duration is no time, not "nan"


def test_illegal_xml_characters_are_replaced_and_the_file_validates(tmp_path, schemas):
    bad = Result("weird[\x01]", "misc", Status.FAIL, "tty said \x1b[31mred\x00 \ud800",
                 measured={"raw": Value("\x0b\x0c")}, remediation="\ufffe run again", gpu=GpuId(1, serial="\x07SN"))
    path = write_junit(_report([bad]), tmp_path / "j.xml")
    xml = path.read_text(encoding="utf-8")
    assert_valid(schemas, xml)
    case = ET.parse(path).getroot().find("testsuite/testcase")
    assert case.get("name") == "weird[\ufffd]"
    assert case.find("failure").get("message") == "tty said \ufffd[31mred\ufffd \ufffd"
    assert "gpu 1: serial \ufffdSN" in case.find("failure").text


def test_an_empty_report_validates(schemas, junitparser):
    xml = render_junit(_report([]))
    assert_valid(schemas, xml)
    root = ET.fromstring(xml)
    assert root.findall("testsuite") == []
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("0", "0", "0")
    assert _read_with_junitparser(junitparser, xml) == []


# --------------------------------------------------------------------------- the validation can fail


def _old_shape(root: ET.Element) -> None:
    root.set("skipped", "1")  # what this renderer wrote before: junit-10.xsd has no such attribute there


def _testcase_properties(root: ET.Element) -> None:
    ET.SubElement(root.find("testsuite/testcase"), "properties")


def _suite_without_tests(root: ET.Element) -> None:
    del root.find("testsuite").attrib["tests"]


def _unknown_child(root: ET.Element) -> None:
    ET.SubElement(root, "testcase", name="outside any suite")


@pytest.mark.parametrize("mutate", [_old_shape, _testcase_properties, _suite_without_tests, _unknown_child])
def test_the_validator_rejects_what_the_xsd_forbids(mutate, schemas):
    root = to_junit_element(_report(_every_status()))
    assert_valid(schemas, ET.tostring(root, encoding="unicode"))
    broken = copy.deepcopy(root)
    mutate(broken)
    errors = _errors(schemas, ET.tostring(broken, encoding="unicode"))
    assert all(errors.values()), errors


# --------------------------------------------------------------------------- root causes (blocked checks)






def test_a_root_cause_carries_its_blocked_count(tmp_path, schemas):
    """A real runner run: gpu.driver fails, four checks need it (one of them through another)."""
    specs = [
        _spec("gpu.driver", _driver_missing),
        _spec("gpu.count", _fine, ("gpu.driver",)),
        _spec("gpu.ecc", _fine, ("gpu.driver",)),
        _spec("cuda.torch", _fine, ("gpu.driver",)),
        _spec("perf.gemm", _fine, ("cuda.torch",)),  # blocked by gpu.driver via cuda.torch
        _spec("net.nccl", _nothing_to_do),
        _spec("system.os", _fine),
    ]
    report = _report(run_checks(specs, Context(stack={}), jobs=3))
    assert report.blocked_by() == {"gpu.driver": 4}
    xml = write_junit(report, tmp_path / "j.xml").read_text(encoding="utf-8")
    assert_valid(schemas, xml)
    cases = _cases(xml)
    for name in ("gpu.count", "gpu.ecc", "cuda.torch"):
        assert cases[name].find("skipped").get("message") == "blocked by gpu.driver (NVIDIA driver not loaded)"
    assert cases["perf.gemm"].find("skipped").get("message").startswith("blocked by gpu.driver via cuda.torch")
    assert cases["net.nccl"].find("skipped").get("message") == "single node; nothing to test"
    assert "blocked: 4 check(s) that need gpu.driver were skipped" in cases["gpu.driver"].find("failure").text
    blocked = {name: {p.get("name"): p.get("value") for p in s.findall("properties/property")}.get("blocked_by")
               for name, s in _suites(xml).items()}
    assert blocked["peftnode.gpu"] == "gpu.driver=4"  # on the suite of the check that caused it, once
    assert [v for k, v in blocked.items() if k != "peftnode.gpu"] == [None] * (len(blocked) - 1)
    assert _suites(xml)["peftnode.gpu"].get("skipped") == "2"


def test_no_blocked_checks_means_no_blocked_by_property():
    assert "blocked_by" not in render_junit(_report(_every_status()))


# --------------------------------------------------------------------------- scripts/fetch-junit-xsd


def test_the_fetch_script_says_why_when_the_index_cannot_be_reached(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PEFTNODE_JUNIT_XSD_CACHE": str(tmp_path / "cache"),
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(FETCH)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch-junit-xsd: pip could not download the source distribution "
                                                   "of pytest=="), proc.stderr
    assert not (tmp_path / "cache").exists()

    bad = subprocess.run([sys.executable, str(FETCH), "--cache", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fetch-junit-xsd: takes no arguments")


def test_the_fetch_script_is_idempotent(schemas):
    """With the schemas cached (the fixture fetched them), a second run downloads nothing: no network."""
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}
    proc = subprocess.run([sys.executable, str(FETCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [Path(p).parent.name for p in proc.stdout.split()] == list(schemas)
    cache = Path(os.environ.get("PEFTNODE_JUNIT_XSD_CACHE") or ROOT / ".cache" / "junit-xsd")
    assert all(Path(p).is_relative_to(cache) for p in proc.stdout.split()), proc.stdout
