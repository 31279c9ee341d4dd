"""NCCL checks: busbw arithmetic, the all-reduce judge, the nccl-tests parser (own samples in the
documented formats, plus the shared real outputs when present), a real all-reduce over gloo on CPU
(the same process orchestration as the NCCL one), and the registered check on this machine. Its
two-verdict path (torch + nccl-tests) is exercised in-process with torch's probe replaced by a
hand-made AllreduceProbe and a fake ``all_reduce_perf`` on PATH that is run for real. Rank faults are
injected from outside, through the process layer: a ``sitecustomize.py`` on the ranks' PYTHONPATH."""

import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from checks import nccl
from checks.figures import Expectation
from checks.nccl import (
    AllreduceProbe,
    algbw_gbps,
    allreduce_busbw,
    expected_busbw,
    expected_sum,
    judge_allreduce,
    judge_nccl_tests,
    measurement_bytes,
    parse_nccl_tests,
    probe_allreduce,
)
from checks.nccl.nccltests import NotANumber, parse_count, parse_number
from checks.node import PerfExpect
from checks.registry import _REGISTRY, Context
from checks.result import Status
from checks.runner import run_checks

MiB = 1 << 20
GiB = 1 << 30
SAMPLES = Path(__file__).resolve().parent.parent.parent / "shared" / "samples"  # real outputs, optional

# --- own samples, written in the formats nccl-tests prints ----------------------------------------------


def header(gpus, min_bytes, max_bytes, step, warmup, iters, tail=" agg iters: 1 validation: 1 graph: 0"):
    """nccl-tests' parameter line (longer than this file's line limit, so it is assembled)."""
    return (f"# nThread 1 nGpus {gpus} minBytes {min_bytes} maxBytes {max_bytes} step: {step} "
            f"warmup iters: {warmup} iters: {iters}{tail}")


# Older layout: no version line, "#wrong" flush against busbw. 2 GPUs: busbw == algbw.
OLD_2GPU = header(2, 1048576, 268435456, "16(factor)", 5, 20) + """
#
# Using devices
#  Rank  0 Group  0 Pid   1201 on      nodea device  0 [0x17] NVIDIA A100-SXM4-80GB
#  Rank  1 Group  0 Pid   1201 on      nodea device  1 [0x31] NVIDIA A100-SXM4-80GB
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     1048576        262144     float     sum      -1    20.00   52.43   52.43      0    20.50   51.15   51.15      0
    16777216       4194304     float     sum      -1   120.00  139.81  139.81      0   121.00  138.65  138.65      0
   268435456      67108864     float     sum      -1  1400.00  191.74  191.74      0  1401.00  191.60  191.60      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 127.56
#
"""

# Newer layout: version line, "Collective test" lines, wider "#wrong" columns. 8 GPUs: busbw = algbw x 1.75.
NEW_8GPU = """\
# nccl-tests version 2.13.9 nccl-headers=21803 nccl-library=21803
# Collective test starting: all_reduce_perf
""" + header(8, 134217728, 268435456, "2(factor)", 3, 10) + """
#
# Using devices
""" + "".join(f"#  Rank  {r} Group  0 Pid  20001 on      nodeb device  {r} [0000:{0x18 + r:02x}:00] "
              "NVIDIA H100 80GB HBM3\n" for r in range(8)) + """\
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)
   134217728      33554432     float     sum      -1   600.00  223.70  391.47       0   601.00  223.32  390.82       0
   268435456      67108864     float     sum      -1  1118.48  240.00  420.00       0  1119.00  239.89  419.81       0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 405.39
#
# Collective test concluded: all_reduce_perf
#
"""

NEW_8GPU_WRONG = (NEW_8GPU.replace("419.81       0", "419.81      12")
                  .replace("Out of bounds values : 0 OK", "Out of bounds values : 12 FAILED"))

# Oldest layout: no root column, an "error" column (max error) instead of "#wrong", no Group.
OLDEST_ERROR_COLUMN = header(2, 8388608, 8388608, "1048576(bytes)", 5, 20, " validation: 1") + """
#
# Using devices
#   Rank  0 Pid   4410 on      noded device  0 [0x06] Tesla V100-SXM2-16GB
#   Rank  1 Pid   4410 on      noded device  1 [0x07] Tesla V100-SXM2-16GB
#
#                                                     out-of-place                       in-place
#       size         count    type   redop     time   algbw   busbw  error     time   algbw   busbw  error
#        (B)    (elements)                     (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     8388608       2097152   float     sum    200.0   41.94   41.94  0e+00    201.0   41.73   41.73  0e+00
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 41.84
"""

# Aborting before the table (an NCCL init failure).
ABORTED = header(4, 268435456, 268435456, "2(factor)", 5, 20) + """
#
# Using devices
nodec: Test NCCL failure common.cu:1005 'unhandled system error (run with NCCL_DEBUG=INFO for details) / '
 .. nodec pid 3303: Test failure common.cu:891
"""


# --- arithmetic -------------------------------------------------------------------------------------


def test_algbw_and_busbw_match_hand_computed_values():
    # 1 GiB in 4000.82 us: 1,073,741,824 / 4.00082e-3 / 1e9 = 268.38 GB/s; x 2(8-1)/8 = 1.75 -> 469.67 GB/s
    assert algbw_gbps(GiB, 4000.82e-6) == pytest.approx(268.3804, rel=1e-5)
    assert allreduce_busbw(268.38, 8) == pytest.approx(469.665)
    assert allreduce_busbw(100.0, 2) == pytest.approx(100.0)  # 2(n-1)/n = 1
    assert allreduce_busbw(100.0, 4) == pytest.approx(150.0)  # 1.5
    assert expected_sum(8) == 36 and expected_sum(2) == 3


def test_measurement_size_defaults_and_overrides():
    assert measurement_bytes(PerfExpect(), quick=False) == GiB
    assert measurement_bytes(PerfExpect(), quick=True) == 256 * MiB
    assert measurement_bytes(PerfExpect(allreduce_bytes=4 * GiB), quick=False) == 4 * GiB
    assert measurement_bytes(PerfExpect(allreduce_bytes=4 * GiB), quick=True) == 256 * MiB
    assert measurement_bytes(PerfExpect(allreduce_bytes=64 * MiB), quick=True) == 64 * MiB


@pytest.mark.parametrize("device, ranks, perf, value", [
    ("NVIDIA H100 80GB HBM3", 8, None, 370.0),
    ("NVIDIA H200", 8, None, 475.0),
    ("NVIDIA A100-SXM4-80GB", 8, None, 230.0),
    ("NVIDIA A800-SXM4-80GB", 8, None, 153.0),  # derived: ~2/3 of A100 (FACTS)
    ("NVIDIA H800", 8, None, None),  # no public figure
    ("NVIDIA H100 80GB HBM3", 4, None, None),  # the table is for 8-GPU nodes
    ("NVIDIA H100 80GB HBM3", 4, PerfExpect(allreduce_busbw_gbps=300), 300.0),
    ("A800", 8, PerfExpect(allreduce_busbw_gbps=160), 160.0),
    ("A800", 8, PerfExpect(gemm_tflops=100), 153.0),  # other figures set: the table still gives busbw
    ("A800", 8, None, 153.0),  # node.gpu_model as the name when no device name came back
])
def test_expected_busbw(device, ranks, perf, value):
    assert expected_busbw(device, ranks, perf).value == value


# --- the all-reduce judge --------------------------------------------------------------------------


def probe_at(busbw, ranks=8, nbytes=GiB, device="NVIDIA H200", **kw):
    algbw = busbw * ranks / (2 * (ranks - 1))
    return AllreduceProbe(ranks, nbytes, device=device, seconds=nbytes / (algbw * 1e9), max_abs_error=0.0, **kw)


def test_healthy_allreduce_passes_with_busbw_measured_and_expected():
    v = judge_allreduce(probe_at(480.0), None)
    assert v.status is Status.PASS, v.message
    assert v.measured["busbw"].value == pytest.approx(480.0) and v.measured["busbw"].unit == "GB/s"
    assert v.measured["algbw"].value == pytest.approx(480 / 1.75, abs=1e-3)
    assert v.expected["busbw"].value == 475 and v.expected["busbw_floor"].value == pytest.approx(380)
    assert v.measured["wrong_elements"].value == 0 and v.expected["sum"].value == 36
    assert "1.01x the expected 475 GB/s" in v.message


def test_slow_allreduce_fails_below_the_floor():
    v = judge_allreduce(probe_at(300.0), None)
    assert v.status is Status.FAIL and "0.63x the expected 475 GB/s" in v.message
    assert "NCCL_DEBUG=INFO" in v.remediation
    assert judge_allreduce(probe_at(300.0), PerfExpect(floor_ratio=0.6)).status is Status.PASS
    assert judge_allreduce(probe_at(300.0), PerfExpect(allreduce_busbw_gbps=310)).status is Status.PASS


def test_wrong_sums_fail_whatever_the_speed():
    v = judge_allreduce(probe_at(480.0, wrong=5), None)
    assert v.status is Status.FAIL and "5 element(s) differ from 36" in v.message


def test_rank_errors_and_timeouts_fail_with_the_first_errors():
    v = judge_allreduce(AllreduceProbe(8, GiB, errors=[
        "rank 0: RuntimeError: CUDA error: system not yet initialized", "rank 1: x", "rank 2: y", "rank 3: z"]), None)
    assert v.status is Status.FAIL and "failed: rank 0: RuntimeError" in v.message and "and 1 more" in v.message
    assert "nvidia-fabricmanager" in v.remediation
    hung = judge_allreduce(AllreduceProbe(8, GiB, errors=["rank 0: no result"], timed_out=True), None)
    assert hung.status is Status.FAIL and "did not finish" in hung.message


def test_no_expectation_reports_without_judging():
    v = judge_allreduce(probe_at(50.0, ranks=4, device="NVIDIA H100 80GB HBM3"), None)
    assert v.status is Status.PASS and "not judged" in v.message and "node.perf.allreduce_busbw_gbps" in v.message


# --- the nccl-tests parser and judge ------------------------------------------------------------------


def test_parse_older_layout():
    r = parse_nccl_tests(OLD_2GPU)
    assert r.version is None and (r.n_threads, r.n_gpus, r.ranks) == (1, 2, 2)
    assert (r.min_bytes, r.max_bytes, r.warmup_iters, r.iters) == (1048576, 268435456, 5, 20)
    assert r.devices == [(0, "NVIDIA A100-SXM4-80GB"), (1, "NVIDIA A100-SXM4-80GB")]
    assert [row.size for row in r.rows] == [1048576, 16777216, 268435456]
    last = r.rows[-1]
    assert (last.count, last.type, last.redop, last.root) == (67108864, "float", "sum", -1)
    assert (last.time_us, last.algbw, last.busbw, last.wrong) == (1400.0, 191.74, 191.74, 0)
    assert (last.in_time_us, last.in_algbw, last.in_busbw, last.in_wrong) == (1401.0, 191.60, 191.60, 0)
    assert r.avg_busbw == 127.56 and r.out_of_bounds == 0 and r.errors == []


def test_parse_newer_layout():
    r = parse_nccl_tests(NEW_8GPU)
    assert (r.version, r.nccl_library, r.ranks) == ("2.13.9", "21803", 8)
    assert (r.warmup_iters, r.iters) == (3, 10)
    assert len(r.devices) == 8 and r.devices[7] == (7, "NVIDIA H100 80GB HBM3")
    assert [row.busbw for row in r.rows] == [391.47, 420.00] and r.rows[1].in_busbw == 419.81
    assert r.avg_busbw == 405.39 and r.errors == []


def test_parse_oldest_layout_with_error_column_and_no_root():
    r = parse_nccl_tests(OLDEST_ERROR_COLUMN)
    [row] = r.rows
    assert (row.size, row.root, row.busbw, row.in_busbw) == (8388608, None, 41.94, 41.73)
    assert row.wrong is None and row.error == 0.0
    assert r.devices == [(0, "Tesla V100-SXM2-16GB"), (1, "Tesla V100-SXM2-16GB")]


@pytest.mark.parametrize("text", [OLD_2GPU, NEW_8GPU, OLDEST_ERROR_COLUMN])
def test_every_row_of_own_samples_obeys_the_busbw_formula(text):
    check_formula(parse_nccl_tests(text))


def check_formula(report):
    n = report.ranks
    for row in report.rows:
        for time_us, algbw, busbw in ((row.time_us, row.algbw, row.busbw),
                                      (row.in_time_us, row.in_algbw, row.in_busbw)):
            assert algbw == pytest.approx(algbw_gbps(row.size, time_us * 1e-6), abs=0.011, rel=0.005)
            assert busbw == pytest.approx(allreduce_busbw(algbw, n), abs=0.011, rel=0.001)


def test_parse_aborted_run_reports_the_error_line():
    r = parse_nccl_tests(ABORTED)
    assert r.rows == [] and r.avg_busbw is None and r.ranks == 4
    assert r.errors[0].startswith("nodec: Test NCCL failure common.cu:1005 'unhandled system error")
    v = judge_nccl_tests(r, 1, Expectation(None, "-"), 0.8)
    assert v.status is Status.FAIL and v.message.startswith("all_reduce_perf failed: nodec: Test NCCL failure")


def test_parse_ignores_noise_and_handles_empty_output():
    r = parse_nccl_tests("")
    assert r.rows == [] and r.errors == [] and r.ranks is None
    v = judge_nccl_tests(r, 127, Expectation(None, "-"), 0.8, output_tail="sh: all_reduce_perf: not found")
    assert v.status is Status.FAIL and "printed no results (exit code 127): sh: all_reduce_perf: not found" in v.message


def test_judge_nccl_tests_healthy_with_the_torch_figure_beside_it():
    r = parse_nccl_tests(NEW_8GPU)
    v = judge_nccl_tests(r, 0, expected_busbw(r.devices[0][1], r.ranks, None), 0.8, torch_busbw=411.5)
    assert v.status is Status.PASS, v.message
    assert v.measured["busbw"].value == 420.0 and v.measured["busbw_in_place"].value == 419.81
    assert v.measured["torch_busbw"].value == 411.5 and "torch nccl.allreduce: 411.5 GB/s" in v.message
    assert v.measured["nccl_tests"].value == "2.13.9" and v.expected["busbw"].value == 370


def test_nccl_debug_lines_inform_or_warn_but_do_not_fail():
    chatty = NEW_8GPU.replace("#\n#    ", "nodeb:20001:20001 [0] NCCL INFO NET/Plugin: Failed to find ncclNetPlugin_v6 "
                                         "symbol.\n#\n#    ", 1)
    r = parse_nccl_tests(chatty)
    assert r.errors == [] and r.warnings == [] and len(r.rows) == 2
    assert judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8).status is Status.PASS
    warned = parse_nccl_tests(NEW_8GPU + "nodeb:20001:20009 [3] NCCL WARN Cuda failure 'out of memory'\n")
    assert warned.errors == [] and warned.warnings[0].endswith("NCCL WARN Cuda failure 'out of memory'")
    v = judge_nccl_tests(warned, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.WARN and "NCCL warned: nodeb:20001:20009 [3] NCCL WARN" in v.message


def test_judge_nccl_tests_failures():
    r = parse_nccl_tests(NEW_8GPU)
    slow = judge_nccl_tests(r, 0, Expectation(600.0, "node.perf.allreduce_busbw_gbps"), 0.8)
    assert slow.status is Status.FAIL and "0.70x the expected 600 GB/s" in slow.message
    wrong = parse_nccl_tests(NEW_8GPU_WRONG)
    assert wrong.rows[-1].in_wrong == 12 and wrong.out_of_bounds == 12
    assert judge_nccl_tests(wrong, 0, Expectation(370.0, "t"), 0.8).status is Status.FAIL
    assert judge_nccl_tests(r, 2, Expectation(370.0, "t"), 0.8).status is Status.FAIL  # non-zero exit


# --- numbers as nccl-tests prints them, and the cases that must never pass ----------------------------------

NCCL_DATA = Path(__file__).resolve().parent / "data" / "nccl"


def nccl_data(name):
    return (NCCL_DATA / name).read_text()


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("-1", -1), ("1048576", 1048576), ("1081.14", 1081.14), ("15668.1", 15668.1), ("0e+00", 0.0),
    ("1.04858e+06", 1048580.0), ("4.2E-3", 0.0042), (".5", 0.5), ("7.", 7.0), ("N/A", None), ("n/a", None),
])
def test_one_number_parser_reads_integers_fixed_and_e_notation(text, value):
    got = parse_number(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["", "nan", "-nan", "inf", "Infinity", "1_000", "0x10", "1e", "1.2.3", "abc",
                                  "1,5", "\uff16\uff13", "e5", "1e999"])
def test_one_number_parser_refuses_what_is_not_a_number(text):
    with pytest.raises(NotANumber):
        parse_number(text)


def test_counts_read_g_notation_round_up_and_refuse_negatives():
    assert parse_count("1.04858e+06") == 1048580 and parse_count("2.5") == 3 and parse_count("N/A") is None
    with pytest.raises(NotANumber):
        parse_count("-1")


def test_every_numeric_column_goes_through_the_one_parser():
    text = NEW_8GPU.replace("1118.48  240.00  420.00", "1.11848e+03  2.4e+02  4.2e+02")
    row = parse_nccl_tests(text).rows[-1]
    assert (row.time_us, row.algbw, row.busbw) == (1118.48, 240.0, 420.0) and row.unreadable == []


def test_own_healthy_data_passes():
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_healthy.txt"))
    assert len(r.rows) == 3 and r.out_of_bounds == 0 and not r.out_of_bounds_failed
    check_formula(r)
    v = judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.PASS and v.measured["wrong_elements"].value == 0


def test_wrong_count_printed_in_g_notation_is_corruption_with_memory_remediation():
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_wrong_g_notation.txt"))
    assert (r.rows[-1].wrong, r.rows[-1].in_wrong) == (1048580, 1048580) and r.rows[-1].unreadable == []
    assert r.out_of_bounds == 2097152 and r.out_of_bounds_failed and r.errors == []
    v = judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.FAIL and v.message.startswith("all_reduce_perf found corrupted data: 2097160 wrong "
                                                            "element(s) (2097160 at 268435456 B)")
    assert "Out of bounds values : 2097152 FAILED" in v.message
    assert v.measured["wrong_elements"].value == 2097160 and v.measured["out_of_bounds_values"].value == 2097152
    assert "ECC" in v.remediation and "reset the GPUs" in v.remediation and "RMA" in v.remediation
    assert "NCCL_DEBUG" not in v.remediation and "P2P" not in v.remediation  # not transport tuning


def test_out_of_bounds_failed_line_alone_is_corruption():
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_out_of_bounds_only.txt"))
    assert all(row.wrong == 0 for row in r.rows) and r.out_of_bounds == 8
    v = judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.FAIL and "'Out of bounds values : 8 FAILED'" in v.message
    assert v.remediation == nccl.nccltests.REMEDIATION_CORRUPTION
    # the word alone decides when the count cannot be read
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_healthy.txt").replace(": 0 OK", ": ?? FAILED"))
    assert r.out_of_bounds is None and r.out_of_bounds_failed
    assert judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8).status is Status.FAIL


def test_unreadable_wrong_count_is_an_error_never_zero():
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_wrong_unreadable.txt"))
    assert r.rows[-1].in_wrong is None and r.rows[-1].unreadable == ["#wrong (in-place) '-nan'"]
    v = judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.ERROR
    assert v.message == ("cannot tell whether all_reduce_perf's values were right: #wrong (in-place) '-nan' at "
                         "268435456 B (not a number)")
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_healthy.txt").replace(": 0 OK", ": zero OK"))
    assert r.out_of_bounds_unreadable
    assert judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8).status is Status.ERROR


def test_validation_off_warns_instead_of_passing():
    r = parse_nccl_tests(nccl_data("allreduce_h100x8_validation_off.txt"))
    assert all(row.unvalidated and row.wrong is None and not row.unreadable for row in r.rows)
    v = judge_nccl_tests(r, 0, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.WARN and "did not check the values (#wrong N/A" in v.message


def _variants(text, rng):
    lines = text.splitlines(keepends=True)
    out = ["".join(lines[:i]) for i in range(len(lines) + 1)]  # truncated at every line
    out += [text[:rng.randrange(len(text) + 1)] for _ in range(15)]  # and inside lines
    for _ in range(15):
        shuffled = lines[:]
        rng.shuffle(shuffled)
        out.append("".join(shuffled))
    for _ in range(15):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))).decode("latin-1")
        at = rng.randrange(len(text) + 1)
        out.append(text[:at] + noise + text[at:])
    for _ in range(15):  # a cell wrapped onto the next line
        at = rng.randrange(len(text) + 1)
        out.append(text[:at] + "\n" + text[at:])
    return out


def test_nccl_tests_parser_and_judge_never_raise_on_arbitrary_text():
    import random

    rng = random.Random(2024)
    texts = [OLD_2GPU, NEW_8GPU, NEW_8GPU_WRONG, OLDEST_ERROR_COLUMN, ABORTED]
    texts += [nccl_data(p.name) for p in sorted(NCCL_DATA.glob("*.txt"))]
    texts += [(SAMPLES / n).read_text() for n in ("nccl_allreduce_h100x8_nvlink_single_node.txt",
                                                   "nccl_allreduce_2x2080ti_pcie_nop2p.txt") if (SAMPLES / n).exists()]
    started = time.monotonic()
    for text in texts:
        for variant in _variants(text, rng):
            v = judge_nccl_tests(parse_nccl_tests(variant), rng.choice([0, 1, None]), Expectation(370.0, "t"), 0.8)
            assert isinstance(v, nccl.Verdict)
    assert time.monotonic() - started < 30


def test_an_unparsable_wrong_or_out_of_bounds_count_never_passes():
    """Any #wrong cell of the healthy sample, or its out-of-bounds count, replaced by something that is not a
    number: the verdict is never a pass (and never reads the cell as 0)."""
    import random

    rng = random.Random(7)
    healthy = nccl_data("allreduce_h100x8_healthy.txt")
    assert judge_nccl_tests(parse_nccl_tests(healthy), 0, Expectation(370.0, "t"), 0.8).status is Status.PASS
    junk = ["nan", "-nan", "inf", "1_0", "0x0", "O", "1.0.0", "e0", "0e", "\uff10", "?", "*****", "0,0", "++0"]
    lines = healthy.splitlines(keepends=True)
    rows = [i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")]
    for _ in range(150):
        i, side = rng.choice(rows), rng.choice([8, 12])  # the out-of-place / in-place #wrong cell
        cells = lines[i].split()
        cells[side] = rng.choice(junk) + rng.choice(["", "", "x", "#"])
        text = "".join(lines[:i]) + "  ".join(cells) + "\n" + "".join(lines[i + 1:])
        v = judge_nccl_tests(parse_nccl_tests(text), 0, Expectation(370.0, "t"), 0.8)
        assert v.status is not Status.PASS, cells[side]
    for bad in junk:
        v = judge_nccl_tests(parse_nccl_tests(healthy.replace(": 0 OK", f": {bad} OK")), 0, Expectation(370.0, "t"),
                             0.8)
        assert v.status is not Status.PASS, bad



# --- the shared real outputs (optional) ---------------------------------------------------------------


def shared(name):
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"shared samples not present ({path}): real nccl-tests outputs are only in the workspace")
    lines = path.read_text().splitlines(keepends=True)
    return "".join(lines[1:]) if lines[0].startswith("# SOURCE:") else "".join(lines)  # line 1 names the source


def test_real_h100_nvlink_output():
    r = parse_nccl_tests(shared("nccl_allreduce_h100x8_nvlink_single_node.txt"))
    assert (r.version, r.nccl_library, r.n_gpus, r.ranks) == ("2.17.8", "22902", 1, 8)
    assert len(r.rows) == 10 and r.rows[-1].size == 17179869184 and r.rows[-1].busbw == 482.27
    assert r.rows[0].type == "double" and r.avg_busbw == 437.957 and r.errors == []
    check_formula(r)
    v = judge_nccl_tests(r, 0, expected_busbw(r.devices[0][1], r.ranks, None), 0.8)
    assert v.status is Status.PASS and v.measured["busbw"].value == 482.27


def test_real_pcie_2080ti_output():
    r = parse_nccl_tests(shared("nccl_allreduce_2x2080ti_pcie_nop2p.txt"))
    assert len(r.rows) == 28 and r.ranks == 2 and r.rows[-1].busbw == 4.0 and r.avg_busbw == 2.05774
    check_formula(r)
    assert match_none(r)
    v = judge_nccl_tests(r, 0, Expectation(20.0, "node.perf.allreduce_busbw_gbps"), 0.8)
    assert v.status is Status.FAIL and "0.20x the expected 20 GB/s" in v.message


def match_none(report):
    return expected_busbw(report.devices[0][1], report.ranks, None).value is None


def test_real_cuda_init_failure_output():
    r = parse_nccl_tests(shared("nccl_allreduce_h100x8_cuda_init_error.txt"))
    assert r.rows == [] and r.ranks == 8
    assert r.errors[0] == "test: Test CUDA failure common.cu:941 'system not yet initialized'"
    v = judge_nccl_tests(r, 3, Expectation(370.0, "t"), 0.8)
    assert v.status is Status.FAIL and "'system not yet initialized'" in v.message
    assert "nvidia-fabricmanager" in v.remediation


# --- a real all-reduce: gloo on CPU runs the same orchestration as NCCL on GPUs ------------------------


@pytest.fixture
def gloo():
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")


def test_real_allreduce_over_gloo_sums_right_and_times(gloo):
    probe = probe_allreduce(3, MiB, backend="gloo", warmup=2, repeats=2, iters=3)
    assert probe.errors == [] and not probe.timed_out
    assert probe.wrong == 0 and probe.max_abs_error == 0.0 and probe.seconds > 0
    v = judge_allreduce(probe, None)
    assert v.status is Status.PASS and "across 3 gloo ranks" in v.message and v.measured["busbw"].value > 0


# A rank fault from outside the production code: the ranks' PYTHONPATH is this process's sys.path
# (checks.proc.child_env), so a sitecustomize.py on it runs first in every rank and picks its own by argv.
SITECUSTOMIZE = """\
import os, time
argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
fault = os.environ.get("PEFTNODE_TEST_RANK_FAULT", "")
if fault and b"rank_entry" in b" ".join(argv):
    rank, _, what = fault.partition(":")
    if argv[3] == rank.encode():
        if what == "hang":
            time.sleep(600)
        elif what == "exit":
            print("rank " + rank + ": injected exit")
            os._exit(3)
"""


@pytest.fixture
def rank_fault(tmp_path, monkeypatch):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.syspath_prepend(str(inject))

    def set_fault(spec):
        monkeypatch.setenv("PEFTNODE_TEST_RANK_FAULT", spec)

    return set_fault


def rank_processes():
    found = []
    for p in psutil.process_iter():
        try:
            if "checks.nccl.allreduce import rank_entry" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_a_hung_rank_and_its_waiting_peer_are_killed_at_the_deadline(gloo, rank_fault):
    rank_fault("1:hang")  # rank 1 never joins: rank 0 waits in the rendezvous
    started = time.monotonic()
    probe = probe_allreduce(2, MiB, backend="gloo", deadline_s=4.0, init_timeout_s=60)
    assert time.monotonic() - started < 4.0 + 10  # the deadline, then the kill
    assert probe.timed_out and probe.seconds is None and probe.leftover == []
    assert probe.errors == ["rank 0: no result (killed at the deadline, 4 s after the start)",
                            "rank 1: no result (killed at the deadline, 4 s after the start)"]
    v = judge_allreduce(probe, None)
    assert v.status is Status.FAIL and v.message.startswith("all-reduce of 1 MiB across 2 gloo ranks did not finish")
    assert rank_processes() == []


def test_a_rank_that_dies_ends_the_wait_of_its_peers_after_the_grace(gloo, rank_fault):
    rank_fault("1:exit")
    started = time.monotonic()
    probe = probe_allreduce(2, MiB, backend="gloo", deadline_s=120.0, init_timeout_s=60, grace_s=1.0)
    assert time.monotonic() - started < 60  # not the deadline, not the init timeout
    assert probe.errors == ["rank 0: no result (killed 1 s after rank 1 ended without a result)",
                            "rank 1: no result (exited with code 3): rank 1: injected exit"]
    assert probe.leftover == [] and rank_processes() == []
    assert judge_allreduce(probe, None).status is Status.FAIL


# --- the registered checks -------------------------------------------------------------------------


def specs(*names):
    import checks.nccl  # noqa: F401  (registers the checks)

    return [_REGISTRY[n] for n in names]


def node_ctx(stack, gpus, quick=True, **extra):
    return Context(stack.data, {**stack.expectations(), "gpus": gpus, **extra}, quick=quick)


def test_one_nccl_check_launched_from_the_shared_torch_worker_with_time_for_both_measurements():
    [spec] = specs("nccl.allreduce")
    assert spec.group == "nccl" and spec.worker == "torch" and not spec.isolate
    assert spec.target == "checks.nccl:nccl_allreduce" and spec.exclusive and spec.needs_gpus
    assert spec.timeout_s > 2 * nccl.DEADLINE_S
    assert "nccl.tests" not in _REGISTRY and "nccl-tests" in spec.title
    assert not hasattr(nccl, "load_torch_figure") and not hasattr(nccl, "FRESH_S")  # no side file any more


def test_allreduce_on_a_gpu_node_without_cuda_fails_with_the_reason(cu117, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-device path cannot be exercised here")
    monkeypatch.setenv("PATH", str(tmp_path))  # no all_reduce_perf: the no-CUDA verdict stands alone
    [r] = run_checks(specs("nccl.allreduce"), node_ctx(cu117, 8))
    assert r.name == "nccl.allreduce" and r.status is Status.FAIL
    assert r.message.startswith("no CUDA device visible to torch (") and "expected to have 8 GPU(s)" in r.message


@pytest.mark.parametrize("gpus, why", [(0, "expected to have no GPUs"), (1, "an all-reduce needs at least 2")])
def test_allreduce_skips_without_two_gpus_in_one_verdict(cu117, tmp_path, monkeypatch, gpus, why):
    fake_binary(tmp_path, "all_reduce_perf", NEW_8GPU)  # on PATH, and still not run
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    [r] = run_checks(specs("nccl.allreduce"), node_ctx(cu117, gpus))
    assert r.name == "nccl.allreduce" and r.status is Status.SKIP and why in r.message
    assert not (tmp_path / "all_reduce_perf.args").exists()


def fake_binary(directory, name, output, exit_code=0):
    """An executable ``name`` that records its arguments and prints ``output``: the real binary cannot exist here."""
    (directory / f"{name}.out").write_text(output)
    script = directory / name
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        open({str(directory / (name + '.args'))!r}, "w").write(" ".join(sys.argv[1:]))
        sys.stdout.write(open({str(directory / (name + '.out'))!r}).read())
        sys.exit({exit_code})
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory / f"{name}.args"


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees ``n`` CUDA devices and its probe returns ``probe(ranks, nbytes)``; records each probe call."""
    calls = []

    def install(n, probe):
        monkeypatch.setattr(nccl, "cuda_status", lambda: (True, n, None))

        def fake_probe(ranks, nbytes, **timing):
            calls.append((ranks, nbytes, timing))
            return probe(ranks, nbytes)

        monkeypatch.setattr(nccl, "probe_allreduce", fake_probe)
        return calls

    return install


def allreduce(stack, gpus, quick=True, **extra):
    """The registered check, called in this process (so the monkeypatches above apply)."""
    [spec] = specs("nccl.allreduce")
    return spec.load()(node_ctx(stack, gpus, quick=quick, **extra))


def on_path(monkeypatch, directory):
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")


H100 = "NVIDIA H100 80GB HBM3"


def test_allreduce_returns_torch_and_nccl_tests_with_this_calls_torch_figure(cu117, tmp_path, monkeypatch, fake_gpus):
    args = fake_binary(tmp_path, "all_reduce_perf", NEW_8GPU)
    on_path(monkeypatch, tmp_path)
    calls = fake_gpus(8, lambda ranks, nbytes: probe_at(401.0, ranks=ranks, nbytes=nbytes, device=H100))
    torch_v, tests_v = allreduce(cu117, 8, quick=True)
    assert calls == [(8, 256 * MiB, {"warmup": 3, "repeats": 3, "iters": 5})]
    assert args.read_text() == "-b 268435456 -e 268435456 -f 2 -g 8 -w 3 -n 10"  # same size, same ranks
    assert (torch_v.subject, tests_v.subject) == ("torch", "nccl-tests")
    assert torch_v.status is Status.PASS and torch_v.measured["busbw"].value == pytest.approx(401.0)
    assert tests_v.status is Status.PASS, tests_v.message
    assert tests_v.measured["busbw"].value == 420.0 and tests_v.expected["busbw"].value == 370  # H100 x 8, table
    assert tests_v.measured["torch_busbw"].value == pytest.approx(401.0)
    assert "(torch nccl.allreduce: 401 GB/s)" in tests_v.message
    assert tests_v.measured["command"].value == "all_reduce_perf -b 268435456 -e 268435456 -g 8"

    calls.clear()
    fake_gpus(8, lambda ranks, nbytes: probe_at(455.0, ranks=ranks, nbytes=nbytes, device=H100))
    torch_full, tests_full = allreduce(cu117, 8, quick=False)  # a second call: its own figure, not the first's
    assert calls == [(8, GiB, {"warmup": 5, "repeats": 5, "iters": 20})]
    assert args.read_text() == "-b 1073741824 -e 1073741824 -f 2 -g 8"
    assert torch_full.status is Status.PASS and tests_full.status is Status.PASS
    assert tests_full.measured["torch_busbw"].value == pytest.approx(455.0)


def test_a_failed_torch_measurement_leaves_nccl_tests_without_a_torch_figure(cu117, tmp_path, monkeypatch,
                                                                             fake_gpus):
    fake_binary(tmp_path, "all_reduce_perf", NEW_8GPU)
    on_path(monkeypatch, tmp_path)
    fake_gpus(8, lambda ranks, nbytes: AllreduceProbe(ranks, nbytes, device=H100, errors=["rank 3: NCCL error"]))
    torch_v, tests_v = allreduce(cu117, 8)
    assert torch_v.subject == "torch" and torch_v.status is Status.FAIL and "rank 3: NCCL error" in torch_v.message
    assert tests_v.subject == "nccl-tests" and tests_v.status is Status.PASS
    assert "torch_busbw" not in tests_v.measured and "torch nccl.allreduce" not in tests_v.message
    fake_gpus(8, lambda ranks, nbytes: probe_at(480.0, ranks=ranks, nbytes=nbytes, device=H100, wrong=4))
    torch_v, tests_v = allreduce(cu117, 8)
    assert torch_v.status is Status.FAIL and "torch_busbw" not in tests_v.measured  # wrong sums: no figure


def test_nccl_tests_skips_when_all_reduce_perf_is_not_on_path(cu117, tmp_path, monkeypatch, fake_gpus):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_gpus(8, lambda ranks, nbytes: probe_at(480.0, ranks=ranks, nbytes=nbytes))
    torch_v, tests_v = allreduce(cu117, 8)
    assert torch_v.subject == "torch" and torch_v.status is Status.PASS
    assert tests_v.subject == "nccl-tests" and tests_v.status is Status.SKIP
    assert tests_v.message == "all_reduce_perf (NVIDIA nccl-tests) is not on PATH; the torch figure stands alone"


def test_nccl_tests_reports_the_error_of_a_failing_all_reduce_perf(cu117, tmp_path, monkeypatch, fake_gpus):
    args = fake_binary(tmp_path, "all_reduce_perf", ABORTED, exit_code=3)
    on_path(monkeypatch, tmp_path)
    fake_gpus(4, lambda ranks, nbytes: probe_at(200.0, ranks=ranks, nbytes=nbytes, device=H100))
    torch_v, tests_v = allreduce(cu117, 4)
    assert " -g 4 " in args.read_text() and torch_v.status is Status.PASS
    assert tests_v.subject == "nccl-tests" and tests_v.status is Status.FAIL
    assert tests_v.message == ("all_reduce_perf failed: nodec: Test NCCL failure common.cu:1005 'unhandled system "
                               "error (run with NCCL_DEBUG=INFO for details) / '")
    assert tests_v.measured["exit_code"].value == 3
    assert tests_v.measured["torch_busbw"].value == pytest.approx(200.0)


def test_too_few_devices_is_one_verdict_even_with_all_reduce_perf(cu117, tmp_path, monkeypatch, fake_gpus):
    args = fake_binary(tmp_path, "all_reduce_perf", NEW_8GPU)
    on_path(monkeypatch, tmp_path)
    calls = fake_gpus(1, lambda ranks, nbytes: pytest.fail("the probe must not run with one device"))
    v = allreduce(cu117, 8)
    assert isinstance(v, nccl.Verdict) and v.subject is None and v.status is Status.FAIL
    assert v.message.startswith("only 1 CUDA device visible to torch") and calls == [] and not args.exists()


def test_without_cuda_all_reduce_perf_says_what_is_wrong(cu117, tmp_path, monkeypatch):
    args = fake_binary(tmp_path, "all_reduce_perf", ABORTED, exit_code=1)
    monkeypatch.setattr(nccl, "cuda_status", lambda: (False, 0, "torch 2.0 (CUDA 11.7): no NVIDIA driver"))
    monkeypatch.setattr(nccl, "probe_allreduce", lambda *a, **k: pytest.fail("no torch probe without CUDA"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    alone = allreduce(cu117, 8)
    assert isinstance(alone, nccl.Verdict) and alone.subject is None and alone.status is Status.FAIL
    assert "no NVIDIA driver" in alone.message
    on_path(monkeypatch, tmp_path)
    torch_v, tests_v = allreduce(cu117, 8)
    assert args.read_text() == "-b 268435456 -e 268435456 -f 2 -g 8 -w 3 -n 10"  # the node's expected GPUs
    assert torch_v.subject == "torch" and torch_v.status is Status.FAIL and "no NVIDIA driver" in torch_v.message
    assert tests_v.subject == "nccl-tests" and tests_v.status is Status.FAIL and "torch_busbw" not in tests_v.measured
    assert tests_v.message.startswith("all_reduce_perf failed: nodec: Test NCCL failure")


def test_all_reduce_perf_is_found_where_the_role_installs_it(cu117, tmp_path, monkeypatch):
    installed = tmp_path / "nccl-tests" / "bin"
    installed.mkdir(parents=True)
    args = fake_binary(installed, "all_reduce_perf", NEW_8GPU.replace("nGpus 8", "nGpus 2"))
    monkeypatch.setattr(nccl, "NCCL_TESTS_DIRS", (str(installed),))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(nccl, "cuda_status", lambda: (False, 0, "torch (CPU build): no NVIDIA driver"))
    assert nccl.find_all_reduce_perf() == str(installed / "all_reduce_perf")
    assert nccl.find_all_reduce_perf(dirs=()) is None
    torch_v, tests_v = allreduce(cu117, 2)
    assert args.read_text().endswith("-g 2 -w 3 -n 10") and torch_v.status is Status.FAIL
    assert tests_v.subject == "nccl-tests" and tests_v.status is Status.PASS, tests_v.message


def script(directory, name, body):
    path = directory / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_all_reduce_perf_that_hangs_is_killed_and_reported(tmp_path):
    binary = script(tmp_path, "all_reduce_perf", """\
        import sys, time
        print("# nThread 1 nGpus 2 minBytes 1024 maxBytes 1024", flush=True)
        time.sleep(120)
        """)
    started = time.monotonic()
    rc, text = nccl.run_all_reduce_perf(binary, 1024, 2, True, timeout_s=1.0)
    assert time.monotonic() - started < 10 and rc is None
    assert text.startswith("# nThread 1 nGpus 2")  # what it printed before the deadline is kept
    assert text.rstrip().endswith("Error: all_reduce_perf timed out after 1 s and was killed")
    v = judge_nccl_tests(parse_nccl_tests(text), rc, Expectation(None, "-"), 0.8)
    assert v.status is Status.FAIL and v.message == ("all_reduce_perf failed: Error: all_reduce_perf timed out "
                                                     "after 1 s and was killed")


def test_all_reduce_perf_that_crashes_after_its_rows_fails(tmp_path):
    binary = script(tmp_path, "all_reduce_perf", f"""\
        import os, signal, sys
        sys.stdout.write({NEW_8GPU!r})
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
        """)
    rc, text = nccl.run_all_reduce_perf(binary, 268435456, 8, False, timeout_s=30)
    report = parse_nccl_tests(text)
    assert rc is None and len(report.rows) == 2  # the whole output, not a tail
    assert report.errors == ["Error: all_reduce_perf crashed with SIGSEGV"]
    assert judge_nccl_tests(report, rc, Expectation(370.0, "t"), 0.8).status is Status.FAIL


def test_allreduce_through_a_worker_reports_both_subjects(cu117, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-device path cannot be exercised here")
    fake_binary(tmp_path, "all_reduce_perf", ABORTED, exit_code=1)
    on_path(monkeypatch, tmp_path)
    results = run_checks(specs("nccl.allreduce"), node_ctx(cu117, 8))
    assert [(r.name, r.status) for r in results] == [("nccl.allreduce[torch]", Status.FAIL),
                                                     ("nccl.allreduce[nccl-tests]", Status.FAIL)]
    assert results[0].message.startswith("no CUDA device visible to torch (")


# --- on a GPU node ---------------------------------------------------------------------------------


def _gpus(minimum):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"needs CUDA GPUs: torch {torch.__version__} sees none here")
    if torch.cuda.device_count() < minimum:
        pytest.skip(f"needs at least {minimum} GPUs for an all-reduce; this machine has {torch.cuda.device_count()}")
    return torch.cuda.device_count()


@pytest.mark.gpu
def test_real_nccl_allreduce_returns_correct_sums():
    n = _gpus(2)
    probe = probe_allreduce(n, 64 * MiB, warmup=2, repeats=2, iters=3)
    assert probe.errors == [] and probe.wrong == 0 and probe.max_abs_error == 0.0
    assert probe.seconds > 0 and judge_allreduce(probe, None).measured["busbw"].value > 0


@pytest.mark.gpu
def test_real_allreduce_check_judges_without_errors(cu117):
    n = _gpus(2)
    torch_r, tests_r = run_checks(specs("nccl.allreduce"), node_ctx(cu117, n))
    assert torch_r.name == "nccl.allreduce[torch]" and tests_r.name == "nccl.allreduce[nccl-tests]"
    assert torch_r.status in (Status.PASS, Status.FAIL) and "busbw" in torch_r.measured, torch_r.message
    if tests_r.status is not Status.SKIP:  # all_reduce_perf is installed here: the same call's torch figure
        assert tests_r.measured["torch_busbw"].value == pytest.approx(torch_r.measured["busbw"].value, abs=1e-3)
