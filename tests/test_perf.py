"""Per-GPU performance checks: arithmetic against hand-computed values, the model table, the judges on
healthy and faulty nodes, the probe code on CPU tensors, and the registered checks on this machine."""

import threading
import time
from dataclasses import replace
from itertools import pairwise

import pytest

from checks import perf
from checks.figures import (
    GPU_TABLE,
    copy_tbps,
    expected_figure,
    match_model,
    median,
    tflops,
    thresholds,
    transfer_gbps,
)
from checks.node import PerfExpect
from checks.perf import (
    BENCHES,
    FULL,
    QUICK,
    Device,
    GpuSample,
    PerfProbe,
    Settings,
    judge_gpus,
    judge_perf,
    probe_gpus,
)
from checks.registry import _REGISTRY, Context
from checks.result import Status
from checks.runner import run_checks
from checks.timing import cuda_status, judge_no_cuda, time_per_op

GiB = 1 << 30
MiB = 1 << 20

# --- arithmetic -------------------------------------------------------------------------------------


def test_tflops_is_2mnk_over_seconds():
    assert tflops(1000, 1000, 1000, 1.0) == pytest.approx(0.002)  # 2e9 FLOP in 1 s
    # 2 x 8192^3 = 1,099,511,627,776 FLOP in 1.4 ms = 785.37 TFLOP/s (an H200-class figure)
    assert tflops(8192, 8192, 8192, 1.4e-3) == pytest.approx(785.3654, rel=1e-6)
    # 2 x 4096 x 2048 x 1024 = 17,179,869,184 FLOP in 0.1 ms = 171.80 TFLOP/s (m, n, k not interchangeable-sized)
    assert tflops(4096, 2048, 1024, 1e-4) == pytest.approx(171.79869184)


def test_copy_bandwidth_counts_bytes_read_and_written():
    # 1 GiB copied in 0.5 ms: 2 x 1,073,741,824 B / 5e-4 s = 4.295 TB/s
    assert copy_tbps(GiB, 5e-4) == pytest.approx(4.294967296)
    assert copy_tbps(500_000_000, 1.0) == pytest.approx(0.001)


def test_transfer_bandwidth_is_one_way_bytes_over_seconds():
    # 256 MiB in 10 ms = 268,435,456 B / 0.01 s = 26.84 GB/s (a PCIe Gen4 x16 figure)
    assert transfer_gbps(256 * MiB, 0.01) == pytest.approx(26.8435456)


def test_median_and_thresholds():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1, 2, 3, 4]) == 2.5
    assert thresholds(None) == thresholds(PerfExpect()) == (0.8, 0.9)
    assert thresholds(PerfExpect(floor_ratio=0.7)) == (0.7, 0.9)
    assert thresholds(PerfExpect(outlier_ratio=0.95, floor_ratio=0.85)) == (0.85, 0.95)


def test_quick_settings_are_smaller_and_shorter_than_full():
    assert QUICK.copy_bytes < FULL.copy_bytes and QUICK.host_bytes < FULL.host_bytes
    assert QUICK.repeats * QUICK.iters < FULL.repeats * FULL.iters
    assert QUICK.warmup_s < FULL.warmup_s
    assert QUICK.gemm_n == FULL.gemm_n == 8192  # the size the table's GEMM figures were measured at
    assert min(QUICK.gemm_buffers, QUICK.copy_buffers, QUICK.host_buffers) >= 2  # inputs rotate
    # 8 GPUs x (GEMM 8192^3 at >= 255 TFLOP/s) x the timed quick ops stays under a second of GPU time
    assert 8 * (QUICK.repeats * QUICK.iters) * 2 * 8192**3 / 255e12 < 1.0


# --- the model table --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIE-40GB"),
    ("NVIDIA A800-SXM4-80GB", "A800"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H800", "H800"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("nvidia a100-sxm4-80gb", "A100"),  # case-insensitive
    ("NVIDIA RTX A1000", None),  # "A100" inside "A1000" is not an A100
    ("NVIDIA A10G", None),  # not an A10 figure
    ("NVIDIA L40", None),
    ("NVIDIA GH200 480GB", None),  # not an H200
    ("Tesla V100-SXM2-32GB", None),
    ("", None),
    (None, None),
])
def test_device_names_match_the_right_table_entry(name, key):
    assert match_model(name) == key


def test_every_table_entry_matches_its_own_name_and_holds_positive_figures():
    for key, figures in GPU_TABLE.items():
        assert match_model(f"NVIDIA {key}") == key
        for value in vars(figures).values():
            assert value is None or value > 0


def test_table_uses_the_figures_in_the_facts():
    assert GPU_TABLE["A100"].gemm_tflops == 255 and GPU_TABLE["A100"].copy_tbps == 1.6
    assert GPU_TABLE["A100"].h2d_gbps == 26 and GPU_TABLE["A100"].allreduce_busbw_gbps == 230
    assert GPU_TABLE["H100"].copy_tbps == 2.9 and GPU_TABLE["H100"].h2d_gbps == 51
    assert GPU_TABLE["H100"].allreduce_busbw_gbps == 370
    assert GPU_TABLE["H200"].gemm_tflops == 770 and GPU_TABLE["H200"].copy_tbps == 4.3
    assert GPU_TABLE["H200"].allreduce_busbw_gbps == 475


def test_expected_figure_prefers_node_perf_then_table_then_none():
    assert expected_figure("gemm_tflops", "NVIDIA H200", PerfExpect(gemm_tflops=700)).value == 700.0
    assert expected_figure("gemm_tflops", "NVIDIA H200", PerfExpect(gemm_tflops=700)).source == "node.perf.gemm_tflops"
    table = expected_figure("gemm_tflops", "NVIDIA H200", PerfExpect(copy_tbps=9.0))  # another figure set
    assert (table.value, table.source) == (770.0, "table: H200")
    unknown = expected_figure("gemm_tflops", "NVIDIA B200", None)
    assert unknown.value is None and "no table entry" in unknown.source
    missing = expected_figure("d2h_gbps", "NVIDIA A100-SXM4-80GB", None)
    assert missing.value is None and "no d2h_gbps figure for A100" in missing.source
    # an override applies to any model, known or not
    assert expected_figure("copy_tbps", "NVIDIA B200", PerfExpect(copy_tbps=7.0)).value == 7.0


# --- judges -----------------------------------------------------------------------------------------


def gemm_node(values, name="NVIDIA H200"):
    return [GpuSample(i, name, {"gemm_tflops": v}, detail={"dtype": "bfloat16"}) for i, v in enumerate(values)]


def test_healthy_node_passes_on_every_gpu_with_measured_expected_and_ratio():
    verdicts = judge_gpus(gemm_node([780, 790, 785, 775, 782, 788, 779, 781]), ["gemm_tflops"], None, 8)
    assert [v.subject for v in verdicts] == [f"gpu{i}" for i in range(8)]
    assert all(v.status is Status.PASS for v in verdicts)
    v = verdicts[0]
    assert v.measured["gemm_tflops"].value == 780 and v.measured["gemm_tflops"].unit == "TFLOP/s"
    assert v.measured["gemm_tflops_ratio"].value == pytest.approx(780 / 770, abs=1e-3)
    assert v.expected["gemm_tflops"].value == 770
    assert v.expected["gemm_tflops_floor"].value == pytest.approx(616)  # 770 x 0.8
    assert v.measured["device"].value == "NVIDIA H200" and v.measured["dtype"].value == "bfloat16"
    assert "table: H200" in v.message


def test_gpus_below_the_floor_fail_even_when_all_alike():
    verdicts = judge_gpus(gemm_node([600] * 8), ["gemm_tflops"], None, 8)
    assert all(v.status is Status.FAIL for v in verdicts)
    assert "is 0.78x the expected 770 TFLOP/s" in verdicts[0].message and "floor 0.8x" in verdicts[0].message
    assert "nvidia-smi -q -d PERFORMANCE" in verdicts[0].remediation


def test_one_slow_gpu_is_an_outlier_even_above_the_floor():
    values = [800] * 8
    values[3] = 700  # 0.91 of the table (floor met) but 0.875 of the node median 800
    verdicts = judge_gpus(gemm_node(values), ["gemm_tflops"], None, 8)
    assert [v.status for v in verdicts] == [Status.PASS] * 3 + [Status.FAIL] + [Status.PASS] * 4
    bad = verdicts[3]
    assert "0.88x the node median 800 TFLOP/s" in bad.message and "outlier below 0.9x" in bad.message
    assert bad.measured["gemm_tflops_vs_median"].value == pytest.approx(0.875)


def test_unknown_model_is_judged_against_the_node_median_only():
    samples = gemm_node([100, 101, 99, 80], name="NVIDIA Future X1")
    verdicts = judge_gpus(samples, ["gemm_tflops"], None, 4)
    assert [v.status for v in verdicts] == [Status.PASS, Status.PASS, Status.PASS, Status.FAIL]
    assert "judged against the node median only" in verdicts[0].message
    assert "gemm_tflops" not in verdicts[0].expected


def test_single_gpu_of_unknown_model_has_nothing_to_fail_against():
    [v] = judge_gpus(gemm_node([5.0], name="NVIDIA Future X1"), ["gemm_tflops"], None, 1)
    assert v.status is Status.PASS and "gemm_tflops_vs_median" not in v.measured


def test_node_perf_overrides_table_and_ratios():
    samples = gemm_node([790] * 8)
    assert all(v.status is Status.FAIL for v in judge_gpus(samples, ["gemm_tflops"], PerfExpect(gemm_tflops=1000), 8))
    relaxed = PerfExpect(gemm_tflops=1000, floor_ratio=0.7)
    assert all(v.status is Status.PASS for v in judge_gpus(samples, ["gemm_tflops"], relaxed, 8))
    values = [800] * 8
    values[3] = 700
    lenient = judge_gpus(gemm_node(values), ["gemm_tflops"], PerfExpect(outlier_ratio=0.8), 8)
    assert all(v.status is Status.PASS for v in lenient)
    assert lenient[3].expected["gemm_tflops_min_vs_median"].value == 0.8


def test_mixed_models_are_compared_with_their_own_kind():
    samples = gemm_node([250, 252, 249, 251], "NVIDIA A100-SXM4-80GB") + [
        GpuSample(i, "NVIDIA H100 80GB HBM3", {"gemm_tflops": 780}) for i in range(4, 8)]
    assert all(v.status is Status.PASS for v in judge_gpus(samples, ["gemm_tflops"], None, 8))


def test_a_gpu_whose_probe_failed_fails_and_the_others_are_still_judged():
    samples = gemm_node([780] * 4)
    samples[2] = GpuSample(2, "NVIDIA H200", error="OutOfMemoryError: CUDA out of memory.")
    verdicts = judge_gpus(samples, ["gemm_tflops"], None, 4)
    assert [v.status for v in verdicts] == [Status.PASS, Status.PASS, Status.FAIL, Status.PASS]
    assert "dense GEMM probe failed: OutOfMemoryError" in verdicts[2].message


def test_pcie_judges_both_directions_in_one_verdict_per_gpu():
    samples = [GpuSample(i, "NVIDIA A100-SXM4-80GB", {"h2d_gbps": 25.0, "d2h_gbps": 24.0}) for i in range(4)]
    samples[1].values["d2h_gbps"] = 12.0  # no table figure for D2H: the median catches it
    verdicts = judge_gpus(samples, ["h2d_gbps", "d2h_gbps"], None, 4)
    assert [v.status for v in verdicts] == [Status.PASS, Status.FAIL, Status.PASS, Status.PASS]
    assert "device-to-host (pinned) 12 GB/s is 0.50x the node median" in verdicts[1].message
    assert "nvidia-smi -q -d PCI" in verdicts[1].remediation
    assert verdicts[0].expected["h2d_gbps"].value == 26 and "d2h_gbps" not in verdicts[0].expected
    # a link trained at Gen3 on every GPU: H2D under the floor everywhere
    gen3 = [GpuSample(i, "NVIDIA A100-SXM4-80GB", {"h2d_gbps": 12.5, "d2h_gbps": 12.5}) for i in range(4)]
    assert all(v.status is Status.FAIL for v in judge_gpus(gen3, ["h2d_gbps", "d2h_gbps"], None, 4))


def test_fewer_gpus_than_expected_adds_a_warning():
    verdicts = judge_gpus(gemm_node([780] * 7), ["gemm_tflops"], None, 8)
    assert verdicts[-1].subject == "node" and verdicts[-1].status is Status.WARN
    assert "torch sees 7 of the 8 expected GPUs" in verdicts[-1].message


def test_no_cuda_fails_on_a_gpu_node():
    v = judge_no_cuda("torch 2.13.0+cpu is a CPU-only build", 8, "the GEMM benchmark")
    assert v.status is Status.FAIL
    assert v.message.startswith("no CUDA device visible to torch (torch 2.13.0+cpu is a CPU-only build)")
    assert "8 GPU(s)" in v.message and "gpu.driver" in v.remediation
    [again] = judge_perf(PerfProbe(False, "no driver"), ["gemm_tflops"], None, 8, "the GEMM benchmark")
    assert again.status is Status.FAIL and "(no driver)" in again.message


# --- the probe code, on CPU tensors (the timed paths are the same, CUDA events aside) ---------------------


TINY = Settings(gemm_n=64, gemm_buffers=2, copy_bytes=64 * 1024, copy_buffers=3, host_bytes=64 * 1024,
                host_buffers=2, warmup_ops=2, warmup_s=0.0, repeats=3, iters=4)


def test_time_per_op_warms_up_then_times_rotating_ops():
    torch = pytest.importorskip("torch")
    seen = []
    seconds = time_per_op(seen.append, torch.device("cpu"), warmup_ops=2, warmup_s=0.0, repeats=3, iters=4)
    assert seen == list(range(2 + 3 * 4))  # op numbers run in order: buffers are picked by i % n
    assert seconds >= 0


def test_measurements_on_cpu_tensors_give_positive_figures():
    torch = pytest.importorskip("torch")
    cpu = torch.device("cpu")
    gemm, detail = perf.measure_gemm(cpu, TINY)
    assert gemm["gemm_tflops"] > 0 and detail == {"dtype": "bfloat16", "gemm_size": 64}
    copy, detail = perf.measure_copy(cpu, TINY)
    assert copy["copy_tbps"] > 0 and detail == {"copy_bytes": 64 * 1024}
    host, detail = perf.measure_host(cpu, TINY)  # pageable on the CPU: nothing to pin for
    assert host["h2d_gbps"] > 0 and host["d2h_gbps"] > 0 and detail == {"transfer_bytes": 64 * 1024}


def test_cuda_status_explains_why_there_is_no_device():
    torch = pytest.importorskip("torch")
    usable, count, reason = cuda_status()
    if torch.cuda.is_available():
        assert usable and count >= 1 and reason is None
    else:
        assert not usable and count == 0 and reason
        if torch.version.cuda is None:
            assert "CPU-only build" in reason


# --- all GPUs at once, then one at a time: proven with CPU stand-in devices whose op sleeps ----------------

OP_S = 0.25  # one stand-in "benchmark" on one device: 5 ops of 50 ms through the real timing path
STAND_IN = Settings(gemm_n=64, gemm_buffers=2, copy_bytes=1024, copy_buffers=3, host_bytes=1024, host_buffers=2,
                    warmup_ops=1, warmup_s=0.0, repeats=2, iters=2)


def cpu_devices(n):
    torch = pytest.importorskip("torch")
    return [Device(i, "CPU stand-in", torch.device("cpu")) for i in range(n)]


def sleeping(intervals, fail_on=None):
    """A benchmark body that sleeps (sleep releases the GIL, as waiting on a GPU does) and records when it ran."""

    def measure(device, s):
        start = time.monotonic()
        seconds = time_per_op(lambda i: time.sleep(OP_S / 5), device, warmup_ops=s.warmup_ops, warmup_s=s.warmup_s,
                              repeats=s.repeats, iters=s.iters)
        intervals.append((start, time.monotonic(), threading.current_thread().name))
        if fail_on is not None and len(intervals) == fail_on:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")
        return {m: 1.0 / seconds for m in ("gemm_tflops", "copy_tbps", "h2d_gbps", "d2h_gbps")}, {}

    return measure


def test_gemm_and_copy_are_concurrent_and_host_transfers_serial():
    assert BENCHES["gemm"].concurrent and BENCHES["memory"].concurrent
    assert not BENCHES["pcie"].concurrent  # GPUs share the host's memory bandwidth and PCIe switches


@pytest.mark.parametrize("bench", ["gemm", "memory"])
def test_concurrent_phase_measures_every_device_at_once(bench):
    n, intervals = 4, []
    started = time.monotonic()
    probe = probe_gpus(replace(BENCHES[bench], measure=sleeping(intervals)), True, devices=cpu_devices(n),
                       settings=STAND_IN)
    wall = time.monotonic() - started
    assert probe.available and [s.index for s in probe.samples] == list(range(n))
    assert all(s.error is None and s.values for s in probe.samples)
    assert len(intervals) == n and len({name for _, _, name in intervals}) == n  # one thread per device
    assert max(start for start, _, _ in intervals) < min(end for _, end, _ in intervals)  # all ran together
    assert wall < (n - 1) * OP_S, f"{n} devices took {wall:.2f} s, one takes {OP_S} s"  # ~1 op time, not n


def test_serial_phase_measures_one_device_after_another():
    n, intervals = 4, []
    started = time.monotonic()
    probe = probe_gpus(replace(BENCHES["pcie"], measure=sleeping(intervals)), True, devices=cpu_devices(n),
                       settings=STAND_IN)
    wall = time.monotonic() - started
    assert [s.index for s in probe.samples] == list(range(n)) and all(s.error is None for s in probe.samples)
    for (_, end, _), (start, _, _) in pairwise(intervals):
        assert start >= end  # never two devices at once
    assert wall >= n * OP_S * 0.95


def test_a_device_that_fails_in_the_concurrent_phase_fails_alone():
    intervals = []
    probe = probe_gpus(replace(BENCHES["gemm"], measure=sleeping(intervals, fail_on=1)), True,
                       devices=cpu_devices(3), settings=STAND_IN)
    errors = [s.error for s in probe.samples]
    assert sum(e is not None for e in errors) == 1
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in errors
    assert sum(bool(s.values) for s in probe.samples) == 2
    [bad] = [v for v in judge_gpus(probe.samples, ["gemm_tflops"], None, 3) if v.status is Status.FAIL]
    assert "dense GEMM probe failed: RuntimeError: CUDA error" in bad.message


@pytest.mark.parametrize("bench", ["gemm", "memory", "pcie"])
def test_real_benchmarks_on_cpu_stand_in_devices(bench):
    probe = probe_gpus(bench, True, devices=cpu_devices(2), settings=TINY)
    assert [s.index for s in probe.samples] == [0, 1]
    for sample in probe.samples:
        assert sample.error is None, sample.error
        assert set(sample.values) == set(BENCHES[bench].metrics) and all(v > 0 for v in sample.values.values())
    verdicts = judge_perf(probe, list(BENCHES[bench].metrics), None, 2, BENCHES[bench].what)
    assert [v.subject for v in verdicts] == ["gpu0", "gpu1"]  # judged (median only: no table entry for a CPU)
    assert all("no table entry for 'CPU stand-in'" in v.message for v in verdicts if v.status is Status.PASS)


# --- the registered checks, run as `invoke verify` runs them ----------------------------------------------

PERF_CHECKS = ["perf.gemm", "perf.memory", "perf.pcie"]


def perf_specs():
    import checks.perf  # noqa: F401  (registers the checks)

    return [_REGISTRY[name] for name in PERF_CHECKS]


def test_perf_checks_run_in_the_shared_torch_worker_one_benchmark_at_a_time():
    for spec in perf_specs():
        assert spec.group == "perf" and spec.worker == "torch" and not spec.isolate
        assert spec.exclusive and spec.needs_gpus and spec.needs == ("gpu.driver", "cuda.torch")
        assert not spec.slow and spec.timeout_s


def test_registered_checks_on_a_gpu_node_without_cuda_fail_with_the_reason(cu117):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-device path cannot be exercised here")
    ctx = Context(cu117.data, {**cu117.expectations(), "gpus": 8}, quick=True)
    results = run_checks(perf_specs(), ctx)
    assert [r.name for r in results] == PERF_CHECKS
    for r in results:
        assert r.status is Status.FAIL, r.message
        assert r.message.startswith("no CUDA device visible to torch (")
        assert "expected to have 8 GPU(s)" in r.message and r.remediation


def test_registered_checks_on_a_node_without_gpus_skip(cu117):
    ctx = Context(cu117.data, {**cu117.expectations(), "gpus": 0}, quick=True)
    results = run_checks(perf_specs(), ctx)
    assert [r.status for r in results] == [Status.SKIP] * 3
    assert all("expected to have no GPUs" in r.message for r in results)


# --- on a GPU node ---------------------------------------------------------------------------------


def _need_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU: torch {torch.__version__} sees none here")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("bench, metrics", [("gemm", ["gemm_tflops"]), ("memory", ["copy_tbps"]),
                                            ("pcie", ["h2d_gbps", "d2h_gbps"])])
def test_real_benchmarks_give_positive_figures_on_every_gpu(bench, metrics):
    torch = _need_cuda()
    probe = perf.probe_gpus(bench, quick=True)
    assert probe.available and len(probe.samples) == torch.cuda.device_count()
    for sample in probe.samples:
        assert sample.error is None, sample.error
        for metric in metrics:
            assert sample.values[metric] > 0


@pytest.mark.gpu
def test_real_checks_judge_without_errors(cu117):
    torch = _need_cuda()
    ctx = Context(cu117.data, {**cu117.expectations(), "gpus": torch.cuda.device_count()}, quick=True)
    results = run_checks(perf_specs(), ctx)
    assert {r.status for r in results} <= {Status.PASS, Status.FAIL, Status.WARN}, [r.message for r in results]
    assert all(r.measured for r in results)


def test_torch_gpu_id_spells_uuid_and_pci_bus_id_as_nvml_does(monkeypatch):
    """A perf figure joins with the NVML checks and dcgm-exporter only if torch's ids are written NVML's way;
    a torch without them (or no device at all) still gives the index."""
    import types
    import uuid as uuidlib

    import torch

    from checks.perf import torch_gpu_id

    raw = uuidlib.UUID("6f6e9b3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    props = types.SimpleNamespace(uuid=raw, pci_bus_id=0x3B, pci_device_id=0, pci_domain_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    got = torch_gpu_id(2)
    assert (got.index, got.uuid, got.pci_bus_id) == (2, f"GPU-{raw}", "00000000:3B:00.0")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name="old torch"))
    assert (torch_gpu_id(1).uuid, torch_gpu_id(1).pci_bus_id) == (None, None)

    def no_device(i):
        raise RuntimeError("no CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device)
    assert torch_gpu_id(0).index == 0 and torch_gpu_id(0).uuid is None


def test_each_gpu_verdict_carries_its_hardware_id():
    from checks.perf import GpuSample, judge_gpus
    from checks.result import GpuId

    ids = [GpuId(i, f"GPU-{i}", f"00000000:{0x18 + i:02X}:00.0") for i in range(3)]
    samples = [GpuSample(i, "NVIDIA H100 80GB HBM3", {"gemm_tflops": 700.0}, gpu=ids[i]) for i in range(2)]
    samples.append(GpuSample(2, "NVIDIA H100 80GB HBM3", error="CUDA error: an illegal memory access"))
    verdicts = judge_gpus(samples, ["gemm_tflops"], None)
    assert [v.gpu for v in verdicts] == [ids[0], ids[1], GpuId(2)]
