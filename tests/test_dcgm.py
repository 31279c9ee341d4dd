"""DCGM diagnostic: the JSON parser on DCGM 3.x and 4.x documents and the boxed-table fallback (own data
in ``tests/data/dcgm`` and tables built in DCGM's layout, plus the shared real output when present), the
judge, seeded fuzzing of both parsers, and the registered check with a fake ``dcgmi`` on PATH."""

import json
import os
import random
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checks import dcgm
from checks.dcgm import (
    judge_diag,
    nvml_ids,
    parse_dcgmi_diag,
    parse_dcgmi_json,
    parse_output,
    parse_results,
    summarise_details,
)
from checks.registry import _REGISTRY, Context
from checks.result import GpuId, Status, worst
from checks.runner import run_checks
from tests.helpers.fake_nvml import FakeNVML, healthy_node

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"  # real outputs, optional
DATA = Path(__file__).resolve().parent / "data" / "dcgm"  # self-made, in DCGM's documented formats


def data(name: str) -> str:
    return (DATA / name).read_text()

NAME_W, VALUE_W, WRAP = 27, 48, 45  # DCGM's cell widths; a value wraps every 45 characters, even mid-word


def box(sections, banner="Successfully ran diagnostic for group."):
    """Build ``dcgmi diag`` output in DCGM's layout. ``sections``: [(title, [(name, value or [lines])])]."""

    def row(name, text):
        return f"| {name:<{NAME_W - 1}}| {text:<{VALUE_W - 1}}|"

    rule = f"+{'-' * NAME_W}+{'-' * VALUE_W}+"
    out = [banner, rule, row("Diagnostic", "Result"), f"+{'=' * NAME_W}+{'=' * VALUE_W}+"]
    for i, (title, rows) in enumerate(sections):
        edge = "|" if i < 2 else "+"  # DCGM draws the first section rules with '|' ends, later ones with '+'
        out.append(f"{edge}{f'-----  {title}  ':-<{NAME_W}}+{'-' * VALUE_W}{edge}")
        for name, value in rows:
            lines = value if isinstance(value, list) else [value]
            pieces = [line[j:j + WRAP] for line in lines for j in range(0, max(len(line), 1), WRAP)]
            out.append(row(name, pieces[0]))
            out.extend(row("", p) for p in pieces[1:])
    out.append(rule)
    return "\n".join(out) + "\n"


DEPLOYMENT = [(n, "Pass") for n in ("Denylist", "NVML Library", "CUDA Main Library", "Permissions and OS Blocks",
                                    "Persistence Mode", "Environment Variables", "Page Retirement/Row Remap",
                                    "Graphics Processes", "Inforom")]
METADATA = [("DCGM Version", "3.3.5"), ("Driver Version Detected", "535.161.08"),
            ("GPU Device IDs Detected", "20b2,20b2,20b2,20b2")]

HEALTHY_R2 = box([
    ("Metadata", METADATA),
    ("Deployment", DEPLOYMENT),
    ("Integration", [("PCIe", "Pass - All"),
                     ("Info", "GPU 0 GPU to Host bandwidth: 24.61 GB/s, GPU 0 Host to GPU bandwidth: 25.02 GB/s")]),
    ("Hardware", [("GPU Memory", "Pass - All")]),
])

THERMAL = ("GPU 0 Memory test stopped after 41.5 seconds: 12 mismatched words between address 0x3f000000 and "
           "0x3f0fffff. Reset the GPU and rerun; replace the board if it repeats.")
MIXED_R2 = box([
    ("Metadata", METADATA),
    ("Deployment", DEPLOYMENT),
    ("Integration", [("PCIe", "Pass - All")]),
    ("Hardware", [("GPU Memory", ["Pass - GPUs: 1, 2, 3", "Fail - GPU: 0"]), ("Warning", THERMAL)]),
    ("Stress", [("Targeted Power", ["Pass - GPUs: 0, 1, 3", "Warn - GPU: 2"]),
                ("Warning", "GPU 2 Power reached 281 W of the 300 W target; check the power cap and cooling."),
                ("Targeted Stress", "Skip - All"), ("Memory Bandwidth", "Not Run")]),
])

DCGM4 = box([
    ("Metadata", [("DCGM Version", "4.2.3"), ("Driver Version Detected", "570.148.08"),
                  ("GPU Device IDs Detected", "2330, 2330")]),
    ("Deployment", [("software", ["Pass", "GPU0: Pass", "GPU1: Pass"])]),
    ("Hardware", [("memory", ["Fail", "GPU0: Pass", "GPU1: Fail"]),
                  ("Warning", "GPU 1 Uncorrectable ECC error detected during the memory test.")]),
])

DEPLOYMENT_ERROR = box([
    ("Metadata", METADATA),
    ("Deployment", [("Error", "GPU 3 has uncorrectable memory errors and row remappings are pending")]),
])

NO_HOSTENGINE = ("Error: unable to establish a connection to the specified host: localhost\n"
                 "Error: Unable to connect to host engine. Host engine connection invalid/disconnected.\n")


# --- parser ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parsed", [
    ("Pass", ("Pass", {})),
    ("Fail - All", ("Fail", {"Fail": "All"})),
    ("Skip - All", ("Skip", {"Skip": "All"})),
    ("Pass - GPUs: 1, 2, 3 Fail - GPU: 0", ("Fail", {"Pass": "1, 2, 3", "Fail": "0"})),
    ("Pass - GPUs: 0, 1, 3 Warn - GPU: 2", ("Warn", {"Pass": "0, 1, 3", "Warn": "2"})),
    ("Fail - GPU 3", ("Fail", {"Fail": "3"})),  # older DCGM: no colon
    ("Pass GPU0: Pass GPU1: Fail", ("Fail", {"Pass": "0", "Fail": "1"})),  # DCGM 4: per-GPU rows
    ("Not Run", ("Not Run", {})),
    ("3.3.5", None),
    ("2330,2330", None),
    ("Persistence mode for GPU 0 is disabled", None),
])
def test_parse_results(text, parsed):
    assert parse_results(text) == parsed


def test_healthy_table_parses_metadata_tests_and_details():
    r = parse_dcgmi_diag(HEALTHY_R2)
    assert r.metadata == {"DCGM Version": "3.3.5", "Driver Version Detected": "535.161.08",
                          "GPU Device IDs Detected": "20b2,20b2,20b2,20b2"}
    assert [t.name for t in r.tests] == [n for n, _ in DEPLOYMENT] + ["PCIe", "GPU Memory"]
    assert {t.result for t in r.tests} == {"Pass"} and r.errors == []
    pcie = r.tests[-2]
    assert pcie.section == "Integration" and pcie.gpus == {"Pass": "All"}
    assert pcie.details == [("Info", "GPU 0 GPU to Host bandwidth: 24.61 GB/s, GPU 0 Host to GPU bandwidth: "
                                     "25.02 GB/s")]
    verdicts = judge_diag(r, 2, 0)
    assert len(verdicts) == 11 and all(v.status is Status.PASS for v in verdicts)
    assert verdicts[-1].subject == "GPU Memory" and verdicts[-1].message == "DCGM GPU Memory: Pass on all GPUs"
    assert verdicts[0].measured["dcgm_version"].value == "3.3.5" and verdicts[0].measured["level"].value == 2


@pytest.mark.parametrize("text", [
    "x" * 44 + " " + "y" * 10,  # a cut right after a space: the space must survive
    "x" * 45 + " y",  # a cut right before a space
    "Reset the GPU. Restart DCGM. Rerun the diagnostic with a longer timeout when it stalls at 90 percent.",
    "Persistence mode for GPU 0 is disabled. Enable persistence mode by running \"nvidia-smi -i <id> -pm 1\".",
])
def test_wrapped_cells_join_back_exactly(text):
    out = box([("Hardware", [("GPU Memory", "Fail - All"), ("Warning", text)])])
    assert len(out.splitlines()[6]) == 1 + NAME_W + 1 + VALUE_W + 1  # the layout really is DCGM's
    [test] = parse_dcgmi_diag(out).tests
    assert test.details == [("Warning", text)]


def test_mixed_results_fail_warn_and_skip_per_test():
    r = parse_dcgmi_diag(MIXED_R2)
    by = {t.name: t for t in r.tests}
    assert by["GPU Memory"].result == "Fail" and by["GPU Memory"].gpus == {"Pass": "1, 2, 3", "Fail": "0"}
    assert by["GPU Memory"].details == [("Warning", THERMAL)]
    assert by["Targeted Power"].result == "Warn" and by["Memory Bandwidth"].result == "Not Run"
    verdicts = {v.subject: v for v in judge_diag(r, 2, 226)}
    # one verdict per GPU a test fails or warns on, carrying that GPU; no verdict claims the test as a whole
    assert "GPU Memory" not in verdicts and "Targeted Power" not in verdicts
    mem = verdicts["GPU Memory gpu0"]
    assert mem.status is Status.FAIL and mem.gpu == GpuId(0)
    assert mem.message == f"DCGM GPU Memory: Fail on GPU 0: {THERMAL[6:]}"
    assert mem.measured["gpus_fail"].value == "0" and mem.measured["gpus_pass"].value == "1, 2, 3"
    assert mem.measured["gpu_index"].value == 0 and mem.measured["format"].value == "text"
    assert mem.expected["result"].value == "Pass" and "nvidia-smi -r -i 0" in mem.remediation
    power = verdicts["Targeted Power gpu2"]
    assert power.status is Status.WARN and "281 W" in power.message and power.gpu == GpuId(2)
    assert verdicts["Targeted Stress"].status is Status.SKIP and verdicts["Memory Bandwidth"].status is Status.SKIP
    assert verdicts["Denylist"].status is Status.PASS and verdicts["Denylist"].gpu is None


def test_dcgm4_layout_with_per_gpu_rows():
    r = parse_dcgmi_diag(DCGM4)
    software, memory = r.tests
    assert (software.name, software.result, software.gpus) == ("software", "Pass", {"Pass": "0, 1"})
    assert (memory.result, memory.gpus) == ("Fail", {"Pass": "0", "Fail": "1"})
    v = judge_diag(r, 2, 226)[1]
    assert v.status is Status.FAIL and v.message == "DCGM memory: Fail on GPU 1: Uncorrectable ECC error detected " \
                                                    "during the memory test."
    assert v.subject == "memory gpu1" and v.gpu == GpuId(1) and "RMA" in v.remediation


def test_deployment_error_row_fails_the_gpu_it_names_with_reset_and_rma():
    r = parse_dcgmi_diag(DEPLOYMENT_ERROR)
    assert r.tests == [] and r.errors == ["Deployment: GPU 3 has uncorrectable memory errors and row remappings "
                                          "are pending"]
    [v] = judge_diag(r, 1, 226)
    assert v.status is Status.FAIL and v.gpu == GpuId(3) and v.subject == "Deployment gpu3"
    assert v.message == ("DCGM stopped before running its tests: GPU 3 has uncorrectable memory errors and row "
                         "remappings are pending")
    assert "nvidia-smi -r -i 3" in v.remediation and "RMA" in v.remediation and "by hand" not in v.remediation


def test_host_engine_down_fails_with_the_way_to_start_it():
    r = parse_dcgmi_diag(NO_HOSTENGINE)
    assert r.tests == [] and len(r.errors) == 2
    [v] = judge_diag(r, 1, 255)
    assert v.status is Status.FAIL
    assert v.message == ("dcgmi diag -r 1 did not run: Error: unable to establish a connection to the specified "
                         "host: localhost")
    assert "nv-hostengine" in v.remediation


def test_no_output_fails():
    [v] = judge_diag(parse_dcgmi_diag(""), 2, 1, "")
    assert v.status is Status.FAIL and "printed no results (exit code 1): no output" in v.message


def test_summarise_details_groups_gpus_with_the_same_text():
    details = [("Warning", f"GPU {i} Unable to initialise CUDA") for i in range(3)] + [
        ("Info", "GPU 0 bandwidth 25 GB/s"), ("Warning", "Check the fans")]
    assert summarise_details(details) == "GPU 0, 1, 2: Unable to initialise CUDA; Check the fans"
    assert len(summarise_details([("Warning", "z" * 1000)], limit=50)) == 50


# --- the shared real output (optional) ------------------------------------------------------------


def test_real_r3_output_with_gpu_memory_failure():
    path = SAMPLES / "dcgmi_diag_r3_h100x8_gpu_memory_fail.txt"
    if not path.is_file():
        pytest.skip(f"shared samples not present ({path}): the real dcgmi output is only in the workspace")
    text = path.read_text().split("\n", 1)[1]  # line 1 names the source
    r = parse_dcgmi_diag(text)
    assert r.metadata["DCGM Version"] == "3.3.8" and r.metadata["Driver Version Detected"] == "560.35.03"
    by = {t.name: t for t in r.tests}
    assert len(r.tests) == 13 and by["GPU Memory"].result == "Fail" and by["GPU Memory"].gpus == {"Fail": "All"}
    assert len(by["GPU Memory"].details) == 8
    assert by["GPU Memory"].details[0][1].startswith("GPU 0 Error using CUDA API cuInit Check DCGM and system logs "
                                                     "for errors. Reset GPU. Restart DCGM.")
    assert "Unable to initialize CUDA library: 'system not yet initialized'" in by["GPU Memory"].details[7][1]
    [(kind, info)] = by["Persistence Mode"].details
    assert kind == "Info" and info.startswith('Persistence mode for GPU 0 is disabled. Enable persistence mode by '
                                              'running "nvidia-smi -i <gpuId> -pm 1 " as root.,Persistence mode for '
                                              'GPU 1 is disabled.')
    verdicts = {v.subject: v for v in judge_diag(r, 3, 226)}
    mem = verdicts["GPU Memory"]
    assert mem.status is Status.FAIL and mem.message.startswith(
        "DCGM GPU Memory: Fail on all GPUs: GPU 0, 1, 2, 3, 4, 5, 6, 7: Error using CUDA API cuInit")
    assert "nvidia-fabricmanager" in mem.remediation
    assert [verdicts[n].status for n in ("PCIe", "Memory Bandwidth", "EUD Test")] == [Status.SKIP] * 3
    assert verdicts["Persistence Mode"].status is Status.PASS


# --- the registered check ---------------------------------------------------------------------------


def spec():
    import checks.dcgm  # noqa: F401  (registers the check)

    return _REGISTRY["gpu.dcgm_diag"]


def ctx_for(stack, gpus=8, quick=True):
    return Context(stack.data, {**stack.expectations(), "gpus": gpus}, quick=quick)


def test_registered_isolated_in_the_gpu_group():
    s = spec()
    assert s.group == "gpu" and s.isolate and not s.slow
    # dcgmi's own deadline per level ends the run first; the runner's timeout is only the last resort
    assert s.timeout_s == dcgm.CHECK_TIMEOUT_S > max(dcgm.TIMEOUT_S.values())
    assert sorted(dcgm.TIMEOUT_S) == [1, 2, 3, 4] and dcgm.TIMEOUT_S[2] < 300


def test_skips_when_dcgmi_is_not_on_path(cu117, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    [r] = run_checks([spec()], ctx_for(cu117))
    assert r.status is Status.SKIP and "dcgmi (NVIDIA DCGM) is not on PATH" in r.message


def test_skips_on_a_node_without_gpus(cu117):
    [r] = run_checks([spec()], ctx_for(cu117, gpus=0))
    assert r.status is Status.SKIP and "expected to have no GPUs" in r.message


def fake_dcgmi(directory, table, exit_code=0, json_doc=None):
    """An executable ``dcgmi`` that appends its arguments (one line per call) to ``dcgmi.args`` and prints
    ``json_doc`` when asked for JSON (``-j``), ``table`` otherwise; without ``json_doc`` it answers ``-j``
    like a dcgmi without that option (a usage error, no JSON). Real DCGM cannot run here."""
    (directory / "dcgmi.out").write_text(table)
    (directory / "dcgmi.json").write_text(json_doc if json_doc is not None else "")
    (directory / "dcgmi.args").write_text("")
    script = directory / "dcgmi"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        args = sys.argv[1:]
        open({str(directory / 'dcgmi.args')!r}, "a").write(" ".join(args) + "\\n")
        if "-j" in args:
            doc = open({str(directory / 'dcgmi.json')!r}).read()
            if not doc:
                sys.stdout.write("PARSE ERROR: Argument: -j\\n             Couldn't find match for argument\\n")
                sys.exit(255)
            sys.stdout.write(doc)
        else:
            sys.stdout.write(open({str(directory / 'dcgmi.out')!r}).read())
        sys.exit({exit_code})
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory / "dcgmi.args"


def calls(args: Path) -> list[str]:
    return args.read_text().splitlines()


def test_fake_dcgmi_json_is_run_at_the_right_level_parsed_and_judged(cu117, tmp_path, monkeypatch):
    args = fake_dcgmi(tmp_path, "no table: the JSON must be read\n", exit_code=226,
                      json_doc=data("dcgm4_r2_h100x8_memory_fail.json"))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    results = {r.name: r for r in run_checks([spec()], ctx_for(cu117, quick=True))}
    assert calls(args) == ["diag -r 1 -j"]
    mem = results["gpu.dcgm_diag[memory gpu5]"]
    assert mem.status is Status.FAIL and mem.gpu.index == 5 and mem.gpu.serial == "1652320000005"
    assert mem.measured["command"].value == "dcgmi diag -r 1 -j" and mem.measured["format"].value == "json"
    assert results["gpu.dcgm_diag[software]"].status is Status.PASS
    # the level comes from --dcgm-level (options["dcgm_level"]) when given
    ctx = ctx_for(cu117, quick=True)
    ctx.options["dcgm_level"] = 3
    run_checks([spec()], ctx)
    assert calls(args)[-1] == "diag -r 3 -j"


def test_fake_dcgmi_without_json_falls_back_to_the_table(cu117, tmp_path, monkeypatch):
    args = fake_dcgmi(tmp_path, MIXED_R2, exit_code=226)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    results = {r.name: r for r in run_checks([spec()], ctx_for(cu117, quick=False))}
    assert calls(args) == ["diag -r 2 -j", "diag -r 2"]
    assert results["gpu.dcgm_diag[GPU Memory gpu0]"].status is Status.FAIL
    assert results["gpu.dcgm_diag[Targeted Power gpu2]"].status is Status.WARN
    assert results["gpu.dcgm_diag[Denylist]"].status is Status.PASS
    assert results["gpu.dcgm_diag[Denylist]"].measured["command"].value == "dcgmi diag -r 2"
    assert results["gpu.dcgm_diag[Denylist]"].measured["format"].value == "text"


def test_diagnose_runs_once_when_dcgmi_reported_an_error(tmp_path):
    # a dcgmi that cannot reach its host engine prints an Error line whatever the flags: no second run
    args = fake_dcgmi(tmp_path, NO_HOSTENGINE, exit_code=255, json_doc=NO_HOSTENGINE)
    done = dcgm.diagnose(str(tmp_path / "dcgmi"), 1)
    assert calls(args) == ["diag -r 1 -j"] and done.command == "dcgmi diag -r 1 -j"
    [v] = judge_diag(done.report, 1, done.returncode, done.output)
    assert v.status is Status.FAIL and "nv-hostengine" in v.remediation


@pytest.mark.parametrize("options, quick, level", [
    ({}, True, 1), ({}, False, 2), ({"dcgm_level": 4}, True, 4), ({"dcgm_level": "3"}, False, 3)])
def test_level_defaults_and_option(cu117, options, quick, level):
    assert dcgm.level_for(Context(cu117.data, {}, quick=quick, options=options)) == level


@pytest.mark.parametrize("bad", [0, 5, "x", True, 2.5, ""])
def test_a_level_outside_1_to_4_is_an_error_not_a_run(cu117, bad, tmp_path, monkeypatch):
    args = fake_dcgmi(tmp_path, HEALTHY_R2)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    [v] = dcgm.gpu_dcgm_diag(Context(cu117.data, {}, options={"dcgm_level": bad}))
    assert v.status is Status.ERROR and "1, 2, 3, 4" in v.message and calls(args) == []


def test_a_hung_dcgmi_is_killed_at_its_deadline_and_reported(tmp_path, monkeypatch):
    # dcgmi waits on nv-hostengine; a hung one must not hold verify beyond the level's deadline
    (tmp_path / "dcgmi").write_text("#!/bin/sh\necho 'Successfully started diagnostic'\nexec /bin/sleep 30\n")
    (tmp_path / "dcgmi").chmod(0o755)
    monkeypatch.setitem(dcgm.TIMEOUT_S, dcgm.QUICK_LEVEL, 0.5)
    started = time.monotonic()
    rc, text = dcgm.run_dcgmi(str(tmp_path / "dcgmi"), dcgm.QUICK_LEVEL)
    assert time.monotonic() - started < 10
    assert rc is None and text.startswith("Successfully started diagnostic")
    [v] = judge_diag(parse_dcgmi_diag(text), dcgm.QUICK_LEVEL, rc, text)
    assert v.status is Status.FAIL
    assert v.message == "dcgmi diag -r 1 did not run: Error: dcgmi diag -r 1 timed out after 0.5 s and was killed"
    # the JSON run is bounded the same way, and a run that timed out is not run again without -j
    done = dcgm.diagnose(str(tmp_path / "dcgmi"), dcgm.QUICK_LEVEL)
    assert done.returncode is None and done.command == "dcgmi diag -r 1 -j"
    [v] = judge_diag(done.report, dcgm.QUICK_LEVEL, done.returncode, done.output)
    assert v.message == "dcgmi diag -r 1 did not run: Error: dcgmi diag -r 1 -j timed out after 0.5 s and was killed"


def test_a_crashed_dcgmi_keeps_its_output_and_says_how_it_ended(tmp_path):
    (tmp_path / "dcgmi").write_text("#!/bin/sh\ncat <<'EOF'\n" + HEALTHY_R2 + "EOF\nkill -SEGV $$\n")
    (tmp_path / "dcgmi").chmod(0o755)
    rc, text = dcgm.run_dcgmi(str(tmp_path / "dcgmi"), dcgm.FULL_LEVEL)
    assert rc is None and text.endswith("Error: dcgmi diag -r 2 crashed with SIGSEGV")
    verdicts = judge_diag(parse_dcgmi_diag(text), dcgm.FULL_LEVEL, rc, text)
    assert len(verdicts) == 12 and verdicts[-1].subject == "errors" and "SIGSEGV" in verdicts[-1].message


# --- JSON: DCGM 3.x and 4.x documents (tests/data/dcgm, written from DCGM's documented schema) -----------------


def by_subject(verdicts):
    return {v.subject: v for v in verdicts}


def test_dcgm4_json_per_gpu_results_serials_and_metadata():
    r = parse_dcgmi_json(data("dcgm4_r2_h100x8_memory_fail.json"))
    assert r.source == "json" and r.errors == []
    assert r.metadata == {"DCGM Version": "4.2.3", "Driver Version Detected": "570.148.08"}
    assert [t.name for t in r.tests] == ["software", "memory", "pcie", "targeted_stress"]
    assert [t.section for t in r.tests] == ["Deployment", "Hardware", "Integration", "Stress"]
    mem = r.tests[1]
    assert mem.result == "Fail" and mem.gpus == {"Pass": "0, 1, 2, 3, 4, 6, 7", "Fail": "5"}
    assert mem.codes == [(5, 85, 6)] and r.serials[5] == "1652320000005" and len(r.serials) == 8
    assert r.tests[2].details[0] == ("Info", "GPU 0 GPU to Host bandwidth: 51.0 GB/s")
    v = by_subject(judge_diag(r, 2, 226))
    assert set(v) == {"software", "memory gpu5", "pcie", "targeted_stress gpu2"}
    m = v["memory gpu5"]
    assert m.status is Status.FAIL and m.gpu == GpuId(5, serial="1652320000005")
    assert m.message == ("DCGM memory: Fail on GPU 5: GPU 5 has a pending row remapping after an uncorrectable memory "
                         "error; reset the GPU to apply it.")
    assert m.measured["dcgm_error_ids"].value == "85" and m.measured["dcgm_version"].value == "4.2.3"
    assert "nvidia-smi -r -i 5" in m.remediation and "RMA" in m.remediation
    # DCGM prints a warning as Fail in JSON: the temperature warning on GPU 2 is a fail here, never a pass
    assert v["targeted_stress gpu2"].status is Status.FAIL and v["targeted_stress gpu2"].gpu.index == 2
    assert v["software"].status is Status.PASS and v["software"].message == "DCGM software: Pass on GPU(s) 0, 1, 2, " \
                                                                            "3, 4, 5, 6, 7"


def test_dcgm3_3_json_gpu_id_strings_deployment_ints_and_the_warnings_key():
    r = parse_dcgmi_json(data("dcgm3_3_r2_a100x4_memory_fail.json"))
    assert r.metadata == {"DCGM Version": "3.3.9", "Driver Version Detected": "535.161.08"}
    assert r.serials == {g: f"132452100{g:04d}" for g in range(4)}
    v = by_subject(judge_diag(r, 2, 226))
    mem = v["GPU Memory gpu1"]
    assert mem.status is Status.FAIL and mem.gpu == GpuId(1, serial="1324521000001")
    assert "double-bit ECC error" in mem.message and mem.measured["dcgm_error_ids"].value == "4"
    assert "RMA" in mem.remediation
    # Deployment's int gpu_id and its "warnings" text key (DCGM 3.3); persistence mode off warns, as gpu.settings
    pm = v["Persistence Mode gpu0"]
    assert pm.status is Status.WARN and pm.gpu.index == 0 and "Persistence mode for GPU 0 is disabled" in pm.message
    assert v["Diagnostic"].status is Status.SKIP and v["Denylist"].status is Status.PASS
    assert v["PCIe"].status is Status.PASS and len(v) == 12


def test_dcgm3_1_json_gpu_ids_and_string_warnings():
    r = parse_dcgmi_json(data("dcgm3_1_r2_pcie_fail.json"))
    assert r.metadata == {"DCGM Version": "3.1.8"} and r.serials == {}
    v = by_subject(judge_diag(r, 2, 226))
    pcie = v["PCIe gpu1"]
    assert pcie.status is Status.FAIL and pcie.gpu == GpuId(1)
    assert pcie.message == ("DCGM PCIe: Fail on GPU 1: GPU 1 host to device bandwidth 3.2 GB/s is below the 5 GB/s "
                            "minimum: check the link width and generation.")
    assert "nvidia-smi -r -i 1" in pcie.remediation  # not a memory fault: the general advice, for this GPU
    assert {s for s, x in v.items() if x.status is not Status.PASS} == {"PCIe gpu1"}


def test_dcgm4_json_runtime_error_is_a_deployment_fail_of_the_gpu():
    r = parse_output(data("dcgm4_r1_runtime_error.json"))
    assert r.source == "json" and r.tests == []
    [v] = judge_diag(r, 1, 226)
    assert v.status is Status.FAIL and v.gpu == GpuId(3) and v.subject == "Deployment gpu3"
    assert v.message == ("DCGM stopped before running its tests: GPU 3 has uncorrectable memory errors and row "
                         "remappings are pending")
    assert "nvidia-smi -r -i 3" in v.remediation and "RMA" in v.remediation and "by hand" not in v.remediation


@pytest.mark.parametrize("where", ["top", "root"])
def test_json_metadata_found_beside_or_inside_the_root_object(where):
    doc = json.loads(data("dcgm4_r2_h100x8_memory_fail.json"))
    if where == "root":
        doc["DCGM Diagnostic"]["metadata"] = doc.pop("metadata")
        doc["DCGM Diagnostic"]["entity_groups"] = doc.pop("entity_groups")
    r = parse_output("Successfully ran diagnostic for group.\n" + json.dumps(doc))
    assert r.metadata["DCGM Version"] == "4.2.3" and r.serials[7] == "1652320000007"


@pytest.mark.parametrize("doc, says", [
    ({"something": {}}, "without a 'DCGM GPU Diagnostic' or 'DCGM Diagnostic' object"),
    ({"DCGM Diagnostic": {"test_categories": {"category": "Hardware"}}}, "test_categories is dict, not a list"),
    ({"DCGM Diagnostic": {"test_categories": [{"tests": [{"name": "memory", "results": [7]}]}]}},
     "results[0] is int, not an object"),
])
def test_json_of_another_shape_fails_saying_where(doc, says):
    r = parse_output(json.dumps(doc))
    verdicts = judge_diag(r, 2, 0)
    assert worst(v.status for v in verdicts) is Status.FAIL
    assert any(says in v.message for v in verdicts), [v.message for v in verdicts]


@pytest.mark.parametrize("status", ["Error", "", None, 3, "PASSED"])
def test_an_unknown_json_status_is_a_fail(status):
    doc = {"DCGM Diagnostic": {"test_categories": [{"category": "Hardware", "tests": [{"name": "memory", "results": [
        {"entity_group": "GPU", "entity_id": 0, "status": status}]}]}]}}
    [v] = judge_diag(parse_output(json.dumps(doc)), 2, 0)
    assert v.status is Status.FAIL and v.gpu == GpuId(0) and "none of Pass, Fail" in v.message


# --- the text fallback: DCGM 4 tables, frame width, rows after a Warning, Deployment errors -------------------------


def test_dcgm4_8gpu_table_wraps_at_the_frame_width_not_a_metadata_row():
    text = data("dcgm4_r2_h100x8_memory_fail.txt")
    ids_row = next(line for line in text.splitlines() if "GPU Device IDs Detected" in line)
    assert len(ids_row.split("|")[2].strip()) == 46  # one more than the 45-character wrap: the old width source
    r = parse_dcgmi_diag(text)
    mem = next(t for t in r.tests if t.name == "memory")
    [(kind, detail)] = mem.details
    assert kind == "Warning" and detail == (
        "GPU3 Memory test found a double-bit ECC error on GPU 3 at offset 0x7f3a0000 in HBM stack 2: the word read "
        "back differs from the written value (0xa5a5a1a5, not 0xa5a5a5a5). Drain the GPU and reset it, then restart "
        "DCGM and rerun.")
    stress = next(t for t in r.tests if t.name == "targeted_stress")
    assert "Restart the test" in stress.details[0][1] and "Resta rt" not in stress.details[0][1]


def test_dcgm4_gpu_rows_after_a_warning_belong_to_the_test():
    r = parse_dcgmi_diag(data("dcgm4_r2_h100x8_memory_fail.txt"))
    mem = next(t for t in r.tests if t.name == "memory")
    assert mem.per_gpu == {0: "Pass", 1: "Pass", 2: "Pass", 3: "Fail", 4: "Pass", 5: "Pass", 6: "Pass", 7: "Pass"}
    assert "GPU4" not in mem.details[0][1]
    # DCGM 4 prints a warning as Warn on the test row and Fail on the GPU row: a warning of GPU 6
    stress = next(t for t in r.tests if t.name == "targeted_stress")
    assert stress.result == "Warn" and stress.per_gpu[6] == "Warn" and stress.per_gpu[7] == "Pass"
    v = by_subject(judge_diag(r, 2, 226))
    assert set(v) == {"software", "memory gpu3", "pcie", "targeted_stress gpu6"}
    assert v["memory gpu3"].status is Status.FAIL and v["memory gpu3"].gpu == GpuId(3)
    assert "RMA" in v["memory gpu3"].remediation
    assert v["targeted_stress gpu6"].status is Status.WARN and v["targeted_stress gpu6"].gpu == GpuId(6)
    assert v["pcie"].status is Status.PASS and v["pcie"].measured["gpus_pass"].value == "0, 1, 2, 3, 4, 5, 6, 7"


def test_dcgm4_deployment_error_table_fails_the_gpu_with_reset_and_rma():
    r = parse_output(data("dcgm4_r1_deployment_error.txt"))
    assert r.source == "text" and r.tests == []
    [v] = judge_diag(r, 1, 226)
    assert v.status is Status.FAIL and v.gpu == GpuId(3) and v.subject == "Deployment gpu3"
    assert v.message.endswith("GPU 3 has uncorrectable memory errors and row remappings are pending")
    assert "did not run" not in v.message and "RMA" in v.remediation and "nvidia-smi -r -i 3" in v.remediation


def test_deployment_error_printed_as_a_plain_line_fails_the_gpu():
    r = parse_output("GPU 2 has uncorrectable memory errors and row remappings are pending\n")
    [v] = judge_diag(r, 1, 226)
    assert v.status is Status.FAIL and v.gpu == GpuId(2) and "RMA" in v.remediation


def test_nvml_identities_join_dcgm_results_and_keep_dcgm_serials():
    fake = FakeNVML(healthy_node(8))
    ids = nvml_ids(fake)
    assert ids[5] == GpuId(5, "GPU-00000005-0000-0000-0000-000000000000", "00000000:68:00.0", "1650000000005")
    assert fake.initialised == 0  # shut down again
    r = parse_dcgmi_json(data("dcgm4_r2_h100x8_memory_fail.json"))
    v = by_subject(judge_diag(r, 2, 226, ids=ids))
    assert v["memory gpu5"].gpu == ids[5]
    no_serial = {5: GpuId(5, "GPU-5", "00000000:68:00.0", None)}
    assert by_subject(judge_diag(r, 2, 226, ids=no_serial))["memory gpu5"].gpu.serial == "1652320000005"
    assert nvml_ids(FakeNVML([], init_error=9)) == {}  # no driver: DCGM's index (and serial) alone


# --- properties: the parsers never raise and never turn what they cannot read into a pass ------------------------


CORPUS = {name: data(name) for name in sorted(os.listdir(DATA))} | {
    "healthy": HEALTHY_R2, "mixed": MIXED_R2, "dcgm4": DCGM4, "deployment": DEPLOYMENT_ERROR}
FAILING = [k for k in CORPUS if k != "healthy"]


def judged(text: str):
    return judge_diag(parse_output(text), 2, 1, text[-2000:])


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_truncated_at_every_line_is_never_a_pass(name):
    lines = CORPUS[name].rstrip("\n").splitlines(keepends=True)
    for k in range(len(lines)):  # every strict prefix, from nothing up to the last line missing
        verdicts = judged("".join(lines[:k]))
        assert worst(v.status for v in verdicts) is Status.FAIL, (name, k)
    assert judged("".join(lines))  # and the whole output is read


def test_shuffled_lines_never_raise_and_never_hide_a_failure():
    rng = random.Random(11)
    for name, text in CORPUS.items():
        lines = text.splitlines()
        for _ in range(25):
            rng.shuffle(lines)
            verdicts = judged("\n".join(lines) + "\n")
            if name in FAILING:
                assert worst(v.status for v in verdicts) is Status.FAIL, name
            for v in verdicts:
                if v.status is Status.PASS:
                    assert "Pass" in text and v.subject in text


def test_random_bytes_and_fragments_never_raise_and_never_pass():
    rng = random.Random(7)
    pieces = ["|", "+", "-" * 27, "=" * 48, " ", "\n", "Pass", "Fail", "Warn", "GPU0: Pass", "Warning: GPU1",
              "Error", "-----  Hardware  ---", "{", "}", "[", "]", '"status"', ":", ",", '"DCGM Diagnostic"',
              '"test_categories"', "\u00e9", "\x00", "\t"]
    for i in range(300):
        if i % 2:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(2000)))
            text = raw.decode("utf-8", "replace") if i % 4 == 1 else raw.decode("latin-1")
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(400)))
        verdicts = judged(text)
        assert verdicts and not any(v.status is Status.PASS for v in verdicts), text[:200]


def test_deep_nesting_and_huge_lines_never_raise():
    for text in ("[" * 100_000, "{" + '"a":{' * 50_000, '{"DCGM Diagnostic":' + "[" * 50_000 + "]" * 50_000 + "}",
                 "| " + "x" * 200_000 + " |\n", "+" + "-" * 100_000 + "+\n",
                 box([("Hardware", [("GPU Memory", "Fail - GPU: " + "7" * 5000), ("Warning", "GPU " + "9" * 5000)])]),
                 '{"DCGM Diagnostic": {"test_categories": [{"tests": [{"name": "memory", "results": [{"status": '
                 '"Fail", "entity_id": ' + "9" * 4000 + ', "warnings": [{"warning": "w", "error_id": '
                 + "8" * 4000 + "}]}]}]}]}}"):
        verdicts = judged(text)
        assert worst(v.status for v in verdicts) is Status.FAIL


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def test_json_with_any_value_swapped_for_another_type_never_raises_and_never_hides_a_failure():
    rng = random.Random(3)
    swaps = [None, 0, -1, 2.5, True, "", "x", "GPU 9", [], [1, "a"], {}, {"k": [None]}, [[[[]]]]]
    for name in [n for n in CORPUS if n.endswith(".json")]:
        original = json.loads(CORPUS[name])
        paths = [p for p in _paths(original) if p]
        for _ in range(60):
            doc = json.loads(CORPUS[name])
            path = rng.choice(paths)
            holder = doc
            for key in path[:-1]:
                holder = holder[key]
            holder[path[-1]] = rng.choice([s for s in swaps if type(s) is not type(holder[path[-1]])])
            verdicts = judged(json.dumps(doc, indent=3))
            assert worst(v.status for v in verdicts) is Status.FAIL, (name, path)


def test_wrapped_cells_join_back_exactly_at_any_frame_width():
    rng = random.Random(5)
    words = ["GPU", "value", "Restart", "0x3f00", "a", "", "mismatch,", "(row", "7)", "  ", "\u00b0C", "ECC."]
    for _ in range(60):
        wrap = rng.randrange(8, 90)
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 40))).strip() or "x"
        value_w = wrap + 3

        def row(name, cell, wrap=wrap):
            return f"| {name:<25} | {cell:<{wrap + 1}}|"

        pieces = [text[j:j + wrap] for j in range(0, len(text), wrap)]
        lines = ["+" + "-" * 27 + "+" + "-" * value_w + "+", row("Diagnostic", "Result"),
                 "+" + "=" * 27 + "+" + "=" * value_w + "+",
                 "|-----  Metadata  " + "-" * 10 + "+" + "-" * value_w + "|",
                 row("GPU Device IDs Detected", "20b5, " * (wrap // 3) + "20b5"),  # a row wider than its cell
                 "+-----  Hardware  " + "-" * 10 + "+" + "-" * value_w + "+",
                 row("GPU Memory", "Fail - All"), row("Warning", pieces[0])]
        lines += [row("", p) for p in pieces[1:]] + ["+" + "-" * 27 + "+" + "-" * value_w + "+"]
        [test] = parse_dcgmi_diag("\n".join(lines) + "\n").tests
        assert test.details == [("Warning", " ".join(text.split()))], (wrap, text)


def test_dcgm_level_flag_reaches_dcgmi_through_the_cli(tmp_path, monkeypatch):
    """`--dcgm-level 3` runs `dcgmi diag -r 3 -j` and the report records the level; without it, `--quick`
    runs level 1; a level outside 1-4 is a usage error before anything runs."""
    from checks.cli import main

    args = fake_dcgmi(tmp_path, HEALTHY_R2)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    report = tmp_path / "r.json"
    common = ["--only", "gpu.dcgm_diag", "--skip", "gpu.driver", "--no-progress"]
    main([*common, "--dcgm-level", "3", "--json", str(report)])
    assert calls(args)[-1].startswith("diag -r 3") and json.loads(report.read_text())["options"]["dcgm_level"] == 3
    main([*common, "--quick"])
    assert calls(args)[-1].startswith("diag -r 1")
    before = len(calls(args))
    assert main([*common, "--dcgm-level", "5"]) == 2 and len(calls(args)) == before
