"""Smoke fine-tune of the stack's model with every PEFT method: verify group ``finetune``.

``finetune.methods`` trains each method for a few steps on a small bundled data set and checks what
PEFT promises (trainable adapter only, loss falls, adapter-only save, reload, merge, disable,
generate), one verdict per method. The methods run in worker processes (one per GPU; see
:mod:`checks.finetune.pool`), each under its own timeout, so a method that hangs or crashes fails
alone; the check itself only supervises them and runs in the runner's process. It reports progress
(``ctx.progress``: each method started, its training steps with the loss, its outcome) and, when the run
is interrupted, keeps the methods that finished and reports the others ``skip: interrupted``.

Options read from the run's context (``ctx.options``), all optional:
``model`` (tiny, random:bloomz-560m or a directory; default the stack's ``model.path``),
``methods`` (names or ``all``; default the stack's ``finetune.methods``), ``steps``,
``method_timeout`` (seconds per method), ``allow_download``, ``workers``, ``keep`` (default the stack's
``finetune.keep_dir``: keep each method's adapter there, :mod:`checks.finetune.keep`).

``finetune.distributed`` fine-tunes LoRA with DDP across the node's GPUs (torchrun, NCCL) and checks
that every rank finishes, the loss falls and the adapters stay identical on every rank;
``finetune.deepspeed`` runs LoRA steps under DeepSpeed ZeRO stage 2 on one GPU (see
:mod:`checks.finetune.distributed`). They read ``model``, ``steps``, ``method_timeout`` (the whole
torchrun run), ``allow_download`` and ``nproc`` (ranks; on a node without CUDA an explicit nproc runs
them on the CPU over gloo; also ``PEFTNODE_FINETUNE_NPROC``).

Importing this package is cheap: torch is imported only by the workers and the torchrun ranks.
"""

from __future__ import annotations

from checks.registry import Context, check
from checks.result import Status, Value, Verdict

CHECK_TIMEOUT_S = 3600.0  # the distributed checks' worker process; each method has its own (pool.DEFAULT_TIMEOUT_S)


def worker_verdict(pool_run) -> Verdict | None:
    """One line on the workers: how many, where, the versions they imported and the one-off start-up cost."""
    if not pool_run.workers:
        return None
    first = pool_run.workers[0]
    versions = first.get("versions") or {}
    devices = sorted({str(w.get("device", "?")) for w in pool_run.workers})
    threads = sorted({w.get("threads") for w in pool_run.workers if w.get("threads")})
    on_cpu = all(str(w.get("device", "")).startswith("cpu") for w in pool_run.workers)
    where = ", ".join(devices) + (f" ({'/'.join(map(str, threads))} thread(s) each)" if on_cpu and threads else "")
    message = (f"{len(pool_run.workers)} worker process(es) on {where}: torch {versions.get('torch')}, "
               f"transformers {versions.get('transformers')}, peft {versions.get('peft')}; "
               f"{pool_run.restarts} restart(s) after a timeout or crash")
    measured = {"import_s": Value(first.get("import_s"), "s"), "load_s": Value(first.get("load_s"), "s"),
                "model_params": Value(first.get("params")), "wall_s": Value(pool_run.wall_s, "s")}
    return Verdict(Status.PASS, message, measured=measured, subject="workers")


def settings_from(ctx: Context) -> dict:
    """Model spec, method names and run settings from the context (raising the module's usage errors)."""
    from checks.finetune.methods import expand
    from checks.finetune.model import parse_model_spec
    from checks.finetune.pool import DEFAULT_TIMEOUT_S

    options = ctx.options or {}
    allow = bool(options.get("allow_download"))
    spec = parse_model_spec(options.get("model"), ctx.stack.get("model"), allow_download=allow)
    defaults = (ctx.stack.get("finetune") or {}).get("methods") or None
    names = expand(options.get("methods"), defaults) if defaults else expand(options.get("methods"))
    keep = options.get("keep") or (ctx.stack.get("finetune") or {}).get("keep_dir")
    return {"model": spec, "methods": names, "steps": int(options["steps"]) if options.get("steps") else None,
            "timeout_s": float(options.get("method_timeout") or DEFAULT_TIMEOUT_S),
            "workers": int(options["workers"]) if options.get("workers") else None, "keep_dir": keep}


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
       slow=True, exclusive=True, needs=("cuda.torch",))
def finetune_methods(ctx: Context) -> list[Verdict]:
    """Runs in the runner's process: the methods run in the pool's worker processes, each under its own
    timeout, so a method that hangs or crashes fails alone and cannot take the run with it."""
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
    import os

    from checks.finetune import budget

    line = budget.announcement(s["model"], s["methods"], s["steps"], budget.device_kind(), load=os.getloadavg()[0])
    if line and not (ctx.options or {}).get("announced"):  # a full-size model on the CPU: the cost, up front
        ctx.progress(line, key="estimate", final=True)
    run = run_methods(s["methods"], s["model"], steps=s["steps"], timeout_s=s["timeout_s"],
                      max_workers=s["workers"], progress=ctx.progress, cancelled=ctx.interrupted,
                      keep_dir=s["keep_dir"])
    workers = worker_verdict(run)
    return run.verdicts + ([workers] if workers else [])


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
