"""``invoke verify`` / ``peftnode-verify`` and ``invoke finetune`` / ``peftnode-finetune``: parse flags, pick
checks, run them, render, exit. The fine-tune command is verify's ``finetune`` group with the fine-tune's
own flags (methods, steps, per-method timeout, workers, distributed runs) mapped into the checks' options;
both share the stack resolution, the runner, the reports and the exit codes.

Exit codes: 0 healthy (warnings allowed), 1 any check failed or errored, 2 bad usage or
configuration (one line on stderr naming what is wrong and what is accepted; never a traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import checks
from checks.registry import DEFAULT_TIMEOUT_S, Context, UsageError, all_checks, select
from checks.report import Report
from checks.result import Result, worst
from checks.runner import DEFAULT_JOBS, run_checks
from checks.stack import (
    DEFAULT_MANIFEST,
    DEFAULT_STACK,
    Stack,
    StackError,
    YamlRefused,
    load_manifest,
    load_stack,
    load_yaml_text,
    one_line,
    quote,
    shown,
)

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
PROG = "peftnode verify"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise UsageError(message)


def _common_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """The flags verify and finetune share: stack, node expectations, model, reports, concurrency, progress."""
    p.add_argument("--stack", metavar="NAME|FILE",
                   help=f"stack to verify against (name in stacks/ or a file); default: the node manifest "
                        f"{DEFAULT_MANIFEST} if present, else {DEFAULT_STACK}")
    p.add_argument("--manifest", metavar="FILE", help="node manifest written by provisioning")
    p.add_argument("--gpus", metavar="N", help="override how many GPUs this node must have (0: none)")
    p.add_argument("--expect", action="append", metavar="KEY=VALUE",
                   help="override a node expectation, e.g. cuda_home=/opt/cuda or gpu_model=H100 (repeatable; "
                        "keys as in a stack's node: section)")
    p.add_argument("--model", metavar="SPEC", help=model_help)
    p.add_argument("--json", metavar="FILE", help="write the JSON report here ('-': to standard output, and the "
                                                  "console report to standard error)")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    p.add_argument("--prom", metavar="FILE", help="write a Prometheus textfile-collector file here")
    p.add_argument("--jobs", metavar="N",
                   help=f"checks run at once (default {DEFAULT_JOBS}; benchmarks and the fine-tune never overlap)")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="list every result on the console (default: failures and warnings one line each, passes "
                        "and skips counted per group)")
    p.add_argument("--failed-only", action="store_true",
                   help="console: only the results that failed, errored or warned, and the summary")
    p.add_argument("--version", action="version", version=f"%(prog)s {checks.__version__}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Prove that this node is ready for PEFT fine-tuning.", allow_abbrev=False)
    _common_flags(p, "model for the finetune group: a directory, tiny, or random:bloomz-560m "
                     "(default: the stack's model.path)")
    p.add_argument("--only", action="append", metavar="GROUPS|CHECKS", help="run only these (comma-separated)")
    p.add_argument("--skip", action="append", metavar="GROUPS|CHECKS", help="leave these out (comma-separated)")
    p.add_argument("--quick", action="store_true",
                   help="health and version checks only: no fine-tune, no long benchmarks")
    p.add_argument("--dcgm-level", type=int, choices=(1, 2, 3, 4), metavar="1-4",
                   help="level of `dcgmi diag -r N` for gpu.dcgm_diag (default: 1 with --quick, 2 otherwise; 3 "
                        "(~15 min) and 4 (longer) are for a burn-in)")
    p.add_argument("--timeout", metavar="SECONDS",
                   help=f"per-check timeout for isolated checks, overriding each check's own (default: the check's "
                        f"own, else {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report here")
    p.add_argument("--list", action="store_true", help="list the checks and groups, then exit")
    return p


def parse_number(flag: str, text: str | None, accept, wanted: str) -> float | None:
    """``text`` as a finite float that ``accept`` takes, None when not given; else a UsageError saying what
    ``flag`` wants."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise UsageError(f"{flag}: {quote(text)} is not {wanted}")
    return value


def parse_timeout(text: str | None) -> float | None:
    return parse_number("--timeout", text, lambda v: v > 0, "a positive number of seconds (e.g. 30 or 2.5)")


_SMALL_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses


def parse_gpus(text: str | None) -> int | None:
    if text is None:
        return None
    if not _SMALL_WHOLE.fullmatch(text) or int(text) > 64:
        raise UsageError(f"--gpus: {quote(text)} is not a whole number from 0 to 64")
    return int(text)


def parse_jobs(text: str | None) -> int:
    if text is None:
        return DEFAULT_JOBS
    if not _SMALL_WHOLE.fullmatch(text) or not 1 <= int(text) <= 64:
        raise UsageError(f"--jobs: {quote(text)} is not a whole number from 1 to 64")
    return int(text)


_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,100}")


def parse_names(flag: str, values: list[str] | None, what: str = "check or group") -> list[str] | None:
    """The comma-separated names of ``--only``/``--skip``/``--methods`` (repeatable), or None when the flag is
    not given. A value that names nothing (``''``, ``,``) or has an empty name between commas is refused rather
    than read as "no filter"; so is a name that cannot be one (odd characters, over 100 characters)."""
    if values is None:
        return None
    names: list[str] = []
    for value in values:
        tokens = [tok.strip() for tok in value.split(",")]
        if not any(tokens):
            raise UsageError(f"{flag}: {quote(value)} names no {what}; give one or more, comma-separated")
        if not all(tokens):
            raise UsageError(f"{flag}: {quote(value)} has an empty name (a stray comma?)")
        for tok in tokens:
            if not _NAME.fullmatch(tok):
                raise UsageError(f"{flag}: {quote(tok)} is not a {what} name (letters, digits, . _ -)")
        names.extend(tokens)
    return names


def parse_expect(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs (YAML-typed values, read by the stack loader's YAML reader: alias bombs and
    malformed YAML refused) validated like a manifest's node: section."""
    from checks.stack import NODE_FIELDS, NODE_OVERRIDES

    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or key not in NODE_FIELDS:
            raise UsageError(f"--expect: {quote(item)} is not KEY=VALUE with KEY one of {', '.join(NODE_FIELDS)}")
        try:
            out[key] = load_yaml_text(text) if text else None
        except YamlRefused as exc:
            where = f" (line {exc.line}, column {exc.column})" if exc.line is not None else ""
            raise UsageError(f"--expect: {key}: cannot read {quote(text)}{where}: {exc.reason}") from None
    problems: list[str] = []
    NODE_OVERRIDES(out, "", problems)
    if problems:
        raise UsageError(f"--expect: {one_line(problems)}")
    return out


def check_writable(flag: str, path: str | None) -> None:
    """Refuse an unwritable report path before any check runs, not after a ten-minute run."""
    if path == "":
        raise UsageError(f"{flag}: empty; give a file path")
    if not path or (path == "-" and flag == "--json"):
        return
    if path == "-":  # standard output carries the console report, or --json's document
        raise UsageError(f"{flag}: '-' (standard output) is for --json only; give a file path")
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        if target.is_dir():
            raise UsageError(f"{flag}: {shown(path)} is a directory; give a file path")
        if not parent.is_dir():
            raise UsageError(f"{flag}: cannot write {shown(path)}: directory {shown(parent)} does not exist")
        existed = target.exists()
        # a real open: permission bits alone mislead root, read-only mounts and pseudo file systems
        with open(target, "a"):
            pass
    except OSError as exc:  # also a name too long, a path through a file
        raise UsageError(f"{flag}: cannot write {shown(path)}: {exc.strerror or type(exc).__name__}") from None
    if not existed:
        target.unlink()


def check_prom_owner(path: str | None, title: str) -> None:
    """verify and finetune write different metric families; neither overwrites a file the other wrote (two
    commands taking turns on one file would hide each other's state from node_exporter)."""
    if not path:
        return
    from checks.report.prom import check_prom_target

    try:
        check_prom_target(path, title)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def resolve(args) -> tuple[Stack, bool]:
    """The stack to verify against and whether it came from a node manifest."""
    if args.stack == "":
        raise UsageError("--stack: empty; give a stack name or a file")
    if args.manifest == "":
        raise UsageError("--manifest: empty; give a manifest file")
    if args.stack and args.manifest:
        raise UsageError("--stack and --manifest: give one of them")
    if args.stack:
        return load_stack(args.stack), False
    if args.manifest:
        return load_manifest(args.manifest), True
    if DEFAULT_MANIFEST.is_file():
        return load_manifest(DEFAULT_MANIFEST), True
    return load_stack(DEFAULT_STACK), False


def _progress_hook(total: int, enabled: bool):
    """The run's display on stderr (checks/report/live.py): live on a terminal, one line per finished check and
    per progress event elsewhere (CI logs), nothing with --no-progress. Its ``check`` and ``event`` methods are
    the runner's hooks; ``close`` ends it."""
    from checks.report.live import make_display

    return make_display(total, enabled)


def list_checks(specs) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="peftnode checks", show_lines=False)
    for col in ("group", "check", "what it proves", "runs"):
        table.add_column(col)
    for s in specs:
        how = (f"shared {s.worker} worker" if s.worker else "own worker process" if s.isolate else "in process")
        how += "".join([", skipped by --quick" if s.slow else "", ", exclusive" if s.exclusive else "",
                        f", needs {', '.join(s.needs)}" if s.needs else ""])
        table.add_row(s.group, s.name, s.title, how)
    Console().print(table)


def _clip(message: str, limit: int = 300) -> str:
    """A message built from printable text, cut to ``limit`` characters."""
    return message if len(message) <= limit else message[:limit - 3] + "..."


def parse_model(text: str | None, stack: Stack, allow_download: bool = False):
    """The model spec of ``--model`` (None: the stack's ``model.path``), checked before anything runs: tiny,
    random:<known shape>, or a model directory that holds a config.json; exit 2 otherwise.
    The stack's own ``model.path`` is never refused here: that it is missing is the node's state, which the
    fine-tune reports as a fail naming how to fetch it."""
    from checks.finetune.model import ModelSpecError, parse_model_spec

    if text is not None and (len(text) > 4096 or not text.isprintable()):
        raise UsageError(f"--model: {quote(text)} is not tiny, random:<name> or a model directory")
    stack_model = stack.data.get("model") or {}
    try:
        spec = parse_model_spec(text, stack_model, allow_download=allow_download)
        missing = spec.missing()
    except ModelSpecError as exc:
        raise UsageError(_clip(str(exc))) from None
    except OSError as exc:  # a name too long, a path through a file
        raise UsageError(f"--model: cannot use {quote(text)}: {exc.strerror or type(exc).__name__}") from None
    own = text is None or (stack_model.get("path") and Path(text.strip()) == Path(str(stack_model["path"])))
    if missing and not own:
        raise UsageError(f"--model: {_clip(missing)} (give tiny, random:bloomz-560m or a saved model "
                         f"directory)")
    return spec


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    timeout = parse_timeout(args.timeout)
    gpus = parse_gpus(args.gpus)
    jobs = parse_jobs(args.jobs)
    expect = parse_expect(args.expect)
    only, skip = parse_names("--only", args.only), parse_names("--skip", args.skip)
    specs = all_checks()
    if args.list:
        list_checks(specs)
        return EXIT_HEALTHY
    chosen = select(specs, only, skip)
    if not chosen:
        raise UsageError("--only/--skip leave no check to run")
    for flag in ("json", "junit", "prom", "html"):
        check_writable(f"--{flag}", getattr(args, flag))
    check_prom_owner(args.prom, PROG)
    stack, from_manifest = resolve(args)
    if args.model is not None:
        parse_model(args.model, stack)
    node = stack.expect({**expect, **({"gpus": gpus} if gpus is not None else {})})
    return execute(args, chosen, stack, from_manifest, node, title=PROG, quick=args.quick, timeout_s=timeout,
                   jobs=jobs, options={**({"model": args.model} if args.model else {}),
                                       **({"dcgm_level": args.dcgm_level} if args.dcgm_level else {})},
                   report_options={"model": args.model, "only": args.only or [], "skip": args.skip or [],
                                   "quick": args.quick, "timeout_s": timeout, "gpus": node.gpus, "expect": expect,
                                   "dcgm_level": args.dcgm_level})


def execute(args, chosen, stack: Stack, from_manifest: bool, node, *, title: str, options: dict,
            report_options: dict, quick: bool = False, timeout_s: float | None = None, jobs: int = DEFAULT_JOBS) -> int:
    """Run the chosen checks, render and write the reports; the exit code (0 healthy, 1 unhealthy, 130 when
    Ctrl-C interrupted the run: the reports then hold what finished and ``skip: interrupted`` for the rest)."""
    from checks.registry import INTERRUPTED
    from checks.runner import RunInterrupted

    ctx = Context(stack.data, node, quick=quick, options=options)
    started = datetime.now(timezone.utc)
    display = _progress_hook(len(chosen), not args.no_progress)
    interrupted = False
    try:
        results = run_checks(chosen, ctx, timeout_s=timeout_s, progress=display.check, events=display.event,
                             jobs=jobs)
    except RunInterrupted as stop:
        results, interrupted = stop.results, True
    finally:
        display.close()
    finished = datetime.now(timezone.utc)
    if interrupted:
        kept: list[Result] = [r for r in results if r.message != INTERRUPTED]
        so_far = f" (worst so far: {worst(r.status for r in kept).label})" if kept else ""
        print(f"{title}: interrupted: writing the reports with the {len(kept)} result(s) that finished{so_far}, "
              f"the rest skip 'interrupted' (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        report_options = {**report_options, "interrupted": True}

    from checks.system import host_facts

    report = Report(
        results=results,
        host=host_facts(),
        stack={"name": stack.name, "source": stack.source, "description": stack.data["description"],
               "from_manifest": from_manifest},
        started_at=started,
        finished_at=finished,
        options=report_options,
        title=title,
    )
    write_reports(report, args)
    return report.exit_code  # 130 when interrupted (128 + SIGINT, as a shell reports it)


def write_reports(report: Report, args) -> None:

    from checks.report.console import render_console
    from checks.report.jsonreport import dumps, write_json
    from checks.report.junit import write_junit
    from checks.report.markdown import append_step_summary
    from checks.report.prom import write_prom

    console = report_console(args)
    render_console(report, console, verbose=getattr(args, "verbose", False),
                   failed_only=getattr(args, "failed_only", False))
    write_outputs(args, report, dumps,
                  {"json": write_json, "junit": write_junit, "prom": write_prom, "html": _write_html})
    append_step_summary(report)


def report_console(args):
    """The rich console the report goes to: standard output, or standard error when `--json -` owns standard
    output. A terminal sets its own width; a log file or pipe gets a wide table instead of rich's 80 columns."""
    from rich.console import Console

    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    return Console(file=stream) if stream.isatty() else Console(file=stream, width=160)


def write_outputs(args, document, dumps, writers: dict) -> None:
    """`--json -`: ``dumps(document)`` on standard output; each other flag of ``writers`` given a path: its
    writer(document, path), a path that cannot be written being a usage error naming the flag."""
    json_to_stdout = getattr(args, "json", None) == "-"
    if json_to_stdout:
        sys.stdout.write(dumps(document))
        sys.stdout.flush()
    for flag, writer in writers.items():
        path = getattr(args, flag, None)
        if path and not (flag == "json" and json_to_stdout):
            try:
                writer(document, path)
            except OSError as exc:
                raise UsageError(f"--{flag}: cannot write {path}: {exc.strerror or exc}") from None


def _write_html(report: Report, path: str) -> None:
    from checks.report.html import write_html  # imported only when --html is given

    write_html(report, path)


def guarded(run_fn, argv: list[str] | None, prog: str) -> int:
    """Run a CLI body: usage and configuration errors become one line on stderr and exit 2; Ctrl-C exits 130
    (during a run, ``execute`` first writes the reports with what finished; outside one, or a second Ctrl-C
    while they are written, ends here)."""
    try:
        return run_fn(sys.argv[1:] if argv is None else argv)
    except (UsageError, StackError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return guarded(run, argv, PROG)


def console_main() -> None:
    sys.exit(main())


# --- invoke finetune / peftnode-finetune: verify's finetune group with the fine-tune's own flags ----------

FINETUNE_PROG = "peftnode finetune"
METHODS_CHECK, DDP_CHECK, ZERO_CHECK = "finetune.methods", "finetune.distributed", "finetune.deepspeed"


def build_finetune_parser() -> argparse.ArgumentParser:
    from checks.finetune.distributed import DEFAULT_STEPS as DIST_STEPS
    from checks.finetune.distributed import DEFAULT_TIMEOUT_S as DIST_TIMEOUT_S
    from checks.finetune.distributed import NPROC_ENV
    from checks.finetune.pool import DEFAULT_STEPS, DEFAULT_TIMEOUT_S

    p = _Parser(prog=FINETUNE_PROG, description="Smoke fine-tune the stack's model with each PEFT method and check "
                                                "it: verify's finetune group, with the fine-tune's own flags.",
                allow_abbrev=False)
    _common_flags(p, "tiny (random 1-layer Bloom, seconds), random:bloomz-560m (exact shape, random weights) or a "
                     "model directory; default: the stack's model.path")
    p.add_argument("--methods", action="append", metavar="NAMES",
                   help="comma-separated methods, or 'all' (the defaults plus every other method the installed PEFT "
                        "has); default: the stack's finetune.methods")
    p.add_argument("--steps", metavar="N", help=f"training steps per method (default {DEFAULT_STEPS}; on a node "
                                                f"without GPUs a bloomz-560m-sized model takes 6, AdaLoRA 8; "
                                                f"{DIST_STEPS} with --distributed / --deepspeed)")
    p.add_argument("--timeout", metavar="SECONDS", help=f"per-method timeout (default {DEFAULT_TIMEOUT_S:g}); with "
                                                        f"--distributed / --deepspeed, the whole torchrun run's "
                                                        f"(default {DIST_TIMEOUT_S:g})")
    p.add_argument("--workers", metavar="N", help="at most this many worker processes (default: one per GPU; on a "
                                                  "node without GPUs two for the tiny model, else one)")
    p.add_argument("--distributed", action="store_true",
                   help="instead of the methods: LoRA with DDP across all local GPUs via torchrun (NCCL), checking "
                        "that every rank finishes, the loss falls and the adapters are identical on every rank")
    p.add_argument("--deepspeed", action="store_true",
                   help="instead of the methods: LoRA steps under DeepSpeed ZeRO stage 2 on one GPU (skipped when "
                        "DeepSpeed is not installed)")
    p.add_argument("--nproc", metavar="N", help=f"ranks for --distributed (default: one per CUDA device) or "
                                                f"--deepspeed (default 1); without CUDA, N ranks on the CPU over "
                                                f"gloo (also {NPROC_ENV})")
    p.add_argument("--allow-download", action="store_true",
                   help="fetch the model from the hub when its directory is missing (never done otherwise)")
    p.add_argument("--keep", metavar="DIR",
                   help="keep each method's adapter (as PEFT saves it), the base of a tiny/random model, the "
                        "tokenizer, the reload check's batch and logits and a result.json under DIR/<method>/ "
                        "(default: the stack's finetune.keep_dir; else nothing is kept)")
    p.add_argument("--list-methods", "--list", dest="list_methods", action="store_true",
                   help="list the method names this PEFT offers, then exit")
    return p


def _positive(flag: str, text: str | None, kind=float, maximum: float = math.inf):
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= maximum):
        what = "whole number" if kind is int else "number"
        raise UsageError(f"{flag}: {text!r} is not a positive {what}"
                         + (f" up to {maximum:g}" if maximum < math.inf else ""))
    return value


def _finetune_nproc(args) -> int | None:
    from checks.finetune.distributed import NPROC_ENV, SettingsError, requested_nproc

    minimum = 2 if args.distributed else 1
    try:
        return requested_nproc({"nproc": args.nproc} if args.nproc is not None else {}, minimum)
    except SettingsError as exc:
        flag = "--nproc" if args.nproc is not None else NPROC_ENV
        raise UsageError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None


def _list_methods(defaults) -> None:
    from checks.finetune.methods import SEED_METHODS, VARIANTS, available_names

    for name in available_names():
        kind = ("default" if name in defaults else "seed" if name in SEED_METHODS
                else "variant" if name in VARIANTS else "extra")
        print(f"{name:26s} {kind}")


def run_finetune(argv: list[str]) -> int:
    """``invoke finetune``: every flag checked before anything runs, then the chosen finetune checks through
    the same runner, report and exit codes as verify."""
    from checks.finetune import CHECK_TIMEOUT_S, missing_packages
    from checks.finetune.distributed import DEFAULT_STEPS as DIST_STEPS
    from checks.finetune.distributed import DEFAULT_TIMEOUT_S as DIST_TIMEOUT_S
    from checks.finetune.methods import SEED_METHODS, MethodError, expand
    from checks.finetune.pool import DEFAULT_STEPS, DEFAULT_TIMEOUT_S

    args = build_finetune_parser().parse_args(argv)
    gpus = parse_gpus(args.gpus)
    jobs = parse_jobs(args.jobs)
    expect = parse_expect(args.expect)
    methods = parse_names("--methods", args.methods, "method")
    distributed = args.distributed or args.deepspeed
    if distributed:
        for flag in ("methods", "workers", "list_methods", "keep"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} does not apply to --distributed / --deepspeed "
                                 f"(they fine-tune LoRA)")
    elif args.nproc is not None:
        raise UsageError("--nproc applies to --distributed / --deepspeed only")
    steps = _positive("--steps", args.steps, int, 100_000)
    timeout = _positive("--timeout", args.timeout)
    workers = _positive("--workers", args.workers, int, 64)
    nproc = _finetune_nproc(args) if distributed else None
    missing = missing_packages()
    if missing:
        raise UsageError(f"{', '.join(missing)} not installed in this environment ({sys.executable}); "
                         "run from the stack's virtualenv or pip install 'peftnode[verify]'")
    for flag in ("json", "junit", "prom"):
        check_writable(f"--{flag}", getattr(args, flag))
    check_prom_owner(args.prom, FINETUNE_PROG)
    if args.keep is not None:
        check_keep_dir(args.keep)
    stack, from_manifest = resolve(args)
    defaults = tuple((stack.data.get("finetune") or {}).get("methods") or SEED_METHODS)
    if args.list_methods:
        _list_methods(defaults)
        return EXIT_HEALTHY
    # A missing model directory stays a fail naming how to fetch it here (tests/test_finetune_cli.py); verify
    # refuses one given by --model at the start.
    spec = parse_model(args.model, stack, allow_download=args.allow_download)
    try:
        names = [] if distributed else expand(methods, defaults)
    except MethodError as exc:  # names are bounded by parse_names; the message lists every known method
        raise UsageError(str(exc)) from None
    node = stack.expect({**expect, **({"gpus": gpus} if gpus is not None else {})})
    wanted = [name for flag, name in ((args.distributed, DDP_CHECK), (args.deepspeed, ZERO_CHECK)) if flag]
    chosen = select(all_checks(), wanted or [METHODS_CHECK])
    options = {"model": args.model, "methods": names, "steps": steps, "method_timeout": timeout,
               "workers": workers, "nproc": nproc, "allow_download": args.allow_download, "keep": args.keep}
    # The distributed checks run in a worker of their own: give it room for a torchrun deadline beyond its own.
    outer = max(CHECK_TIMEOUT_S, timeout + 300.0) if distributed and timeout else None
    if not distributed:
        from checks.finetune import budget

        device = budget.device_kind()
        line = budget.announcement(spec, names, steps, device, load=os.getloadavg()[0])
        if line:  # a full-size model on the CPU: what it will cost, before anything starts
            print(f"{FINETUNE_PROG}: {line}", file=sys.stderr, flush=True)
            options["announced"] = True
        if steps is None:  # each method's own default: recorded per method
            steps = {m: d.steps for m, d in budget.plan_defaults(spec, names, device).items()}
            steps = next(iter(set(steps.values()))) if len(set(steps.values())) == 1 else steps
    steps = steps or (DIST_STEPS if distributed else DEFAULT_STEPS)
    timeout = timeout or (DIST_TIMEOUT_S if distributed else DEFAULT_TIMEOUT_S)
    report_options = {"model": spec.name, "methods": names, "steps": steps, "timeout_s": timeout, "workers": workers,
                      "distributed": args.distributed, "deepspeed": args.deepspeed, "nproc": nproc, "gpus": node.gpus,
                      "allow_download": args.allow_download, "expect": expect,
                      "keep": args.keep or (stack.data.get("finetune") or {}).get("keep_dir")}
    return execute(args, chosen, stack, from_manifest, node, title=FINETUNE_PROG, options=options,
                   report_options=report_options, timeout_s=outer, jobs=jobs)


def check_keep_dir(path: str) -> None:
    """--keep DIR: a directory (made if missing) this user can write, checked before anything runs."""
    where = Path(path)
    if where.exists() and not where.is_dir():
        raise UsageError(f"--keep: {path} exists and is not a directory")
    probe = where
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--keep: cannot write in {probe}")


def finetune_main(argv: list[str] | None = None) -> int:
    return guarded(run_finetune, argv, FINETUNE_PROG)


def finetune_console_main() -> None:
    """The ``peftnode-finetune`` console script."""
    sys.exit(finetune_main())


# --- invoke fleet-report / peftnode-fleet-report: one view of a fleet's verify reports ------------------------

FLEET_PROG = "peftnode fleet-report"


def build_fleet_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=FLEET_PROG, allow_abbrev=False,
                description="Show a fleet's verify reports as one table: the worst status per node and group, the "
                            "failures grouped by cause, performance outliers against the fleet median, version "
                            "drift; optionally drain the failing nodes in Slurm.")
    p.add_argument("dir", metavar="DIR", nargs=None,
                   help="the run directory verify.yml wrote (reports/<run-id>: run.json, <host>.json, "
                        "<host>.noreport.json, pairs/)")
    p.add_argument("--json", metavar="FILE", help="write the fleet JSON here ('-': to standard output, and the "
                                                  "console report to standard error)")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML here: one testsuite per node, one testcase per "
                                                   "check")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML fleet report here")
    p.add_argument("--stack", metavar="NAME|FILE",
                   help="judge drift against this stack too (not only the fleet majority); its "
                        "node.perf.outlier_ratio applies (default: the run's stack from run.json, else 0.9)")
    p.add_argument("--outlier-ratio", metavar="X",
                   help="a figure below the fleet median (same GPU model) times X is an outlier (0 < X <= 1)")
    p.add_argument("--drain", action="store_true",
                   help="print `scontrol update NodeName=<n> State=DRAIN Reason=\"peftnode: <check>: <reason>\"` "
                        "for every failing node (nodes Slurm holds for someone else's reason are left alone)")
    p.add_argument("--resume", action="store_true",
                   help="print `scontrol update NodeName=<n> State=RESUME` for nodes that now pass and that Slurm "
                        "holds with a reason starting 'peftnode:' (no other node is touched)")
    p.add_argument("--apply", action="store_true", help="with --drain / --resume: run the scontrol commands")
    p.add_argument("--node-names", choices=("inventory", "hostname"), metavar="inventory|hostname",
                   help="Slurm node names: the inventory host name (default) or the hostname the node's report "
                        "records, each up to its first dot")
    p.add_argument("--version", action="version", version=f"%(prog)s {checks.__version__}")
    return p


def _outlier_ratio(text: str | None) -> float | None:
    return parse_number("--outlier-ratio", text, lambda v: 0 < v <= 1, "a number above 0 and at most 1 (e.g. 0.9)")


def _fleet_stack(args, run) -> Stack | None:
    """--stack, else the run's stack when run.json names one this checkout has (silently none otherwise)."""
    if args.stack == "":
        raise UsageError("--stack: empty; give a stack name or a file")
    if args.stack:
        return load_stack(args.stack)
    if run.stack:
        try:
            return load_stack(run.stack)
        except StackError:
            return None
    return None


def run_fleet(argv: list[str]) -> int:

    from checks.figures import thresholds
    from checks.fleet import build_fleet, load_run, slurm
    from checks.fleet.render import dumps_fleet, render_fleet_console, write_fleet_json, write_fleet_junit

    args = build_fleet_parser().parse_args(argv)
    ratio = _outlier_ratio(args.outlier_ratio)
    if args.apply and not (args.drain or args.resume):
        raise UsageError("--apply runs what --drain or --resume prints: give one of them")
    if args.apply and shutil.which("scontrol") is None:
        raise UsageError("--apply: scontrol not found on PATH (run on a Slurm controller or login node, or leave "
                         "out --apply to print the commands)")
    for flag in ("json", "junit", "html"):
        check_writable(f"--{flag}", getattr(args, flag))
    if args.dir == "":
        raise UsageError("DIR: empty; give the run directory")
    run = load_run(args.dir)
    stack = _fleet_stack(args, run)
    drift_stack = stack if args.stack else None  # drift against a stack only when asked for
    if ratio is None:
        ratio = thresholds(stack.expect().perf if stack is not None else None)[1]
    fleet = build_fleet(run, drift_stack, ratio)
    states = None
    if args.resume or args.apply:
        states = slurm.read_states()  # exit 2 when sinfo is missing: these need Slurm's view
    elif args.drain:
        try:
            states = slurm.read_states()
        except UsageError as exc:
            print(f"{FLEET_PROG}: warning: {exc}; listing every failing node", file=sys.stderr)

    console = report_console(args)
    stream = console.file
    render_fleet_console(fleet, console)

    def html(fl, path):
        from checks.report.html import write_fleet_html  # imported only when --html is given

        write_fleet_html(fl, run.reports, path)

    write_outputs(args, fleet, dumps_fleet, {
        "json": write_fleet_json, "junit": lambda fl, path: write_fleet_junit(fl, run.reports, path), "html": html})

    code = fleet["exit_code"]
    for wanted, planner, what in ((args.drain, slurm.plan_drain, "drain"), (args.resume, slurm.plan_resume, "resume")):
        if not wanted:
            continue
        plan = planner(fleet, states, args.node_names or "inventory")
        print(f"\n# {what}: {len(plan.commands)} node(s)" + (" (running them)" if args.apply else ""), file=stream)
        for note in plan.notes:
            print(f"# {note}", file=stream)
        for argv_ in plan.commands:
            print(slurm.shell_line(argv_), file=stream)
        if args.apply:
            failed = slurm.apply(plan.commands)
            for line in failed:
                print(f"{FLEET_PROG}: scontrol failed: {line}", file=sys.stderr)
            if failed:
                code = max(code, 1)
    return code


def fleet_main(argv: list[str] | None = None) -> int:
    return guarded(run_fleet, argv, FLEET_PROG)


def fleet_console_main() -> None:
    """The ``peftnode-fleet-report`` console script."""
    sys.exit(fleet_main())


if __name__ == "__main__":
    console_main()
