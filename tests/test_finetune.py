"""The smoke fine-tune (checks.finetune): every method on the tiny random Bloom through the worker pool,
named failures, isolation of hanging and crashing methods, model specs and the CLI's exit codes."""

from __future__ import annotations

import json
import math

import pytest

from checks.finetune import data as D
from checks.finetune import finetune_methods, settings_from, verdict_of
from checks.finetune import methods as M
from checks.finetune import pool as P
from checks.finetune.cli import main as finetune_main
from checks.finetune.model import BLOOMZ_560M_PARAMS, ModelSpecError, parse_model_spec
from checks.registry import Context
from checks.result import Status

TINY = parse_model_spec("tiny")
STEPS = 30
SEED_AND_VARIANTS = list(M.SEED_METHODS) + list(M.VARIANTS)
EXTRAS = [n for n in M.available_names() if n not in SEED_AND_VARIANTS]  # discovered from the installed PEFT
PROMPT_LEARNING = {"prefix_tuning", "prefix_tuning_v2", "p_tuning", "prompt_tuning", "cartridge"}


# --- the real thing: every method, once per module, through the worker pool ------------------------


@pytest.fixture(scope="module")
def all_results():
    run = P.run_methods(SEED_AND_VARIANTS + EXTRAS, TINY, steps=STEPS, timeout_s=300)
    return run, {r["method"]: r for r in run.results}


def test_one_worker_ran_everything_on_cpu(all_results):
    run, _ = all_results
    if P.gpu_slots() == [None]:
        assert len(run.workers) == 1 and run.restarts == 0
        assert run.workers[0]["device"] == "cpu" and run.workers[0]["params"] > 0


@pytest.mark.parametrize("name", SEED_AND_VARIANTS + EXTRAS)
def test_method(all_results, name):
    _, results = all_results
    r = results[name]
    if r["status"] == "skip":
        assert name not in M.SEED_METHODS, f"a seed method must never be skipped: {r['message']}"
        if name in SEED_AND_VARIANTS:  # a variant only when the installed PEFT predates it (DoRA: peft < 0.9)
            assert r["message"].startswith("this PEFT cannot build it"), r["message"]
        assert r["message"], "a skip must carry its reason"
        pytest.skip(f"{name}: {r['message']}")
    assert r["status"] == "pass", r["message"]
    a, m = r["assertions"], r["metrics"]
    assert not r["failed"]
    # trainable parameters > 0 and only adapter parameters receive gradients
    assert m["trainable_params"] > 0 and a["trainable_params"]["ok"]
    assert a["adapter_only_grads"]["ok"], a["adapter_only_grads"]["detail"]
    # held-out loss falls
    assert m["loss_after"] < m["loss_before"] and a["loss_decreased"]["ok"]
    # save_pretrained writes the adapter only
    assert a["save_adapter_only"]["ok"], a["save_adapter_only"]["detail"]
    assert "adapter_config.json" in a["save_adapter_only"]["detail"]
    assert m["adapter_params_saved"] > 0
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
    assert m["steps_per_s"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0 and m["wall_s"] > 0
    if name == "adalora":
        assert a["adalora_schedule"]["ok"] and m["update_and_allocate_calls"] == STEPS
    assert verdict_of(r).status is Status.PASS


def test_seed_methods_use_the_seed_shapes(all_results):
    _, results = all_results
    # prefix tuning with the projection MLP trains far more than P-Tuning v2 without it
    assert results["prefix_tuning"]["metrics"]["trainable_params"] > results["prefix_tuning_v2"]["metrics"][
        "trainable_params"]
    assert results["dora"]["metrics"]["trainable_params"] > results["lora"]["metrics"]["trainable_params"]


def test_known_skips_are_reported_with_their_reason(all_results):
    _, results = all_results
    for peft_type, reason in M.KNOWN_SKIPS.items():
        name = peft_type.lower()
        if name in results:
            assert results[name]["status"] == "skip" and results[name]["message"] == reason
            assert verdict_of(results[name]).status is Status.SKIP


# --- failures are named, and a bad method fails alone ----------------------------------------------


def test_faults_fail_alone_and_are_named(monkeypatch):
    # through the environment hook, as an operator reproducing a report would
    monkeypatch.setenv(P.FAULTS_ENV, "ia3:hang,prompt_tuning:crash,prefix_tuning:zero_lr,p_tuning:corrupt_adapter")
    run = P.run_methods(["lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"], TINY, steps=STEPS,
                        timeout_s=12)
    r = {x["method"]: x for x in run.results}
    assert r["lora"]["status"] == "pass", r["lora"]["message"]
    assert r["ia3"]["status"] == "fail" and r["ia3"]["failed"] == ["timeout"]
    assert "timed out after 12 s" in r["ia3"]["message"]
    assert r["prompt_tuning"]["status"] == "error" and r["prompt_tuning"]["failed"] == ["crash"]
    assert "SIGABRT" in r["prompt_tuning"]["message"]
    # lr 0: the loss cannot fall, and that is the assertion named; the rest still holds
    zero = r["prefix_tuning"]
    assert zero["status"] == "fail" and zero["failed"] == ["loss_decreased"], zero["message"]
    assert zero["metrics"]["loss_after"] == pytest.approx(zero["metrics"]["loss_before"])
    assert zero["message"].startswith("loss_decreased: held-out loss")
    # a damaged adapter file: the reload comparison fails by name
    bad = r["p_tuning"]
    assert bad["status"] == "fail" and bad["failed"] == ["reload_logits"], bad["message"]
    assert bad["metrics"]["reload_max_abs_diff"] > 1e-4
    assert run.restarts == 2
    verdicts = {x["method"]: verdict_of(x) for x in run.results}
    assert verdicts["ia3"].status is Status.FAIL and verdicts["prompt_tuning"].status is Status.ERROR
    assert "loss_decreased" in verdicts["prefix_tuning"].remediation


def test_parse_faults():
    assert P.parse_faults("lora:hang, ia3:crash,ia3:raise,,junk") == {"lora": {"hang"}, "ia3": {"crash", "raise"}}
    assert P.parse_faults(None) == {}


def test_gpu_slots_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert P.gpu_slots() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert P.gpu_slots() == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert P.gpu_slots() == [None]


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
    assert xlora.config is None and "reload" in xlora.skip
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
    bad = finetune_methods(Context(cu117.data, {}, options={"methods": "nope"}))
    assert bad[0].status is Status.ERROR and "unknown method 'nope'" in bad[0].message


def test_verify_check_runs_isolated_with_one_verdict_per_method(cu117):
    from checks.registry import _REGISTRY  # importing checks.finetune registered it
    from checks.runner import run_isolated

    spec = _REGISTRY["finetune.methods"]
    assert spec.isolate and spec.slow and spec.group == "finetune"
    ctx = Context(cu117.data, cu117.expectations(), options={"model": "tiny", "methods": "lora,xlora", "steps": 5})
    results = {r.name: r for r in run_isolated(spec, ctx, timeout_s=120)}
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


# --- CLI ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "lora,nope", "--model", "tiny"], "unknown method 'nope'"),
    (["--model", "random:gpt9"], "unknown random model"),
    (["--model", ""], "--model: empty"),
    (["--steps", "0", "--model", "tiny"], "--steps: '0' is not a positive whole number"),
    (["--timeout", "soon", "--model", "tiny"], "--timeout: 'soon'"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_usage_errors_exit_2_on_one_line(argv, needle, capsys):
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_model_exits_1_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    report = tmp_path / "report.json"
    assert finetune_main(["--model", str(missing), "--json", str(report), "--no-progress"]) == 1
    data = json.loads(report.read_text())
    (result,) = data["results"]
    assert result["status"] == "fail" and str(missing) in result["message"]
    assert "git lfs clone" in result["remediation"]


def test_cli_list(capsys):
    assert finetune_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "prefix_tuning_v2" in out and "default" in out


def test_cli_runs_a_saved_model_directory_and_writes_a_valid_report(tmp_path, capsys):
    import jsonschema

    from checks.finetune.model import build_random
    from checks.report.jsonreport import load_schema

    # a saved model directory, as the stack's model.path holds (here: the tiny model, saved)
    model_dir = tmp_path / "bloom-tiny"
    tokenizer = D.build_tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_random("tiny", tokenizer).save_pretrained(model_dir)
    report = tmp_path / "report.json"
    code = finetune_main(["--model", str(model_dir), "--methods", "lora,prompt_tuning,xlora", "--steps", "10",
                          "--json", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, load_schema())
    by_name = {r["name"]: r for r in data["results"]}
    assert by_name["finetune.methods[lora]"]["status"] == "pass"
    assert by_name["finetune.methods[prompt_tuning]"]["status"] == "pass"  # TEXT init reads the model's tokenizer
    assert by_name["finetune.methods[xlora]"]["status"] == "skip"
    assert by_name["finetune.methods[workers]"]["measured"]["import_s"]["value"] > 0
    lora = by_name["finetune.methods[lora]"]["measured"]
    for key in ("steps_per_s", "tokens_per_s", "peak_memory", "wall_s"):
        assert math.isfinite(lora[key]["value"]) and lora[key]["value"] > 0
    assert "[1/3]" in capsys.readouterr().err


# --- GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_methods_run_on_the_gpus():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False here")
    run = P.run_methods(["lora", "adalora", "prefix_tuning", "prompt_tuning"], TINY, steps=STEPS, timeout_s=300)
    assert all(r["status"] == "pass" for r in run.results), [r["message"] for r in run.results]
    assert all(w["device"].startswith("cuda") for w in run.workers)
    assert len(run.workers) == min(torch.cuda.device_count(), 4)
    for r in run.results:
        assert r["metrics"]["peak_memory_kind"] == "cuda_max_allocated" and r["metrics"]["peak_memory_bytes"] > 0


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
