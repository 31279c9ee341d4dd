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

  mutations, each made to break one assertion of checks.finetune.run (tests/test_finetune.py MUTATIONS):
    ``tiny_lr``          the method trains at learning rate 1e-7 (loss_decreased: the loss barely moves)
    ``frozen_adapter``   every parameter is frozen once the adapter is applied (trainable_params)
    ``unfreeze_base``    one base weight is left trainable (adapter_only_grads)
    ``touch_base``       a frozen base weight is nudged after every optimizer step (adapter_only_grads)
    ``nan_loss``         the training loss is NaN (train)
    ``no_allocate``      AdaLoRA's update_and_allocate is never called (adalora_schedule)
    ``base_in_adapter``  a base weight file is written beside the adapter (save_adapter_only)
    ``no_disable``       disable_adapter() does nothing (disabled_equals_base)
    ``no_generate``      generate() returns the prompt without a new token (generate)
    ``generate_base``    generate() runs with the adapter disabled: the base model's text (generate)
    ``bad_merge``        merge_and_unload's weights are perturbed (merge_logits)

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

    gen = torch.Generator().manual_seed(1)
    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # whichever the installed PEFT wrote
        path = os.path.join(adapter_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file, save_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        noisy = {k: torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v
                 for k, v in tensors.items()}
        if name.endswith(".safetensors"):
            save_file(noisy, path, metadata={"format": "pt"})
        else:
            torch.save(noisy, path)


def _first_base(model):
    """(name, parameter) of the first base weight of a PEFT model (not an adapter's)."""
    for name, p in model.named_parameters():
        if "default" not in name.split(".") and p.dim() == 2:
            return name, p
    raise RuntimeError("no base weight found")


def _faults() -> set[str]:
    return FAULTS.get(_current["method"], set())


def patch_run(module) -> None:
    import contextlib

    real = {name: getattr(module, name) for name in ("run_method", "_check_reload", "_apply", "_training_loss",
                                                     "_optimizer_step", "_allocate", "_save", "_disabled", "_merge",
                                                     "_generate")}

    def run_method(plan, env, steps, lr=None, on_step=None, keep_dir=None):
        faults = FAULTS.get(plan.name, set())
        _current["method"] = plan.name
        if "hang" in faults:
            _hang()
        if "crash" in faults:
            os.abort()
        if "raise" in faults:
            raise RuntimeError("injected failure (test fault)")
        if "zero_lr" in faults:
            lr = 0.0
        elif "tiny_lr" in faults:
            lr = 1e-7
        return real["run_method"](plan, env, steps, lr, on_step, keep_dir=keep_dir)

    def check_reload(adapter_dir, *args, **kwargs):
        if "corrupt_adapter" in _faults():
            _corrupt(adapter_dir)
        return real["_check_reload"](adapter_dir, *args, **kwargs)

    def apply(plan, base):
        model, pairs = real["_apply"](plan, base)
        if "frozen_adapter" in _faults():
            for p in model.parameters():
                p.requires_grad_(False)
        if "unfreeze_base" in _faults():
            _first_base(model)[1].requires_grad_(True)
        return model, pairs

    def training_loss(model, batch):
        loss = real["_training_loss"](model, batch)
        return loss * float("nan") if "nan_loss" in _faults() else loss

    def optimizer_step(optimizer, scaler):
        real["_optimizer_step"](optimizer, scaler)
        if "touch_base" in _faults():
            import torch

            with torch.no_grad():
                _first_base(_current["model"])[1].add_(1e-3)

    def allocate(model, step):
        if "no_allocate" not in _faults():
            real["_allocate"](model, step)

    def save(model, adapter_dir):
        real["_save"](model, adapter_dir)
        if "base_in_adapter" in _faults():
            from safetensors.torch import save_file

            name, weight = _first_base(model)
            save_file({name: weight.detach().cpu().contiguous()}, os.path.join(adapter_dir, "model.safetensors"))

    def disabled(model):
        return contextlib.nullcontext() if "no_disable" in _faults() else real["_disabled"](model)

    def merge(model):
        merged = real["_merge"](model)
        if "bad_merge" in _faults():
            import torch

            gen = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for p in merged.parameters():
                    if p.dim() == 2:
                        p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        return merged

    def generate(model, **kwargs):
        if "no_generate" in _faults():
            return kwargs["input_ids"]
        if "generate_base" in _faults():
            with real["_disabled"](model):
                return real["_generate"](model, **kwargs)
        return real["_generate"](model, **kwargs)

    def remember(fn):
        def wrapper(model, *args, **kwargs):
            _current["model"] = model
            return fn(model, *args, **kwargs)
        return wrapper

    module.run_method, module._check_reload, module._apply = run_method, check_reload, apply
    module._training_loss, module._optimizer_step = remember(training_loss), optimizer_step
    module._allocate, module._save, module._disabled, module._merge = allocate, save, disabled, merge
    module._generate = generate


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
