"""The Prometheus textfile output, through its real consumers: files written by real runs of the CLI,
read by a real node_exporter (textfile collector) and scraped over HTTP, linted by promtool; the
Grafana dashboard's queries checked against those files. Plus the unit conversions, labels, StateSet,
escaping and the atomic, world-readable write."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import checks
from checks.cli import FINETUNE_PROG, PROG
from checks.finetune.verdict import MethodRun
from checks.gpu import health
from checks.nccl.allreduce import AllreduceProbe, judge_allreduce
from checks.perf import METRICS, GpuSample, judge_gpus
from checks.registry import Context
from checks.report import Report
from checks.report.prom import (
    FINETUNE_TITLE,
    QUANTITIES,
    STATES,
    UNITS,
    check_prom_target,
    families_in,
    quantity_of,
    render_prom,
    write_prom,
)
from checks.result import GpuId, Result, Status, Value
from tests.helpers.fake_nvml import FakeNVML, healthy_node
from tests.helpers.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "peftnode.json"
NODE_EXPORTER = "prometheus-node-exporter"
STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
H100 = "NVIDIA H100 80GB HBM3"
FAMILY = re.compile(r"peftnode_[a-z0-9_]+")


# --------------------------------------------------------------------------- helpers


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every series of an exposition, by (name, sorted labels); fails on a duplicate series, a family
    that is not a gauge or one without HELP."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        assert family.documentation, family.name
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def _series(samples, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _get(samples, name: str, **labels) -> float:
    full = {"gpu": "", "UUID": "", "pci_bus_id": "", **labels} if "check" in labels else labels
    return samples[(name, tuple(sorted(full.items())))]


def _report(results: list[Result], title: str = PROG) -> Report:
    return Report(results=results, host={"hostname": "gpu-node-01"},
                  stack={"name": "cu124", "source": "stacks/cu124.yml", "description": "CUDA 12.4"},
                  started_at=STARTED, finished_at=STARTED + timedelta(seconds=3.25), title=title)


def _results() -> list[Result]:
    return [
        Result("gpu.count", "gpu", Status.PASS, "8 GPUs", measured={"gpus": Value(8)}, duration_s=0.12),
        Result("gpu.memory", "gpu", Status.PASS, "80 GiB", duration_s=0.01,
               measured={"memory": Value(79.5, "GiB"), "mig": Value(False), "model": Value("H100")}),
        Result("cuda.driver", "cuda", Status.WARN, "old driver", measured={"version": Value("535.54")}, duration_s=0.2),
        Result("python.torch", "python", Status.ERROR, "probe crashed", duration_s=1.5),
        Result("net.nccl", "net", Status.SKIP, "single node", measured={"bandwidth": Value(float("nan"), "GB/s")}),
        Result("storage.scratch", "storage", Status.FAIL, "too slow", duration_s=2.0,
               measured={"write": Value(180.25, "MB/s"), "free": Value(512, "GiB")}),
    ]


def _gpu_results(monkeypatch, cu117) -> list[Result]:
    """Per-GPU results as the real judges make them: the NVML health checks on a fake NVML (an 8-GPU
    H100 node, GPU 3 with uncorrectable ECC errors and running hot), perf.* on measured figures (GPU 5
    slow), the nccl.allreduce judge, a fine-tune method, and keys only the fallback names."""
    gpus = healthy_node(8)
    gpus[3].update(ecc_uncorrected=2, temperature=86)
    fake = FakeNVML(gpus)
    monkeypatch.setattr(health, "load_nvml", lambda: fake)
    ctx = Context(cu117.data, {**cu117.expectations(), "gpus": 8, "gpu_model": "H100"})
    results: list[Result] = []
    for name, fn in [("gpu.inventory", health.gpu_inventory), ("gpu.ecc", health.gpu_ecc),
                     ("gpu.memory_errors", health.gpu_memory_errors), ("gpu.throttle", health.gpu_throttle),
                     ("gpu.pcie", health.gpu_pcie), ("gpu.settings", health.gpu_settings),
                     ("gpu.nvlink", health.gpu_nvlink), ("gpu.processes", health.gpu_processes)]:
        verdicts = fn(ctx)
        for v in verdicts if isinstance(verdicts, list) else [verdicts]:
            results.append(Result.from_verdict(name, "gpu", v, 0.05))
    ids = [GpuId(i, g["uuid"], g["bus_id"], g["serial"]) for i, g in enumerate(gpus)]
    figures = {"gemm": {"gemm_tflops": 700.0}, "memory": {"copy_tbps": 2.9},
               "pcie": {"h2d_gbps": 52.0, "d2h_gbps": 50.5}}
    for bench, values in figures.items():
        detail = {"dtype": "bfloat16", "gemm_size": 8192} if bench == "gemm" else {}
        samples = [GpuSample(i, H100, {k: v * (0.6 if i == 5 else 1.0) for k, v in values.items()},
                             detail=dict(detail), gpu=ids[i]) for i in range(8)]
        for v in judge_gpus(samples, list(values), None):
            results.append(Result.from_verdict(f"perf.{bench}", "perf", v, 1.0))
    probe = AllreduceProbe(ranks=8, nbytes=256 * 2**20, device=H100, seconds=0.0015)
    results.append(Result.from_verdict("nccl.allreduce", "nccl", judge_allreduce(probe, None), 4.0))
    run = MethodRun("lora", Status.PASS, "loss went down", metrics={
        "loss_before": 6.5, "loss_after": 4.7, "trainable_params": 8192, "steps_per_s": 31.8,
        "tokens_per_s": 5255.2, "wall_s": 0.36, "peak_memory_bytes": 417_228_800})
    results.append(Result.from_verdict("finetune.methods", "finetune", run.verdict(), 12.0))
    results.append(Result("cuda.odd", "cuda", Status.PASS, "odd keys", measured={
        "wall_s": Value(1.5, "s"), "steps_per_s": Value(3, "steps/s"), "x_count": Value(3),
        "size_kilobytes": Value(4), "rate": Value(2, "errors/s"), "odd-key!": Value(7, "ms"),
        "counter": Value(1, "B"), "gauge_total": Value(5)}))
    return results


def _promtool_check(text: str) -> subprocess.CompletedProcess:
    promtool = require_tool("promtool", "the Debian `prometheus` package lints the exposition")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(textfile_dir: Path, tmp_path: Path) -> str:
    """Start a real node_exporter with only the textfile collector on ``textfile_dir``; its /metrics."""
    binary = require_tool(NODE_EXPORTER, "the Debian `prometheus-node-exporter` package reads the textfile directory")
    port = _free_port()
    log = (tmp_path / "node_exporter.log").open("w")
    proc = subprocess.Popen([binary, "--collector.disable-defaults", "--collector.textfile",
                             f"--collector.textfile.directory={textfile_dir}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                    return reply.read().decode()
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise AssertionError(f"node_exporter did not serve /metrics (exit {proc.poll()}): "
                                         f"{(tmp_path / 'node_exporter.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def verify_run(tmp_path_factory) -> tuple[Path, dict]:
    """``peftnode-verify --quick --gpus 64`` for real: unhealthy on any node (no node has 64 GPUs; this
    one has none). The Prometheus file and the JSON report of the same run."""
    out = tmp_path_factory.mktemp("verify")
    prom, js = out / "peftnode.prom", out / "verify.json"
    ran = subprocess.run([sys.executable, "-m", "checks.cli", "--quick", "--gpus", "64", "--no-progress",
                          "--prom", str(prom), "--json", str(js)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 1, ran.stdout[-3000:] + ran.stderr[-3000:]
    return prom, json.loads(js.read_text())


FINETUNE_CODE = "import sys; from checks.cli import finetune_main; sys.exit(finetune_main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> tuple[Path, dict]:
    """``invoke finetune``'s CLI for real: the tiny model, LoRA, 3 steps (~15-30 s on CPU)."""
    out = tmp_path_factory.mktemp("finetune")
    prom, js = out / "peftnode-finetune.prom", out / "finetune.json"
    ran = subprocess.run([sys.executable, "-c", FINETUNE_CODE, "--model", "tiny", "--methods", "lora", "--steps",
                          "3", "--no-progress", "--prom", str(prom), "--json", str(js)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    return prom, json.loads(js.read_text())


@pytest.fixture
def gpu_report_files(monkeypatch, cu117, tmp_path) -> tuple[Path, Path]:
    """The per-GPU report written as verify's file and as finetune's."""
    results = _gpu_results(monkeypatch, cu117)
    return (write_prom(_report(results), tmp_path / "gpu-verify.prom"),
            write_prom(_report(results, FINETUNE_TITLE), tmp_path / "gpu-finetune.prom"))


@pytest.mark.slow
def test_node_exporter_scrape_of_both_files_is_the_unhealthy_state(verify_run, finetune_run, tmp_path):
    verify_prom, verify_doc = verify_run
    finetune_prom, finetune_doc = finetune_run
    directory = tmp_path / "textfile"
    directory.mkdir()
    for src in (verify_prom, finetune_prom):
        (directory / src.name).write_bytes(src.read_bytes())

    scraped = {}
    for family in text_string_to_metric_families(_scrape(directory, tmp_path)):
        for sample in family.samples:
            scraped[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    assert scraped[("node_textfile_scrape_error", ())] == 0
    assert verify_doc["exit_code"] == 1 and finetune_doc["exit_code"] == 0
    assert scraped[("peftnode_node_healthy", ())] == 0  # the unhealthy node reads unhealthy
    assert scraped[("peftnode_finetune_node_healthy", ())] == 1
    mtimes = {dict(labels)["file"] for (name, labels) in scraped if name == "node_textfile_mtime_seconds"}
    assert mtimes == {str(directory / "peftnode.prom"), str(directory / "peftnode-finetune.prom")}
    # every series of both files arrives unchanged: node_exporter dropped nothing
    for src in (verify_prom, finetune_prom):
        for key, value in _samples(src.read_text()).items():
            assert key in scraped, key
            assert scraped[key] == value or (value != value and scraped[key] != scraped[key]), key
    # and the scrape says which checks failed, as the JSON report of the same run does
    failed = {r["name"] for r in verify_doc["results"] if r["status"] == "fail"}
    assert failed
    scraped_failed = {dict(labels)["check"] for (name, labels), v in scraped.items()
                      if name == "peftnode_check_status" and dict(labels)["state"] == "fail" and v == 1}
    assert scraped_failed == failed


@pytest.mark.slow
def test_verify_and_finetune_files_share_no_family(verify_run, finetune_run):
    verify_families = families_in(verify_run[0].read_text())
    finetune_families = families_in(finetune_run[0].read_text())
    assert "peftnode_node_healthy" in verify_families and "peftnode_finetune_node_healthy" in finetune_families
    assert verify_families.isdisjoint(finetune_families)
    assert all(f.startswith("peftnode_finetune_") for f in finetune_families)
    assert not any(f.startswith("peftnode_finetune_") for f in verify_families)
    # the finetune run's quantities are there under its own names
    assert {"peftnode_finetune_train_tokens_per_second", "peftnode_finetune_train_peak_memory_bytes",
            "peftnode_finetune_train_wall_time_seconds"} <= finetune_families


@pytest.mark.slow
def test_check_prom_target_on_real_files(verify_run, finetune_run):
    verify_prom, finetune_prom = verify_run[0], finetune_run[0]
    check_prom_target(verify_prom, PROG)  # the command's own file: rewritten every run
    check_prom_target(finetune_prom, FINETUNE_PROG)
    with pytest.raises(ValueError) as caught:
        check_prom_target(verify_prom, FINETUNE_PROG)
    message = str(caught.value)
    assert "\n" not in message and str(verify_prom) in message and "invoke verify" in message
    assert "peftnode-finetune.prom" in message
    with pytest.raises(ValueError, match="invoke finetune"):
        check_prom_target(finetune_prom, PROG)


def test_promtool_is_clean_on_a_real_runs_file(verify_run):
    prom, doc = verify_run
    checked = _promtool_check(prom.read_text())
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr
    samples = _samples(prom.read_text())
    assert samples[("peftnode_node_healthy", ())] == 0
    # the real run's measured numbers are there in base units: system.disk's free GiB in bytes
    disk = next(r for r in doc["results"] if r["name"].startswith("system.disk"))
    free = disk["measured"]["free"]
    assert free["unit"] == "GiB"
    assert _get(samples, "peftnode_disk_free_bytes", check=disk["name"]) == pytest.approx(free["value"] * 2**30)


def test_promtool_is_clean_on_per_gpu_results(gpu_report_files):
    for path in gpu_report_files:
        text = path.read_text()
        checked = _promtool_check(text)
        said = checked.stdout + checked.stderr
        assert checked.returncode == 0 and not said.strip(), (path.name, said)


def test_promtool_catches_what_the_fallback_avoids():
    """The lint the tests rely on is live: a name with an abbreviated unit or a gauge ending in _total fails."""
    bad = "# HELP x_wall_s w\n# TYPE x_wall_s gauge\nx_wall_s 1\n# HELP y_total t\n# TYPE y_total gauge\ny_total 1\n"
    checked = _promtool_check(bad)
    said = checked.stdout + checked.stderr
    assert checked.returncode != 0 and "x_wall_s" in said and "y_total" in said


# --------------------------------------------------------------------------- names, units, labels


def test_gemm_tflops_becomes_flops_with_the_gpus_labels():
    gid = GpuId(2, "GPU-2222", "00000000:3B:00.0", "1650")
    (verdict,) = judge_gpus([GpuSample(2, H100, {"gemm_tflops": 312.0}, gpu=gid)], ["gemm_tflops"], None)
    result = Result.from_verdict("perf.gemm", "perf", verdict, 1.0)
    samples = _samples(render_prom(_report([result])))
    series = _series(samples, "peftnode_gpu_gemm_flops")
    assert series == {(("UUID", "GPU-2222"), ("check", "perf.gemm[gpu2]"), ("gpu", "2"),
                       ("pci_bus_id", "00000000:3B:00.0")): pytest.approx(3.12e14)}


@pytest.mark.parametrize(("unit", "value", "suffix", "base"), [
    ("TFLOP/s", 312, "flops", 3.12e14), ("GB/s", 180.5, "bytes_per_second", 1.805e11),
    ("TB/s", 2.9, "bytes_per_second", 2.9e12), ("MB/s", 180.25, "bytes_per_second", 1.8025e8),
    ("MiB", 397.8, "bytes", 397.8 * 2**20), ("GiB", 78.11, "bytes", 78.11 * 2**30),
    ("B", 268435456, "bytes", 268435456),
    ("s", 12.4, "seconds", 12.4), ("us", 1500.0, "seconds", 1.5e-3), ("ms", 250, "seconds", 0.25),
    ("C", 86, "celsius", 86), ("W", 700, "watts", 700), ("lanes", 16, "lanes", 16),
    ("steps/s", 31.8, "steps_per_second", 31.8), ("tokens/s", 5255.2, "tokens_per_second", 5255.2),
    (None, 8, "", 8), ("errors", 3, "errors", 3), ("req/s", 2, "req_per_second", 2),
])
def test_units_convert_to_base_units_in_the_name(unit, value, suffix, base):
    result = Result("x.probe", "x", Status.PASS, "ok", measured={"level": Value(value, unit)})
    samples = _samples(render_prom(_report([result])))
    name = "peftnode_x_level" + (f"_{suffix}" if suffix else "")
    assert _get(samples, name, check="x.probe") == pytest.approx(base)


def test_every_unit_a_check_reports_is_in_the_table():
    """A new unit in a check without a conversion here would be exported under a made-up name."""
    used = set()
    for path in (ROOT / "checks").rglob("*.py"):
        used |= set(re.findall(r"Value\([^()]*?,\s*\"([^\"]+)\"\)", path.read_text()))
    used |= {m.unit for m in METRICS.values()}
    assert used, "the scan found no units: the pattern no longer matches the checks' code"
    assert used <= set(UNITS), sorted(used - set(UNITS))


def test_every_perf_metric_has_a_curated_name():
    for key in METRICS:
        for tail in ("", "_ratio", "_vs_median"):
            assert ("perf", key + tail) in QUANTITIES, key + tail


def test_curated_names_on_the_per_gpu_report(gpu_report_files):
    verify = _samples(gpu_report_files[0].read_text())
    gpu3 = {"gpu": "3", "UUID": "GPU-00000003-0000-0000-0000-000000000000", "pci_bus_id": "00000000:48:00.0"}
    assert _get(verify, "peftnode_gpu_ecc_volatile_uncorrected_errors", check="gpu.ecc[gpu3]", **gpu3) == 2
    assert _get(verify, "peftnode_gpu_temperature_celsius", check="gpu.throttle[gpu3]", **gpu3) == 86
    assert _get(verify, "peftnode_gpu_memory_used_bytes", check="gpu.processes[gpu3]", **gpu3) == 512 * 2**20
    assert _get(verify, "peftnode_gpu_pcie_link_width_lanes", check="gpu.pcie[gpu3]", **gpu3) == 16
    assert _get(verify, "peftnode_gpu_nvlink_links_active", check="gpu.nvlink[gpu3]", **gpu3) == 18
    gpu5 = {"gpu": "5", "UUID": "GPU-00000005-0000-0000-0000-000000000000", "pci_bus_id": "00000000:68:00.0"}
    assert _get(verify, "peftnode_gpu_gemm_flops", check="perf.gemm[gpu5]", **gpu5) == pytest.approx(4.2e14)
    assert _get(verify, "peftnode_gpu_gemm_node_median_ratio", check="perf.gemm[gpu5]", **gpu5) == pytest.approx(0.6)
    assert _get(verify, "peftnode_gpu_memory_copy_bytes_per_second", check="perf.memory[gpu0]", gpu="0",
                UUID="GPU-00000000-0000-0000-0000-000000000000", pci_bus_id="00000000:18:00.0") == pytest.approx(2.9e12)
    assert _get(verify, "peftnode_gpu_host_to_device_bytes_per_second", check="perf.pcie[gpu0]", gpu="0",
                UUID="GPU-00000000-0000-0000-0000-000000000000", pci_bus_id="00000000:18:00.0") == pytest.approx(52e9)
    busbw = _get(verify, "peftnode_nccl_allreduce_busbw_bytes_per_second", check="nccl.allreduce")
    assert busbw == pytest.approx(256 * 2**20 / 0.0015 * 2 * 7 / 8, rel=1e-3)
    assert _get(verify, "peftnode_nccl_allreduce_duration_seconds", check="nccl.allreduce") == pytest.approx(0.0015)
    assert _get(verify, "peftnode_nccl_allreduce_message_size_bytes", check="nccl.allreduce") == 256 * 2**20
    assert _get(verify, "peftnode_train_tokens_per_second", check="finetune.methods[lora]") == 5255.2
    assert _get(verify, "peftnode_train_peak_memory_bytes", check="finetune.methods[lora]") == \
        pytest.approx(417_228_800, rel=1e-3)  # reported in MiB rounded to 0.1
    # keys no table entry names: promtool-clean fallbacks, the unit converted
    assert _get(verify, "peftnode_cuda_wall_seconds", check="cuda.odd") == 1.5
    assert _get(verify, "peftnode_cuda_odd_key_seconds", check="cuda.odd") == pytest.approx(0.007)
    assert _get(verify, "peftnode_cuda_rate_errors_per_second", check="cuda.odd") == 2
    assert _get(verify, "peftnode_cuda_x_count_value", check="cuda.odd") == 3
    # the StateSet says which GPU failed
    assert _get(verify, "peftnode_check_status", check="gpu.ecc[gpu3]", state="fail", **gpu3) == 1
    # the finetune file: the same quantities, its own names
    finetune = _samples(gpu_report_files[1].read_text())
    assert _get(finetune, "peftnode_finetune_gpu_gemm_flops", check="perf.gemm[gpu5]", **gpu5) == \
        pytest.approx(4.2e14)
    assert all(name.startswith("peftnode_finetune_") for name, _ in finetune)
    assert not any(name.startswith("peftnode_finetune_") for name, _ in verify)


def test_per_gpu_series_carry_uuid_and_pci_bus_id(gpu_report_files):
    samples = _samples(gpu_report_files[0].read_text())
    per_gpu = [dict(labels) for (name, labels) in samples if name == "peftnode_gpu_gemm_flops"]
    assert len(per_gpu) == 8
    for labels in per_gpu:
        i = int(labels["gpu"])
        assert labels["UUID"] == f"GPU-{i:08d}-0000-0000-0000-000000000000"
        assert labels["pci_bus_id"] == f"00000000:{0x18 + 0x10 * i:02X}:00.0"
        assert labels["check"] == f"perf.gemm[gpu{i}]"
    # a family's label set is the same on every series: empty GPU labels where a result is about no GPU
    label_sets: dict[str, set] = {}
    for name, labels in samples:
        label_sets.setdefault(name, set()).add(tuple(k for k, _ in labels))
    assert all(len(sets) == 1 for sets in label_sets.values()), label_sets
    assert _get(samples, "peftnode_check_status", check="nccl.allreduce", state="pass") == 1


def test_stateset_has_exactly_one_state_per_check():
    results = _results()
    samples = _samples(render_prom(_report(results)))
    status = _series(samples, "peftnode_check_status")
    assert len(status) == len(results) * len(STATES)
    assert STATES == ["pass", "skip", "warn", "error", "fail"]
    for result in results:
        states = {dict(k)["state"]: v for k, v in status.items() if dict(k)["check"] == result.name}
        assert set(states) == set(STATES)
        assert [s for s, v in states.items() if v == 1] == [result.status.label]
        assert sum(states.values()) == 1


def test_values_durations_and_run_families():
    samples = _samples(render_prom(_report(_results())))
    for result in _results():
        assert _get(samples, "peftnode_check_duration_seconds", check=result.name) == pytest.approx(result.duration_s)
    assert _get(samples, "peftnode_gpu_devices", check="gpu.count") == 8
    assert _get(samples, "peftnode_gpu_memory_bytes", check="gpu.memory") == 79.5 * 2**30
    assert _get(samples, "peftnode_storage_write_bytes_per_second", check="storage.scratch") == 180.25e6
    assert _get(samples, "peftnode_storage_free_bytes", check="storage.scratch") == 512 * 2**30
    nan = _get(samples, "peftnode_net_bandwidth_bytes_per_second", check="net.nccl")
    assert nan != nan
    names = {name for name, _ in samples}
    assert not any("mig" in n or "model" in n or "version" in n for n in names)  # bools, strings: no numbers
    assert _get(samples, "peftnode_node_healthy") == 0
    assert _get(samples, "peftnode_verify_last_run_timestamp_seconds") == pytest.approx(STARTED.timestamp() + 3.25)
    assert _get(samples, "peftnode_verify_info", stack="cu124", version=checks.__version__) == 1
    healthy = _samples(render_prom(_report([r for r in _results() if r.status.healthy])))
    assert _get(healthy, "peftnode_node_healthy") == 1


def test_finetune_report_uses_its_own_families():
    assert FINETUNE_TITLE == FINETUNE_PROG
    results = [r for r in _results() if r.status.healthy]
    samples = _samples(render_prom(_report(results, FINETUNE_PROG)))
    assert _get(samples, "peftnode_finetune_node_healthy") == 1
    assert _get(samples, "peftnode_finetune_last_run_timestamp_seconds") == pytest.approx(STARTED.timestamp() + 3.25)
    assert _get(samples, "peftnode_finetune_info", stack="cu124", version=checks.__version__) == 1
    assert _get(samples, "peftnode_finetune_check_status", check="gpu.count", state="pass") == 1
    assert all(name.startswith("peftnode_finetune_") for name, _ in samples)
    verify = {name for name, _ in _samples(render_prom(_report(results)))}
    assert verify.isdisjoint(name for name, _ in samples)


def test_verify_never_writes_a_finetune_family():
    """verify's own finetune group (and any group spelled so) reads train_*, so no verify family can
    collide with invoke finetune's, whatever the keys."""
    odd = [Result("finetune.methods[lora]", "finetune", Status.PASS, "ok",
                  measured={"tokens_per_s": Value(10, "tokens/s"), "node_healthy": Value(1), "info": Value(2)}),
           Result("finetune_x.y", "finetune_x", Status.PASS, "ok", measured={"check_status": Value(3)})]
    names = {name for name, _ in _samples(render_prom(_report(odd)))}
    assert "peftnode_train_tokens_per_second" in names and "peftnode_train_x_check_status" in names
    assert not any(n.startswith("peftnode_finetune_") for n in names), names


def test_label_escaping():
    odd = Result('ch"eck\\x\nz', "g", Status.PASS, "ok", measured={"v": Value(1.5, 'u"n')})
    text = render_prom(_report([odd]))
    samples = _samples(text)
    assert _get(samples, "peftnode_check_status", check='ch"eck\\x\nz', state="pass") == 1
    assert _get(samples, "peftnode_g_v_u_n", check='ch"eck\\x\nz') == 1.5
    assert 'check="ch\\"eck\\\\x\\nz"' in text  # the exposition's own escapes, one line per series


def test_one_series_per_check_even_when_a_name_repeats():
    first = Result("gpu.ecc[gpu0]", "gpu", Status.PASS, "0 errors", measured={"n": Value(0)})
    again = Result("gpu.ecc[gpu0]", "gpu", Status.FAIL, "3 errors", measured={"n": Value(3)})
    samples = _samples(render_prom(_report([first, again])))  # _samples fails on a duplicate series
    assert _get(samples, "peftnode_check_status", check="gpu.ecc[gpu0]", state="fail") == 1  # the worst stands
    assert _get(samples, "peftnode_check_status", check="gpu.ecc[gpu0]", state="pass") == 0
    assert _get(samples, "peftnode_gpu_n", check="gpu.ecc[gpu0]") == 3
    assert _get(samples, "peftnode_node_healthy") == 0


def test_two_keys_named_alike_in_one_check_give_one_series():
    result = Result("cuda.x", "cuda", Status.PASS, "ok", measured={"load_s": Value(1, "s"), "load": Value(2, "s")})
    samples = _samples(render_prom(_report([result])))
    assert _get(samples, "peftnode_cuda_load_seconds", check="cuda.x") == 1  # the first stands


# --------------------------------------------------------------------------- writing the file


def test_atomic_write(tmp_path):
    target = tmp_path / "peftnode.prom"
    target.write_text("old content\n")
    write_prom(_report(_results()), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peftnode.prom"]
    text = target.read_text()
    assert "old content" not in text
    assert _get(_samples(text), "peftnode_node_healthy") == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    write_prom(_report([r for r in _results() if r.status.healthy]), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peftnode.prom"]
    assert _get(_samples(target.read_text()), "peftnode_node_healthy") == 1


def test_file_is_world_readable_under_a_strict_umask(tmp_path):
    old = os.umask(0o077)
    try:
        target = write_prom(_report(_results()), tmp_path / "peftnode.prom")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peftnode.prom"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "peftnode.prom"
    target.write_text("old content\n")

    def boom(src, dst):
        raise OSError("disk full")

    # prometheus_client's write_to_textfile renames its temp file over the target (os.rename on POSIX)
    monkeypatch.setattr(os, "rename", boom)
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_prom(_report(_results()), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peftnode.prom"]
    assert target.read_text() == "old content\n"


def test_check_prom_target(tmp_path):
    verify_file = write_prom(_report(_results()), tmp_path / "peftnode.prom")
    finetune_file = write_prom(_report(_results(), FINETUNE_PROG), tmp_path / "peftnode-finetune.prom")
    check_prom_target(verify_file, PROG)
    check_prom_target(finetune_file, FINETUNE_PROG)
    check_prom_target(tmp_path / "absent.prom", FINETUNE_PROG)
    foreign = tmp_path / "other.prom"
    foreign.write_text("# HELP node_x x\n# TYPE node_x gauge\nnode_x 1\n")
    check_prom_target(foreign, FINETUNE_PROG)
    check_prom_target(foreign, PROG)
    with pytest.raises(ValueError, match=r"holds `invoke verify`'s metrics \(peftnode_check_duration_seconds"):
        check_prom_target(verify_file, FINETUNE_PROG)
    with pytest.raises(ValueError, match=r"holds `invoke finetune`'s metrics \(peftnode_finetune_"):
        check_prom_target(finetune_file, PROG)
    # a file from before the split (peftnode_verify_healthy etc.) is verify's: finetune keeps off it
    old = tmp_path / "old.prom"
    old.write_text("# HELP peftnode_verify_healthy h\n# TYPE peftnode_verify_healthy gauge\n"
                   "peftnode_verify_healthy 0\n")
    with pytest.raises(ValueError, match="peftnode_verify_healthy"):
        check_prom_target(old, FINETUNE_PROG)
    check_prom_target(old, PROG)


# --------------------------------------------------------------------------- the Grafana dashboard


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_dashboard_has_the_structure_grafana_needs():
    dash = _dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert dash["uid"] and dash["title"] and dash["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells = set()
    for p in dash["panels"]:
        assert p["type"] in {"stat", "table", "timeseries", "bargauge", "gauge"} and p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["x"] + g["w"] <= 24 and g["h"] > 0
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], x, y)
                cells.add((x, y))
        assert p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            assert 'instance=~"$instance"' in t["expr"], t["expr"]  # the node picker applies to every query
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("healthy", "failing", "since", "gemm", "memory", "host", "all-reduce", "fine-tune"):
        assert needed in titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana's $instance given the All value)."""
    promtool = require_tool("promtool", "the Debian `prometheus` package parses PromQL")
    rules = [{"record": f"peftnode:dashboard:query{i}", "expr": expr.replace("$instance", ".*")}
             for i, expr in enumerate(e for e in _exprs(_dashboard()) if not e.startswith("label_values("))]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(rules)} rules found" in checked.stdout
    path.write_text(json.dumps({"groups": [{"name": "d", "rules": [{"record": "a:b", "expr": "peftnode_x{"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0


def test_dashboard_queries_only_metrics_a_real_run_writes(verify_run, gpu_report_files):
    queried = {name for expr in _exprs(_dashboard()) for name in FAMILY.findall(expr)}
    assert {"peftnode_node_healthy", "peftnode_gpu_gemm_flops", "peftnode_nccl_allreduce_busbw_bytes_per_second",
            "peftnode_check_status", "peftnode_finetune_train_tokens_per_second"} <= queried
    written = families_in(verify_run[0].read_text())
    for path in gpu_report_files:
        written |= families_in(path.read_text())
    assert queried <= written, sorted(queried - written)


@pytest.mark.slow
def test_dashboard_finetune_queries_match_a_real_finetune_run(finetune_run):
    queried = {name for expr in _exprs(_dashboard()) for name in FAMILY.findall(expr)}
    finetune_queries = {n for n in queried if n.startswith("peftnode_finetune_")}
    assert finetune_queries
    assert finetune_queries <= families_in(finetune_run[0].read_text())


# --------------------------------------------------------------------------- the README's Metrics section


def _readme_metrics() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("#### Metrics\n")
    end = re.compile(r"\n#{2,4} [A-Z]").search(text, start + 1).start()
    return text[start:end]


def test_readme_metrics_table_matches_the_code(gpu_report_files):
    section = _readme_metrics()
    documented = {n for n in FAMILY.findall(section) if not n.endswith("_")}
    fixed = {"peftnode_check_status", "peftnode_check_duration_seconds", "peftnode_node_healthy",
             "peftnode_verify_last_run_timestamp_seconds", "peftnode_verify_info",
             "peftnode_finetune_last_run_timestamp_seconds", "peftnode_finetune_info"}
    producible = set(fixed)
    for group, key in QUANTITIES:
        for unit in UNITS:
            result = Result("x.y", group if group != "*" else "x", Status.PASS, "ok")
            producible.add("peftnode_" + quantity_of(result, key, Value(1, unit))[0])
    for path in gpu_report_files:
        producible |= families_in(path.read_text())
    assert documented <= producible, sorted(documented - producible)  # no name the code cannot write
    for q in QUANTITIES.values():  # and every curated quantity is in the table
        assert any(n.startswith("peftnode_" + q.stem) for n in documented), q.stem
    # the names the section promises for the families every run writes
    written = _samples(gpu_report_files[0].read_text())
    assert {n for n, _ in written if n in fixed} <= documented


def test_readme_promql_examples_parse(tmp_path):
    promtool = require_tool("promtool", "the Debian `prometheus` package parses PromQL")
    blocks = re.findall(r"```promql\n(.*?)```", _readme_metrics(), re.S)
    assert blocks
    rules = [{"record": f"peftnode:readme:example{i}", "expr": b} for i, b in enumerate(blocks)]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "readme", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
