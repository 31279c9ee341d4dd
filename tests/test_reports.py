"""Tests for the report renderers: console, JSON (+ schema), JUnit and Markdown (Prometheus: tests/test_prom.py)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone

import jsonschema
import pytest
from rich.console import Console

import checks
from checks.registry import Context
from checks.report import REPORT_SCHEMA, Report
from checks.report.console import render_console, summary_line
from checks.report.jsonreport import load_schema, to_json_dict, write_json
from checks.report.junit import render_junit
from checks.report.markdown import append_step_summary, render_markdown
from checks.result import Result, Status, Value
from checks.runner import run_checks
from tests.helpers.fake_checks import driver_missing as _driver_missing
from tests.helpers.fake_checks import fine as _fine
from tests.helpers.fake_checks import nothing_to_do as _nothing_to_do
from tests.helpers.fake_checks import spec_of as _spec
from tests.helpers.fake_checks import toolkit_crashes as _toolkit_crashes

STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
NASTY = 'driver said "no" | retry <now> & later\nsecond line'


def _results() -> list[Result]:
    return [
        Result(
            "gpu.count",
            "gpu",
            Status.PASS,
            "8 GPUs visible",
            measured={"count": Value(8)},
            expected={"count": Value(8)},
            duration_s=0.12,
        ),
        Result(
            "gpu.ecc[0]",
            "gpu",
            Status.FAIL,
            NASTY,
            measured={"uncorrectable": Value(3, "errors"), "model": Value("H100 80GB HBM3")},
            expected={"uncorrectable": Value(0, "errors")},
            remediation="Drain node; RMA GPU 0",
            duration_s=0.5,
        ),
        Result(
            "gpu.memory",
            "gpu",
            Status.PASS,
            "80 GiB per GPU",
            measured={"memory": Value(79.6, "GiB"), "mig": Value(False)},
            duration_s=0.01,
        ),
        Result(
            "cuda.driver",
            "cuda",
            Status.WARN,
            "driver 535.54 is older than recommended 550",
            measured={"version": Value("535.54")},
            expected={"version": Value(">=550")},
            remediation="Upgrade the NVIDIA driver",
            duration_s=0.2,
        ),
        Result("cuda.toolkit", "cuda", Status.PASS, "nvcc 12.4", measured={"version": Value("12.4")}),
        Result(
            "python.torch",
            "python",
            Status.ERROR,
            "probe crashed: ImportError",
            remediation="Reinstall torch",
            duration_s=1.5,
        ),
        Result(
            "net.nccl",
            "net",
            Status.SKIP,
            "single node; nothing to test",
            measured={"bandwidth": Value(float("nan"), "GB/s")},
        ),
        Result(
            "storage.scratch",
            "storage",
            Status.FAIL,
            "scratch too slow",
            measured={"write": Value(180.25, "MB/s"), "free": Value(512, "GiB")},
            expected={"write": Value(1000, "MB/s")},
            remediation="Mount NVMe scratch at /scratch",
            duration_s=2.0,
        ),
    ]


def _report(results: list[Result] | None = None) -> Report:
    return Report(
        results=_results() if results is None else results,
        host={"hostname": "gpu-node-01", "os": "Ubuntu 22.04", "kernel": "5.15", "arch": "x86_64", "python": "3.11"},
        stack={"name": "cu124", "source": "stacks/cu124.yml", "description": "CUDA 12.4"},
        started_at=STARTED,
        finished_at=STARTED + timedelta(seconds=3.25),
        options={"only": None, "skip": [], "quick": True, "timeout": 60},
    )


def _healthy_report() -> Report:
    return _report([r for r in _results() if r.status in (Status.PASS, Status.WARN, Status.SKIP)])


# --------------------------------------------------------------------------- JSON


def test_json_document_shape():
    report = _report()
    doc = to_json_dict(report)
    assert doc["schema"] == REPORT_SCHEMA
    assert doc["peftnode_version"] == checks.__version__
    assert doc["started_at"] == "2024-05-01T12:00:00.000Z"
    assert doc["finished_at"] == "2024-05-01T12:00:03.250Z"
    assert doc["duration_s"] == pytest.approx(3.25)
    assert doc["status"] == "fail"
    assert doc["exit_code"] == 1
    assert doc["counts"] == {"pass": 3, "skip": 1, "warn": 1, "error": 1, "fail": 2}
    assert [r["name"] for r in doc["results"]] == [r.name for r in report.results]
    assert doc["host"]["hostname"] == "gpu-node-01"
    assert doc["options"]["timeout"] == 60


def test_json_non_utc_times_are_converted_to_z():
    report = _report()
    cest = timezone(timedelta(hours=2))
    report.started_at = datetime(2024, 5, 1, 14, 0, 0, tzinfo=cest)
    report.finished_at = datetime(2024, 5, 1, 14, 0, 1, tzinfo=cest)
    doc = to_json_dict(report)
    assert doc["started_at"] == "2024-05-01T12:00:00.000Z"
    assert doc["finished_at"] == "2024-05-01T12:00:01.000Z"


def _reject_constant(name):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_json_validates_against_schema(tmp_path):
    path = tmp_path / "report.json"
    write_json(_report(), path)
    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)  # strict JSON, no NaN
    assert doc["results"][6]["measured"]["bandwidth"] == {"value": None, "unit": "GB/s"}
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(doc)
    jsonschema.Draft202012Validator(schema).validate(to_json_dict(_healthy_report()))
    jsonschema.Draft202012Validator(schema).validate(to_json_dict(_report([])))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d.__setitem__("status", "bogus"), id="bad-status"),
        pytest.param(lambda d: d["results"][0].__setitem__("status", "ok"), id="bad-result-status"),
        pytest.param(lambda d: d.pop("counts"), id="missing-counts"),
        pytest.param(lambda d: d.__setitem__("started_at", "2024-05-01T12:00:00+02:00"), id="not-z"),
        pytest.param(lambda d: d["results"][1]["measured"].__setitem__("x", 3), id="bare-measured"),
        pytest.param(lambda d: d["results"][1]["measured"]["uncorrectable"].pop("unit"), id="value-no-unit"),
        pytest.param(lambda d: d.__setitem__("exit_code", 2), id="bad-exit"),
        pytest.param(lambda d: d.__setitem__("schema", "other/2"), id="bad-schema-id"),
        pytest.param(lambda d: d.__setitem__("extra", 1), id="unknown-key"),
    ],
)
def test_schema_rejects_invalid_documents(mutate):
    doc = to_json_dict(_report())
    mutate(doc)
    validator = jsonschema.Draft202012Validator(load_schema())
    assert list(validator.iter_errors(doc)), "schema accepted an invalid document"


def test_json_round_trips_results(tmp_path):
    report = _report()
    path = write_json(report, tmp_path / "r.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    back = [Result.from_dict(d) for d in doc["results"]]
    assert len(back) == len(report.results)
    for original, restored in zip(report.results, back, strict=True):
        assert restored.name == original.name
        assert restored.status == original.status
        assert restored.message == original.message
        assert restored.remediation == original.remediation
        assert restored.expected == original.expected
        assert restored.duration_s == pytest.approx(original.duration_s)
        for key, value in original.measured.items():
            got = restored.measured[key]
            assert got.unit == value.unit
            if isinstance(value.value, float) and value.value != value.value:  # NaN is written as null
                assert got.value is None
            else:
                assert got.value == value.value


# --------------------------------------------------------------------------- JUnit: tests/test_junit.py


# --------------------------------------------------------------------------- Prometheus: tests/test_prom.py


# --------------------------------------------------------------------------- Markdown


def test_markdown_content():
    md = render_markdown(_report())
    assert md.startswith("## ")
    assert "UNHEALTHY" in md.splitlines()[0]
    assert "2 fail" in md and "3 pass" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    ecc_rows = [line for line in rows if "gpu.ecc[0]" in line]
    assert len(ecc_rows) == 2  # problems table + full table
    problems_part = md.split("<details>")[0]
    assert "storage.scratch" in problems_part and "Mount NVMe scratch at /scratch" in problems_part
    assert "gpu.count" not in problems_part  # passes only in the folded table
    assert "<details>" in md and "</details>" in md and "gpu.count" in md.split("<details>")[1]
    row = ecc_rows[0]
    assert "\\|" in row
    assert " | retry" not in row  # the pipe in the message did not split a cell
    assert "&lt;now&gt; &amp; later<br>second line" in row
    # every table row in a table has the same number of unescaped cell separators
    problems_rows = [line for line in problems_part.splitlines() if line.startswith("| ")]
    assert len({line.replace("\\|", "").count("|") for line in problems_rows}) == 1
    # a problem table sorted worst first: fails before error before warn before skip
    order = [
        next(s for s in ("fail", "error", "warn", "skip", "status") if s in line.lower()) for line in problems_rows
    ]
    assert order == ["status", "fail", "fail", "error", "warn", "skip"]


def test_markdown_healthy():
    md = render_markdown(_healthy_report())
    assert "HEALTHY" in md.splitlines()[0] and "UNHEALTHY" not in md


def test_step_summary_appends(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    assert append_step_summary(_report(), env=env) is True
    assert append_step_summary(_healthy_report(), env=env) is True
    text = summary.read_text()
    assert text.startswith("# earlier step\n")
    assert text.count("peftnode verify: UNHEALTHY") == 1
    assert text.count("peftnode verify: HEALTHY") == 1
    assert text.index("UNHEALTHY") < text.index("verify: HEALTHY")


def test_step_summary_noop_when_unset(tmp_path):
    assert append_step_summary(_report(), env={}) is False
    assert append_step_summary(_report(), env={"GITHUB_STEP_SUMMARY": ""}) is False
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- console (tested in test_console.py)


def _console_text(report: Report) -> str:
    console = Console(record=True, width=140, file=io.StringIO(), color_system=None)
    render_console(report, console)
    return console.export_text()


# --------------------------------------------------------------------------- root causes (blocked checks)







def _blocked_run(two_roots: bool) -> Report:
    """A real runner run: gpu.driver fails, four checks need it (one of them through another);
    with ``two_roots`` cuda.toolkit crashes too and blocks one more. One ordinary skip beside them."""
    specs = [
        _spec("gpu.driver", _driver_missing),
        _spec("gpu.count", _fine, ("gpu.driver",)),
        _spec("gpu.ecc", _fine, ("gpu.driver",)),
        _spec("cuda.torch", _fine, ("gpu.driver",)),
        _spec("perf.gemm", _fine, ("cuda.torch",)),  # blocked by gpu.driver via cuda.torch
        _spec("net.nccl", _nothing_to_do),
        _spec("system.os", _fine),
    ]
    if two_roots:
        specs += [_spec("cuda.toolkit", _toolkit_crashes), _spec("cuda.nvcc_works", _fine, ("cuda.toolkit",))]
    results = run_checks(specs, Context(stack={}), jobs=3)
    return _report(results)


def test_blocked_checks_count_as_one_root_cause_everywhere(tmp_path):
    report = _blocked_run(two_roots=False)
    assert report.blocked_by() == {"gpu.driver": 4}

    line = summary_line(report)
    assert line == ("7 checks: 1 pass, 5 skip (4 blocked), 0 warn, 0 error, 1 fail in 3.2 s -> UNHEALTHY (exit 1); "
                    "1 root cause (gpu.driver) blocked 4 checks")
    assert "1 root cause (gpu.driver) blocked 4 checks" in _console_text(report)

    doc = to_json_dict(report)
    assert doc["blocked_by"] == {"gpu.driver": 4}
    assert doc["counts"]["skip"] == 5
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    # JUnit's share of this: tests/test_junit.py::test_a_root_cause_carries_its_blocked_count

    md = render_markdown(report)
    assert "**1 root cause (gpu.driver) blocked 4 checks.**" in md
    assert "5 skip (4 blocked)" in md
    attention = md.split("### Needs attention")[1].split("<details>")[0]
    assert "gpu.driver" in attention and "net.nccl" in attention  # the root cause and an ordinary skip
    assert "gpu.count" not in attention and "perf.gemm" not in attention  # blocked checks are not problems
    assert "perf.gemm" in md.split("<details>")[1]  # but they are in the full table


def test_two_root_causes_are_named_with_their_counts():
    report = _blocked_run(two_roots=True)
    assert report.blocked_by() == {"gpu.driver": 4, "cuda.toolkit": 1}
    assert summary_line(report).endswith("; 2 root causes (gpu.driver: 4, cuda.toolkit: 1) blocked 5 checks")
    doc = to_json_dict(report)
    assert doc["blocked_by"] == {"gpu.driver": 4, "cuda.toolkit": 1}
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    assert "**2 root causes (gpu.driver: 4, cuda.toolkit: 1) blocked 5 checks.**" in render_markdown(report)


def test_no_blocked_checks_means_no_root_cause_sentence():
    report = _report()
    assert report.blocked_by() == {}
    assert to_json_dict(report)["blocked_by"] == {}
    assert "root cause" not in summary_line(report) and "blocked" not in summary_line(report)
    assert "root cause" not in render_markdown(report)
    assert "blocked_by" not in render_junit(report)


@pytest.mark.parametrize("blocked_by", [{"gpu.driver": 0}, {"gpu.driver": "4"}, {"": 1}, [["gpu.driver", 4]]])
def test_schema_rejects_a_bad_blocked_by(blocked_by):
    doc = to_json_dict(_report())
    doc["blocked_by"] = blocked_by
    assert list(jsonschema.Draft202012Validator(load_schema()).iter_errors(doc))
