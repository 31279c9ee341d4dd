"""Smoke fine-tune of the stack's model with every PEFT method: verify group ``finetune``.

``finetune.methods`` trains each method for a few steps on a small bundled data set and checks what
PEFT promises (trainable adapter only, loss falls, adapter-only save, reload, merge, disable,
generate), one verdict per method. The methods run in worker processes, one per GPU (see
:mod:`checks.finetune.pool`), so a method that hangs or crashes fails alone.

Options read from the run's context (``ctx.options``), all optional:
``model`` (tiny, random:bloomz-560m or a directory; default the stack's ``model.path``),
``methods`` (names or ``all``; default the stack's ``finetune.methods``), ``steps``,
``method_timeout`` (seconds per method), ``allow_download``, ``workers``.

``finetune.distributed`` fine-tunes LoRA with DDP across the node's GPUs (torchrun, NCCL) and checks
that every rank finishes, the loss falls and the adapters stay identical on every rank;
``finetune.deepspeed`` runs LoRA steps under DeepSpeed ZeRO stage 2 on one GPU (see
:mod:`checks.finetune.distributed`). They read ``model``, ``steps``, ``method_timeout`` (the whole
torchrun run), ``allow_download`` and ``nproc`` (ranks; on a node without CUDA an explicit nproc runs
them on the CPU over gloo; also ``PEFTNODE_FINETUNE_NPROC``).

Importing this package is cheap: torch is imported only by the workers and the torchrun ranks.
"""

from __future__ import annotations

import math

from checks.registry import Context, check
from checks.result import Status, Verdict

CHECK_TIMEOUT_S = 3600.0  # the whole check; each method has its own (pool.DEFAULT_TIMEOUT_S)

_STATUS = {"pass": Status.PASS, "fail": Status.FAIL, "skip": Status.SKIP, "error": Status.ERROR}


def _mib(value) -> float | None:
    return round(value / 2**20, 1) if isinstance(value, (int, float)) else None


def verdict_of(result: dict, rerun_hint: str = "invoke finetune") -> Verdict:
    """One method's result dict (run.run_method / pool) as a verdict whose subject is the method."""
    name = result["method"]
    status = _STATUS.get(result.get("status"), Status.ERROR)
    m = result.get("metrics") or {}
    measured: dict = {}
    if "loss_before" in m and "loss_after" in m:
        measured["loss"] = f"{m['loss_before']:.3f}->{m['loss_after']:.3f}"
    for key, unit in (("trainable_params", None), ("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"),
                      ("wall_s", "s")):
        if isinstance(m.get(key), (int, float)) and math.isfinite(m[key]):
            measured[key] = (m[key], unit)
    if m.get("peak_memory_bytes") is not None:
        measured["peak_memory"] = (_mib(m["peak_memory_bytes"]), "MiB")
    applicable = [a for a in (result.get("assertions") or {}).values() if a.get("ok") is not None]
    if applicable and status in (Status.PASS, Status.FAIL):
        measured["assertions"] = f"{sum(1 for a in applicable if a['ok'])}/{len(applicable)} passed"
    expected = {}
    if status in (Status.PASS, Status.FAIL) and "loss_before" in m:
        expected["loss_after"] = f"< {m['loss_before']:.3f}"
    remediation = None
    if status in (Status.FAIL, Status.ERROR):
        failed = result.get("failed") or []
        remediation = (f"Failed assertion(s): {', '.join(failed) or 'see message'}. Rerun this method alone to "
                       f"see it: {rerun_hint} --methods {name}; a PEFT/transformers/torch version mismatch is the "
                       f"usual cause when every method fails the same way.")
    return Verdict(status, result.get("message", ""),
                   measured={k: _value(v) for k, v in measured.items()},
                   expected=expected, remediation=remediation, subject=name)


def _value(v):
    from checks.result import Value

    return Value(*v) if isinstance(v, tuple) else Value(v)


def worker_verdict(pool_run) -> Verdict | None:
    """One line on the workers: how many, where, the versions they imported and the one-off start-up cost."""
    if not pool_run.workers:
        return None
    first = pool_run.workers[0]
    versions = first.get("versions") or {}
    devices = sorted({str(w.get("device", "?")) for w in pool_run.workers})
    message = (f"{len(pool_run.workers)} worker process(es) on {', '.join(devices)}: torch {versions.get('torch')}, "
               f"transformers {versions.get('transformers')}, peft {versions.get('peft')}; "
               f"{pool_run.restarts} restart(s) after a timeout or crash")
    measured = {"import_s": (first.get("import_s"), "s"), "load_s": (first.get("load_s"), "s"),
                "model_params": first.get("params"), "wall_s": (pool_run.wall_s, "s")}
    return Verdict(Status.PASS, message, measured={k: _value(v) for k, v in measured.items()}, subject="workers")


def settings_from(ctx: Context) -> dict:
    """Model spec, method names and run settings from the context (raising the module's usage errors)."""
    from checks.finetune.methods import expand
    from checks.finetune.model import parse_model_spec

    options = ctx.options or {}
    allow = bool(options.get("allow_download"))
    spec = parse_model_spec(options.get("model"), ctx.stack.get("model"), allow_download=allow)
    defaults = (ctx.stack.get("finetune") or {}).get("methods") or None
    names = expand(options.get("methods"), defaults) if defaults else expand(options.get("methods"))
    return {"model": spec, "methods": names, "steps": int(options.get("steps") or 30),
            "timeout_s": float(options.get("method_timeout") or 600.0),
            "workers": options.get("workers")}


def missing_model_verdict(spec) -> Verdict:
    return Verdict(Status.FAIL, f"{spec.missing()}: cannot fine-tune {spec.label}",
                   measured={"model": spec.path}, expected={"model": f"{spec.repo or 'model'} at {spec.path}"},
                   remediation=spec.fetch_hint())


REQUIRED_PACKAGES = ("torch", "transformers", "peft")


def missing_packages() -> list[str]:
    """What the fine-tune needs but this environment lacks (looked up without importing anything)."""
    import importlib.util

    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def missing_packages_verdict(missing: list[str]) -> Verdict:
    import sys

    return Verdict(Status.FAIL, f"cannot fine-tune: {', '.join(missing)} not installed in this environment "
                                f"({sys.executable})", measured={"missing": ", ".join(missing)},
                   expected={"installed": ", ".join(REQUIRED_PACKAGES)},
                   remediation="Run verify from the stack's virtualenv (the venv role installs them), or "
                               "pip install 'peftnode[verify]'.")


@check("finetune.methods", "Each PEFT method fine-tunes, saves, reloads, merges and generates on the stack's model",
       isolate=True, slow=True, exclusive=True, needs=("cuda.torch",), timeout_s=CHECK_TIMEOUT_S)
def finetune_methods(ctx: Context) -> list[Verdict]:
    from checks.finetune.methods import MethodError
    from checks.finetune.model import ModelSpecError
    from checks.finetune.pool import run_methods

    missing = missing_packages()
    if missing:
        return [missing_packages_verdict(missing)]
    try:
        s = settings_from(ctx)
    except (MethodError, ModelSpecError) as exc:
        return [Verdict(Status.ERROR, f"bad fine-tune settings: {exc}",
                        remediation="Fix the stack's finetune.methods / model.path or the options given.")]
    if s["model"].missing():
        return [missing_model_verdict(s["model"])]
    run = run_methods(s["methods"], s["model"], steps=s["steps"], timeout_s=s["timeout_s"],
                      max_workers=s["workers"])
    verdicts = [verdict_of(r, f"invoke finetune --model {s['model'].name}") for r in run.results]
    workers = worker_verdict(run)
    return verdicts + ([workers] if workers else [])


def _distributed_settings(ctx: Context, minimum_nproc: int) -> dict:
    """Model spec, steps, timeout and explicit nproc for the distributed checks (raising usage errors)."""
    from checks.finetune.distributed import DEFAULT_STEPS, DEFAULT_TIMEOUT_S, requested_nproc
    from checks.finetune.model import parse_model_spec

    options = ctx.options or {}
    spec = parse_model_spec(options.get("model"), ctx.stack.get("model"),
                            allow_download=bool(options.get("allow_download")))
    return {"model": spec, "steps": int(options.get("steps") or DEFAULT_STEPS),
            "timeout_s": float(options.get("method_timeout") or DEFAULT_TIMEOUT_S),
            "nproc": requested_nproc(options, minimum_nproc)}


def preflight(spec) -> Verdict | None:
    """What stops a planned fine-tune before it starts: missing packages, then a missing model."""
    missing = missing_packages()
    if missing:
        return missing_packages_verdict(missing)
    return missing_model_verdict(spec) if spec.missing() else None


def _distributed_check(ctx: Context, minimum_nproc: int, body) -> list[Verdict]:
    from checks.finetune.distributed import SettingsError
    from checks.finetune.model import ModelSpecError

    try:
        s = _distributed_settings(ctx, minimum_nproc)
        return body(ctx.node.gpus, s["model"], steps=s["steps"], timeout_s=s["timeout_s"],
                    nproc=s["nproc"], preflight=preflight)
    except (SettingsError, ModelSpecError) as exc:
        return [Verdict(Status.ERROR, f"bad distributed fine-tune settings: {exc}",
                        remediation="Fix the options given (model, nproc) or PEFTNODE_FINETUNE_NPROC.")]


@check("finetune.distributed", "LoRA fine-tune with DDP across the node's GPUs (torchrun, NCCL): every rank "
                               "finishes, the loss falls, the adapters are identical on every rank",
       isolate=True, slow=True, exclusive=True, needs=("cuda.torch",), timeout_s=CHECK_TIMEOUT_S)
def finetune_distributed(ctx: Context) -> list[Verdict]:
    from checks.finetune.distributed import ddp_verdicts

    return _distributed_check(ctx, 2, ddp_verdicts)


@check("finetune.deepspeed", "LoRA fine-tune under DeepSpeed ZeRO stage 2 on one GPU: the loss is finite and falls",
       isolate=True, slow=True, exclusive=True, needs=("cuda.torch",), timeout_s=CHECK_TIMEOUT_S)
def finetune_deepspeed(ctx: Context) -> list[Verdict]:
    from checks.finetune.distributed import zero_verdicts

    return _distributed_check(ctx, 1, zero_verdicts)
