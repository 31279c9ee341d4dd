"""``invoke verify`` / ``peftnode-verify``: parse flags, pick checks, run them, render, exit.

Exit codes: 0 healthy (warnings allowed), 1 any check failed or errored, 2 bad usage or
configuration (one line on stderr naming what is wrong and what is accepted; never a traceback).
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from checks.registry import DEFAULT_TIMEOUT_S, Context, UsageError, all_checks, select
from checks.report import Report
from checks.result import Result, worst
from checks.runner import DEFAULT_JOBS, run_checks
from checks.stack import DEFAULT_MANIFEST, DEFAULT_STACK, Stack, StackError, load_manifest, load_stack

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
PROG = "peftnode verify"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message otherwise)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Prove that this node is ready for PEFT fine-tuning.")
    p.add_argument("--stack", metavar="NAME|FILE",
                   help=f"stack to verify against (name in stacks/ or a file); default: the node manifest "
                        f"{DEFAULT_MANIFEST} if present, else {DEFAULT_STACK}")
    p.add_argument("--manifest", metavar="FILE", help="node manifest written by provisioning")
    p.add_argument("--gpus", metavar="N", help="override how many GPUs this node must have (0: none)")
    p.add_argument("--expect", action="append", metavar="KEY=VALUE",
                   help="override a node expectation, e.g. cuda_home=/opt/cuda or gpu_model=H100 (repeatable; "
                        "keys as in a stack's node: section)")
    p.add_argument("--model", metavar="SPEC",
                   help="model for the finetune group: a directory, tiny, or random:bloomz-560m "
                        "(default: the stack's model.path)")
    p.add_argument("--only", action="append", metavar="GROUPS|CHECKS", help="run only these (comma-separated)")
    p.add_argument("--skip", action="append", metavar="GROUPS|CHECKS", help="leave these out (comma-separated)")
    p.add_argument("--quick", action="store_true",
                   help="health and version checks only: no fine-tune, no long benchmarks")
    p.add_argument("--json", metavar="FILE", help="write the JSON report here")
    p.add_argument("--junit", metavar="FILE", help="write a JUnit XML report here")
    p.add_argument("--prom", metavar="FILE", help="write a Prometheus textfile-collector file here")
    p.add_argument("--timeout", metavar="SECONDS",
                   help=f"per-check timeout for isolated checks, overriding each check's own (default: the check's "
                        f"own, else {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--jobs", metavar="N",
                   help=f"checks run at once (default {DEFAULT_JOBS}; benchmarks and the fine-tune never overlap)")
    p.add_argument("--list", action="store_true", help="list the checks and groups, then exit")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    return p


def parse_timeout(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--timeout: {text!r} is not a positive number of seconds (e.g. 30 or 2.5)")
    return value


def parse_gpus(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) > 64:
        raise UsageError(f"--gpus: {text!r} is not a whole number from 0 to 64")
    return int(text)


def parse_jobs(text: str | None) -> int:
    if text is None:
        return DEFAULT_JOBS
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise UsageError(f"--jobs: {text!r} is not a whole number from 1 to 64")
    return int(text)


def parse_expect(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs (YAML-typed values) validated like a manifest's node: section."""
    import yaml

    from checks.stack import NODE_FIELDS, NODE_OVERRIDES

    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or key not in NODE_FIELDS:
            raise UsageError(f"--expect: {item!r} is not KEY=VALUE with KEY one of {', '.join(NODE_FIELDS)}")
        try:
            out[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise UsageError(f"--expect: cannot read the value of {item!r}") from None
    problems: list[str] = []
    NODE_OVERRIDES(out, "", problems)
    if problems:
        raise UsageError(f"--expect: {'; '.join(problems)}")
    return out


def check_writable(flag: str, path: str | None) -> None:
    """Refuse an unwritable report path before any check runs, not after a ten-minute run."""
    if not path:
        return
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file path")
    if not parent.is_dir():
        raise UsageError(f"{flag}: cannot write {path}: directory {parent} does not exist")
    existed = target.exists()
    try:  # a real open: permission bits alone mislead root, read-only mounts and pseudo file systems
        with open(target, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        target.unlink()


def resolve(args) -> tuple[Stack, bool]:
    """The stack to verify against and whether it came from a node manifest."""
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
    """Live progress: a rich bar on a terminal, one plain line per check elsewhere (CI logs)."""
    state = {"done": 0, "progress": None, "task": None}
    interactive = enabled and sys.stderr.isatty()

    def hook(spec, results: list[Result] | None):
        if results is None:
            if interactive and state["progress"] is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    SpinnerColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )

                state["progress"] = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                             MofNCompleteColumn(), TimeElapsedColumn(),
                                             console=Console(stderr=True), transient=True)
                state["progress"].start()
                state["task"] = state["progress"].add_task("", total=total)
            if state["progress"] is not None:
                state["progress"].update(state["task"], description=f"{spec.name} ({spec.title})")
            return
        state["done"] += 1
        status = worst(r.status for r in results)
        if state["progress"] is not None:
            state["progress"].advance(state["task"])
            if state["done"] == total:
                state["progress"].stop()
        elif enabled:
            print(f"[{state['done']}/{total}] {spec.name}: {status.label} ({results[-1].duration_s:.2f} s)",
                  file=sys.stderr, flush=True)

    def close():
        if state["progress"] is not None:
            state["progress"].stop()

    return hook, close


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


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    timeout = parse_timeout(args.timeout)
    gpus = parse_gpus(args.gpus)
    jobs = parse_jobs(args.jobs)
    expect = parse_expect(args.expect)
    specs = all_checks()
    if args.list:
        list_checks(specs)
        return EXIT_HEALTHY
    chosen = select(specs, args.only, args.skip)
    if not chosen:
        raise UsageError("--only/--skip leave no check to run")
    for flag in ("json", "junit", "prom"):
        check_writable(f"--{flag}", getattr(args, flag))
    stack, from_manifest = resolve(args)
    node = stack.expect({**expect, **({"gpus": gpus} if gpus is not None else {})})
    ctx = Context(stack.data, node, quick=args.quick, options={"model": args.model} if args.model else {})

    started = datetime.now(timezone.utc)
    hook, close = _progress_hook(len(chosen), not args.no_progress)
    try:
        results = run_checks(chosen, ctx, timeout_s=timeout, progress=hook, jobs=jobs)
    finally:
        close()
    finished = datetime.now(timezone.utc)

    from checks.system import host_facts

    report = Report(
        results=results,
        host=host_facts(),
        stack={"name": stack.name, "source": stack.source, "description": stack.data["description"],
               "from_manifest": from_manifest},
        started_at=started,
        finished_at=finished,
        options={"model": args.model, "only": args.only or [], "skip": args.skip or [], "quick": args.quick,
                 "timeout_s": timeout, "gpus": node.gpus},
    )
    write_reports(report, args)
    return report.exit_code


def write_reports(report: Report, args) -> None:
    from rich.console import Console

    from checks.report.console import render_console
    from checks.report.jsonreport import write_json
    from checks.report.junit import write_junit
    from checks.report.markdown import append_step_summary
    from checks.report.prom import write_prom

    # A terminal sets its own width; a log file or pipe gets a wide table instead of rich's 80 columns.
    render_console(report, Console() if sys.stdout.isatty() else Console(width=160))
    writers = {"json": write_json, "junit": write_junit, "prom": write_prom}
    for flag, writer in writers.items():
        path = getattr(args, flag)
        if path:
            try:
                writer(report, path)
            except OSError as exc:
                raise UsageError(f"--{flag}: cannot write {path}: {exc.strerror or exc}") from None
    append_step_summary(report)


def guarded(run_fn, argv: list[str] | None, prog: str) -> int:
    """Run a CLI body: usage and configuration errors become one line on stderr and exit 2."""
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



if __name__ == "__main__":
    console_main()
