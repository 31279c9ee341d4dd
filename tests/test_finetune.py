"""The smoke fine-tune (checks.finetune): every method on the tiny random Bloom through the worker pool,
named failures (faults injected from outside through tests/helpers/faults), isolation of hanging and
crashing methods, model specs, and the finetune.methods check. The CLI is in test_finetune_cli.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from checks.finetune import data as D
from checks.finetune import finetune_methods, settings_from
from checks.finetune import methods as M
from checks.finetune import pool as P
from checks.finetune import verdict as V
from checks.finetune.model import BLOOMZ_560M_PARAMS, ModelSpecError, parse_model_spec
from checks.registry import Context
from checks.result import Status

FAULTS_DIR = Path(__file__).resolve().parent / "helpers" / "faults"

TINY = parse_model_spec("tiny")
STEPS = 30
SEED_AND_VARIANTS = list(M.SEED_METHODS) + list(M.VARIANTS)
EXTRAS = [n for n in M.available_names() if n not in SEED_AND_VARIANTS]  # discovered from the installed PEFT
PROMPT_LEARNING = {"prefix_tuning", "prefix_tuning_v2", "p_tuning", "prompt_tuning", "cartridge"}


# --- the real thing: every method, once per module, through the worker pool ------------------------


@pytest.fixture(scope="module")
def all_results():
    run = P.run_methods(SEED_AND_VARIANTS + EXTRAS, TINY, steps=STEPS, timeout_s=300)
    return run, {v.subject: (v, run.details[v.subject]) for v in run.verdicts}


def test_the_workers_ran_everything(all_results):
    run, results = all_results
    assert list(results) == SEED_AND_VARIANTS + EXTRAS and run.restarts == 0
    if P.gpu_slots() == [None]:  # no GPU: the tiny model's methods shared by up to two single-threaded workers
        assert len(run.workers) == min(2, P.usable_cpus())
        for w in run.workers:
            assert w["device"] == "cpu" and w["params"] > 0 and w["threads"] == P.usable_cpus() // len(run.workers)


def only_known_defects(d: dict) -> bool:
    """Every failed assertion is a known defect of the installed PEFT (M.KNOWN_PEFT_DEFECTS, e.g. peft 0.3.0's
    disable_adapter on prompt learning), said as such: an expected failure on that PEFT, not a pass."""
    defects = d.get("peft_defects") or {}
    return bool(defects) and not d["not_run"] and set(d["failed"]) <= set(defects) and all(
        d["assertions"][n]["detail"].startswith(defects[n]["defect"]) for n in d["failed"])


@pytest.mark.parametrize("name", SEED_AND_VARIANTS + EXTRAS)
def test_method(all_results, name):
    _, results = all_results
    v, d = results[name]
    assert v.subject == name
    if v.status is Status.WARN:  # only ever a known defect of the installed PEFT (e.g. generate on peft < 0.9)
        assert only_known_defects(d), v.message
        pytest.xfail(f"{name}: {v.message}")
    if v.status is Status.SKIP:
        if name in SEED_AND_VARIANTS:  # only when the installed PEFT predates it (DoRA: peft < 0.9), saying so
            assert v.message.startswith(f"{name} needs peft >= {M.ADDED_IN[name]}, the release that added it; "
                                        f"this is peft "), v.message
        assert v.message, "a skip must carry its reason"
        pytest.skip(f"{name}: {v.message}")
    assert v.status is Status.PASS, v.message
    a, m = d["assertions"], d["metrics"]
    assert not d["failed"] and not d["not_run"] and v.remediation is None
    # trainable parameters > 0 and only adapter parameters receive gradients
    assert m["trainable_params"] > 0 and a["trainable_params"]["ok"]
    assert a["adapter_only_grads"]["ok"], a["adapter_only_grads"]["detail"]
    # held-out loss falls by at least the method's calibrated margin
    floor = M.min_drop(name, M.Setting(STEPS, "", "tiny"))
    assert floor == M.MIN_DROP.get(name, M.DEFAULT_MIN_DROP) and d["min_drop"] == floor
    assert m["loss_relative_drop"] >= floor and m["loss_after"] < m["loss_before"] and a["loss_decreased"]["ok"]
    # every base tensor is frozen and unchanged by training
    assert m["base_tensors_compared"] > 0 and "bit-identical" in a["adapter_only_grads"]["detail"]
    # save_pretrained writes the adapter only
    assert a["save_adapter_only"]["ok"], a["save_adapter_only"]["detail"]
    assert "adapter_config.json" in a["save_adapter_only"]["detail"]
    assert m["adapter_params_saved"] > 0 and m["adapter_bytes"] > 0
    assert f"adapter_model.{m['adapter_format']}" in a["save_adapter_only"]["detail"]
    # reload into a fresh base and disable the adapter: allclose at 1e-4
    assert a["reload_logits"]["ok"] and m["reload_max_abs_diff"] <= 1e-3
    assert a["disabled_equals_base"]["ok"] and m["disabled_max_abs_diff"] <= 1e-3
    # generate() produces new tokens
    assert a["generate"]["ok"] and all(n >= 1 for n in m["generated_tokens"])
    if name.startswith("prefix_tuning"):
        assert "use_cache=False" in a["generate"]["detail"]
    # merge_and_unload: allclose to the adapter, different from the base; n/a for prompt learning
    if name in PROMPT_LEARNING:
        assert a["merge_logits"]["ok"] is None and a["merge_differs_from_base"]["ok"] is None
    elif a["merge_logits"]["ok"] is None:
        assert "does not merge" in a["merge_logits"]["detail"]
    else:
        assert a["merge_logits"]["ok"] and a["merge_differs_from_base"]["ok"]
        assert m["merge_vs_base_max_abs_diff"] > 1e-4
    # throughput and memory are recorded
    assert m["steps_per_s"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_bytes"] >= 0 and m["wall_s"] > 0
    if P.gpu_slots() == [None]:
        assert m["peak_memory_kind"] == "cpu_rss_increase"
    if name == "adalora":  # the rank budget moved: lora_E ranks in use down to the schedule's final budget
        assert a["adalora_schedule"]["ok"], a["adalora_schedule"]["detail"]
        assert 0 < m["adalora_ranks_used"] <= m["adalora_rank_budget"] < m["adalora_ranks_initial"]
    # the report line the worker built: the figures it showed before the verdicts came from the worker
    applicable = [x for x in a.values() if x["ok"] is not None]
    assert v.measured["assertions"].value == f"{len(applicable)}/{len(applicable)} passed"
    assert v.measured["loss"].value == f"{m['loss_before']:.3f}->{m['loss_after']:.3f}"
    assert v.expected["loss_after"].value == f"<= {m['loss_before'] * (1 - floor):.3f}"
    # the figures a user reads in the JSON report
    assert v.measured["reload_max_abs_diff"].value == m["reload_max_abs_diff"]
    assert v.measured["adapter_bytes"].value == m["adapter_bytes"] and v.measured["adapter_bytes"].unit == "bytes"
    assert v.measured["loss_drop"].value == round(100 * m["loss_relative_drop"], 2)
    for key, unit in (("trainable_params", None), ("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"),
                      ("wall_s", "s")):
        assert (v.measured[key].value, v.measured[key].unit) == (m[key], unit)
    assert v.measured["peak_memory"].unit == "MiB" and v.measured["peak_memory"].value >= 0
    assert v.measured["peak_memory_kind"].value in set(V.MEMORY_KINDS.values())


def test_seed_methods_use_the_seed_shapes(all_results):
    _, results = all_results

    def trainable(name):
        return results[name][1]["metrics"]["trainable_params"]

    # prefix tuning with the projection MLP trains far more than P-Tuning v2 without it
    assert trainable("prefix_tuning") > trainable("prefix_tuning_v2")
    assert trainable("dora") > trainable("lora")


def test_known_skips_are_reported_with_their_reason(all_results):
    _, results = all_results
    for peft_type, reason in M.KNOWN_SKIPS.items():
        name = peft_type.lower()
        if name in results:
            v, _ = results[name]
            assert v.status is Status.SKIP and v.message == reason and v.remediation is None


# --- failures are named, and a bad method fails alone ----------------------------------------------


@pytest.fixture
def faults(monkeypatch):
    """Inject faults into the processes this test starts: tests/helpers/faults on sys.path becomes their
    PYTHONPATH (checks.proc.child_env), and its sitecustomize patches the real functions."""
    monkeypatch.syspath_prepend(str(FAULTS_DIR))

    def inject(spec: str) -> None:
        monkeypatch.setenv("PEFTNODE_TEST_FAULTS", spec)

    return inject


def test_faults_fail_alone_and_are_named(faults):
    faults("ia3:hang,prompt_tuning:crash,adalora:raise,prefix_tuning:zero_lr,p_tuning:corrupt_adapter")
    names = ["lora", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]
    run = P.run_methods(names, TINY, steps=STEPS, timeout_s=12)
    v = {x.subject: x for x in run.verdicts}
    d = run.details
    assert [x.subject for x in run.verdicts] == names
    assert v["lora"].status is Status.PASS, v["lora"].message
    # a hang: killed at the method's timeout, a fail named timeout
    assert v["ia3"].status is Status.FAIL and d["ia3"]["failed"] == ["timeout"]
    assert "timed out after 12 s" in v["ia3"].message and "timeout" in v["ia3"].remediation
    # a crash: an error naming the signal; a fresh worker runs the next method
    assert v["prompt_tuning"].status is Status.ERROR and d["prompt_tuning"]["failed"] == ["crash"]
    assert "crashed with SIGABRT" in v["prompt_tuning"].message
    # an exception in the worker: an error; the worker itself goes on
    assert v["adalora"].status is Status.ERROR and d["adalora"]["failed"] == ["worker_error"]
    assert "RuntimeError: injected failure" in v["adalora"].message
    # lr 0: the loss cannot fall, and that is the assertion named; the rest still holds
    zero = d["prefix_tuning"]
    assert v["prefix_tuning"].status is Status.FAIL and zero["failed"] == ["loss_decreased"], v["prefix_tuning"].message
    assert zero["metrics"]["loss_after"] == pytest.approx(zero["metrics"]["loss_before"])
    assert v["prefix_tuning"].message.startswith("loss_decreased: held-out loss")
    assert "loss_decreased" in v["prefix_tuning"].remediation
    assert v["prefix_tuning"].measured["assertions"].value == "7/8 passed"
    # a damaged adapter file: the reload comparison fails by name
    bad = d["p_tuning"]
    assert v["p_tuning"].status is Status.FAIL and bad["failed"] == ["reload_logits"], v["p_tuning"].message
    assert bad["metrics"]["reload_max_abs_diff"] > 1e-4
    assert run.restarts == 2  # the hang and the crash; the exception left its worker running


# --- every assertion can fail: a mutation per assertion, through the test-only hook -----------------------

# (method, mutation in tests/helpers/faults, the assertion it must fail by name). Methods in one batch run
# together in one pool run, so a method appears at most once per batch.
MUTATION_BATCHES = [
    [("lora", "frozen_adapter", "trainable_params"), ("adalora", "no_allocate", "adalora_schedule"),
     ("ia3", "unfreeze_base", "adapter_only_grads"), ("prefix_tuning", "tiny_lr", "loss_decreased"),
     ("p_tuning", "nan_loss", "train"), ("prompt_tuning", "base_in_adapter", "save_adapter_only"),
     ("prefix_tuning_v2", "touch_base", "adapter_only_grads")],
    [("lora", "zero_lr", "merge_differs_from_base"), ("ia3", "bad_merge", "merge_logits"),
     ("prompt_tuning", "corrupt_adapter", "reload_logits"), ("p_tuning", "no_disable", "disabled_equals_base"),
     ("prefix_tuning", "no_generate", "generate"), ("adalora", "tiny_lr", "loss_decreased")],
    [("lora", "generate_base", "generate")],
]
MUTATIONS = [m for batch in MUTATION_BATCHES for m in batch]


@pytest.fixture(scope="module")
def mutated():
    """Every batch once: {(method, mutation): (verdict, details)}."""
    import os
    import sys

    out = {}
    saved_path, saved_env = list(sys.path), os.environ.get("PEFTNODE_TEST_FAULTS")
    sys.path.insert(0, str(FAULTS_DIR))  # checks.proc.child_env hands sys.path to the workers
    try:
        for batch in MUTATION_BATCHES:
            os.environ["PEFTNODE_TEST_FAULTS"] = ",".join(f"{method}:{fault}" for method, fault, _ in batch)
            run = P.run_methods([method for method, _, _ in batch], TINY, steps=STEPS, timeout_s=300)
            for (method, fault, _), v in zip(batch, run.verdicts, strict=True):
                out[(method, fault)] = (v, run.details[method])
    finally:
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("PEFTNODE_TEST_FAULTS", None)
        else:
            os.environ["PEFTNODE_TEST_FAULTS"] = saved_env
    return out


def test_every_assertion_has_a_mutation():
    covered = {assertion for _, _, assertion in MUTATIONS}
    from checks.finetune.run import ASSERTIONS

    assert covered == set(ASSERTIONS)


@pytest.mark.parametrize("method, fault, assertion", MUTATIONS, ids=[f"{m}-{f}" for m, f, _ in MUTATIONS])
def test_a_mutation_fails_its_assertion_by_name(mutated, method, fault, assertion):
    v, d = mutated[(method, fault)]
    if v.status is Status.SKIP and M.lacks(method):  # IA3 on peft 0.3: nothing to mutate
        pytest.skip(f"{method} with {fault}: {v.message}")
    assert v.status is Status.FAIL, f"{method} with {fault} passed: {v.message}"
    assert assertion in d["failed"], (d["failed"], v.message)
    assert f"{assertion}: " in v.message and assertion in v.remediation


def test_mutations_fail_for_the_reason_they_plant(mutated):
    """The detail says what went wrong, not just that something did."""
    assert "12 of 12 lora_E ranks in use" in mutated[("adalora", "no_allocate")][1]["assertions"][
        "adalora_schedule"]["detail"]  # without update_and_allocate no rank is ever masked
    assert "base weights changed in training" in mutated[("prefix_tuning_v2", "touch_base")][1]["assertions"][
        "adapter_only_grads"]["detail"]
    if not M.lacks("ia3"):
        assert "non-adapter parameters are trainable" in mutated[("ia3", "unfreeze_base")][1]["assertions"][
            "adapter_only_grads"]["detail"]
    assert "other weight files written: model.safetensors" in mutated[("prompt_tuning", "base_in_adapter")][1][
        "assertions"]["save_adapter_only"]["detail"]
    assert "generate() ignored the adapter" in mutated[("lora", "generate_base")][1]["assertions"]["generate"][
        "detail"]
    tiny = mutated[("prefix_tuning", "tiny_lr")][1]["metrics"]["loss_relative_drop"]
    assert tiny < M.NOISE_DROP  # lr 1e-7 fails even the uncalibrated floor


# --- --keep: what a user keeps, reloaded in a fresh process -------------------------------------------------


def test_kept_adapters_reload_in_a_fresh_process_with_the_recorded_logits(tmp_path):
    import json
    import subprocess
    import sys

    from checks.finetune import keep as K

    keep_dir = tmp_path / "kept"
    names = [n for n in M.SEED_METHODS if not M.lacks(n)]  # IA3 on peft 0.3: absent
    run = P.run_methods(names, TINY, steps=STEPS, timeout_s=300, keep_dir=str(keep_dir))
    assert all(v.status is Status.PASS or (v.status is Status.WARN and only_known_defects(run.details[v.subject]))
               for v in run.verdicts), [v.message for v in run.verdicts]  # WARN: peft 0.3's disable_adapter
    bases = list((keep_dir / K.BASE).iterdir())
    assert [b.name.rsplit("-", 1)[0] for b in bases] == ["tiny"], bases  # one base, named by model and digest
    base = bases[0]
    assert (base / "config.json").is_file() and (base / "tokenizer_config.json").is_file()
    for name in names:
        here = keep_dir / name
        config = json.loads((here / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(base)
        if name == "prompt_tuning":  # its TEXT init's tokenizer: the kept one, not a deleted temp dir
            assert config["tokenizer_name_or_path"] == str(here / "tokenizer")
        assert (here / "tokenizer" / "tokenizer_config.json").is_file() and (here / K.RELOAD_CHECK).is_file()
        result = json.loads((here / K.RESULT).read_text())
        status = next(v.status.label for v in run.verdicts if v.subject == name)
        assert result["status"] == status and result["metrics"] == run.details[name]["metrics"]
        assert result["versions"]["peft"] and result["assertions"]["reload_logits"]["ok"] is True
    # a fresh interpreter that imports torch, transformers and peft only (not this project)
    proc = subprocess.run([sys.executable, "-I", str(Path(__file__).parent / "helpers" / "load_kept.py"),
                           str(keep_dir)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    loaded = {x["method"]: x for x in lines if "method" in x}
    assert sorted(loaded) == sorted(names)
    for x in loaded.values():
        assert x["max_abs_diff"] is not None and x["max_abs_diff"] <= 1e-4, x
    assert lines[-1] == {"peftnode_modules_imported": []}


def test_a_keep_dir_reused_for_another_base_never_points_an_adapter_at_the_wrong_one(tmp_path):
    """Two different built bases kept in one DIR (another model, or the same name built by another
    torch) get a directory each; the same base again reuses its own."""
    from types import SimpleNamespace

    from checks.finetune import keep as K
    from checks.finetune.data import build_tiny_tokenizer
    from checks.finetune.model import build_random

    tokenizer = build_tiny_tokenizer()

    def env(seed):
        return SimpleNamespace(source=None, model_name="tiny", base_digest=None, tokenizer=tokenizer,
                               base=build_random("tiny", tokenizer, seed=seed))

    first = K.write_base(str(tmp_path), env(0))
    again = K.write_base(str(tmp_path), env(0))  # a new worker, the same weights
    other = K.write_base(str(tmp_path), env(1))  # same name, other weights
    assert first == again != other
    assert sorted(p.name for p in (tmp_path / K.BASE).iterdir()) == sorted([Path(first).name, Path(other).name])
    for where, seed in ((first, 0), (other, 1)):
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(where)
        assert K.base_digest(saved) == K.base_digest(env(seed).base)
        assert Path(where).name == K.base_dir_name("tiny", K.base_digest(saved))
    assert K.base_dir_name("random:bloomz-560m", "ab" * 32) == "random-bloomz-560m-" + "ab" * 6


# --- true skip reasons and per-method memory --------------------------------------------------------------


# What each known skip's reason claims, as the installed PEFT says it when the method is run anyway on the
# tiny Bloom (the reason must be where it really fails, not a guess).
SKIP_EVIDENCE = {
    "ADAPTION_PROMPT": "Unsupported model type for adaption prompt: 'bloom'",
    "XLORA": "`use_cache` must be False",
    "TRAINABLE_TOKENS": "trainable_params: 0 trainable parameters",
    "MULTITASK_PROMPT_TUNING": "task_ids cannot be None",
    "POLY": "task_ids should not be None",
    "CPT": "training loss is nan",
}


def test_known_skip_reasons_are_where_the_method_really_fails(tmp_path, monkeypatch):
    from checks.finetune import run as R
    from checks.finetune.model import load

    assert set(SKIP_EVIDENCE) == set(M.KNOWN_SKIPS)
    present = [t for t in M.KNOWN_SKIPS if t in {name.upper() for name in M.peft_types()}]
    if not present:
        pytest.skip("the installed PEFT has none of the known-skip methods")
    model, tokenizer, path = load(TINY, tokenizer_dir=str(tmp_path / "tok"))
    env = R.prepare(model, tokenizer, path, str(tmp_path))
    for peft_type in present:
        monkeypatch.delitem(M.KNOWN_SKIPS, peft_type)
        plan = M.plan(peft_type.lower(), M.Setting(5, path))
        said = plan.skip or R.run_method(plan, env, 5).message
        assert SKIP_EVIDENCE[peft_type] in said, (peft_type, said)


def test_a_discovered_method_without_a_bloom_default_runs_on_loras_modules_and_says_so(tmp_path, monkeypatch):
    """PEFT < 0.8 has no Bloom target modules for LoHa (nor LoKr, OFT): the same state made here by taking Bloom
    out of the installed PEFT's LoHa mapping. The method runs on LoRA's Bloom modules, and the result says so."""
    from checks.finetune import run as R
    from checks.finetune.model import load

    utils = pytest.importorskip("peft.utils")
    mapping = getattr(utils, "TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING", None)
    if mapping is None or "loha" not in M.available_names():
        pytest.skip("the installed PEFT has no LoHa target-module mapping")
    monkeypatch.delitem(mapping, "bloom", raising=False)
    model, tokenizer, path = load(TINY, tokenizer_dir=str(tmp_path / "tok"))
    env = R.prepare(model, tokenizer, path, str(tmp_path))
    plan = M.plan("loha", M.Setting(STEPS, path, "tiny"))
    assert plan.config.target_modules is None
    run = R.run_method(plan, env, STEPS)
    assert run.status is Status.PASS, run.message
    assert list(plan.config.target_modules) == ["query_key_value"]
    assert run.message.endswith("this PEFT has no Bloom default for LOHA") and run.info["notes"] == plan.notes
    # a seed method's config is applied as written: no modules chosen for it behind the user's back
    seed = M.plan("lora", M.Setting(STEPS, path, "tiny"))
    seed.config.target_modules = None
    monkeypatch.delitem(utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "bloom")
    crashed = R.run_method(seed, env, STEPS)
    assert crashed.status is not Status.PASS and "target_modules" in crashed.message, crashed.message


def test_a_known_peft_defect_fails_its_assertion_naming_the_release_that_fixes_it():
    """peft 0.3.0's disable_adapter() on a prompt-learning model (seen there: every prompt-learning method fails
    disabled_equals_base with this AttributeError): the failure stays, and it says whose and what to do."""
    from checks.finetune.run import _Record
    from checks.finetune.verdict import MethodRun

    error = AttributeError("'BloomForCausalLM' object has no attribute 'enable_adapter_layers'")
    said, fixed = M.known_defect("disabled_equals_base", error, installed="0.3.0")
    assert fixed == "0.4.0" and said.startswith("peft 0.3.0's own defect, fixed in peft 0.4.0: disable_adapter()")
    assert M.known_defect("disabled_equals_base", error, installed="0.4.0.dev0") is None  # the seed's has the fix
    assert M.known_defect("disabled_equals_base", ValueError("other"), installed="0.3.0") is None
    assert M.known_defect("generate", error, installed="0.3.0") is None
    ignored = "the first generated tokens [5] are not ... but the base model's [7]: generate() ignored the adapter"
    assert M.known_defect("generate", ignored, installed="0.8.2", peft_type="P_TUNING")[0].startswith(
        "peft 0.8.2's own defect, fixed in peft 0.9.0")
    assert M.known_defect("generate", ignored, installed="0.9.0", peft_type="P_TUNING") is None
    assert M.known_defect("generate", ignored, installed="0.8.2", peft_type="LORA") is None  # LoRA generates fine
    rec = _Record()
    try:
        raise error
    except AttributeError as exc:
        import unittest.mock

        with unittest.mock.patch.object(M, "installed_peft", lambda: "0.3.0"):
            rec.crashed("disabled_equals_base", exc)
    detail = rec.assertions["disabled_equals_base"]["detail"]
    assert rec.assertions["disabled_equals_base"]["ok"] is False and detail.startswith(said)
    assert "(AttributeError: 'BloomForCausalLM' object has no attribute 'enable_adapter_layers'" in detail
    run = MethodRun("prompt_tuning", Status.WARN, f"disabled_equals_base: {detail}", rec.assertions,
                    failed=["disabled_equals_base"], info={"peft_defects": rec.defects})
    assert "upgrade PEFT to >= 0.4.0" in run.verdict().remediation
    assert rec.defects == {"disabled_equals_base": {"defect": said, "fixed_in": "0.4.0"}}
    two = {"generate": {"defect": "…", "fixed_in": "0.9.0"}, "merge_logits": {"defect": "…", "fixed_in": "0.10.0"}}
    run.info["peft_defects"] = two  # the newer release is the one to upgrade to: 0.10.0 (a version, not a string)
    assert "upgrade PEFT to >= 0.10.0" in run.verdict().remediation
    plain = MethodRun("prompt_tuning", Status.FAIL, "x", failed=["disabled_equals_base"])
    assert "version mismatch is the usual cause" in plain.verdict().remediation


def test_a_missing_package_is_named_as_the_skip_reason(monkeypatch):
    def needs_sklearn(peft_type):
        raise ImportError("scikit-learn is required for AdaMSS. Please install it with: pip install scikit-learn")

    monkeypatch.setattr(M, "generic_config", needs_sklearn)
    skip = M.plan("adamss", M.Setting(30, "/nonexistent")).skip
    assert skip.startswith("needs the Python package 'scikit-learn', which is not installed here (pip install "
                           "scikit-learn)")
    missing = ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    assert M.missing_module(missing) == "sklearn"
    assert M.missing_module(ValueError("nope")) is None


def test_a_method_older_peft_lacks_is_a_skip_naming_the_release(monkeypatch):
    assert M.lacks("dora", "0.8.2") == "dora needs peft >= 0.9.0, the release that added it; this is peft 0.8.2"
    assert M.lacks("dora", "0.9.0.dev0") is None and M.lacks("lora", "0.3.0") is None
    assert M.lacks("ia3", "0.3.0").startswith("ia3 needs peft >= 0.4.0")
    monkeypatch.setattr(M, "installed_peft", lambda: "0.3.0")

    def no_ia3(setting):
        raise ImportError("cannot import name 'IA3Config' from 'peft'")

    monkeypatch.setitem(M.SEED_CONFIGS, "ia3", ("IA3", no_ia3))
    p = M.plan("ia3", M.Setting(30, "/nonexistent"))
    assert p.config is None and p.skip.startswith("ia3 needs peft >= 0.4.0, the release that added it; this is "
                                                  "peft 0.3.0 (ImportError: cannot import name 'IA3Config'")


def test_memory_is_measured_per_method_not_over_the_workers_life():
    import mmap

    import torch

    from checks.finetune.run import MemoryWatch

    cpu = torch.device("cpu")
    size = 64 * 2**20
    with MemoryWatch(cpu) as big:
        block = mmap.mmap(-1, size)  # fresh pages, whatever the allocator kept from earlier tests
        for offset in range(0, size, 4096):
            block[offset] = 1  # touched: resident
        time.sleep(4 * MemoryWatch.SAMPLE_S)
        block.close()
    with MemoryWatch(cpu) as small:
        torch.ones(16).sum()
    grew, kind = big.result()
    assert kind == "cpu_rss_increase" and grew >= 48 * 2**20
    assert small.result()[0] < 16 * 2**20  # the first one's peak is not charged to the second


def test_gpu_slots_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert P.gpu_slots() == ["2", "5"]
    assert P.worker_slots(6, TINY) == [P.Slot("2"), P.Slot("5")]
    assert P.worker_slots(1, TINY) == [P.Slot("2")] and P.worker_slots(6, TINY, max_workers=1) == [P.Slot("2")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert P.gpu_slots() == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert P.gpu_slots() == [None]


def test_cpu_workers(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(P, "usable_cpus", lambda: 16)
    assert P.worker_slots(6, TINY) == [P.Slot(None, 8)] * 2  # the tiny model: two workers, the CPUs shared
    assert P.worker_slots(1, TINY) == [P.Slot(None, 16)]
    assert P.worker_slots(6, parse_model_spec("random:bloomz-560m")) == [P.Slot(None, 16)]  # a real model: one
    assert P.worker_slots(6, TINY, max_workers=4) == [P.Slot(None, 4)] * 4
    monkeypatch.setattr(P, "usable_cpus", lambda: 1)
    assert P.worker_slots(6, TINY) == [P.Slot(None, 1)]


# --- methods: names, discovery, plans ----------------------------------------------------------------


def test_method_names_are_discovered_from_peft():
    names = M.available_names()
    assert names[:6] == list(M.SEED_METHODS)
    assert {"loha", "lokr", "oft", "boft", "vera", "fourierft", "ln_tuning"} <= set(names)
    import peft

    assert {t.name.lower() for t in peft.PeftType} <= set(names)


def test_expand():
    assert M.expand(None) == list(M.SEED_METHODS)
    assert M.expand(["lora,ia3", "lora"]) == ["lora", "ia3"]
    assert M.expand("LoRA") == ["lora"]
    everything = M.expand("all")
    assert everything[:6] == list(M.SEED_METHODS) and "prefix_tuning_v2" in everything and "dora" in everything
    assert len(everything) == len(set(everything)) == len(M.available_names())
    assert M.expand("all", ["lora"])[0] == "lora"
    with pytest.raises(M.MethodError, match="unknown method 'nope'.*known: all, lora"):
        M.expand("lora,nope")


def test_plans():
    s = M.Setting(steps=30, tokenizer_path="/nonexistent")
    ada = M.plan("adalora", s)
    assert ada.config.total_step == 30 and ada.config.tinit < 30 - ada.config.tfinal and ada.merge_tolerance == 1e-2
    assert M.plan("prefix_tuning", s).config.prefix_projection is True
    v2 = M.plan("prefix_tuning_v2", s)
    assert v2.peft_type == "PREFIX_TUNING" and v2.config.prefix_projection is False
    assert M.plan("dora", s).config.use_dora is True
    ia3 = M.plan("ia3", s).config
    assert set(ia3.target_modules) == {"query_key_value", "mlp.dense_4h_to_h"}
    assert M.plan("p_tuning", s).config.encoder_hidden_size == 128
    assert M.plan("prompt_tuning", s).config.num_virtual_tokens == 8
    xlora = M.plan("xlora", s)
    assert xlora.config is None and "unexpected keys" in xlora.skip and "0 trainable parameters" in xlora.skip
    assert M.plan("adaption_prompt", s).skip.startswith("adaption prompt")


def test_a_config_that_cannot_be_built_is_a_skip_with_the_exception(monkeypatch):
    def broken(peft_type):
        raise ValueError(f"{peft_type} wants something")

    monkeypatch.setattr(M, "generic_config", broken)
    p = M.plan("loha", M.Setting(30, "/nonexistent"))
    assert p.config is None and p.skip == "its config cannot be built with generic defaults: ValueError: LOHA wants " \
                                          "something"


# --- data ---------------------------------------------------------------------------------------------


def test_bundled_data_is_balanced_and_split():
    examples = D.load_examples()
    assert 60 <= len(examples) <= 100
    train, held = D.split(examples)
    assert len(train) + len(held) == len(examples) and held
    for part in (train, held):
        labels = [e.label for e in part]
        assert labels.count("complaint") == labels.count("no complaint")
    assert not {e.text for e in train} & {e.text for e in held}


def test_prompt_tokens_are_masked_and_batches_left_padded():
    tok = D.build_tiny_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    examples = D.load_examples()[:3]
    rows = D.encode(tok, examples)
    for ex, row in zip(examples, rows, strict=True):
        n_prompt = len(row["prompt_ids"])
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:] and row["labels"][-1] == tok.eos_token_id
        assert tok.decode(row["input_ids"][n_prompt:-1]) == ex.label
        assert tok.decode(row["prompt_ids"]).startswith("tweet text :")
    batch = D.collate(rows, tok.pad_token_id)
    width = max(len(r["input_ids"]) for r in rows)
    for ids, mask, labels, row in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], rows, strict=True):
        pad = width - len(row["input_ids"])
        assert ids[:pad] == [3] * pad and mask == [0] * pad + [1] * len(row["input_ids"])
        assert labels[:pad] == [-100] * pad


# --- model specs --------------------------------------------------------------------------------------

STACK_MODEL = {"name": "bloomz-560m", "repo": "bigscience/bloomz-560m", "path": "/data/models/bloomz-560m"}


def test_model_specs(tmp_path):
    assert parse_model_spec("tiny").kind == "tiny"
    rnd = parse_model_spec("random:bloomz-560m")
    assert rnd.kind == "random" and rnd.shape == "bloomz-560m" and rnd.missing() is None
    default = parse_model_spec(None, STACK_MODEL)
    assert default.kind == "path" and default.path == STACK_MODEL["path"] and default.repo == STACK_MODEL["repo"]
    for bad in ("", "random:gpt9", "random:tiny", "hub:thing"):
        with pytest.raises(ModelSpecError):
            parse_model_spec(bad, STACK_MODEL)
    with pytest.raises(ModelSpecError):
        parse_model_spec(None, {})
    (tmp_path / "config.json").write_text("{}")
    assert parse_model_spec(str(tmp_path)).missing() is None


def test_a_missing_model_names_the_path_and_how_to_fetch_it(tmp_path, cu117):
    path = tmp_path / "models" / "bloomz-560m"
    stack = dict(cu117.data, model=dict(cu117.data["model"], path=str(path)))
    verdicts = finetune_methods(Context(stack, {}, options={}))
    assert len(verdicts) == 1 and verdicts[0].status is Status.FAIL
    assert str(path) in verdicts[0].message and "does not exist" in verdicts[0].message
    assert "git lfs clone" in verdicts[0].remediation and "bigscience/bloomz-560m" in verdicts[0].remediation


def test_settings_come_from_options_then_the_stack(cu117):
    s = settings_from(Context(cu117.data, {}, options={}))
    assert s["model"].path == cu117.data["model"]["path"] and s["methods"] == cu117.data["finetune"]["methods"]
    s = settings_from(Context(cu117.data, {}, options={"model": "tiny", "methods": "all", "steps": 5}))
    assert s["model"].kind == "tiny" and len(s["methods"]) > 6 and s["steps"] == 5
    assert s["keep_dir"] is None
    stack = dict(cu117.data, finetune=dict(cu117.data["finetune"], keep_dir="/data/peftnode/adapters"))
    assert settings_from(Context(stack, {}, options={}))["keep_dir"] == "/data/peftnode/adapters"
    assert settings_from(Context(stack, {}, options={"keep": "/tmp/k"}))["keep_dir"] == "/tmp/k"  # --keep wins
    bad = finetune_methods(Context(cu117.data, {}, options={"methods": "nope"}))
    assert bad[0].status is Status.ERROR and "unknown method 'nope'" in bad[0].message


def test_verify_check_runs_in_the_runner_with_one_verdict_per_method(cu117):
    from checks.registry import _REGISTRY  # importing checks.finetune registered it
    from checks.runner import run_checks

    spec = _REGISTRY["finetune.methods"]
    # it only supervises worker processes (each method under its own timeout): no worker of its own
    assert not spec.out_of_process and spec.slow and spec.exclusive and spec.group == "finetune"
    ctx = Context(cu117.data, cu117.expectations(), options={"model": "tiny", "methods": "lora,xlora", "steps": 5})
    results = {r.name: r for r in run_checks([spec], ctx)}
    assert list(results) == ["finetune.methods[lora]", "finetune.methods[xlora]", "finetune.methods[workers]"]
    assert results["finetune.methods[lora]"].status is Status.PASS
    assert results["finetune.methods[xlora]"].status is Status.SKIP
    assert results["finetune.methods[workers]"].measured["model_params"].value > 0


@pytest.mark.slow
def test_random_bloomz_560m_has_the_exact_parameter_count():
    from checks.finetune.data import build_tiny_tokenizer
    from checks.finetune.model import build_random, count_parameters

    model = build_random("bloomz-560m", build_tiny_tokenizer())
    cfg = model.config
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.vocab_size) == (24, 1024, 16, 250880)
    assert count_parameters(model) == model.num_parameters() == BLOOMZ_560M_PARAMS == 559_214_592


# --- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_methods_run_on_the_gpus():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False here")
    run = P.run_methods(["lora", "adalora", "prefix_tuning", "prompt_tuning"], TINY, steps=STEPS, timeout_s=300)
    assert all(v.status is Status.PASS for v in run.verdicts), [v.message for v in run.verdicts]
    assert all(w["device"].startswith("cuda") for w in run.workers)
    assert len(run.workers) == min(torch.cuda.device_count(), 4)
    for d in run.details.values():
        assert d["metrics"]["peak_memory_kind"] == "cuda_max_allocated" and d["metrics"]["peak_memory_bytes"] > 0


def test_missing_packages_fail_with_the_reason_not_a_crash(monkeypatch, cu117):
    import importlib.util

    import checks.finetune as ft
    from checks.registry import Context
    from checks.result import Status

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    [v] = ft.finetune_methods(Context(cu117.data, cu117.expectations(), options={"model": "tiny"}))
    assert v.status is Status.FAIL and v.message.startswith("cannot fine-tune: peft not installed")
    assert ft.missing_packages() == ["peft"]
