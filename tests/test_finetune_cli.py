"""``invoke finetune`` / ``peftnode-finetune``: verify's finetune group through checks/cli.py, with the
fine-tune's flags. Usage errors exit 2 on one line before anything runs; a run goes through the same
runner, reports and exit codes as verify."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import tomllib
import yaml

import checks.cli as cli
from checks.cli import build_finetune_parser, finetune_main
from checks.finetune import data as D
from checks.finetune import distributed as DIST

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the CLI gets as far as running a check."""
    def refuse(*args, **kwargs):
        pytest.fail("a check ran although the command line was bad")

    monkeypatch.setattr(cli, "run_checks", refuse)
    monkeypatch.delenv(DIST.NPROC_ENV, raising=False)


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "lora,nope", "--model", "tiny"], "unknown method 'nope'"),
    (["--model", "random:gpt9"], "unknown random model"),
    (["--model", ""], "--model: empty"),
    (["--steps", "0", "--model", "tiny"], "--steps: '0' is not a positive whole number"),
    (["--steps", "2.5", "--model", "tiny"], "--steps: '2.5' is not a positive whole number"),
    (["--timeout", "soon", "--model", "tiny"], "--timeout: 'soon'"),
    (["--timeout", "nan", "--model", "tiny"], "--timeout: 'nan' is not a positive number"),
    (["--workers", "65", "--model", "tiny"], "--workers: '65' is not a positive whole number up to 64"),
    (["--gpus", "many", "--model", "tiny"], "--gpus: 'many' is not a whole number from 0 to 64"),
    (["--jobs", "0", "--model", "tiny"], "--jobs: '0' is not a whole number from 1 to 64"),
    (["--expect", "colour=blue", "--model", "tiny"], "--expect: 'colour=blue' is not KEY=VALUE"),
    (["--stack", "cu117", "--manifest", "/nowhere.yml", "--model", "tiny"], "--stack and --manifest: give one"),
    (["--stack", "cu999", "--model", "tiny"], "cu999"),
    (["--json", "/nonexistent-dir/r.json", "--model", "tiny"], "--json: cannot write /nonexistent-dir/r.json"),
    (["--distributed", "--nproc", "1", "--model", "tiny"], "--nproc: DDP needs at least 2 ranks, got 1"),
    (["--distributed", "--nproc", "two", "--model", "tiny"], "--nproc: 'two' is not a whole number"),
    (["--deepspeed", "--nproc", "0", "--model", "tiny"], "--nproc: 0 is out of range"),
    (["--nproc", "2", "--model", "tiny"], "--nproc applies to --distributed / --deepspeed only"),
    (["--distributed", "--methods", "lora", "--model", "tiny"], "--methods does not apply to --distributed"),
    (["--distributed", "--workers", "2", "--model", "tiny"], "--workers does not apply"),
    (["--deepspeed", "--list-methods"], "--list-methods does not apply"),
    (["--distributed", "--keep", "/tmp", "--model", "tiny"], "--keep does not apply"),
    (["--keep", "/etc/hostname", "--model", "tiny"], "--keep: /etc/hostname exists and is not a directory"),
    (["--only", "gpu"], "unrecognized arguments: --only gpu"),
    (["--bogus"], "unrecognized arguments"),
])
def test_usage_errors_exit_2_on_one_line_before_anything_runs(argv, needle, capsys, nothing_runs):
    assert finetune_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftnode finetune: error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_nproc_environment_variable_is_checked_too(capsys, nothing_runs, monkeypatch):
    monkeypatch.setenv(DIST.NPROC_ENV, "1")
    assert finetune_main(["--distributed", "--model", "tiny"]) == 2
    assert f"{DIST.NPROC_ENV}: DDP needs at least 2 ranks, got 1" in capsys.readouterr().err


def test_flags_parse():
    args = build_finetune_parser().parse_args(["--distributed", "--deepspeed", "--nproc", "2", "--model", "tiny",
                                               "--gpus", "0", "--expect", "gpus=2", "--jobs", "3", "--list"])
    assert args.distributed and args.deepspeed and args.nproc == "2" and args.list_methods
    assert (args.gpus, args.expect, args.jobs) == ("0", ["gpus=2"], "3")
    args = build_finetune_parser().parse_args([])
    assert not args.distributed and not args.deepspeed and args.nproc is None and args.steps is None
    assert not args.list_methods and not args.allow_download and args.methods is None


def test_the_stacks_own_missing_model_is_a_fail_naming_how_to_fetch_it(tmp_path, capsys):
    """The stack's model.path absent is the node's state: exit 1 with the fetch hint in the report."""
    report = tmp_path / "report.json"
    missing = "/data/models/bloomz-560m"
    if Path(missing).exists():
        pytest.skip(f"{missing} exists on this machine")
    assert finetune_main(["--stack", "cu117", "--json", str(report), "--no-progress"]) == 1
    data = json.loads(report.read_text())
    (result,) = data["results"]
    assert result["name"] == "finetune.methods" and result["status"] == "fail" and missing in result["message"]
    assert "git lfs clone" in result["remediation"]
    assert data["exit_code"] == 1


def test_a_mistyped_model_directory_exits_2_before_anything_runs(tmp_path, capsys, nothing_runs):
    missing = tmp_path / "nowhere"
    report = tmp_path / "report.json"
    assert finetune_main(["--model", str(missing), "--json", str(report), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peftnode finetune: error: --model: ") and str(missing) in err[0]
    assert not report.exists()


@pytest.mark.parametrize("flag", ["--list-methods", "--list"])
def test_list_methods(flag, capsys, nothing_runs):
    assert finetune_main([flag]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "prefix_tuning_v2" in out and "default" in out and "variant" in out


def test_a_saved_model_directory_through_the_runner_and_the_reports(tmp_path, capsys):
    import jsonschema

    from checks.finetune.model import build_random
    from checks.report.jsonreport import load_schema

    # a saved model directory, as the stack's model.path holds (here: the tiny model, saved)
    model_dir = tmp_path / "bloom-tiny"
    tokenizer = D.build_tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_random("tiny", tokenizer).save_pretrained(model_dir)
    report, junit, prom = tmp_path / "report.json", tmp_path / "junit.xml", tmp_path / "f.prom"
    kept = tmp_path / "kept"
    code = finetune_main(["--model", str(model_dir), "--methods", "lora,prompt_tuning,xlora", "--steps", "10",
                          "--json", str(report), "--junit", str(junit), "--prom", str(prom), "--keep", str(kept)])
    assert code == 0
    data = json.loads(report.read_text())
    jsonschema.validate(data, load_schema())
    by_name = {r["name"]: r for r in data["results"]}
    assert list(by_name) == ["finetune.methods[lora]", "finetune.methods[prompt_tuning]", "finetune.methods[xlora]",
                             "finetune.methods[workers]"]
    assert by_name["finetune.methods[lora]"]["status"] == "pass"
    assert by_name["finetune.methods[prompt_tuning]"]["status"] == "pass"  # TEXT init reads the model's tokenizer
    assert by_name["finetune.methods[xlora]"]["status"] == "skip"
    assert by_name["finetune.methods[workers]"]["measured"]["import_s"]["value"] > 0
    lora = by_name["finetune.methods[lora]"]["measured"]
    for key in ("steps_per_s", "tokens_per_s", "peak_memory", "wall_s", "trainable_params"):
        assert math.isfinite(lora[key]["value"]) and lora[key]["value"] > 0
    assert lora["assertions"]["value"] == "10/10 passed" and "->" in lora["loss"]["value"]
    # the figures the run computed are in the report
    assert lora["reload_max_abs_diff"]["value"] <= 1e-4 and lora["adapter_bytes"]["value"] > 0
    assert lora["adapter_bytes"]["unit"] == "bytes" and lora["adapter_format"]["value"] in ("safetensors", "bin")
    assert "resident memory" in lora["peak_memory_kind"]["value"] or "CUDA" in lora["peak_memory_kind"]["value"]
    # --keep: a directory model is not copied; the kept adapter points at it, and every method has a result.json
    adapter_config = json.loads((kept / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(model_dir) and not (kept / "base").exists()
    assert json.loads((kept / "xlora" / "result.json").read_text())["status"] == "skip"
    assert data["options"]["keep"] == str(kept)
    options = data["options"]
    assert options["methods"] == ["lora", "prompt_tuning", "xlora"] and options["steps"] == 10
    assert options["model"] == str(model_dir) and options["timeout_s"] == 600 and options["distributed"] is False
    text = prom.read_text()
    assert 'check="finetune.methods[lora]"' in text and "peftnode_finetune_node_healthy 1.0" in text
    assert any(line.startswith("peftnode_finetune_check_status{") and 'check="finetune.methods[lora]"' in line
               and 'state="pass"' in line and line.endswith(" 1.0") for line in text.splitlines())
    assert "finetune.methods[lora]" in junit.read_text()
    captured = capsys.readouterr()
    assert "[1/3]" in captured.err and "[3/3]" in captured.err  # a line per method as it finishes
    assert "peftnode finetune" in captured.out


def test_distributed_and_deepspeed_skip_without_gpus(tmp_path, cu117, monkeypatch):
    monkeypatch.delenv(DIST.NPROC_ENV, raising=False)
    stack = tmp_path / "cpu.yml"
    stack.write_text(yaml.safe_dump(dict(cu117.data, node=dict(cu117.data.get("node") or {}, gpus=0))))
    for argv in (["--stack", str(stack)], ["--gpus", "0"], ["--expect", "gpus=0"]):
        report = tmp_path / "r.json"
        assert finetune_main(["--distributed", "--deepspeed", "--model", "tiny", *argv, "--json", str(report),
                              "--no-progress"]) == 0
        data = json.loads(report.read_text())
        assert {r["name"]: r["status"] for r in data["results"]} == {"finetune.distributed": "skip",
                                                                    "finetune.deepspeed": "skip"}
        assert data["options"]["distributed"] is True and data["options"]["gpus"] == 0


def test_invoke_task_forwards_the_flags(monkeypatch):
    import invoke

    import tasks

    seen = []
    monkeypatch.setattr(cli, "finetune_main", lambda argv: seen.append(argv) or 0)
    tasks.finetune(invoke.Context(), model="tiny", distributed=True, deepspeed=True, nproc=2, gpus=2,
                   expect=["gpu_model=H100", "gpus=2"], jobs=2)
    tasks.finetune(invoke.Context(), list_methods=True)
    assert seen == [["--gpus=2", "--expect=gpu_model=H100", "--expect=gpus=2", "--model=tiny", "--jobs=2",
                     "--distributed", "--deepspeed", "--nproc=2"], ["--list-methods"]]


def test_the_console_script_goes_through_checks_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["peftnode-finetune"] == "checks.cli:finetune_console_main"
    assert scripts["peftnode-verify"] == "checks.cli:console_main"
    assert callable(cli.finetune_console_main)
    assert not (ROOT / "checks" / "finetune" / "cli.py").exists()


def test_no_module_under_checks_imports_the_cli():
    """checks/cli.py is the entry: the checks never call up into it (a package's __main__.py is an entry as the
    console scripts are: `python -m checks.fleet`)."""
    offenders = []
    for path in sorted((ROOT / "checks").rglob("*.py")):
        if path == ROOT / "checks" / "cli.py" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "checks.cli" or n.startswith("checks.cli.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
