"""The distributed fine-tunes: ``finetune.distributed`` (DDP) and ``finetune.deepspeed`` (ZeRO stage 2).

``finetune.distributed`` runs the seed's LoRA with DistributedDataParallel on every local GPU, one
torchrun rank per CUDA device over NCCL (:mod:`checks.finetune.ddp`), and checks what DDP must
guarantee, one named assertion each:

``all_ranks_finished``  every rank ran to the end and torchrun exited 0 (else the rank, its stage and error)
``world_size``          every rank joined a process group of the expected size
``loss_finite``         every training loss on every rank is finite
``loss_decreased``      the held-out loss after the steps is below the loss before, on every rank
``adapters_identical``  after the steps, the LoRA weights are bit-for-bit the same on every rank
                        (sha256 of each adapter tensor, all-gathered; the largest difference from
                        rank 0's broadcast weights is reported beside it)

A run that passes its deadline fails ``timeout``: torchrun and every rank are killed, and the report
says which stage each rank had reached. Per-rank lines give each rank's steps/s and tokens/s.

When it runs: ``node.gpus`` 0 skips, 1 skips (DDP needs at least 2), a GPU node where torch sees no
CUDA fails with the reason, fewer than 2 CUDA devices fails. Asked explicitly for N ranks (option
``nproc``, ``invoke finetune --distributed --nproc N`` or ``PEFTNODE_FINETUNE_NPROC``) on a node
without CUDA, it runs N ranks on the CPU over gloo: the same path end to end, testable anywhere.

``finetune.deepspeed`` runs a few LoRA steps under DeepSpeed ZeRO stage 2 on one GPU (one torchrun
rank; :mod:`checks.finetune.zero`) and checks ``all_ranks_finished``, ``zero_stage`` (the engine
really built a stage-2 optimizer), ``loss_finite`` and ``loss_decreased``. It skips when DeepSpeed is
not installed or ``node.gpus`` is 0, and fails on a GPU node without CUDA; an explicit ``nproc`` runs
that many ranks (on the CPU with DeepSpeed's CPU accelerator where there is no CUDA).

Nothing here imports torch except :func:`cuda_status` (only when a GPU node must be probed).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass

from checks.finetune.launch import Launch, run_torchrun
from checks.finetune.model import ModelSpec
from checks.proc import signal_name
from checks.result import Status, Value, Verdict

NPROC_ENV = "PEFTNODE_FINETUNE_NPROC"
DDP_MODULE, ZERO_MODULE = "checks.finetune.ddp", "checks.finetune.zero"
DEFAULT_STEPS = 10
DEFAULT_TIMEOUT_S = 600.0  # the whole torchrun run: start-up, model load, steps, comparison
MAX_NPROC = 64

DDP_ASSERTIONS = ("all_ranks_finished", "world_size", "loss_finite", "loss_decreased", "adapters_identical")
ZERO_ASSERTIONS = ("all_ranks_finished", "zero_stage", "loss_finite", "loss_decreased")

REMEDIATION_DDP = (
    "Rerun it alone to see it: invoke finetune --distributed --model {model} (NCCL_DEBUG=INFO shows the "
    "transport). A rank that stops or hangs points at one GPU or the fabric (check nccl.allreduce and "
    "`nvidia-smi topo -m`); different adapters across ranks mean gradients were not all-reduced the same "
    "everywhere: a torch/NCCL bug or corrupted traffic (run `dcgmi diag -r 3`).")
REMEDIATION_ZERO = (
    "Rerun it alone to see it: invoke finetune --deepspeed --model {model}. DeepSpeed, torch and CUDA must "
    "match (`ds_report` lists what DeepSpeed sees and which ops it can build).")


class SettingsError(ValueError):
    """A bad nproc (or other distributed setting): a usage error."""


@dataclass(frozen=True)
class Plan:
    """How a distributed check runs: rank count, backend, and where."""

    nproc: int
    backend: str  # nccl or gloo
    device: str  # cuda or cpu
    why: str  # one phrase for the report


def parse_nproc(value, minimum: int = 1, what: str = "nproc") -> int | None:
    """The explicit rank count (option or environment), or None when none was asked for."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        raise SettingsError(f"{what}: {value!r} is not a whole number") from None
    if not 1 <= n <= MAX_NPROC:
        raise SettingsError(f"{what}: {n} is out of range (1 to {MAX_NPROC})")
    if n < minimum:
        raise SettingsError(f"{what}: DDP needs at least {minimum} ranks, got {n}")
    return n


def requested_nproc(options: dict, minimum: int = 1) -> int | None:
    if options.get("nproc") not in (None, ""):
        return parse_nproc(options["nproc"], minimum, "nproc")
    return parse_nproc(os.environ.get(NPROC_ENV), minimum, NPROC_ENV)


def cuda_status() -> tuple[bool, int, str | None]:
    from checks.timing import cuda_status as probe

    return probe()


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# --- when and how they run ------------------------------------------------------------------------


def plan_ddp(gpus: int, nproc: int | None, cuda=cuda_status) -> Plan | Verdict:
    """The DDP run's plan, or the SKIP / FAIL verdict that replaces it."""
    what = "the DDP fine-tune"
    if nproc is not None and nproc < 2:
        raise SettingsError(f"nproc: DDP needs at least 2 ranks, got {nproc}")
    if nproc is None and gpus == 0:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have no GPUs (ask for N ranks on the CPU "
                                    f"with --nproc N or {NPROC_ENV}=N)", {}, {"gpus": 0})
    if nproc is None and gpus == 1:
        return Verdict(Status.SKIP, f"{what} needs at least 2 GPUs: this node is expected to have 1", {},
                       {"gpus": 1})
    usable, count, reason = cuda()
    if not usable:
        if nproc is not None:
            return Plan(nproc, "gloo", "cpu", f"{nproc} ranks on the CPU over gloo (asked for; no CUDA here: "
                                              f"{reason or 'none visible'})")
        from checks.timing import judge_no_cuda

        return judge_no_cuda(reason, gpus, what, f"invoke finetune --distributed --nproc 2 (2 ranks over gloo; "
                                                 f"or {NPROC_ENV}=2)")
    if count < 2:
        return Verdict(Status.FAIL, f"only {count} CUDA device visible to torch; this node is expected to have "
                                    f"{gpus}, and DDP needs at least 2", {"cuda_devices": count}, {"gpus": gpus},
                       "See the GPU inventory checks; check CUDA_VISIBLE_DEVICES and `nvidia-smi -L`.")
    if nproc is not None and nproc > count:
        raise SettingsError(f"nproc: {nproc} ranks asked for but torch sees {count} CUDA devices")
    n = nproc or count
    return Plan(n, "nccl", "cuda", f"{n} ranks, one per GPU, over NCCL")


def plan_zero(gpus: int, nproc: int | None, cuda=cuda_status, installed=deepspeed_installed) -> Plan | Verdict:
    """The DeepSpeed run's plan, or the SKIP / FAIL verdict that replaces it."""
    what = "the DeepSpeed ZeRO-2 fine-tune"
    if not installed():
        return Verdict(Status.SKIP, f"deepspeed is not installed in this environment ({sys.executable}), so "
                                    f"{what} cannot run", {}, {},
                       "pip install deepspeed into the stack's virtualenv to run it (it is optional).")
    if nproc is None and gpus == 0:
        return Verdict(Status.SKIP, f"{what}: this node is expected to have no GPUs (ask for a run on the CPU "
                                    f"with --nproc 1 or {NPROC_ENV}=1)", {}, {"gpus": 0})
    usable, count, reason = cuda()
    if not usable:
        if nproc is not None:
            return Plan(nproc, "gloo", "cpu", f"{nproc} rank(s) on the CPU with DeepSpeed's CPU accelerator "
                                              f"(asked for; no CUDA here: {reason or 'none visible'})")
        from checks.timing import judge_no_cuda

        return judge_no_cuda(reason, gpus, what, f"invoke finetune --deepspeed --nproc 1 (DeepSpeed's CPU "
                                                 f"accelerator; or {NPROC_ENV}=1)")
    if nproc is not None and nproc > count:
        raise SettingsError(f"nproc: {nproc} ranks asked for but torch sees {count} CUDA devices")
    n = nproc or 1
    return Plan(n, "nccl", "cuda", "one GPU" if n == 1 else f"{n} GPUs over NCCL")


# --- running ----------------------------------------------------------------------------------------


def rank_config(model: ModelSpec, steps: int, plan: Plan, timeout_s: float, lr: float | None = None) -> dict:
    return {"model": model.to_dict(), "steps": steps, "backend": plan.backend, "timeout_s": timeout_s, "lr": lr}


def run_ddp(model: ModelSpec, plan: Plan, *, steps: int = DEFAULT_STEPS, timeout_s: float = DEFAULT_TIMEOUT_S,
            lr: float | None = None) -> Launch:
    return run_torchrun(DDP_MODULE, plan.nproc, rank_config(model, steps, plan, timeout_s, lr),
                        timeout_s=timeout_s, allow_download=model.allow_download)


def run_zero(model: ModelSpec, plan: Plan, *, steps: int = DEFAULT_STEPS, timeout_s: float = DEFAULT_TIMEOUT_S,
             lr: float | None = None) -> Launch:
    env = {"DS_ACCELERATOR": "cpu"} if plan.device == "cpu" else {}
    return run_torchrun(ZERO_MODULE, plan.nproc, rank_config(model, steps, plan, timeout_s, lr),
                        timeout_s=timeout_s, env=env, allow_download=model.allow_download)


# --- judging ----------------------------------------------------------------------------------------


_EXIT_RX = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def rank_exit_codes(log: str) -> dict[int, int]:
    """Exit codes torchrun's failure summary gives per rank (``rank : 1 (local_rank: 1)`` / ``exitcode : -6``)."""
    return {int(r): int(c) for r, c in _EXIT_RX.findall(log)}


def _how_exited(code: int) -> str:
    return f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"


def _stages(launch: Launch) -> str:
    parts = []
    for rank in range(launch.nproc):
        got = launch.ranks.get(rank)
        parts.append(f"rank {rank}: {got.get('stage', '?')}" if got else f"rank {rank}: not started")
    return ", ".join(parts)


def _timeout_verdict(launch: Launch, what: str, remediation: str) -> Verdict:
    leftover = launch.exit.leftover
    left = f"; {len(leftover)} process(es) could not be killed: {leftover}" if leftover else ""
    message = (f"timeout: {what} did not finish within {launch.timeout_s:g} s; torchrun and its {launch.nproc} "
               f"rank(s) were killed ({_stages(launch)}){left}")
    return Verdict(Status.FAIL, message,
                   {"wall_s": Value(launch.wall_s, "s"), "killed_processes": launch.exit.killed,
                    "leftover_processes": len(leftover)},
                   {"timeout": Value(launch.timeout_s, "s")}, remediation)


def _finished(launch: Launch) -> tuple[bool, str]:
    """``all_ranks_finished``: each rank's status says done, and torchrun exited 0."""
    codes = rank_exit_codes(launch.log_tail)
    problems = []
    for rank in range(launch.nproc):
        got = launch.ranks.get(rank)
        if got and got.get("ok"):
            continue
        if got is None:
            problems.append(f"rank {rank} never started")
            continue
        how = f" ({_how_exited(codes[rank])})" if rank in codes else ""
        error = got.get("error")
        problems.append(f"rank {rank} stopped at {got.get('stage', '?')}{how}" + (f": {error}" if error else ""))
    if not launch.exit.ok and not problems:
        problems.append(f"torchrun {launch.exit.describe(launch.timeout_s)}")
    if problems:
        tail = launch.exit.last_line()
        if tail and not any(r.get("error") for r in launch.ranks.values()):
            problems.append(f"torchrun's last output: {tail[:300]}")
        return False, "; ".join(problems)
    return True, f"all {launch.nproc} rank(s) finished; torchrun exited 0"


def _losses(done: dict[int, dict]) -> tuple[tuple[bool, str], tuple[bool, str]]:
    bad = {r: [x for x in d.get("train_losses", []) if not (isinstance(x, (int, float)) and math.isfinite(x))]
           for r, d in done.items()}
    held = {r: (d.get("loss_before"), d.get("loss_after")) for r, d in done.items()}
    not_finite = [r for r in done if bad[r] or not _finite(*held[r])]
    finite = (not not_finite,
              f"non-finite loss on rank(s) {', '.join(map(str, not_finite))}: "
              + "; ".join(f"rank {r}: train {bad[r][:3]}, held-out {held[r][0]} -> {held[r][1]}" for r in not_finite)
              if not_finite else
              f"{sum(len(d.get('train_losses', [])) for d in done.values())} training losses and the held-out "
              f"losses finite on every rank")
    rising = [r for r in done if not (_finite(*held[r]) and held[r][1] < held[r][0])]
    steps = next(iter(done.values())).get("steps")
    lr = next(iter(done.values())).get("lr")
    if rising:
        detail = "held-out loss did not fall on rank(s) " + ", ".join(
            f"{r} ({_fmt(held[r][0])} -> {_fmt(held[r][1])})" for r in rising) + f" after {steps} steps at lr {lr:g}"
    else:
        values = sorted({(round(b, 4), round(a, 4)) for b, a in held.values()})
        detail = "held-out loss " + ", ".join(f"{b:.4f} -> {a:.4f}" for b, a in values) + \
                 f" after {steps} steps at lr {lr:g}" + (" on every rank" if len(done) > 1 else "")
    return finite, (not rising, detail)


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def _identical(done: dict[int, dict], nproc: int) -> tuple[bool, str]:
    """Adapters identical: the digests the ranks wrote agree, and so do the ones they all-gathered."""
    digests = {r: d.get("adapter_sha256") for r, d in done.items()}
    reference = digests.get(0)
    by_files = [r for r, h in digests.items() if h != reference]
    collective = done.get(0, {}).get("differing") or {}
    diffs = {r: d.get("max_abs_diff_vs_rank0") for r, d in done.items()}
    differing = sorted(set(by_files) | {int(r) for r in collective})
    if not differing:
        tensors = done[0].get("adapter_tensors")
        return True, (f"LoRA weights bit-for-bit identical on all {nproc} ranks (sha256 {str(reference)[:16]}…, "
                      f"{tensors} tensors, {done[0].get('adapter_values', 0):,} values; max |diff| from rank 0: "
                      f"{max((v or 0.0) for v in diffs.values()):.3g})")
    parts = []
    for r in differing:
        names = collective.get(str(r)) or []
        which = (f"{len(names)} of {done[0].get('adapter_tensors')} tensors differ ({', '.join(names[:2])}"
                 f"{', …' if len(names) > 2 else ''})") if names else "its adapter hash differs"
        diff = diffs.get(r)
        parts.append(f"rank {r}: {which}; max |diff| {diff:.3g}" if isinstance(diff, float) else f"rank {r}: {which}")
    return False, (f"LoRA weights differ across ranks after {done[0].get('steps')} steps, which DDP must never "
                   f"allow: " + "; ".join(parts) + f" (rank 0's sha256 {str(reference)[:16]}…)")


def _assertions_verdict(assertions: dict[str, tuple[bool | None, str]], pass_message: str, measured: dict,
                        expected: dict, remediation: str) -> Verdict:
    failed = [n for n, (ok, _) in assertions.items() if ok is False]
    applicable = [n for n, (ok, _) in assertions.items() if ok is not None]
    measured["assertions"] = Value(f"{len(applicable) - len(failed)}/{len(applicable)} passed")
    if failed:
        message = "; ".join(f"{n}: {assertions[n][1]}" for n in failed)
        return Verdict(Status.FAIL, message, measured, expected,
                       f"Failed assertion(s): {', '.join(failed)}. " + remediation)
    return Verdict(Status.PASS, pass_message, measured, expected)


def judge_ddp(launch: Launch, plan: Plan, model_name: str = "tiny") -> list[Verdict]:
    """The ``ddp`` summary verdict, then one verdict per rank with its throughput."""
    remediation = REMEDIATION_DDP.format(model=model_name)
    what = f"the DDP fine-tune ({plan.why})"
    if launch.timed_out:
        return [_timeout_verdict(launch, what, remediation)] + _rank_verdicts(launch, None)
    ok, detail = _finished(launch)
    assertions: dict[str, tuple[bool | None, str]] = {"all_ranks_finished": (ok, detail)}
    done = {r: d for r, d in launch.ranks.items() if d.get("ok")}
    measured: dict = {"world_size": plan.nproc, "backend": plan.backend, "wall_s": Value(launch.wall_s, "s")}
    expected: dict = {"world_size": plan.nproc, "adapters": "identical on every rank"}
    if done:
        seen = {r: d.get("world_size_seen") for r, d in done.items()}
        wrong = {r: s for r, s in seen.items() if s != plan.nproc}
        assertions["world_size"] = (not wrong, f"every rank joined a group of {plan.nproc}" if not wrong else
                                    "; ".join(f"rank {r} saw world size {s}" for r, s in wrong.items()))
        assertions["loss_finite"], assertions["loss_decreased"] = _losses(done)
        if len(done) == plan.nproc:
            assertions["adapters_identical"] = _identical(done, plan.nproc)
        else:
            assertions["adapters_identical"] = (False, "not run: not every rank finished")
        first = done[min(done)]
        devices = sorted({d.get("device_name") or d.get("device", "?") for d in done.values()})
        measured.update({
            "device": ", ".join(devices),
            "loss": f"{_fmt(first.get('loss_before'))}->{_fmt(first.get('loss_after'))}",
            "steps_per_s_slowest_rank": Value(min(d["steps_per_s"] for d in done.values()), "steps/s"),
            "tokens_per_s_all_ranks": Value(round(sum(d["tokens_per_s"] for d in done.values()), 1), "tokens/s"),
            "adapter_params": first.get("adapter_params"),
            "adapter_sha256": str(first.get("adapter_sha256"))[:16],
            "max_abs_diff_vs_rank0": max(d.get("max_abs_diff_vs_rank0") or 0.0 for d in done.values()),
        })
    else:
        for name in DDP_ASSERTIONS[1:]:
            assertions[name] = (False, "not run: no rank finished")
    pass_message = (f"DDP LoRA fine-tune, {plan.why}: {assertions.get('loss_decreased', (0, ''))[1]}; "
                    f"{assertions.get('adapters_identical', (0, ''))[1]}")
    summary = _assertions_verdict(assertions, pass_message, measured, expected, remediation)
    summary.subject = "ddp"
    return [summary] + _rank_verdicts(launch, done.get(0))


def _rank_verdicts(launch: Launch, reference: dict | None) -> list[Verdict]:
    out = []
    for rank in range(launch.nproc):
        got = launch.ranks.get(rank)
        if got is None:
            continue
        measured: dict = {"device": got.get("device_name") or got.get("device"), "pid": got.get("pid")}
        if not got.get("ok"):
            why = "killed at the deadline" if launch.timed_out else "did not finish"
            error = f": {got['error']}" if got.get("error") else ""
            out.append(Verdict(Status.FAIL, f"rank {rank} {why} (stage {got.get('stage', '?')}){error}", measured,
                               subject=f"rank{rank}"))
            continue
        measured.update({
            "steps_per_s": Value(got["steps_per_s"], "steps/s"), "tokens_per_s": Value(got["tokens_per_s"], "tokens/s"),
            "train_s": Value(got.get("train_s"), "s"), "load_s": Value(got.get("load_s"), "s"),
            "loss": f"{_fmt(got.get('loss_before'))}->{_fmt(got.get('loss_after'))}",
            "peak_memory": Value(round(got.get("peak_memory_bytes", 0) / 2**20, 1), "MiB"),
        })
        problems = []
        if not _finite(*got.get("train_losses", []), got.get("loss_before"), got.get("loss_after")):
            problems.append("loss_finite")
        elif not got["loss_after"] < got["loss_before"]:
            problems.append("loss_decreased")
        if reference is not None and got.get("adapter_sha256") != reference.get("adapter_sha256"):
            problems.append(f"adapters_identical (max |diff| from rank 0 {got.get('max_abs_diff_vs_rank0', 0):.3g})")
        text = (f"rank {rank} on {measured['device']}: {got.get('timed_steps')} timed steps at "
                f"{got['steps_per_s']:g} steps/s, {got['tokens_per_s']:g} tokens/s (first step left out as warm-up)")
        if problems:
            out.append(Verdict(Status.FAIL, f"{text}; failed: {', '.join(problems)}", measured, subject=f"rank{rank}"))
        else:
            out.append(Verdict(Status.PASS, text, measured, subject=f"rank{rank}"))
    return out


def judge_zero(launch: Launch, plan: Plan, model_name: str = "tiny") -> list[Verdict]:
    remediation = REMEDIATION_ZERO.format(model=model_name)
    what = f"the DeepSpeed ZeRO-2 fine-tune ({plan.why})"
    if launch.timed_out:
        verdict = _timeout_verdict(launch, what, remediation)
        verdict.subject = "zero2"
        return [verdict]
    ok, detail = _finished(launch)
    assertions: dict[str, tuple[bool | None, str]] = {"all_ranks_finished": (ok, detail)}
    done = {r: d for r, d in launch.ranks.items() if d.get("ok")}
    measured: dict = {"world_size": plan.nproc, "wall_s": Value(launch.wall_s, "s")}
    any_rank = done.get(0) or launch.ranks.get(0) or {}
    if any_rank.get("deepspeed"):
        measured["deepspeed"] = any_rank["deepspeed"]
    if done:
        stages = {r: d.get("zero_stage") for r, d in done.items()}
        assertions["zero_stage"] = (all(s == 2 for s in stages.values()),
                                    f"the engine runs ZeRO stage {stages[min(stages)]} with "
                                    f"{done[min(done)].get('optimizer')}")
        assertions["loss_finite"], assertions["loss_decreased"] = _losses(done)
        first = done[min(done)]
        measured.update({
            "device": first.get("device_name") or first.get("device"), "dtype": first.get("dtype"),
            "zero_stage": first.get("zero_stage"), "optimizer": first.get("optimizer"),
            "loss": f"{_fmt(first.get('loss_before'))}->{_fmt(first.get('loss_after'))}",
            "steps_per_s": Value(first["steps_per_s"], "steps/s"),
            "tokens_per_s": Value(first["tokens_per_s"], "tokens/s"),
            "skipped_steps": first.get("skipped_steps", 0),
            "peak_memory": Value(round(first.get("peak_memory_bytes", 0) / 2**20, 1), "MiB"),
        })
    else:
        for name in ZERO_ASSERTIONS[1:]:
            assertions[name] = (False, "not run: no rank finished")
    expected = {"zero_stage": 2}
    pass_message = (f"DeepSpeed {measured.get('deepspeed', '?')} ZeRO stage 2, {plan.why}, "
                    f"{measured.get('dtype', '?')}: {assertions['loss_decreased'][1]}"
                    + (f"; {measured['skipped_steps']} step(s) skipped by the fp16 loss scaler"
                       if measured.get("skipped_steps") else ""))
    verdict = _assertions_verdict(assertions, pass_message, measured, expected, remediation)
    verdict.subject = "zero2"
    return [verdict]


# --- the checks' bodies (shared by verify and invoke finetune) --------------------------------------


def ddp_verdicts(gpus: int, model: ModelSpec, *, steps: int = DEFAULT_STEPS, timeout_s: float = DEFAULT_TIMEOUT_S,
                 nproc: int | None = None, preflight=None, cuda=cuda_status) -> list[Verdict]:
    """``finetune.distributed``: plan (or SKIP / FAIL), run, judge. Raises SettingsError for a bad nproc.
    ``preflight(model)`` returns the verdict that stops a planned run (missing packages or model), or None."""
    plan = plan_ddp(gpus, nproc, cuda)
    if isinstance(plan, Verdict):
        return [plan]
    blocked = preflight(model) if preflight else None
    if blocked:
        return [blocked]
    return judge_ddp(run_ddp(model, plan, steps=steps, timeout_s=timeout_s), plan, model.name)


def zero_verdicts(gpus: int, model: ModelSpec, *, steps: int = DEFAULT_STEPS, timeout_s: float = DEFAULT_TIMEOUT_S,
                  nproc: int | None = None, preflight=None, cuda=cuda_status,
                  installed=deepspeed_installed) -> list[Verdict]:
    """``finetune.deepspeed``: plan (or SKIP / FAIL), run, judge. Raises SettingsError for a bad nproc."""
    plan = plan_zero(gpus, nproc, cuda, installed)
    if isinstance(plan, Verdict):
        return [plan]
    blocked = preflight(model) if preflight else None
    if blocked:
        return [blocked]
    return judge_zero(run_zero(model, plan, steps=steps, timeout_s=timeout_s), plan, model.name)
