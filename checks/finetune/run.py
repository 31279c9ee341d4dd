"""Fine-tune one PEFT method briefly and check what PEFT promises about it.

:func:`run_method` returns a :class:`~checks.finetune.verdict.MethodRun` (its status a
:class:`~checks.result.Status`) with one named assertion per promise:

``trainable_params``        the adapter has trainable parameters
``adapter_only_grads``      only adapter parameters are trainable, some receive a non-zero gradient, and every
                            base tensor is bit-identical to the pristine base after training
``train``                   the training steps ran (no exception, finite loss)
``loss_decreased``          held-out loss after N steps is at least the plan's ``min_drop`` (relative) lower
``adalora_schedule``        (AdaLoRA) the rank budget moved: after training, the non-zero lora_E ranks are
                            within the budget update_and_allocate's schedule gives for the last step
``save_adapter_only``       save_pretrained wrote adapter_config.json and the adapter weights in the format
                            the installed PEFT writes (.safetensors, or .bin before peft 0.6), no base weights
``reload_logits``           the saved adapter loaded into a fresh base gives the same logits (allclose)
``disabled_equals_base``    with the adapter disabled the model gives the base model's logits
``generate``                generate() produces new tokens
``merge_logits``            merge_and_unload gives the adapter model's logits (methods that merge)
``merge_differs_from_base`` and those logits are not the base model's

An assertion is ``ok`` True, False, or None when it does not apply (with the reason in ``detail``).
An exception is charged to the assertion whose stage raised it (``apply`` and ``config`` name the two
stages before any assertion); the ones it prevented are listed under ``not_run``. The run's
``failed`` names every assertion that failed, and its ``message`` gives each one's detail.
Comparisons run in float32 in eval mode; training uses bf16 autocast on GPUs that support it, else
fp16 autocast with a GradScaler.
"""

from __future__ import annotations

import copy
import math
import os
import random
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from checks.finetune import data as D
from checks.finetune.methods import Plan
from checks.finetune.verdict import MethodRun
from checks.result import Status

TOLERANCE = 1e-4  # reload / disabled-adapter comparisons (atol = rtol), as PEFT's own tests use
BATCH_SIZE = 8  # the seed's
COMPARE_EXAMPLES = 4  # held-out examples whose logits are compared (small: vocabularies are large)
GENERATE_EXAMPLES = 2
MAX_NEW_TOKENS = 4
SEED = 0
NOT_RUN = "not run: "

ASSERTIONS = ("trainable_params", "adapter_only_grads", "train", "loss_decreased", "adalora_schedule",
              "save_adapter_only", "reload_logits", "disabled_equals_base", "generate", "merge_logits",
              "merge_differs_from_base")


@dataclass
class Env:
    """What every method of a worker shares: the pristine base model and the tokenised data."""

    base: torch.nn.Module
    tokenizer: object
    tokenizer_path: str
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype for training; None on CPU
    train: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]]
    compare: dict[str, torch.Tensor]  # a left-padded held-out batch whose logits are compared
    prompts: list[list[int]]  # unpadded held-out prompts for generate()
    base_logits: torch.Tensor  # the base model's logits on ``compare`` (non-pad positions)
    base_names: frozenset[str]
    base_params: int
    workdir: str
    info: dict = field(default_factory=dict)
    source: str | None = None  # the model directory it was loaded from; None for a built (tiny/random) model
    model_name: str | None = None  # the model spec's name (tiny, random:bloomz-560m, a path)
    base_digest: str | None = None  # sha256 of the built base's weights, once --keep needed it (keep.write_base)


def pick_device() -> tuple[torch.device, torch.dtype | None]:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda", torch.cuda.current_device()), dtype
    return torch.device("cpu"), None


def _tensors(batch: dict[str, list[list[int]]], device) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}


def prepare(model, tokenizer, tokenizer_path: str, workdir: str, device=None, amp_dtype=None) -> Env:
    """Move the base to the device, tokenise the bundled data, and record the base's reference logits."""
    if device is None:
        device, amp_dtype = pick_device()
    torch.backends.cuda.matmul.allow_tf32 = False  # comparisons at 1e-4 need true float32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_ex, held_ex = D.split(D.load_examples())
    random.Random(SEED).shuffle(train_ex)
    pad = tokenizer.pad_token_id
    train_rows, held_rows = D.encode(tokenizer, train_ex), D.encode(tokenizer, held_ex)
    compare = _tensors(D.collate(held_rows[:COMPARE_EXAMPLES], pad), device)
    env = Env(
        base=model, tokenizer=tokenizer, tokenizer_path=tokenizer_path, device=device, amp_dtype=amp_dtype,
        train=[_tensors(b, device) for b in D.batches(train_rows, BATCH_SIZE, pad)],
        held_out=[_tensors(b, device) for b in D.batches(held_rows, BATCH_SIZE, pad)],
        compare=compare,
        prompts=[r["prompt_ids"] for r in held_rows[:GENERATE_EXAMPLES]],
        base_logits=compare_logits(model, compare),
        base_names=frozenset(n for n, _ in model.named_parameters()) | frozenset(model.state_dict()),
        base_params=sum(p.numel() for p in model.parameters()),
        workdir=workdir,
    )
    env.info = {"device": str(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
                "train_examples": len(train_rows), "held_out_examples": len(held_rows)}
    return env


# --- measurements --------------------------------------------------------------------------------


def _tail(logits: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt-learning models return logits for their virtual tokens too: keep the real positions."""
    return logits[:, -length:]


def _logits_model(model):
    """What logits are read from: for a PEFT method that injects layers, the transformers model inside it
    (the adapter layers are in it; PEFT's own wrapper only adds AdaLoRA's regulariser to the loss, and a
    reloaded AdaLoRA cannot run that wrapper: PEFT < 0.5 lacks its training adapter there, later PEFT
    fails once labels are given). Prompt-learning methods and plain models: the model itself."""
    config = (getattr(model, "peft_config", None) or {}).get("default")
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if config is not None and inner is not None and not is_prompt_learning(config) else model


@torch.no_grad()
def compare_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits at the batch's non-pad positions, shape [tokens, vocab]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = _logits_model(model)(input_ids=ids, attention_mask=mask).logits
    return _tail(logits, ids.shape[1]).float()[mask.bool()]


@torch.no_grad()
def held_out_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over the answer tokens of the held-out set, from the logits (so without the
    regulariser terms some methods add to the model's own loss); labels go in as for training."""
    total, count = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        logits = _tail(model(**b).logits, ids.shape[1]).float()
        target = b["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / max(count, 1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=tol))


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what): GPU allocator peak since the method started, or this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"


# --- the run -------------------------------------------------------------------------------------


class _Record:
    def __init__(self, peft_type: str | None = None):
        self.peft_type = peft_type
        self.assertions: dict[str, dict] = {}
        self.metrics: dict = {}
        self.stage = "apply"  # the assertion an unexpected exception is charged to
        self.grad_problems: list[str] = []  # adapter_only_grads' findings at the first backward
        # assertion -> {"defect", "fixed_in"}: the known defects of the installed PEFT that failed an assertion
        self.defects: dict[str, dict[str, str]] = {}

    def put(self, name: str, ok: bool | None, detail: str) -> bool | None:
        self.assertions[name] = {"ok": ok, "detail": detail}
        return ok

    def crashed(self, name: str, exc: BaseException) -> None:
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
        self.fail(name, f"{type(exc).__name__}: {_one_line(exc)}{at}")

    def fail(self, name: str, detail: str) -> None:
        """``name`` failed; when that is a known defect of the installed PEFT, said first, with the detail behind."""
        from checks.finetune.methods import known_defect

        known = known_defect(name, detail, peft_type=self.peft_type)
        if known:
            self.defects[name] = {"defect": known[0], "fixed_in": known[1]}
            detail = f"{known[0]} ({detail})"
        self.put(name, False, detail)

    def not_run(self, names, why: str) -> None:
        for name in names:
            self.assertions.setdefault(name, {"ok": False, "detail": f"{NOT_RUN}{why}"})


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_prompt_learning(config) -> bool:
    flag = getattr(config, "is_prompt_learning", None)
    if flag is not None:
        return bool(flag)
    from peft import PromptLearningConfig  # peft < 0.5 has no is_prompt_learning on the config

    return isinstance(config, PromptLearningConfig)


def is_adapter_param(name: str, adapter: str = "default") -> bool:
    """PEFT names every adapter parameter with the adapter's name as one dotted component."""
    return adapter in name.split(".")


OnStep = Callable[[int, int, float], None]  # (steps done, steps in all, that step's training loss)


class MemoryWatch:
    """One method's peak memory: on a GPU the allocator's peak since the method began (reset at its start);
    on the CPU the largest rise of this process's resident set over its size when the method began, sampled
    every :data:`SAMPLE_S` by a thread (a process-lifetime peak would charge one method with another's)."""

    SAMPLE_S = 0.02

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = self.peak = 0
        self._stop = None
        self._thread = None

    @staticmethod
    def rss() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import threading

        self.baseline = self.peak = self.rss() or 0
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.SAMPLE_S):
                self.peak = max(self.peak, self.rss() or 0)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss() or 0)

    def result(self) -> tuple[int, str]:
        """(bytes, kind): ``cuda_max_allocated`` or ``cpu_rss_increase`` (0 when /proc is not there)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return max(0, self.peak - self.baseline), "cpu_rss_increase"


def run_method(plan: Plan, env: Env, steps: int, lr: float | None = None, on_step: OnStep | None = None,
               keep_dir: str | None = None) -> MethodRun:
    """Train ``plan``'s method for ``steps`` steps and check it. Never raises for a method's own failure.
    ``on_step`` hears of every training step as it ends (the worker sends progress from it). ``keep_dir``:
    keep the adapter and what reloads it there (:mod:`checks.finetune.keep`); else a temp dir is used."""
    started = time.perf_counter()
    info = {"peft_type": plan.peft_type, "seed": plan.seed, "steps": steps, "device": env.info.get("device"),
            "notes": plan.notes}  # the same list: applying may add to it
    if plan.skip:
        return _kept(keep_dir, MethodRun(plan.name, Status.SKIP, plan.skip, info=info))
    rec = _Record(plan.peft_type)
    lr = plan.lr if lr is None else lr
    info["lr"], info["min_drop"] = lr, plan.min_drop
    with MemoryWatch(env.device) as memory:
        try:
            _run(plan, env, steps, lr, rec, on_step, keep_dir)
        except _Skip as skip:
            return _kept(keep_dir, MethodRun(plan.name, Status.SKIP, str(skip), metrics=rec.metrics, info=info))
        except Exception as exc:  # outside the guarded checks: charge it to the stage that was running
            rec.crashed(rec.stage, exc)
            rec.not_run(_applicable(plan), f"the method stopped at {rec.stage}")
    rec.metrics["wall_s"] = round(time.perf_counter() - started, 4)
    rec.metrics["peak_memory_bytes"], rec.metrics["peak_memory_kind"] = memory.result()
    not_run = [n for n, a in rec.assertions.items() if a["ok"] is False and a["detail"].startswith(NOT_RUN)]
    failed = [n for n, a in rec.assertions.items() if a["ok"] is False and n not in not_run]
    if rec.defects:
        info["peft_defects"] = rec.defects
    run = MethodRun(plan.name, Status.PASS, "", rec.assertions, rec.metrics, failed, not_run, info)
    if failed or not_run:
        parts = [f"{n}: {rec.assertions[n]['detail']}" for n in failed]
        if not_run:
            parts.append(f"not run: {', '.join(not_run)}")
        # Only known defects of the installed PEFT: a warning (the node is sound; that PEFT release is not)
        defects_only = not not_run and set(failed) <= set(rec.defects)
        run.status, run.message = Status.WARN if defects_only else Status.FAIL, "; ".join(parts)
    else:
        run.message = summary(run)
    return _kept(keep_dir, run)


def _kept(keep_dir: str | None, run: MethodRun) -> MethodRun:
    if keep_dir is not None:
        from checks.finetune import keep

        keep.write_result(keep_dir, run)
    return run


def config_failure(name: str, exc: BaseException) -> MethodRun:
    """A method whose PEFT config could not be built (a seed method on an unsuitable PEFT)."""
    detail = f"{type(exc).__name__}: {_one_line(exc)}"
    return MethodRun(name, Status.FAIL, f"config: {detail}", {"config": {"ok": False, "detail": detail}},
                     failed=["config"])


def summary(run: MethodRun) -> str:
    m = run.metrics
    na = [n for n, a in run.assertions.items() if a["ok"] is None]
    text = (f"{run.info.get('steps')} steps, held-out loss {m.get('loss_before', math.nan):.3f} -> "
            f"{m.get('loss_after', math.nan):.3f}; "
            f"{sum(1 for a in run.assertions.values() if a['ok'])} assertions passed")
    text += f" ({', '.join(na)}: n/a)" if na else ""
    return "; ".join([text, *run.info.get("notes", [])])  # how this method was run differently, said


class _Skip(Exception):
    pass


# --- the steps a method goes through (module functions: the test-only mutations replace them) ------------


def _apply(plan: Plan, base):
    """(the PEFT model of ``plan`` on a copy of ``base``, the copy's parameters paired with the base's)."""
    from peft import get_peft_model

    fresh = copy.deepcopy(base)
    pairs = _base_pairs(fresh, base)  # before PEFT wraps the modules (it keeps their parameter objects)
    return get_peft_model(fresh, plan.config), pairs


def _apply_planned(plan: Plan, base):
    """_apply, and for a discovered method whose generic config names no target modules on a PEFT that has no
    Bloom default for it (LoHa, LoKr, OFT before PEFT gave them one), once more on the modules the installed
    PEFT's LoRA uses for Bloom, said in the plan's notes; the seed methods' configs are applied as they are."""
    try:
        return _apply(plan, base)
    except ValueError as exc:
        config = plan.config
        if plan.seed or "target_modules" not in str(exc) or getattr(config, "target_modules", "") is not None:
            raise
        config.target_modules = _bloom_lora_targets()
        plan.notes.append(f"target_modules {config.target_modules} (the installed PEFT's LoRA modules for Bloom): "
                          f"this PEFT has no Bloom default for {plan.peft_type}")
        return _apply(plan, base)


def _bloom_lora_targets() -> list[str]:
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as lora_targets
    except ImportError:  # moved or renamed in a PEFT to come
        lora_targets = {}
    return list(lora_targets.get("bloom") or ["query_key_value"])


def _training_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as the seed computes it: the batch with its labels into the model, the model's own loss."""
    return model(**batch).loss


def _optimizer_step(optimizer, scaler) -> None:
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _allocate(model, step: int) -> None:
    """AdaLoRA's rank allocation for ``step``: after the optimizer step, while the gradients are there."""
    model.base_model.update_and_allocate(step)


def _save(model, adapter_dir: str) -> None:
    """The adapter as the installed PEFT saves it by default (``.bin`` before peft 0.6, ``.safetensors`` since)."""
    model.save_pretrained(adapter_dir)


def _disabled(model):
    return model.disable_adapter()


def _merge(model):
    return model.merge_and_unload()


def _generate(model, **kwargs):
    return model.generate(**kwargs)


def _base_pairs(model, base) -> dict[int, tuple[str, torch.Tensor]]:
    """id(parameter of the fresh copy) -> (name, the pristine base's parameter); taken right after the copy."""
    ours, theirs = list(model.named_parameters()), list(base.named_parameters())
    return {id(p): (n, q) for (n, p), (m, q) in zip(ours, theirs, strict=True) if n == m}


def _run(plan: Plan, env: Env, steps: int, lr: float, rec: _Record, on_step: OnStep | None = None,
         keep_dir: str | None = None) -> None:
    torch.manual_seed(SEED)
    try:
        model, pairs = _apply_planned(plan, env.base)
    except Exception as exc:
        if not plan.seed:  # an extra method PEFT cannot put on Bloom here
            from checks.finetune.methods import skip_reason

            raise _Skip(skip_reason(exc, "cannot be applied to Bloom with generic defaults")) from exc
        rec.crashed("apply", exc)
        rec.not_run(_applicable(plan), "the adapter could not be applied")
        return
    model.to(env.device)
    prompt_learning = is_prompt_learning(plan.config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for _, p in trainable)
    rec.metrics |= {"trainable_params": n_trainable, "base_params": env.base_params}
    rec.put("trainable_params", n_trainable > 0, f"{n_trainable:,} trainable parameters")

    rec.stage = "loss_decreased"
    rec.metrics["loss_before"] = held_out_loss(model.eval(), env.held_out)
    rec.stage = "train"
    trained = _train(plan, model, env, steps, lr, rec, on_step)
    _check_frozen(model, pairs, rec)
    if not trained:
        rec.not_run(_applicable(plan), "training did not complete")
        return
    model.eval()
    rec.stage = "loss_decreased"
    rec.metrics["loss_after"] = after = held_out_loss(model, env.held_out)
    before = rec.metrics["loss_before"]
    drop = (before - after) / before if math.isfinite(after) and before > 0 else -math.inf
    rec.metrics["loss_relative_drop"] = float(f"{drop:.3g}") if math.isfinite(drop) else None
    rec.put("loss_decreased", drop >= plan.min_drop,
            f"held-out loss {before:.4f} -> {after:.4f} after {steps} steps at lr {lr:g}: "
            f"{drop:.3g} relative drop (needs ≥ {plan.min_drop:g})")

    rec.stage = "reload_logits"
    adapter_logits = compare_logits(model, env.compare)
    if keep_dir is not None:
        from checks.finetune import keep

        adapter_dir = keep.prepare_method(keep_dir, plan, model, env, adapter_logits)
    else:
        adapter_dir = tempfile.mkdtemp(prefix=f"{plan.name}-", dir=env.workdir)
    try:
        if _check_save(model, adapter_dir, env, rec):
            _check_reload(adapter_dir, adapter_logits, env, rec)
        else:
            rec.not_run(["reload_logits"], "no adapter was saved")
    finally:
        if keep_dir is None:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    _check_disabled(model, env, rec)
    _check_generate(plan, model, env, rec, prompt_learning)
    _check_merge(plan, model, adapter_logits, env, rec, prompt_learning)  # last: merging changes the model


def _applicable(plan: Plan) -> list[str]:
    return [n for n in ASSERTIONS if n != "adalora_schedule" or plan.peft_type == "ADALORA"]


def _check_frozen(model, pairs: dict[int, tuple[str, torch.Tensor]], rec: _Record) -> None:
    """adapter_only_grads, finished after training: every base tensor still in the model is frozen and
    bit-identical to the pristine base (autograd leaves a frozen tensor's .grad None, so gradients alone
    cannot show a base weight that changed)."""
    problems = list(rec.grad_problems)
    checked, changed = 0, []
    with torch.no_grad():
        for _, p in model.named_parameters():
            if id(p) not in pairs:
                continue
            name, original = pairs[id(p)]
            checked += 1
            if p.shape != original.shape or not torch.equal(p.detach().to(original.device), original):
                changed.append(name)
    if changed:
        problems.append(f"base weights changed in training: {', '.join(changed[:3])}"
                        + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""))
    if not checked:
        problems.append("no base parameter could be found in the PEFT model to compare")
    rec.metrics["base_tensors_compared"] = checked
    if "adapter_only_grads" not in rec.assertions and not problems:
        return  # training stopped before the first backward: not judged (listed as not run)
    seen = rec.assertions.get("adapter_only_grads", {}).get("detail")
    detail = "; ".join(problems) or f"{seen}; {checked} base tensors frozen and bit-identical after training"
    rec.put("adapter_only_grads", not problems, detail)


def _lora_e_ranks(model) -> tuple[int, int]:
    """(non-zero entries of every AdaLoRA lora_E, their count): the ranks in use, and the most possible."""
    used = total = 0
    for name, p in model.named_parameters():
        if "lora_E" in name.split("."):
            used += int((p.detach() != 0).sum())
            total += p.numel()
    return used, total


def _check_adalora(model, steps: int, rec: _Record) -> None:
    """adalora_schedule: the rank budget really moved. lora_E starts at zero and training makes every entry
    non-zero; update_and_allocate masks the least important ones to zero down to the scheduled budget."""
    config = model.peft_config["default"]
    used, total = _lora_e_ranks(model)
    allocator = getattr(model.base_model, "rankallocator", None)
    budget = None
    if allocator is not None and steps >= 1:
        budget = allocator.budget_schedule(steps - 1)[0] if steps - 1 < config.total_step - config.tfinal \
            else allocator.target_bgt
    rec.metrics |= {"adalora_ranks_used": used, "adalora_ranks_initial": total, "adalora_rank_budget": budget,
                    "adalora_total_step": getattr(config, "total_step", None)}
    if steps < 2 or budget is None or budget >= total:
        rec.put("adalora_schedule", None, f"the budget schedule does not mask within {steps} step(s) "
                                          f"(total_step {config.total_step}, tinit {config.tinit})")
        return
    ok = 0 < used <= budget
    rec.put("adalora_schedule", ok, f"{used} of {total} lora_E ranks in use after {steps} steps; budget {budget} "
                                    f"(total_step {config.total_step}, target_r {config.target_r}, "
                                    f"init_r {config.init_r})")


def _train(plan: Plan, model, env: Env, steps: int, lr: float, rec: _Record, on_step: OnStep | None = None) -> bool:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        rec.put("train", False, "nothing to train")
        return False
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    use_scaler = env.device.type == "cuda" and env.amp_dtype == torch.float16
    scaler = _grad_scaler() if use_scaler else None
    adalora = plan.peft_type == "ADALORA"
    tokens, losses = 0, []
    model.train()
    started = time.perf_counter()
    try:
        for step in range(steps):
            batch = env.train[step % len(env.train)]
            with _autocast(env):
                loss = _training_loss(model, batch)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss is {losses[-1]} at step {step}")
            (scaler.scale(loss) if scaler else loss).backward()
            if step == 0:
                _check_grads(model, rec)
            _optimizer_step(optimizer, scaler)
            schedule.step()
            if adalora:
                _allocate(model, step)
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            if on_step is not None:
                on_step(step + 1, steps, losses[-1])
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
    except Exception as exc:
        rec.crashed("train", exc)
        return False
    elapsed = max(time.perf_counter() - started, 1e-9)
    rec.put("train", True, f"{steps} steps, last training loss {losses[-1]:.4f}" if losses else "0 steps")
    rec.metrics |= {"train_s": round(elapsed, 4), "steps_per_s": round(steps / elapsed, 3),
                    "tokens_per_s": round(tokens / elapsed, 1), "train_tokens": tokens,
                    "first_train_loss": losses[0] if losses else None,
                    "last_train_loss": losses[-1] if losses else None,
                    # the curve the HTML report draws per method
                    "train_losses": [round(x, 4) for x in losses]}
    if adalora:
        _check_adalora(model, steps, rec)
    return True


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cuda")
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _autocast(env: Env):
    if env.amp_dtype is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(env.device.type, dtype=env.amp_dtype)


def _check_grads(model, rec: _Record) -> None:
    """adapter_only_grads, first part (after the first backward): only adapter parameters are trainable,
    and some adapter parameter received a non-zero gradient. :func:`_check_frozen` finishes it."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    not_adapter = [n for n in trainable if not is_adapter_param(n)]
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    nonzero = [n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    problems = []
    if not_adapter:
        problems.append(f"non-adapter parameters are trainable: {', '.join(not_adapter[:3])}")
    if not nonzero:
        problems.append("no adapter parameter received a non-zero gradient")
    rec.grad_problems = problems
    rec.put("adapter_only_grads", not problems, f"{len(with_grad)} adapter tensors received gradients "
                                                f"({len(nonzero)} non-zero)")


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft >= 0.6 / older: whichever it wrote


def saved_tensors(path: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in an adapter weights file (safetensors or a torch pickle)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_save(model, adapter_dir: str, env: Env, rec: _Record) -> bool:
    try:
        _save(model, adapter_dir)
    except Exception as exc:
        rec.crashed("save_adapter_only", exc)
        return False
    files = sorted(os.listdir(adapter_dir))
    written = [f for f in ADAPTER_WEIGHTS if f in files]
    problems = [] if "adapter_config.json" in files else ["adapter_config.json missing"]
    if not written:
        problems.append(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}) written")
    others = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")) and f not in written]
    if others:
        problems.append(f"other weight files written: {', '.join(others)}")
    saved_params = 0
    if written:
        rec.metrics["adapter_format"] = written[0].rsplit(".", 1)[1]
        shapes = saved_tensors(os.path.join(adapter_dir, written[0]))
        saved_params = sum(math.prod(shape) for shape in shapes.values())
        base_keys = [k for k in shapes if _strip(k) in env.base_names]
        if base_keys:
            problems.append(f"base weights saved in the adapter: {', '.join(base_keys[:3])}")
        if not shapes:
            problems.append(f"{written[0]} holds no tensors")
    rec.metrics["adapter_params_saved"] = saved_params
    size = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in files)
    rec.metrics["adapter_bytes"] = size
    rec.put("save_adapter_only", not problems,
            "; ".join(problems) or f"wrote {', '.join(files)} ({size:,} bytes, {saved_params:,} values)")
    return bool(written) and "adapter_config.json" in files


def _strip(key: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _check_reload(adapter_dir: str, adapter_logits: torch.Tensor, env: Env, rec: _Record) -> None:
    from peft import PeftModel

    try:
        reloaded = PeftModel.from_pretrained(copy.deepcopy(env.base), adapter_dir).to(env.device).eval()
        logits = compare_logits(reloaded, env.compare)
    except Exception as exc:
        rec.crashed("reload_logits", exc)
        return
    diff = max_diff(logits, adapter_logits)
    rec.metrics["reload_max_abs_diff"] = diff
    rec.put("reload_logits", close(logits, adapter_logits, TOLERANCE),
            f"max |reloaded - trained| = {diff:.3g} (tolerance {TOLERANCE:g})")
    del reloaded


def _check_disabled(model, env: Env, rec: _Record) -> None:
    try:
        with _disabled(model):
            logits = compare_logits(model, env.compare)
    except Exception as exc:
        rec.crashed("disabled_equals_base", exc)
        return
    diff = max_diff(logits, env.base_logits)
    rec.metrics["disabled_max_abs_diff"] = diff
    rec.put("disabled_equals_base", close(logits, env.base_logits, TOLERANCE),
            f"max |disabled - base| = {diff:.3g} (tolerance {TOLERANCE:g})")


def _check_generate(plan: Plan, model, env: Env, rec: _Record, prompt_learning: bool) -> None:
    """generate: greedy generation gives new tokens, and its first token per prompt is the adapter model's own
    next-token prediction (a forward pass's argmax), not the base model's: generation must use the adapter."""
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "pad_token_id": env.tokenizer.pad_token_id}
    unpadded = prompt_learning or plan.unpadded_generate
    # Prefix tuning uncached first: transformers 5's cached Bloom generation ignores the prefix. Where the
    # uncached path raises (peft 0.13 / transformers 4.46, peft 0.17 / 4.55: the prefix reaches Bloom as a
    # legacy tuple), cached generation keeps the prefix: that is used, and said.
    modes = [{"use_cache": False}, {}] if plan.peft_type == "PREFIX_TUNING" else [{}]
    errors: list[BaseException] = []
    for extra in modes:
        try:
            new, first = _generated(model, env, unpadded, kwargs | extra)
            break
        except Exception as exc:  # noqa: BLE001 - the next mode, or the failure below
            errors.append(exc)
    else:
        rec.crashed("generate", errors[0])
        return
    rec.metrics["generated_tokens"] = new
    how = "one unpadded prompt at a time" if unpadded else "a left-padded batch"
    if "use_cache" in extra:
        how += ", use_cache=False"
    elif errors:
        how += f", cached: use_cache=False raised {type(errors[0]).__name__}: {_one_line(errors[0], 120)}"
    if not all(n >= 1 for n in new):
        rec.put("generate", False, f"{new} new tokens for {len(new)} prompts ({how})")
        return
    try:
        adapter_next, adapter_ok = _next_tokens(model, env, unpadded, first)
        base_next, _ = _next_tokens(env.base, env, unpadded, first)
    except Exception as exc:  # noqa: BLE001
        rec.crashed("generate", exc)
        return
    if all(adapter_ok):
        rec.put("generate", True, f"{new} new tokens for {len(new)} prompts ({how}); the first ones {first} are the "
                                  f"adapter model's own greedy prediction")
        return
    ignored = first == base_next and base_next != adapter_next
    rec.fail("generate", f"the first generated tokens {first} are not the adapter model's greedy prediction "
                         f"{adapter_next}" + (f" but the base model's {base_next}: generate() ignored the adapter"
                                              if ignored else f" (the base model's: {base_next})") + f" ({how})")


def _generated(model, env: Env, unpadded: bool, kwargs: dict) -> tuple[list[int], list[int | None]]:
    """(new tokens per prompt, the first new token per prompt) of greedy generation."""
    if unpadded:  # padded batches break prompt-learning generation on Bloom: one at a time
        new, first = [], []
        for prompt in env.prompts:
            ids = torch.tensor([prompt], device=env.device)
            out = _generate(model, input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            new.append(out.shape[1] - ids.shape[1])
            first.append(int(out[0, ids.shape[1]]) if out.shape[1] > ids.shape[1] else None)
        return new, first
    batch = _padded_prompts(env)
    out = _generate(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    width = batch["input_ids"].shape[1]
    n = out.shape[1] - width
    return [n] * len(env.prompts), [int(t) for t in out[:, width]] if n > 0 else [None] * len(env.prompts)


def _padded_prompts(env: Env) -> dict[str, torch.Tensor]:
    return _tensors(D.collate([{"input_ids": p, "labels": p} for p in env.prompts], env.tokenizer.pad_token_id),
                    env.device)


def _next_tokens(model, env: Env, unpadded: bool, first: list[int]) -> tuple[list[int], list[bool]]:
    """``model``'s greedy next token after each prompt (a plain forward pass, as generate's first step sees the
    prompt), and whether ``first`` holds a token within 1e-3 of that maximum logit (ties and float noise)."""
    rows = []
    model = _logits_model(model)  # AdaLoRA's wrapper of PEFT < 0.5 cannot run without labels
    with torch.no_grad():
        if unpadded:
            for prompt in env.prompts:
                ids = torch.tensor([prompt], device=env.device)
                rows.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float())
        else:
            batch = _padded_prompts(env)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rows = list(logits[:, -1].float())
    best = [int(r.argmax()) for r in rows]
    ok = [t is not None and float(r[t]) >= float(r.max()) - 1e-3 for r, t in zip(rows, first, strict=True)]
    return best, ok


def _check_merge(plan: Plan, model, adapter_logits, env: Env, rec: _Record, prompt_learning: bool) -> None:
    if prompt_learning:
        for name in ("merge_logits", "merge_differs_from_base"):
            rec.put(name, None, "prompt-learning methods have no weights to merge")
        return
    try:
        merged = _merge(model)
    except NotImplementedError as exc:
        for name in ("merge_logits", "merge_differs_from_base"):
            rec.put(name, None, f"{plan.peft_type} does not merge: {_one_line(exc, 200)}")
        return
    except Exception as exc:
        rec.crashed("merge_logits", exc)
        rec.not_run(["merge_differs_from_base"], "merge_and_unload failed")
        return
    logits = compare_logits(merged.eval(), env.compare)
    tol = plan.merge_tolerance
    diff = max_diff(logits, adapter_logits)
    from_base = max_diff(logits, env.base_logits)
    rec.metrics |= {"merge_max_abs_diff": diff, "merge_vs_base_max_abs_diff": from_base}
    rec.put("merge_logits", close(logits, adapter_logits, tol),
            f"max |merged - adapter| = {diff:.3g} (tolerance {tol:g})")
    rec.put("merge_differs_from_base", not close(logits, env.base_logits, TOLERANCE),
            f"max |merged - base| = {from_base:.3g} (must exceed tolerance {TOLERANCE:g})")
