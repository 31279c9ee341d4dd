"""DCGM diagnostic: the boxed-table parser (own tables built in DCGM's layout, plus the shared real
output when present), the judge, and the registered check with a fake ``dcgmi`` on PATH."""

import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checks import dcgm
from checks.dcgm import judge_diag, parse_dcgmi_diag, parse_results, summarise_details
from checks.registry import _REGISTRY, Context
from checks.result import Status
from checks.runner import run_checks

SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"  # real outputs, optional

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
    mem = verdicts["GPU Memory"]
    assert mem.status is Status.FAIL
    assert mem.message == f"DCGM GPU Memory: Fail on GPU(s) 0: GPU 0: {THERMAL[6:]}"
    assert mem.measured["gpus_fail"].value == "0" and mem.measured["gpus_pass"].value == "1, 2, 3"
    assert mem.expected["result"].value == "Pass" and "nvidia-smi -r" in mem.remediation
    assert verdicts["Targeted Power"].status is Status.WARN and "281 W" in verdicts["Targeted Power"].message
    assert verdicts["Targeted Stress"].status is Status.SKIP and verdicts["Memory Bandwidth"].status is Status.SKIP
    assert verdicts["Denylist"].status is Status.PASS


def test_dcgm4_layout_with_per_gpu_rows():
    r = parse_dcgmi_diag(DCGM4)
    software, memory = r.tests
    assert (software.name, software.result, software.gpus) == ("software", "Pass", {"Pass": "0, 1"})
    assert (memory.result, memory.gpus) == ("Fail", {"Pass": "0", "Fail": "1"})
    v = judge_diag(r, 2, 226)[1]
    assert v.status is Status.FAIL and v.message.startswith("DCGM memory: Fail on GPU(s) 1: GPU 1: Uncorrectable")


def test_error_row_outside_a_test_fails():
    r = parse_dcgmi_diag(DEPLOYMENT_ERROR)
    assert r.tests == [] and r.errors == ["Deployment: GPU 3 has uncorrectable memory errors and row remappings "
                                          "are pending"]
    [v] = judge_diag(r, 1, 226)
    assert v.status is Status.FAIL and "row remappings are pending" in v.message


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
    assert v.status is Status.FAIL and "printed no results table (exit code 1): no output" in v.message


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
    assert s.group == "gpu" and s.isolate and s.timeout_s == 300 and not s.slow


def test_skips_when_dcgmi_is_not_on_path(cu117, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    [r] = run_checks([spec()], ctx_for(cu117))
    assert r.status is Status.SKIP and "dcgmi (NVIDIA DCGM) is not on PATH" in r.message


def test_skips_on_a_node_without_gpus(cu117):
    [r] = run_checks([spec()], ctx_for(cu117, gpus=0))
    assert r.status is Status.SKIP and "expected to have no GPUs" in r.message


def fake_dcgmi(directory, output, exit_code=0):
    """An executable ``dcgmi`` that records its arguments and prints ``output``: real DCGM cannot run here."""
    (directory / "dcgmi.out").write_text(output)
    script = directory / "dcgmi"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        open({str(directory / 'dcgmi.args')!r}, "w").write(" ".join(sys.argv[1:]))
        sys.stdout.write(open({str(directory / 'dcgmi.out')!r}).read())
        sys.exit({exit_code})
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory / "dcgmi.args"


def test_fake_dcgmi_is_run_at_the_right_level_parsed_and_judged(cu117, tmp_path, monkeypatch):
    args = fake_dcgmi(tmp_path, MIXED_R2, exit_code=226)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    results = {r.name: r for r in run_checks([spec()], ctx_for(cu117, quick=True))}
    assert args.read_text() == "diag -r 1"
    assert results["gpu.dcgm_diag[GPU Memory]"].status is Status.FAIL
    assert results["gpu.dcgm_diag[Targeted Power]"].status is Status.WARN
    assert results["gpu.dcgm_diag[Denylist]"].status is Status.PASS
    assert results["gpu.dcgm_diag[Denylist]"].measured["command"].value == "dcgmi diag -r 1"
    fake_dcgmi(tmp_path, HEALTHY_R2)
    full = run_checks([spec()], ctx_for(cu117, quick=False))
    assert args.read_text() == "diag -r 2"
    assert {r.status for r in full} == {Status.PASS} and len(full) == 11


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


def test_a_crashed_dcgmi_keeps_its_output_and_says_how_it_ended(tmp_path):
    (tmp_path / "dcgmi").write_text("#!/bin/sh\ncat <<'EOF'\n" + HEALTHY_R2 + "EOF\nkill -SEGV $$\n")
    (tmp_path / "dcgmi").chmod(0o755)
    rc, text = dcgm.run_dcgmi(str(tmp_path / "dcgmi"), dcgm.FULL_LEVEL)
    assert rc is None and text.endswith("Error: dcgmi diag -r 2 crashed with SIGSEGV")
    verdicts = judge_diag(parse_dcgmi_diag(text), dcgm.FULL_LEVEL, rc, text)
    assert len(verdicts) == 12 and verdicts[-1].subject == "errors" and "SIGSEGV" in verdicts[-1].message
