"""``invoke finetune``: the smoke fine-tune on its own, with the same reports as ``invoke verify``.

``--distributed`` runs the DDP LoRA fine-tune across the local GPUs instead (check
``finetune.distributed``), ``--deepspeed`` the DeepSpeed ZeRO stage 2 one (``finetune.deepspeed``);
both together run both. ``--nproc N`` sets their rank count; on a node without CUDA it runs them on
the CPU over gloo.

Exit codes as verify: 0 every method passed or was skipped with a reason, 1 a method failed or
errored (or the model is missing), 2 bad usage (unknown method, bad model spec, bad number): one line
on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone

from checks.finetune import missing_model_verdict, missing_packages, preflight, verdict_of, worker_verdict
from checks.finetune.distributed import DEFAULT_STEPS as DIST_STEPS
from checks.finetune.distributed import DEFAULT_TIMEOUT_S as DIST_TIMEOUT_S
from checks.finetune.distributed import NPROC_ENV, SettingsError, ddp_verdicts, requested_nproc, zero_verdicts
from checks.finetune.methods import SEED_METHODS, VARIANTS, MethodError, available_names, expand
from checks.finetune.model import ModelSpecError, parse_model_spec
from checks.finetune.pool import DEFAULT_STEPS, DEFAULT_TIMEOUT_S, run_methods
from checks.registry import UsageError
from checks.result import Result
from checks.stack import DEFAULT_MANIFEST, DEFAULT_STACK, load_manifest, load_stack

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
PROG = "peftnode finetune"
CHECK_NAME, GROUP = "finetune.methods", "finetune"
DDP_CHECK, ZERO_CHECK = "finetune.distributed", "finetune.deepspeed"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Smoke fine-tune the stack's model with each PEFT method and check it.")
    p.add_argument("--model", metavar="SPEC",
                   help="tiny (random 2-layer Bloom, seconds), random:bloomz-560m (exact shape, random weights) or "
                        "a model directory; default: the stack's model.path")
    p.add_argument("--methods", action="append", metavar="NAMES",
                   help="comma-separated methods, or 'all' (the defaults plus every other method the installed PEFT "
                        "has); default: the stack's finetune.methods")
    p.add_argument("--steps", metavar="N", help=f"training steps per method (default {DEFAULT_STEPS}; "
                                                f"{DIST_STEPS} with --distributed / --deepspeed)")
    p.add_argument("--timeout", metavar="SECONDS", help=f"per-method timeout (default {DEFAULT_TIMEOUT_S:g}); with "
                                                        f"--distributed / --deepspeed, the whole torchrun run's "
                                                        f"(default {DIST_TIMEOUT_S:g})")
    p.add_argument("--distributed", action="store_true",
                   help="instead of the methods: LoRA with DDP across all local GPUs via torchrun (NCCL), checking "
                        "that every rank finishes, the loss falls and the adapters are identical on every rank")
    p.add_argument("--deepspeed", action="store_true",
                   help="instead of the methods: LoRA steps under DeepSpeed ZeRO stage 2 on one GPU (skipped when "
                        "DeepSpeed is not installed)")
    p.add_argument("--nproc", metavar="N", help=f"ranks for --distributed (default: one per CUDA device) or "
                                                f"--deepspeed (default 1); without CUDA, N ranks on the CPU over "
                                                f"gloo (also {NPROC_ENV})")
    p.add_argument("--workers", metavar="N", help="at most this many worker processes (default: one per GPU, one "
                                                  "on a CPU-only node)")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch the model from the hub when its directory is missing (never done otherwise)")
    p.add_argument("--stack", metavar="NAME|FILE", help=f"stack for the defaults (default: the node manifest "
                                                        f"{DEFAULT_MANIFEST} if present, else {DEFAULT_STACK})")
    p.add_argument("--json", metavar="FILE", help="write the JSON report (schema peftnode.verify.report/1) here")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    p.add_argument("--prom", metavar="FILE", help="write a Prometheus textfile-collector file here")
    p.add_argument("--list", action="store_true", help="list the method names this PEFT offers, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress line per method")
    return p


def _positive(flag: str, text: str | None, kind=float, maximum: float = math.inf):
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= maximum):
        what = "whole number" if kind is int else "number"
        raise UsageError(f"{flag}: {text!r} is not a positive {what}" + (f" up to {maximum:g}" if maximum < math.inf
                                                                         else ""))
    return value


def _stack(arg: str | None):
    if arg:
        return load_stack(arg), False
    if DEFAULT_MANIFEST.is_file():
        return load_manifest(DEFAULT_MANIFEST), True
    return load_stack(DEFAULT_STACK), False


def _list_methods(defaults) -> None:
    for name in available_names():
        kind = ("default" if name in defaults else "seed" if name in SEED_METHODS
                else "variant" if name in VARIANTS else "extra")
        print(f"{name:26s} {kind}")


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    missing = missing_packages()
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed in this environment ({sys.executable}); "
                         "run from the stack's virtualenv or pip install 'peftnode[verify]'")
    distributed = args.distributed or args.deepspeed
    if distributed:
        for flag in ("methods", "workers", "list"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} does not apply to --distributed / --deepspeed (they fine-tune LoRA)")
    elif args.nproc is not None:
        raise UsageError("--nproc applies to --distributed / --deepspeed only")
    steps = _positive("--steps", args.steps, int, 100_000) or (DIST_STEPS if distributed else DEFAULT_STEPS)
    timeout = _positive("--timeout", args.timeout) or (DIST_TIMEOUT_S if distributed else DEFAULT_TIMEOUT_S)
    workers = _positive("--workers", args.workers, int, 64)
    nproc = _nproc(args) if distributed else None
    from checks.cli import check_writable

    for flag in ("json", "junit", "prom"):
        check_writable(f"--{flag}", getattr(args, flag))
    stack, from_manifest = _stack(args.stack)
    defaults = tuple(stack.data.get("finetune", {}).get("methods") or SEED_METHODS)
    if args.list:
        _list_methods(defaults)
        return EXIT_HEALTHY
    try:
        spec = parse_model_spec(args.model, stack.data.get("model"), allow_download=args.allow_download)
        names = [] if distributed else expand(args.methods, defaults)
    except (ModelSpecError, MethodError) as exc:
        raise UsageError(str(exc)) from None

    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    if distributed:
        gpus = int(stack.expectations().get("gpus", 0))
        results = _run_distributed(args, gpus, spec, steps, timeout, nproc)
    elif spec.missing():
        results = [Result.from_verdict(CHECK_NAME, GROUP, missing_model_verdict(spec), 0.0)]
    else:
        done = {"n": 0}

        def progress(result: dict) -> None:
            done["n"] += 1
            if not args.no_progress:
                wall = (result.get("metrics") or {}).get("wall_s", 0.0)
                print(f"[{done['n']}/{len(names)}] {result['method']}: {result['status']} ({wall:.2f} s)",
                      file=sys.stderr, flush=True)

        pool_run = run_methods(names, spec, steps=steps, timeout_s=timeout, max_workers=workers, progress=progress)
        hint = f"invoke finetune --model {spec.name}"
        results = [Result.from_verdict(CHECK_NAME, GROUP, verdict_of(r, hint), r.get("metrics", {}).get("wall_s", 0))
                   for r in pool_run.results]
        workers_line = worker_verdict(pool_run)
        if workers_line:
            results.append(Result.from_verdict(CHECK_NAME, GROUP, workers_line, pool_run.wall_s))
    finished = datetime.now(timezone.utc)

    from checks.cli import write_reports
    from checks.report import Report
    from checks.system import host_facts

    report = Report(
        results=results, host=host_facts(),
        stack={"name": stack.name, "source": stack.source, "description": stack.data["description"],
               "from_manifest": from_manifest},
        started_at=started, finished_at=finished, title=PROG,
        options={"model": spec.name, "methods": names, "steps": steps, "timeout_s": timeout, "workers": workers,
                 "distributed": args.distributed, "deepspeed": args.deepspeed, "nproc": nproc,
                 "allow_download": args.allow_download, "wall_s": round(time.monotonic() - t0, 3)},
    )
    write_reports(report, argparse.Namespace(json=args.json, junit=args.junit, prom=args.prom))
    return report.exit_code


def _nproc(args) -> int | None:
    minimum = 2 if args.distributed else 1
    try:
        if args.nproc is not None:
            return requested_nproc({"nproc": args.nproc}, minimum)
        return requested_nproc({}, minimum)
    except SettingsError as exc:
        flag = "--nproc" if args.nproc is not None else NPROC_ENV
        raise UsageError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None


def _run_distributed(args, gpus: int, spec, steps: int, timeout: float, nproc: int | None) -> list[Result]:
    """The --distributed / --deepspeed checks, in that order, as report lines."""
    results: list[Result] = []
    runs = ((args.distributed, DDP_CHECK, ddp_verdicts), (args.deepspeed, ZERO_CHECK, zero_verdicts))
    for wanted, name, body in runs:
        if not wanted:
            continue
        t0 = time.monotonic()
        if not args.no_progress:
            print(f"{name}: running ({spec.name}, {steps} steps) ...", file=sys.stderr, flush=True)
        try:
            verdicts = body(gpus, spec, steps=steps, timeout_s=timeout, nproc=nproc, preflight=preflight)
        except SettingsError as exc:
            raise UsageError(str(exc)) from None
        wall = time.monotonic() - t0
        for v in verdicts:
            results.append(Result.from_verdict(name, GROUP, v, wall))
            if not args.no_progress:
                print(f"  {v.subject or name}: {v.status.label} ({wall:.2f} s)", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    from checks.cli import guarded

    return guarded(run, argv, PROG)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
