"""Test-only faults for the fine-tune's worker processes and torchrun ranks, injected from outside.

A test puts this directory on ``sys.path`` (``monkeypatch.syspath_prepend``) and sets
``PEFTNODE_TEST_FAULTS``; :func:`checks.proc.child_env` hands ``sys.path`` to every child as its
``PYTHONPATH``, and Python imports ``sitecustomize`` at start-up, so each child the test starts patches
the real functions when their modules are imported. Production code carries no hook. Without the
variable this module does nothing.

``PEFTNODE_TEST_FAULTS`` is a comma-separated list of ``TARGET:FAULT``:

methods (``checks.finetune.run``, in the pool's workers), TARGET a method name:
    ``hang``             run_method sleeps forever (the pool's timeout must kill the worker)
    ``crash``            run_method aborts the worker (SIGABRT)
    ``raise``            run_method raises (the worker survives and reports an error)
    ``zero_lr``          the method trains at learning rate 0 (its loss cannot fall)
    ``corrupt_adapter``  the saved adapter's tensors are overwritten with noise before the reload check

torchrun ranks (``checks.finetune.ranks``), TARGET ``rank<N>``:
    ``hang``             the rank sleeps forever once it joined the process group (the others wait in DDP)
    ``crash``            the rank aborts as it starts its second training step (after recording that stage)
    ``diverge``          the rank's first adapter tensor is moved by 1e-3 before the adapters are compared, as a
                         broken all-reduce would leave it

pair all-reduce ranks (``checks.nccl.pairs``, under torchrun on two "nodes"), TARGET ``pairs.rank<N>``:
    ``corrupt``          the rank contributes rank+2 instead of rank+1 to the checked all-reduce (a wrong sum)
    ``absent``           the rank exits (status 1) before it announces itself: a node whose worker never joins
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV = "PEFTNODE_TEST_FAULTS"
DIVERGE_BY = 1e-3


def parse(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in text.split(","):
        target, _, fault = item.strip().partition(":")
        if target and fault:
            out.setdefault(target.strip(), set()).add(fault.strip())
    return out


FAULTS = parse(os.environ.get(ENV, ""))
_current = {"method": None}


def _hang() -> None:
    while True:
        time.sleep(3600)


def _corrupt(adapter_dir: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})


def patch_run(module) -> None:
    real_run_method, real_check_reload = module.run_method, module._check_reload

    def run_method(plan, env, steps, lr=None, on_step=None):
        faults = FAULTS.get(plan.name, set())
        _current["method"] = plan.name
        if "hang" in faults:
            _hang()
        if "crash" in faults:
            os.abort()
        if "raise" in faults:
            raise RuntimeError("injected failure (test fault)")
        return real_run_method(plan, env, steps, 0.0 if "zero_lr" in faults else lr, on_step)

    def check_reload(adapter_dir, *args, **kwargs):
        if "corrupt_adapter" in FAULTS.get(_current["method"], set()):
            _corrupt(adapter_dir)
        return real_check_reload(adapter_dir, *args, **kwargs)

    module.run_method, module._check_reload = run_method, check_reload


def patch_ranks(module) -> None:
    faults = FAULTS.get(f"rank{os.environ.get('RANK', '')}", set())
    if not faults:
        return
    real_load_lora, real_digest, real_stage = module.load_lora, module.digest, module.Status.stage

    def load_lora(*args, **kwargs):  # the first thing a rank does after joining the process group
        if "hang" in faults:
            _hang()
        return real_load_lora(*args, **kwargs)

    def stage(self, name, **fields):
        real_stage(self, name, **fields)
        if "crash" in faults and name.startswith("train step 2/"):
            os.abort()

    def digest(tensors):
        if "diverge" in faults:
            import torch

            with torch.no_grad():
                next(iter(tensors.values())).add_(DIVERGE_BY)
        return real_digest(tensors)

    module.load_lora, module.digest, module.Status.stage = load_lora, digest, stage


# --- checks.nccl.pairs (separate from the fine-tune's targets above) ---


def patch_pairs(module) -> None:
    faults = FAULTS.get(f"pairs.rank{os.environ.get('RANK', '')}", set())
    if not faults:
        return
    real_fill, real_measure = module.fill_contribution, module.measure

    def fill_contribution(buf, rank):
        real_fill(buf, rank)
        if "corrupt" in faults:
            buf.add_(1.0)

    def measure(args, env):
        if "absent" in faults:
            os._exit(1)
        return real_measure(args, env)

    module.fill_contribution, module.measure = fill_contribution, measure


PATCHES = {"checks.finetune.run": patch_run, "checks.finetune.ranks": patch_ranks, "checks.nccl.pairs": patch_pairs}


if FAULTS:
    _root = str(Path(__file__).resolve().parents[3])
    if _root not in sys.path:  # for tests.helpers.patch_on_import (appended: the child's own path wins)
        sys.path.append(_root)
    from tests.helpers.patch_on_import import install

    install(PATCHES)
