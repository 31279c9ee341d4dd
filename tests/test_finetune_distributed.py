"""The distributed fine-tunes (checks.finetune.distributed): DDP across ranks started by torchrun, run for
real with gloo on the CPU (2 ranks, tiny model), its named failures (diverged adapters, a hung rank, a
crashed rank: faults injected from outside through tests/helpers/faults), and the SKIP / FAIL rules of
finetune.distributed and finetune.deepspeed. Their CLI flags are in test_finetune_cli.py."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import psutil
import pytest

import checks.finetune as ft
from checks.cli import finetune_main
from checks.finetune import distributed as DIST
from checks.finetune.launch import Launch
from checks.finetune.model import parse_model_spec
from checks.proc import Exit
from checks.registry import Context
from checks.result import Status

TINY = parse_model_spec("tiny")
STEPS = 5
NO_CUDA = (False, 0, "hidden by the test")
FAULTS_DIR = Path(__file__).resolve().parent / "helpers" / "faults"


def no_cuda():
    return NO_CUDA


@pytest.fixture
def cpu_only(monkeypatch):
    """torch sees no CUDA (as on this CPU node, and on a GPU node whose driver is broken)."""
    import checks.timing

    monkeypatch.setattr(checks.timing, "cuda_status", no_cuda)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv(DIST.NPROC_ENV, raising=False)


@pytest.fixture
def faults(monkeypatch):
    """Inject faults into the ranks this test starts (see tests/helpers/faults/sitecustomize.py)."""
    monkeypatch.syspath_prepend(str(FAULTS_DIR))
    return lambda spec: monkeypatch.setenv("PEFTNODE_TEST_FAULTS", spec)


def node(cu117, gpus: int) -> dict:
    return dict(cu117.expectations(), gpus=gpus)


def rank_processes() -> list[int]:
    """Live processes running a rank module of this package (there must be none after a run)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if p.info["status"] != psutil.STATUS_ZOMBIE and ("checks.finetune.ddp" in cmdline
                                                         or "checks.finetune.zero" in cmdline):
            found.append(p.pid)
    return found


# --- the real thing: torchrun, 2 ranks, gloo on the CPU -----------------------------------------------


@pytest.fixture(scope="module")
def ddp_report(tmp_path_factory):
    """One real DDP run through ``invoke finetune --distributed --nproc 2`` (CUDA hidden), its JSON report."""
    report = tmp_path_factory.mktemp("ddp") / "report.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # the check runs in a worker process: hide CUDA from it
        mp.delenv("PEFTNODE_TEST_FAULTS", raising=False)
        started = time.monotonic()
        code = finetune_main(["--distributed", "--nproc", "2", "--model", "tiny", "--steps", str(STEPS),
                              "--timeout", "120", "--json", str(report), "--no-progress"])
        wall = time.monotonic() - started
    return code, json.loads(report.read_text()), wall


def test_ddp_on_cpu_passes_with_identical_adapters(ddp_report):
    import jsonschema

    from checks.report.jsonreport import load_schema

    code, data, wall = ddp_report
    jsonschema.validate(data, load_schema())
    by_name = {r["name"]: r for r in data["results"]}
    summary = by_name["finetune.distributed[ddp]"]
    assert code == 0 and summary["status"] == "pass", summary["message"]
    m = summary["measured"]
    assert m["world_size"]["value"] == 2 and m["backend"]["value"] == "gloo"
    assert m["assertions"]["value"] == "5/5 passed"
    assert m["max_abs_diff_vs_rank0"]["value"] == 0
    assert "bit-for-bit identical on all 2 ranks" in summary["message"]
    before, after = (float(x) for x in m["loss"]["value"].split("->"))
    assert after < before
    for rank in (0, 1):
        line = by_name[f"finetune.distributed[rank{rank}]"]
        assert line["status"] == "pass", line["message"]
        assert line["measured"]["steps_per_s"]["value"] > 0 and line["measured"]["tokens_per_s"]["value"] > 0
        assert line["measured"]["loss"]["value"] == m["loss"]["value"]  # same weights, same held-out loss
    assert data["options"]["distributed"] is True and data["options"]["nproc"] == 2
    assert not rank_processes()
    print(f"\nDDP on CPU, 2 ranks x {STEPS} steps: {wall:.1f} s; "
          + ", ".join(f"rank{r} {by_name[f'finetune.distributed[rank{r}]']['measured']['steps_per_s']['value']} "
                      f"steps/s" for r in (0, 1)))


def test_diverged_adapters_fail_by_name(faults, cpu_only):
    # rank 1 moves its adapter after training, as a broken all-reduce would leave it
    faults("rank1:diverge")
    verdicts = DIST.ddp_verdicts(0, TINY, steps=STEPS, timeout_s=120, nproc=2, cuda=no_cuda)
    summary, rank0, rank1 = verdicts
    assert summary.status is Status.FAIL and summary.subject == "ddp"
    assert summary.message.startswith("adapters_identical: LoRA weights differ across ranks"), summary.message
    assert "rank 1: 1 of 2 tensors differ" in summary.message and "max |diff| 0.001" in summary.message
    assert summary.measured["assertions"].value == "4/5 passed"
    assert "adapters_identical" in summary.remediation
    assert rank0.status is Status.PASS and rank1.status is Status.FAIL
    assert "adapters_identical" in rank1.message
    assert not rank_processes()


def test_a_hung_rank_is_killed_at_the_timeout(faults, cpu_only):
    faults("rank1:hang")
    started = time.monotonic()
    verdicts = DIST.ddp_verdicts(0, TINY, steps=STEPS, timeout_s=8, nproc=2, cuda=no_cuda)
    elapsed = time.monotonic() - started
    summary = verdicts[0]
    assert summary.status is Status.FAIL and summary.message.startswith("timeout: the DDP fine-tune"), summary.message
    assert "did not finish within 8 s; torchrun and its 2 rank(s) were killed" in summary.message
    assert summary.measured["leftover_processes"].value == 0 and summary.measured["killed_processes"].value >= 1
    assert elapsed < 8 + 15
    assert all(v.status is Status.FAIL for v in verdicts[1:])  # every rank that reported was killed
    assert not rank_processes()


def test_a_crashed_rank_is_named_with_its_signal_and_stage(faults, cpu_only):
    faults("rank1:crash")
    summary, *ranks = DIST.ddp_verdicts(0, TINY, steps=STEPS, timeout_s=120, nproc=2, cuda=no_cuda)
    assert summary.status is Status.FAIL
    assert summary.message.startswith("all_ranks_finished:"), summary.message
    assert "rank 1 stopped at train step 2/5 (killed by SIGABRT)" in summary.message
    assert any(v.subject == "rank1" and v.status is Status.FAIL for v in ranks)
    assert not rank_processes()


# --- judging what the ranks reported (no processes) -----------------------------------------------------


def _rank(rank: int, **extra) -> dict:
    base = {"rank": rank, "ok": True, "stage": "done", "device": "cpu", "device_name": "cpu", "world_size_seen": 2,
            "train_losses": [6.0, 5.0], "loss_before": 6.0, "loss_after": 4.0, "steps": 2, "lr": 0.03,
            "timed_steps": 1, "steps_per_s": 10.0, "tokens_per_s": 100.0, "adapter_sha256": "a" * 64,
            "adapter_tensors": 2, "adapter_values": 16, "differing": {}, "max_abs_diff_vs_rank0": 0.0,
            "peak_memory_bytes": 2**20, "zero_stage": 2, "optimizer": "DeepSpeedZeroOptimizer", "dtype": "bf16"}
    return base | extra


PLAN2 = DIST.Plan(2, "gloo", "cpu", "2 ranks on the CPU over gloo")

TORCHRUN_FAILURE = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
checks.finetune.ddp FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : node
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 4242
============================================================
"""


def test_a_crash_in_torchruns_summary_is_named_with_its_signal_and_stage():
    launch = Launch("checks.finetune.ddp", 2, Exit(code=1, tail=TORCHRUN_FAILURE),
                    ranks={0: _rank(0, ok=False, stage="train step 2/5",
                                    error="RuntimeError: Connection closed by peer"),
                           1: _rank(1, ok=False, stage="train step 2/5")})
    summary, rank0, rank1 = DIST.judge_ddp(launch, PLAN2)
    assert summary.status is Status.FAIL
    assert summary.message.startswith("all_ranks_finished: rank 0 stopped at train step 2/5")
    assert "rank 1 stopped at train step 2/5 (killed by SIGABRT)" in summary.message
    assert "world_size: not run" in summary.message and "adapters_identical: not run" in summary.message
    assert rank0.status is Status.FAIL and "Connection closed" in rank0.message
    assert DIST.rank_exit_codes(TORCHRUN_FAILURE) == {1: -6}


def test_non_finite_and_rising_losses_are_named():
    launch = Launch("checks.finetune.ddp", 2, Exit(code=0),
                    ranks={0: _rank(0, train_losses=[6.0, float("nan")]), 1: _rank(1, loss_after=7.0)})
    summary = DIST.judge_ddp(launch, PLAN2)[0]
    assert summary.status is Status.FAIL
    assert "loss_finite: non-finite loss on rank(s) 0" in summary.message
    assert "loss_decreased: held-out loss did not fall on rank(s) 1 (6.0000 -> 7.0000)" in summary.message
    assert DIST.judge_ddp(Launch("m", 2, Exit(code=0), ranks={0: _rank(0), 1: _rank(1)}), PLAN2)[0].status \
        is Status.PASS


def test_zero_judge_names_a_wrong_stage_and_passes_a_good_run():
    plan = DIST.Plan(1, "nccl", "cuda", "one GPU")
    good = DIST.judge_zero(Launch("m", 1, Exit(code=0), ranks={0: _rank(0, deepspeed="0.19.8")}), plan)[0]
    assert good.status is Status.PASS and good.subject == "zero2" and "ZeRO stage 2" in good.message
    bad = DIST.judge_zero(Launch("m", 1, Exit(code=0), ranks={0: _rank(0, zero_stage=0)}), plan)[0]
    assert bad.status is Status.FAIL and bad.message.startswith("zero_stage: the engine runs ZeRO stage 0")


# --- when the checks run: the SKIP / FAIL rules through the registered functions ------------------------


def test_checks_are_registered_isolated_and_slow():
    from checks.registry import _REGISTRY, all_checks

    names = [s.name for s in all_checks()]
    for name in ("finetune.distributed", "finetune.deepspeed"):
        spec = _REGISTRY[name]
        assert spec.isolate and spec.slow and spec.group == "finetune" and name in names
        assert spec.target.startswith("checks.finetune:")


def test_ddp_skips_without_gpus_and_with_one(cu117, cpu_only):
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 0), options={"model": "tiny"}))
    assert v.status is Status.SKIP and "expected to have no GPUs" in v.message and "--nproc" in v.message
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 1), options={"model": "tiny"}))
    assert v.status is Status.SKIP and "needs at least 2 GPUs" in v.message


def test_ddp_fails_on_a_gpu_node_without_cuda(cu117, monkeypatch, cpu_only):
    import checks.timing

    monkeypatch.setattr(checks.timing, "cuda_status", lambda: (False, 0, "torch 2.13.0+cpu is a CPU-only build"))
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 8), options={"model": "tiny"}))
    assert v.status is Status.FAIL and "no CUDA device visible to torch (torch 2.13.0+cpu is a CPU-only build)" \
        in v.message and "8 GPU(s)" in v.message
    # it says how to run the same check on this node's CPUs
    assert "(on the CPU: invoke finetune --distributed --nproc 2 (2 ranks over gloo" in v.message
    assert "To run it on this node's CPUs instead: invoke finetune --distributed --nproc 2" in v.remediation
    monkeypatch.setattr(checks.timing, "cuda_status", lambda: (True, 1, None))
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 8), options={"model": "tiny"}))
    assert v.status is Status.FAIL and v.message.startswith("only 1 CUDA device visible")


def test_ddp_bad_nproc_is_an_error(cu117, monkeypatch, cpu_only):
    for nproc, needle in (("1", "DDP needs at least 2 ranks"), ("two", "not a whole number")):
        [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 8), options={"model": "tiny", "nproc": nproc}))
        assert v.status is Status.ERROR and needle in v.message
    monkeypatch.setenv(DIST.NPROC_ENV, "0")
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 0), options={"model": "tiny"}))
    assert v.status is Status.ERROR and DIST.NPROC_ENV in v.message


def test_ddp_plans():
    cuda4 = lambda: (True, 4, None)  # noqa: E731
    assert DIST.plan_ddp(8, None, cuda4) == DIST.Plan(4, "nccl", "cuda", "4 ranks, one per GPU, over NCCL")
    assert DIST.plan_ddp(8, 2, cuda4).nproc == 2
    with pytest.raises(DIST.SettingsError, match="5 ranks asked for but torch sees 4"):
        DIST.plan_ddp(8, 5, cuda4)
    cpu = DIST.plan_ddp(0, 2, no_cuda)  # asked for explicitly: the CPU over gloo, even on a node without GPUs
    assert (cpu.nproc, cpu.backend, cpu.device) == (2, "gloo", "cpu")


def test_nproc_from_the_environment(monkeypatch):
    monkeypatch.setenv(DIST.NPROC_ENV, "3")
    assert DIST.requested_nproc({}, 2) == 3
    assert DIST.requested_nproc({"nproc": 2}, 2) == 2  # the option wins
    monkeypatch.delenv(DIST.NPROC_ENV)
    assert DIST.requested_nproc({}, 2) is None


def test_a_missing_model_fails_before_any_rank_starts(cu117, tmp_path, cpu_only):
    missing = tmp_path / "nowhere"
    [v] = ft.finetune_distributed(Context(cu117.data, node(cu117, 0), options={"model": str(missing), "nproc": 2}))
    assert v.status is Status.FAIL and str(missing) in v.message and "git lfs clone" in v.remediation


# --- DeepSpeed ---------------------------------------------------------------------------------------


@pytest.fixture
def deepspeed_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))


@pytest.fixture
def deepspeed_present(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "deepspeed" else real(name, *a))


def test_deepspeed_skips_when_not_installed(cu117, deepspeed_missing, cpu_only):
    for gpus in (0, 8):
        [v] = ft.finetune_deepspeed(Context(cu117.data, node(cu117, gpus), options={"model": "tiny"}))
        assert v.status is Status.SKIP and v.message.startswith("deepspeed is not installed"), v.message


def test_deepspeed_rules_when_installed(cu117, monkeypatch, deepspeed_present, cpu_only):
    import checks.timing

    [v] = ft.finetune_deepspeed(Context(cu117.data, node(cu117, 0), options={"model": "tiny"}))
    assert v.status is Status.SKIP and "expected to have no GPUs" in v.message
    [v] = ft.finetune_deepspeed(Context(cu117.data, node(cu117, 8), options={"model": "tiny"}))
    assert v.status is Status.FAIL and "no CUDA device visible to torch (hidden by the test)" in v.message
    assert "invoke finetune --deepspeed --nproc 1" in v.message and "--nproc 1" in v.remediation
    monkeypatch.setattr(checks.timing, "cuda_status", lambda: (True, 8, None))
    plan = DIST.plan_zero(8, None)
    assert (plan.nproc, plan.backend, plan.why) == (1, "nccl", "one GPU")
    assert DIST.plan_zero(1, None).nproc == 1  # one GPU is enough for ZeRO-2 here
    assert DIST.plan_zero(0, 1, no_cuda).device == "cpu"  # asked for explicitly: DeepSpeed's CPU accelerator


def test_deepspeed_config_is_minimal_zero2():
    from checks.finetune.zero import ds_config

    bf16, fp16 = ds_config("bf16"), ds_config("fp16")
    assert bf16["zero_optimization"] == {"stage": 2} and bf16["gradient_accumulation_steps"] == 1
    assert bf16["train_micro_batch_size_per_gpu"] == 8
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    assert fp16["fp16"]["enabled"] and not fp16["bf16"]["enabled"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed here")
def test_deepspeed_zero2_runs_for_real():
    """On a GPU: one GPU, bf16/fp16. Without CUDA: one rank on DeepSpeed's CPU accelerator in bf16 (it
    builds its shared-memory op with the C++ compiler on first use: up to a minute, once)."""
    from checks.timing import cuda_status

    usable, _, _ = cuda_status()
    verdicts = DIST.zero_verdicts(8 if usable else 0, TINY, steps=STEPS, timeout_s=240, nproc=None if usable else 1)
    [v] = verdicts
    assert v.status is Status.PASS, v.message
    assert v.measured["zero_stage"].value == 2 and v.measured["optimizer"].value == "DeepSpeedZeroOptimizer"
    before, after = (float(x) for x in v.measured["loss"].value.split("->"))
    assert after < before
    assert not rank_processes()


@pytest.mark.gpu
def test_ddp_runs_over_nccl_on_every_gpu(cu117):
    from checks.timing import cuda_status

    usable, count, reason = cuda_status()
    if not usable or count < 2:
        pytest.skip(f"needs at least 2 CUDA GPUs: {reason or f'torch sees {count}'}")
    summary, *per_rank = DIST.ddp_verdicts(count, TINY, steps=10, timeout_s=300)
    assert summary.status is Status.PASS, summary.message
    assert summary.measured["world_size"].value == count and summary.measured["backend"].value == "nccl"
    assert len(per_rank) == count and all(v.status is Status.PASS for v in per_rank)


def test_no_rank_processes_are_left():
    assert not rank_processes(), [" ".join(psutil.Process(p).cmdline()) for p in rank_processes()
                                  if psutil.pid_exists(p)]
