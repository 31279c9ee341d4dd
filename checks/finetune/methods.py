"""Which PEFT methods the smoke fine-tune runs, and the PEFT config of each.

The six seed methods (the stack's ``finetune.methods``) use the seed notebooks' hyper-parameters.
``all`` adds every other method the installed PEFT knows, discovered from its ``PeftType`` enum and
config mapping rather than listed here, so a PEFT upgrade brings its new methods into the run:

* a method in :data:`KNOWN_SKIPS` is reported as skip with the documented reason;
* any other method gets its config class's generic defaults (``task_type="CAUSAL_LM"``, and 8
  virtual tokens for prompt-learning methods); where the installed PEFT has no Bloom target modules for
  it, the ones its LoRA uses for Bloom (``run._apply_planned``, said in the result); when that config
  cannot be built, or the method cannot be applied to Bloom with it, the method is a skip carrying the
  exception text;
* everything else is trained and checked like the seed methods.

Name lists come from :func:`available_names` without importing PEFT (the parent stays light);
configs are built in the worker by :func:`plan`.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SEED_METHODS = ("lora", "adalora", "ia3", "prefix_tuning", "p_tuning", "prompt_tuning")
ALL = "all"

SEED_LR = 3e-2  # the seed notebooks' learning rate, batch 8
EXTRA_LR = 3e-2
PROMPT_INIT_TEXT = "Classify if the tweet is a complaint or not:"

# Named forms of a PEFT type that are not PEFT types themselves: name -> (PEFT type, description).
VARIANTS = {
    "prefix_tuning_v2": ("PREFIX_TUNING", "P-Tuning v2: prefix tuning without the reparameterisation MLP"),
    "dora": ("LORA", "DoRA: LoRA with weight decomposition (use_dora=True)"),
}

# Variants an older PEFT may lack (DoRA arrived in peft 0.9): skipped with the reason there, not failed.
OPTIONAL_VARIANTS = frozenset({"dora"})

# The PEFT release that brought each named method (from PEFT's release notes): a PEFT older than that lacks
# it, and the method is a skip saying so rather than a failure.
ADDED_IN = {"lora": "0.1.0", "prefix_tuning": "0.1.0", "prefix_tuning_v2": "0.1.0", "p_tuning": "0.1.0",
            "prompt_tuning": "0.1.0", "adalora": "0.3.0", "ia3": "0.4.0", "dora": "0.9.0"}

# Failures that are defects of PEFT itself, fixed in a later release: (assertion, the PEFT types it hits or
# None for all, the release that fixed it, text the failure's detail carries, what goes wrong). Such a
# failure is a warning, not a failure: the node is sound, the PEFT release is not; the detail says whose
# defect it is and which release fixes it.
PROMPT_LEARNING_TYPES = frozenset({"PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"})
KNOWN_PEFT_DEFECTS = [
    ("disabled_equals_base", PROMPT_LEARNING_TYPES, "0.4.0", "adapter_layers",
     "disable_adapter() of peft < 0.4.0 cannot disable a prompt-learning adapter: it looks for a prompt-learning "
     "config in the whole peft_config dict instead of the active adapter's, so it calls "
     "disable_adapter_layers/enable_adapter_layers on the transformers model, which has neither"),
    # Measured on the tiny Bloom (first greedy tokens, generate() against the forward pass): peft 0.4.0.dev0 (the
    # seed's) to 0.8.2 return the base model's tokens for prefix tuning and p-tuning, cached or not; 0.9.0 with
    # the same transformers (4.38.2) and every later release seen follow the adapter.
    ("generate", PROMPT_LEARNING_TYPES, "0.9.0", "generate() ignored the adapter",
     "generate() of peft < 0.9.0 on Bloom leaves the prompt-learning adapter out (seen for prefix tuning and "
     "p-tuning): the text generated is the base model's, although the forward pass uses the adapter"),
]


def known_defect(assertion: str, failure, installed: str | None = None,
                 peft_type: str | None = None) -> tuple[str, str] | None:
    """(what it is, the release that fixes it) when ``failure`` (an exception or a detail) of ``assertion`` is a
    known defect of the installed PEFT for ``peft_type``, else None."""
    installed = installed or installed_peft()
    if not installed:
        return None
    from packaging.version import Version

    for name, types, fixed, marker, what in KNOWN_PEFT_DEFECTS:
        if (name == assertion and marker in str(failure) and (types is None or peft_type is None or peft_type in types)
                and Version(installed).release < Version(fixed).release):
            return f"peft {installed}'s own defect, fixed in peft {fixed}: {what}", fixed
    return None


# loss_decreased: the relative held-out loss drop, (before - after) / before, each method must reach. About a
# third of the smallest drop measured on the tiny model at the default 30 steps and the seed's lr, across the
# seed's PEFT (0.4.0.dev0), peft 0.5.0 and current PEFT (README, "The smoke fine-tune": e.g. prompt tuning
# 0.93 %, LoRA 44.5 %); lr 1e-7 moves every method by < 0.001 %.
MIN_DROP = {"lora": 0.15, "adalora": 0.07, "ia3": 0.01, "prefix_tuning": 0.2, "prefix_tuning_v2": 0.008,
            "p_tuning": 0.005, "prompt_tuning": 0.003, "dora": 0.12}
DEFAULT_MIN_DROP = 3e-4  # discovered methods with generic defaults: a third of the smallest measured (c3a, 0.11 %)
CALIBRATED_STEPS = 30  # MIN_DROP holds for the tiny model at this many steps or more
# Any other run (fewer steps, another model) needs a drop beyond float noise: the shortest real run measured,
# AdaLoRA at 2 steps, falls 6e-5; lr 1e-7 falls at most 4e-6 (30 steps) on the tiny model.
NOISE_DROP = 1e-5

# PEFT types that cannot run on Bloom in a generic smoke run, with the reason (checked on peft 0.21).
KNOWN_SKIPS = {
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter) patches LLaMA-family attention only; Bloom is not supported",
    "XLORA": "X-LoRA mixes already-trained LoRA experts (XLoraConfig.adapters) on a model built with "
             "use_cache=False; generic defaults give it no expert (0 trainable parameters), and given LoRA experts "
             "trained on this Bloom, PEFT's expert loading fails with 'Got unexpected keys' "
             "(model.model.transformer.…): it expects Llama-style module names",
    "TRAINABLE_TOKENS": "trainable tokens retrains chosen embedding rows; it needs explicit token_indices, which "
                        "have no generic default",
    "MULTITASK_PROMPT_TUNING": "multi-task prompt tuning needs per-example task_ids; a single-task smoke run has "
                               "none",
    "POLY": "Polytropon routes per task and needs per-example task_ids; a single-task smoke run has none",
    "CPT": "context-aware prompt tuning is built from in-context examples (cpt_token_ids, cpt_mask, "
           "cpt_tokens_type_mask of a prompt template); with generic defaults its training loss is NaN",
}

# Methods whose left-padded batched generate() fails on Bloom (checked on peft 0.21): generate one unpadded
# prompt at a time for them, as for the prompt-learning methods, and say so in the result.
UNPADDED_GENERATE = {
    "SHADOW": "padded cached generation fails on Bloom (attention-mask shape error); one prompt at a time",
}

# Merge tolerances (atol = rtol) where merging is not exact in float32; 1e-4 otherwise.
# OSF merges by recomposing its SVD factors (≈ 1e-3 in float32 logits).
MERGE_TOLERANCE = {"ADALORA": 1e-2, "OFT": 1e-2, "BOFT": 1e-2, "OSF": 1e-2}
DEFAULT_TOLERANCE = 1e-4


class MethodError(ValueError):
    """An unknown method name: a usage error (exit 2)."""


# --- names (parent side, no torch) ---------------------------------------------------------------


def _peft_types_from_source() -> list[str] | None:
    """PeftType member names read from the installed PEFT's source with ``ast`` (no import, no torch)."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        source = Path(root, "utils", "peft_types.py")
        if not source.is_file():
            continue
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name == "PeftType":
                return [t.id for stmt in node.body if isinstance(stmt, ast.Assign) for t in stmt.targets
                        if isinstance(t, ast.Name) and t.id.isupper()]
    return None


def peft_types() -> list[str]:
    """Every PEFT type the installed PEFT declares, e.g. ``["PROMPT_TUNING", ..., "LORA", ...]``."""
    names = _peft_types_from_source()
    if names is None:  # another layout: ask PEFT itself (slower: imports torch)
        from peft import PeftType

        names = [t.name for t in PeftType]
    return names


def available_names() -> list[str]:
    """Every method name ``--methods`` accepts (besides ``all``): seed methods first, then the variants,
    then the other PEFT types in PEFT's own order."""
    names = list(SEED_METHODS) + list(VARIANTS)
    names += [t.lower() for t in peft_types() if t.lower() not in names]
    return names


def expand(requested, defaults=SEED_METHODS) -> list[str]:
    """Method names from ``--methods`` (comma-separated strings or a list; None: ``defaults``).
    ``all`` is the defaults plus every other available method. Unknown names raise MethodError."""
    tokens = _tokens(requested)
    if not tokens:
        tokens = list(defaults)
    known = available_names()
    out: list[str] = []
    for tok in tokens:
        picked = list(defaults) + known if tok == ALL else [tok]
        for name in picked:
            if name not in known:
                from checks.stack import quote  # here: a bare node's Python may lack yaml
                raise MethodError(f"--methods: unknown method {quote(name)} (known: all, {', '.join(known)})")
            if name not in out:
                out.append(name)
    return out


def _tokens(requested) -> list[str]:
    if not requested:
        return []
    if isinstance(requested, str):
        requested = [requested]
    return [t.strip().lower() for item in requested for t in str(item).split(",") if t.strip()]


# --- configs (worker side: imports peft) ---------------------------------------------------------


@dataclass
class Setting:
    """What a config builder may use: the run's step count and where the tokenizer lives; which model it is
    (``tiny``, ``random:<name>`` or ``path``: the loss margins are calibrated on the tiny model)."""

    steps: int
    tokenizer_path: str
    model: str = "tiny"


# random:bloomz-560m (random weights, ln(250880) ≈ 12.4 to start): a third of the smaller relative drop measured at
# 2 steps and at the CPU defaults (checks/finetune/budget.py) with its per-method learning rates, e.g. LoRA 73.6 %
# and 88.1 %, AdaLoRA 5.1 % and 86.3 %, prompt tuning 17.8 % and 21.8 % (benchmarks/finetune_560m_cpu.py).
MIN_DROP_RANDOM = {"bloomz-560m": (2, {"lora": 0.25, "adalora": 0.017, "ia3": 0.12, "prefix_tuning": 0.28,
                                       "p_tuning": 0.07, "prompt_tuning": 0.06})}


def min_drop(name: str, setting: Setting) -> float:
    """loss_decreased's threshold for ``name`` in this run (see MIN_DROP, MIN_DROP_RANDOM, NOISE_DROP)."""
    if setting.model == "tiny" and setting.steps >= CALIBRATED_STEPS:
        return MIN_DROP.get(name, DEFAULT_MIN_DROP)
    if setting.model.startswith("random:"):
        from_steps, drops = MIN_DROP_RANDOM.get(setting.model.removeprefix("random:"), (0, {}))
        if setting.steps >= from_steps and name in drops:
            return drops[name]
    return NOISE_DROP


@dataclass
class Plan:
    """How to run one method: its PEFT config, or why it is skipped."""

    name: str
    peft_type: str
    seed: bool  # one of the seed's methods or variants (failures to apply are failures, not skips)
    config: object | None = None
    skip: str | None = None
    lr: float = SEED_LR
    min_drop: float = DEFAULT_MIN_DROP  # loss_decreased's threshold (relative drop of the held-out loss)
    merge_tolerance: float = DEFAULT_TOLERANCE
    unpadded_generate: bool = False  # generate one unpadded prompt at a time
    notes: list[str] = field(default_factory=list)


def _lora(s: Setting, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                      target_modules=["query_key_value"], **extra)


def _adalora(s: Setting):
    from peft import AdaLoraConfig

    # The seed's ranks and betas; tinit/tfinal/deltaT scaled to the run's length so the budget
    # schedule runs (PEFT requires total_step > 0 and tinit < total_step - tfinal).
    return AdaLoraConfig(task_type="CAUSAL_LM", init_r=12, target_r=8, beta1=0.85, beta2=0.85,
                         tinit=s.steps // 5, tfinal=s.steps // 5, deltaT=max(1, s.steps // 10),
                         lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"], total_step=s.steps)


def _ia3(s: Setting):
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM", target_modules=["query_key_value", "mlp.dense_4h_to_h"],
                     feedforward_modules=["mlp.dense_4h_to_h"])


def _prefix(s: Setting, projection: bool = True):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30, prefix_projection=projection)


def _p_tuning(s: Setting):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, encoder_hidden_size=128,
                               encoder_reparameterization_type="MLP")


def _prompt_tuning(s: Setting):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text=PROMPT_INIT_TEXT, tokenizer_name_or_path=s.tokenizer_path)


SEED_CONFIGS: dict[str, tuple[str, Callable[[Setting], object]]] = {
    "lora": ("LORA", _lora),
    "adalora": ("ADALORA", _adalora),
    "ia3": ("IA3", _ia3),
    "prefix_tuning": ("PREFIX_TUNING", _prefix),
    "prefix_tuning_v2": ("PREFIX_TUNING", lambda s: _prefix(s, projection=False)),
    "p_tuning": ("P_TUNING", _p_tuning),
    "prompt_tuning": ("PROMPT_TUNING", _prompt_tuning),
    "dora": ("LORA", lambda s: _lora(s, use_dora=True)),
}


def generic_config(peft_type: str):
    """The config class's own defaults for a causal LM; raises what the class raises."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[peft_type]](task_type="CAUSAL_LM")
    if getattr(config, "is_prompt_learning", False) and not getattr(config, "num_virtual_tokens", None):
        config.num_virtual_tokens = 8
    return config


def plan(name: str, setting: Setting) -> Plan:
    """The plan for ``name``: a config to run, or a skip with its reason."""
    if name in SEED_CONFIGS:
        peft_type, build = SEED_CONFIGS[name]
        seed = name not in OPTIONAL_VARIANTS
        out = Plan(name, peft_type, seed=seed, lr=SEED_LR, min_drop=min_drop(name, setting),
                   merge_tolerance=MERGE_TOLERANCE.get(peft_type, DEFAULT_TOLERANCE))
        try:
            out.config = build(setting)
        except Exception as exc:
            lacking = lacks(name)
            if lacking:
                out.skip = f"{lacking} ({type(exc).__name__}: {_one_line(exc, 160)})"
            elif seed:  # a seed method whose config cannot be built is a failure: let it raise
                raise
            else:
                out.skip = f"this PEFT cannot build it: {type(exc).__name__}: {_one_line(exc)}"
        return out
    peft_type = name.upper()
    out = Plan(name, peft_type, seed=False, lr=EXTRA_LR, min_drop=min_drop(name, setting),
               merge_tolerance=MERGE_TOLERANCE.get(peft_type, DEFAULT_TOLERANCE))
    if peft_type in KNOWN_SKIPS:
        out.skip = KNOWN_SKIPS[peft_type]
        return out
    if peft_type in UNPADDED_GENERATE:
        out.unpadded_generate = True
        out.notes.append(UNPADDED_GENERATE[peft_type])
    try:
        out.config = generic_config(peft_type)
    except Exception as exc:  # noqa: BLE001 - any reason is reported as the skip's reason
        out.skip = skip_reason(exc, "its config cannot be built with generic defaults")
    return out


def skip_reason(exc: BaseException, otherwise: str) -> str:
    """Why a method cannot run here: a missing Python package named as such, else ``otherwise`` and the error."""
    missing = missing_module(exc)
    if missing:
        return (f"needs the Python package {missing!r}, which is not installed here (pip install {missing}): "
                f"{type(exc).__name__}: {_one_line(exc, 200)}")
    return f"{otherwise}: {type(exc).__name__}: {_one_line(exc)}"


def missing_module(exc: BaseException | None) -> str | None:
    """The package an ImportError (or what caused it) says is missing, e.g. 'scikit-learn', or None."""
    import re

    for _ in range(5):
        if exc is None:
            break
        if isinstance(exc, ImportError):
            found = re.search(r"pip install (?:-U |--upgrade )?['\"]?([A-Za-z0-9][A-Za-z0-9_.\-]*)", str(exc))
            if found:
                return found.group(1)
            if isinstance(exc, ModuleNotFoundError) and exc.name:
                return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def installed_peft() -> str | None:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return None


def lacks(name: str, installed: str | None = None) -> str | None:
    """Why the installed PEFT cannot have ``name`` (it predates the release that added it), or None."""
    added = ADDED_IN.get(name)
    installed = installed or installed_peft()
    if not added or not installed:
        return None
    from packaging.version import Version

    if Version(installed).release >= Version(added).release:  # 0.9.0.dev0 counts as 0.9.0: it has the method
        return None
    return f"{name} needs peft >= {added}, the release that added it; this is peft {installed}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
