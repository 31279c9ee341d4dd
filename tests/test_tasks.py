"""`invoke verify` / `invoke finetune` are the console scripts under another name: the same flags (generated
from checks/cli.py's argparse parsers), the same exit codes, and a bad flag exits 2 with one line. Driven
through a real `invoke` process from a directory outside the repository (`invoke -r ROOT`), as a user runs
it, plus a structural comparison of invoke's parser contexts with the argparse parsers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection
from invoke.parser import Parser, ParserContext

import checks
import tasks
from checks import cli

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INVOKE = str(BIN / "invoke")
PARSERS = {"verify": cli.build_parser, "finetune": cli.build_finetune_parser}
SCRIPTS = {"verify": "peftnode-verify", "finetune": "peftnode-finetune"}


def invoke(*args, cwd: Path, timeout: float = 120):
    return subprocess.run([INVOKE, "-r", str(ROOT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def script(name: str, *args, cwd: Path):
    return subprocess.run([str(BIN / SCRIPTS[name]), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def contexts() -> dict[str, ParserContext]:
    """invoke's parser contexts for tasks.py, built the way `invoke` builds them after loading the module."""
    return {ctx.name: ctx for ctx in Collection.from_module(tasks).to_contexts()}


def one_usage_line(proc, prefix: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# --- structure: invoke's flags are argparse's, and nothing else ---------------------------------------------

@pytest.mark.parametrize("name", ["verify", "finetune"])
def test_every_argparse_flag_is_the_same_invoke_flag_and_there_is_no_other(name):
    parser = PARSERS[name]()
    ctx = contexts()[name]
    actions = [a for a in parser._actions if "--help" not in a.option_strings]
    wanted = {flag for a in actions for flag in a.option_strings}
    assert set(ctx.flag_names()) == wanted  # long flags, short flags (-v) and aliases (--list), no auto short flag
    assert not ctx.inverse_flags  # no invoke-made --no-<flag>
    assert not ctx.positional_args
    for action in actions:
        expected_help = action.help % {**vars(action), "prog": parser.prog} if "%" in action.help else action.help
        for flag in action.option_strings:
            arg = ctx.flags[flag]
            assert ctx.help_for(flag)[1] == expected_help, flag
            kind = list if action.__class__.__name__ == "_AppendAction" else bool if action.nargs == 0 else str
            assert arg.kind is kind, (flag, arg.kind)
            assert arg.name == action.dest.replace("_", "-") or arg.attr_name == action.dest, flag
    # the short flags argparse defines, and only those
    assert sorted(f for f in ctx.flag_names() if not f.startswith("--")) == ["-v"]


def test_lint_and_test_keep_their_own_flags():
    ctxs = contexts()
    assert set(ctxs) == {"verify", "finetune", "fleet-report", "lint", "test"}
    assert set(ctxs["test"].flag_names()) == {"--args", "-a", "--quick", "-q"}
    assert set(ctxs["lint"].flag_names()) == set()


@pytest.mark.parametrize("name, argv", [
    ("verify", ["-v", "--expect", "gpus=0", "--expect", "gpu_model=H100", "--only", "system", "--only",
                "python.openssl,gpu", "--skip=gpu", "--json", "-", "--failed-only", "--no-progress", "--jobs", "3",
                "--stack", "cu117", "--timeout", "2.5", "--quick", "--list"]),
    ("verify", []),
    ("finetune", ["--list", "--methods", "lora,ia3", "--methods", "prefix", "--steps", "5", "--allow-download",
                  "--model", "tiny", "--nproc", "2", "--distributed", "--deepspeed", "--workers", "1",
                  "--verbose", "--expect", "min_free_gib={model: 1}", "--json", "-"]),
])
def test_invoke_parse_then_rebuilt_argv_reads_as_the_original_to_argparse(name, argv):
    """What invoke's real parser makes of a command line, rebuilt by the task, is what argparse makes of it."""
    parser = PARSERS[name]()
    ctx = contexts()[name]
    parsed = Parser(initial=ParserContext(), contexts=[ctx]).parse_argv([name, *argv])
    values = parsed[1].as_kwargs
    rebuilt = tasks.to_argv(parser, values)
    assert vars(parser.parse_args(rebuilt)) == vars(parser.parse_args(argv))


# --- a real invoke process ---------------------------------------------------------------------------------

def test_repeatable_expect_reaches_the_run(tmp_path):
    report = tmp_path / "r.json"
    proc = invoke("verify", "--expect", "gpus=0", "--expect", "gpu_model=H100", "--expect",
                  "min_free_gib={model: 123456}", "--only", "system", "--json", str(report), "--no-progress",
                  cwd=tmp_path)
    assert proc.returncode in (0, 1), (proc.returncode, proc.stderr)  # never the usage error
    assert "No idea" not in proc.stderr and "error" not in proc.stderr
    doc = json.loads(report.read_text())
    assert doc["options"]["gpus"] == 0 and doc["options"]["only"] == ["system"]  # the first --expect
    disk = {r["name"]: r for r in doc["results"]}["system.disk[model]"]
    assert disk["status"] == "fail" and "needs 123456 GiB" in disk["message"]  # the third, in the same run
    assert proc.returncode == 1


def test_comma_lists_and_repeats_both_select(tmp_path):
    report = tmp_path / "r.json"
    proc = invoke("verify", "--only", "system.os,python.openssl", "--only", "system.disk", "--skip", "system.disk",
                  "--json", str(report), "--no-progress", cwd=tmp_path)
    assert proc.returncode in (0, 1), proc.stderr
    assert sorted({r["name"].split("[")[0] for r in json.loads(report.read_text())["results"]}) == [
        "python.openssl", "system.os"]


def test_json_dash_goes_through_invoke_to_stdout(tmp_path):
    proc = invoke("verify", "--only", "system.os", "--gpus", "0", "--json", "-", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["name"] == "system.os"


@pytest.mark.parametrize("name, argv, prefix", [
    ("verify", ["--no-such-flag"], "peftnode verify: error: unrecognized arguments: --no-such-flag"),
    ("verify", ["--jobs"], "peftnode verify: error: argument --jobs: expected one argument"),
    ("verify", ["--jobs", "--quick"], "peftnode verify: error: argument --jobs: expected one argument"),
    ("verify", ["--gpus", "abc"], "peftnode verify: error: --gpus: 'abc' is not a whole number from 0 to 64"),
    ("verify", ["--only", "system", "stray"], "peftnode verify: error: unrecognized arguments: stray"),
    ("finetune", ["--no-such-flag"], "peftnode finetune: error: unrecognized arguments: --no-such-flag"),
    ("finetune", ["--steps"], "peftnode finetune: error: argument --steps: expected one argument"),
])
def test_a_bad_flag_exits_2_with_the_console_scripts_line(tmp_path, name, argv, prefix):
    line = one_usage_line(invoke(name, *argv, cwd=tmp_path), prefix)
    # the console script says the same (invoke may add where to look)
    assert line.startswith(one_usage_line(script(name, *argv, cwd=tmp_path), prefix))


@pytest.mark.parametrize("argv, needle", [
    (["verify", "-d"], "--debug/-d (an option of invoke itself: give it before the task name)"),
    (["verify", "-V"], "--version/-V (an option of invoke itself"),
    (["verify", "--", "extra"], "unrecognized arguments: extra"),
    (["test", "--no-such-flag"], "peftnode test: error: unrecognized arguments: --no-such-flag"),
    (["no-such-task"], "peftnode: error: no task or flag 'no-such-task'"),
    (["--help", "no-such-task"], "peftnode: error: no task or flag 'no-such-task'"),
])
def test_what_invoke_alone_would_take_or_refuse_is_a_usage_error(tmp_path, argv, needle):
    line = one_usage_line(invoke(*argv, cwd=tmp_path), "peftnode")
    assert needle in line


def test_invoke_help_lists_the_generated_flags(tmp_path):
    proc = invoke("--help", "verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--expect=KEY=VALUE ..." in proc.stdout and "--verbose, -v" in proc.stdout
    assert "override a node expectation" in proc.stdout  # argparse's help text
    for action in cli.build_parser()._actions:
        if "--help" not in action.option_strings:
            assert all(flag in proc.stdout for flag in action.option_strings), action.option_strings
    after = invoke("verify", "--help", cwd=tmp_path)  # `--help` after the task: the same page
    assert after.returncode == 0 and after.stdout == proc.stdout


def test_version_is_the_console_scripts(tmp_path):
    proc = invoke("verify", "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"peftnode verify {checks.__version__}\n"
    assert proc.stdout == script("verify", "--version", cwd=tmp_path).stdout


@pytest.mark.parametrize("flag", ["--list-methods", "--list"])
def test_finetune_list_methods(tmp_path, flag):
    proc = invoke("finetune", flag, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"lora", "ia3"} <= set(names)
    assert proc.stdout == script("finetune", flag, cwd=tmp_path).stdout


# --- the README's flag tables are the parsers' ------------------------------------------------------------

def test_readme_flag_tables_are_generated_from_the_parsers():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("verify", "finetune"):
        table = tasks.flag_table(PARSERS[name]())
        assert table in text, f"README's {name} flag table is stale"
        for action in PARSERS[name]()._actions:
            if "--help" not in action.option_strings:
                assert f"`{action.option_strings[0]}" in table
    assert tasks.readme_with_flag_tables(text) == text, (
        "README.md's flag tables differ from checks/cli.py's parsers: run "
        "`.venv/bin/python -c 'import tasks; tasks.update_readme()'` and review the diff")


def test_a_python_caller_gets_the_same_command_line(monkeypatch):
    """`tasks.verify(ctx, ...)` from Python: keyword arguments by argparse dest, a string is one item of a
    repeatable flag, and an unknown keyword is an error rather than silently dropped."""
    import invoke

    seen = []
    monkeypatch.setattr(cli, "finetune_main", lambda argv: seen.append(argv) or 0)
    tasks.finetune(invoke.Context(), model="tiny", expect=["gpu_model=H100", "gpus=2"], methods="lora", nproc=2,
                   list_methods=True, json="-")
    assert seen == [["--expect=gpu_model=H100", "--expect=gpus=2", "--model=tiny", "--json=-", "--methods=lora",
                     "--nproc=2", "--list-methods"]]
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['list'\]"):
        tasks.finetune(invoke.Context(), list=True)
    monkeypatch.setattr(cli, "main", lambda argv: 1)
    with pytest.raises(invoke.Exit) as exit_:
        tasks.verify(invoke.Context(), only=["system"])
    assert exit_.value.code == 1
