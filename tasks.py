"""peftnode's menu: `invoke --list`. Each task is thin: it parses flags and calls into `checks`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from invoke import Exit, task

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # tools of the environment invoke runs in (the venv)


def _flag(argv: list[str], name: str, value) -> None:
    if value is True:
        argv.append(f"--{name}")
    elif value not in (None, False, ""):
        argv.extend([f"--{name}", str(value)])


@task(
    help={
        "stack": "stack name in stacks/ (cu117, cu124) or a stack file; default: the node manifest, else cu117",
        "manifest": "node manifest to read (default /etc/peftnode/manifest.yml when present)",
        "only": "comma-separated groups or checks to run, e.g. system,python or gpu.driver",
        "skip": "comma-separated groups or checks to leave out",
        "quick": "health and version checks only: no fine-tune, no long benchmarks",
        "json": "write the JSON report (schema peftnode.verify.report/1) to this file",
        "junit": "write a JUnit XML report to this file",
        "prom": "write a Prometheus textfile-collector file to this file",
        "timeout": "per-check timeout in seconds for isolated checks (overrides each check's own)",
        "model": "model for the finetune group: a directory, tiny, or random:bloomz-560m",
        "gpus": "override how many GPUs this node must have (0 = a node without GPUs)",
        "expect": "override node expectations: comma-separated KEY=VALUE, e.g. cuda_home=/opt/cuda,gpu_model=H100",
        "jobs": "checks run at once (default 6; benchmarks and the fine-tune never overlap)",
        "list": "list the checks and their groups, then exit",
        "no_progress": "no live progress display",
    }
)
def verify(c, stack=None, manifest=None, only=None, skip=None, quick=False, json=None, junit=None, prom=None,
           timeout=None, gpus=None, expect=None, model=None, jobs=None, list=False, no_progress=False):
    """Prove this node is ready for PEFT fine-tuning (exit 0 healthy, 1 unhealthy, 2 bad usage)."""
    from checks.cli import main

    argv: list[str] = []
    for name, value in (("stack", stack), ("manifest", manifest), ("only", only), ("skip", skip),
                        ("quick", quick), ("json", json), ("junit", junit), ("prom", prom),
                        ("timeout", timeout), ("gpus", gpus), ("model", model), ("jobs", jobs), ("list", list),
                        ("no-progress", no_progress)):
        _flag(argv, name, value)
    for item in (expect or "").split(","):
        _flag(argv, "expect", item.strip())
    code = main(argv)
    if code:
        raise Exit(code=code)


@task(
    help={
        "model": "tiny, random:bloomz-560m, or a model directory (default: the stack's model.path)",
        "methods": "comma-separated PEFT methods, or 'all' (default: the stack's finetune.methods)",
        "steps": "training steps per method (default 30; 10 with --distributed / --deepspeed)",
        "timeout": "per-method timeout in seconds (default 600); with --distributed / --deepspeed the whole "
                   "torchrun run's",
        "workers": "at most this many worker processes (default: one per GPU; without GPUs two for the tiny model, "
                   "else one)",
        "distributed": "instead of the methods: LoRA with DDP across all local GPUs via torchrun (NCCL); checks that "
                       "every rank finishes, the loss falls and the adapters are identical on every rank",
        "deepspeed": "instead of the methods: LoRA steps under DeepSpeed ZeRO stage 2 on one GPU",
        "nproc": "ranks for --distributed / --deepspeed (default: one per GPU / 1); without CUDA, N ranks on the "
                 "CPU over gloo",
        "allow_download": "fetch the model from the hub when its directory is missing",
        "stack": "stack name in stacks/ or a stack file (default: the node manifest, else cu117)",
        "manifest": "node manifest to read (default /etc/peftnode/manifest.yml when present)",
        "gpus": "override how many GPUs this node must have (0 = a node without GPUs)",
        "expect": "override node expectations: comma-separated KEY=VALUE, e.g. gpus=2,gpu_model=H100",
        "jobs": "checks run at once (the fine-tune checks never overlap)",
        "json": "write the JSON report (schema peftnode.verify.report/1) to this file",
        "junit": "write a JUnit XML report to this file",
        "prom": "write a Prometheus textfile-collector file to this file",
        "list_methods": "list the method names, then exit",
        "list": "the same as --list-methods",
        "no_progress": "no progress display, no line per method",
    }
)
def finetune(c, model=None, methods=None, steps=None, timeout=None, workers=None, distributed=False, deepspeed=False,
             nproc=None, allow_download=False, stack=None, manifest=None, gpus=None, expect=None, jobs=None, json=None,
             junit=None, prom=None, list_methods=False, list=False, no_progress=False):
    """Smoke fine-tune the model with each PEFT method and check it: verify's finetune group with its own flags
    (exit 0 pass, 1 fail, 2 bad usage)."""
    from checks.cli import finetune_main

    argv: list[str] = []
    for name, value in (("model", model), ("methods", methods), ("steps", steps), ("timeout", timeout),
                        ("workers", workers), ("distributed", distributed), ("deepspeed", deepspeed),
                        ("nproc", nproc), ("allow-download", allow_download), ("stack", stack),
                        ("manifest", manifest), ("gpus", gpus), ("jobs", jobs), ("json", json), ("junit", junit),
                        ("prom", prom), ("list-methods", list_methods or list), ("no-progress", no_progress)):
        _flag(argv, name, value)
    for item in (expect or "").split(","):
        _flag(argv, "expect", item.strip())
    code = finetune_main(argv)
    if code:
        raise Exit(code=code)


LINTERS = (
    ("ruff", [str(BIN / "ruff"), "check", "."]),
    ("yamllint", [str(BIN / "yamllint"), "-s", "."]),
    ("ansible-lint", [str(BIN / "ansible-lint"), "--offline"]),
    ("syntax-check", [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", "site.yml"]),
)


@task
def lint(c):
    """Lint everything: ruff, yamllint, ansible-lint, and ansible-playbook --syntax-check site.yml."""
    failed = []
    for name, argv in LINTERS:
        print(f"--- {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        result = c.run(shlex.join(argv), warn=True, pty=False, env={"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")})
        if not result.ok:
            failed.append(name)
    if failed:
        raise Exit(f"lint failed: {', '.join(failed)}", code=1)
    print("lint: all clean")


@task(help={"args": "extra pytest arguments, e.g. \"-k stack -x\"",
            "quick": "leave out the slow tiers (markers slow and converge): seconds instead of minutes"})
def test(c, args="", quick=False):
    """Run the test suite (tests needing a GPU are skipped with their reason on CPU)."""
    select = "-m 'not slow and not converge' " if quick else ""
    result = c.run(f"{shlex.quote(sys.executable)} -m pytest {select}{args}", warn=True, pty=False)
    if not result.ok:
        raise Exit(code=result.exited)
