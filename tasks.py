"""peftnode's menu: `invoke --list`. Each task is thin: it parses flags and calls into `checks`.

`invoke verify`, `invoke finetune` and `invoke fleet-report` are generated from the one argparse definition of
`peftnode-verify`, `peftnode-finetune` and `peftnode-fleet-report` (`checks/cli.py`: `build_parser()`,
`build_finetune_parser()`, `build_fleet_parser()`; a positional such as fleet-report's DIR becomes invoke's
positional argument, also spelled `--dir`): every flag, short
flag, alias and help text is the parser's, and the task rebuilds the command line and calls the same entry,
so the two ways in cannot drift apart. Adaptations of invoke itself, made here because invoke imports this
file before it parses any task flag, and tested through a real `invoke` process in tests/test_tasks.py:

- a flag invoke cannot parse (unknown, missing value) exits 2 with one line, like the console scripts'
  usage errors, instead of invoke's exit 1, which in this project means "unhealthy" (`Program.parse_tasks`
  and `parse_cleanup` turn invoke's ParseError into `Exit(line, code=2)`);
- after `verify`/`finetune`, invoke's own options (`-d`, `-V`, ...) and text after `--` are refused the
  same way, as the console scripts refuse them, instead of being taken as invoke's or dropped;
- `invoke --help verify` shows each flag's metavar (`--expect=KEY=VALUE`) instead of invoke's `STRING`
  (and nothing at all for a repeatable flag).
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from pathlib import Path

from invoke import Argument, Exit, Task, task
from invoke.exceptions import ParseError
from invoke.parser import ParserContext
from invoke.parser.context import to_flag
from invoke.program import Program

from checks import cli

ROOT = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # tools of the environment invoke runs in (the venv)

EXIT_USAGE = cli.EXIT_USAGE


# --- flags generated from the console scripts' argparse parsers ------------------------------------------

def _kind(action: argparse.Action):
    """The invoke Argument kind of an argparse action: a switch, a repeatable value, or one value."""
    if isinstance(action, argparse._AppendAction):
        return list
    if action.nargs == 0:  # store_true, version
        return bool
    if action.nargs is None and isinstance(action, argparse._StoreAction):
        return str
    raise TypeError(f"{'/'.join(action.option_strings)}: argparse action {type(action).__name__} "
                    f"(nargs={action.nargs!r}) has no invoke counterpart in tasks.py")


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text exactly as argparse prints it (with `%(prog)s`-style fields filled in)."""
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": parser.prog}
    return text


def _metavar(action: argparse.Action) -> str | None:
    return None if _kind(action) is bool else (action.metavar or action.dest.upper())


def _long(action: argparse.Action) -> str:
    return next(s for s in action.option_strings if s.startswith("--"))


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's flags, without argparse's own --help (invoke's `--help <task>` and `-h` stand for it)."""
    # argparse keeps its actions in `_actions` and offers no public accessor for them.
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


class ArgparseArgument(Argument):
    """An invoke Argument made from an argparse action; it keeps the action's metavar for `--help`."""

    def __init__(self, *args, metavar: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metavar = metavar


def to_arguments(parser: argparse.ArgumentParser) -> list[Argument]:
    """One invoke Argument per argparse flag: the same long and short names, dest, kind and help."""
    out = []
    for action in flag_actions(parser):
        if not action.option_strings:  # a positional (fleet-report's DIR): invoke's positional argument
            if action.nargs is not None or not isinstance(action, argparse._StoreAction):
                raise TypeError(f"{action.dest}: only a single-value positional has an invoke counterpart in tasks.py")
            out.append(ArgparseArgument(names=[action.dest], kind=str, default=None, positional=True,
                                        help=_help(parser, action), metavar=_metavar(action)))
            continue
        if any(not s.startswith("-") for s in action.option_strings):
            raise TypeError(f"{action.dest}: positional arguments have no invoke counterpart in tasks.py")
        longs = [s[2:] for s in action.option_strings if s.startswith("--")]
        shorts = [s[1:] for s in action.option_strings if not s.startswith("--")]
        if not longs or any(len(n) < 2 for n in longs) or any(len(n) != 1 for n in shorts):
            raise TypeError(f"{'/'.join(action.option_strings)}: invoke needs a long flag first and one-letter "
                            f"short flags")
        if to_flag(action.dest) != f"--{longs[0]}":
            raise TypeError(f"{'/'.join(action.option_strings)}: dest {action.dest!r} must name the first long flag "
                            f"(invoke keys the task's arguments and its help by it)")
        kind = _kind(action)
        # attr_name only where it differs from the flag (invoke aliases one to the other; a self-alias loops)
        out.append(ArgparseArgument(names=[*longs, *shorts], attr_name=action.dest if "_" in action.dest else None,
                                    kind=kind,
                                    default=[] if kind is list else False if kind is bool else None,
                                    help=_help(parser, action), metavar=_metavar(action)))
    return out


def to_argv(parser: argparse.ArgumentParser, values: dict) -> list[str]:
    """The console script's command line for the values invoke parsed (keyed by dest)."""
    argv: list[str] = []
    positionals: list[str] = []
    for action in flag_actions(parser):
        if not action.option_strings:
            if values.get(action.dest) is not None:
                positionals.append(str(values[action.dest]))
            continue
        flag, kind, value = _long(action), _kind(action), values.get(action.dest)
        if kind is bool:
            argv += [flag] if value else []
        elif kind is list:  # one string is one item (a Python caller's `expect="gpus=0"`), not its characters
            items = [value] if isinstance(value, str) else value or []
            argv += [f"{flag}={item}" for item in items]  # `=`: a value may start with '-' (`--json -`)
        elif value is not None:
            argv.append(f"{flag}={value}")
    return argv + (["--", *positionals] if positionals else [])  # `--`: a directory may start with '-'


class ArgparseTask(Task):
    """An invoke task whose flags are a console script's argparse flags and whose body runs that script's
    entry with them: `invoke verify ARGS` is `peftnode-verify ARGS`, exit code included."""

    def __init__(self, name: str, build_parser, entry: str, script: str, exits: str):
        self.parser, self.entry = build_parser(), entry

        def body(c, **values):
            return self.run(values)

        body.__name__, body.__module__ = name, __name__
        body.__doc__ = (f"{self.parser.description} {exits}\n\n"
                        f"The flags are {script}'s, generated from its parser in checks/cli.py.")
        super().__init__(body, name=name, positional=[], auto_shortflags=False)

    @property
    def prog(self) -> str:
        return self.parser.prog

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        return to_arguments(self.parser)

    def run(self, values: dict) -> None:
        unknown = sorted(set(values) - {a.dest for a in flag_actions(self.parser)})
        if unknown:  # a Python caller's typo must not vanish (invoke's parser only ever passes the dests)
            raise TypeError(f"{self.name}() got unexpected keyword arguments {unknown}; its flags are "
                            f"{self.prog}'s, keyed by argparse dest")
        argv = to_argv(self.parser, values)
        try:
            code = getattr(cli, self.entry)(argv)  # looked up per call: the entry a test or caller sees
        except SystemExit as exc:  # argparse's --version prints and exits 0
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if code:
            raise Exit(code=code)


verify = ArgparseTask("verify", cli.build_parser, "main", "peftnode-verify",
                      "Exit 0 healthy, 1 unhealthy, 2 bad usage.")
finetune = ArgparseTask("finetune", cli.build_finetune_parser, "finetune_main", "peftnode-finetune",
                        "Exit 0 pass, 1 fail, 2 bad usage.")
fleet_report = ArgparseTask("fleet-report", cli.build_fleet_parser, "fleet_main", "peftnode-fleet-report",
                            "Exit 0 healthy, 1 any node failed, errored or has no report, 2 bad usage.")
GENERATED = {t.name: t for t in (verify, finetune, fleet_report)}


# --- invoke adaptations: bad flags exit 2 with one line; --help shows metavars ------------------------------

def _flag_of(text: str) -> str:
    """`--jobs` from invoke's `Flag <Argument: jobs> ...` (its messages name the Argument, not the flag)."""
    match = re.search(r"<\w+: ([\w-]+)", text)
    return to_flag(match.group(1)) if match else "a flag"


def usage_line(exc: ParseError) -> str:
    """One line for an invoke parse error, in the console scripts' words where the task is one of theirs."""
    text = str(exc)
    name = getattr(exc.context, "name", None)
    owner = GENERATED.get(name)
    prog = owner.prog if owner else f"peftnode {name}" if name else "peftnode"
    unknown = re.fullmatch(r"No idea what '(.*)' is!", text)
    if unknown:
        what = unknown.group(1)
        if name:  # inside a task's flags
            return f"{prog}: error: unrecognized arguments: {what} (invoke --help {name} lists the flags)"
        return f"{prog}: error: no task or flag {what!r} here (invoke --list lists the tasks)"
    if "needed value and was not given one" in text:
        return f"{prog}: error: argument {_flag_of(text)}: expected one argument"
    if "doesn't take any value" in text:
        return f"{prog}: error: argument {_flag_of(text)}: takes no value"
    return f"{prog}: error: {text}"


def _usage_exits_2(method):
    """Wrap a Program parse step so that invoke's ParseError (exit 1, this project's "unhealthy") becomes
    exit 2 with one line. tasks.py runs before task arguments are parsed (collection loading), so the
    wrap is in place in time; it is idempotent if tasks.py is imported twice."""
    if getattr(method, "peftnode_usage", False):
        return method

    @functools.wraps(method)
    def step(self, *args, **kwargs):
        try:
            method(self, *args, **kwargs)
        except ParseError as exc:
            raise Exit(usage_line(exc), code=EXIT_USAGE) from None
        if method.__name__ == "parse_tasks":
            _refuse_invoke_options_after(self)

    step.peftnode_usage = True
    return step


def _refuse_invoke_options_after(program: Program) -> None:
    """After `invoke verify` only verify's own flags count: invoke would otherwise take its core options
    there too (`invoke verify -d` = debug, `-V` = invoke's version) and ignore text after `--`, where
    peftnode-verify refuses both. `--help`/`-h` after the task stays: it prints the task's help."""
    ours = [ctx.name for ctx in program.tasks if ctx.name in GENERATED]
    if not ours:
        return
    prog = GENERATED[ours[0]].prog
    given = [arg for arg in program.core_via_tasks.args.values() if arg.got_value and arg.name != "help"]
    if given:
        names = "/".join(to_flag(n) for n in given[0].names)
        raise Exit(f"{prog}: error: unrecognized arguments: {names} (an option of invoke itself: give it before "
                   f"the task name)", code=EXIT_USAGE)
    if program.core.remainder:
        raise Exit(f"{prog}: error: unrecognized arguments: {program.core.remainder}", code=EXIT_USAGE)


def _help_with_metavars(method):
    """Wrap ParserContext.help_for: a flag made from argparse shows its metavar (`--expect=KEY=VALUE`,
    `-v`), where invoke would print `=STRING`, or nothing for a repeatable flag."""
    if getattr(method, "peftnode_metavar", False):
        return method

    @functools.wraps(method)
    def help_for(self, flag):
        names, text = method(self, flag)
        arg = self.flags[flag]
        if isinstance(arg, ArgparseArgument):
            meta = f"{arg.metavar}{' ...' if arg.kind is list else ''}" if arg.metavar else ""
            spelled = [to_flag(n) + ((f"={meta}" if len(n) > 1 else f" {meta}") if meta else "") for n in arg.names]
            names = ", ".join(spelled)
        return names, text

    help_for.peftnode_metavar = True
    return help_for


Program.parse_tasks = _usage_exits_2(Program.parse_tasks)
Program.parse_cleanup = _usage_exits_2(Program.parse_cleanup)  # `invoke --help no-such-task`
ParserContext.help_for = _help_with_metavars(ParserContext.help_for)


# --- README flag tables, from the same parsers ---------------------------------------------------------------

README = ROOT / "README.md"


def flag_table(parser: argparse.ArgumentParser) -> str:
    """The README's markdown table of a parser's flags: names as typed, metavar, argparse's help."""
    rows = ["| flag | meaning |", "| --- | --- |"]
    for action in flag_actions(parser):
        meta = _metavar(action)
        names = ", ".join(f"`{s}{' ' + meta if meta and s.startswith('--') else ''}`" for s in action.option_strings)
        names = names or f"`{meta}` (positional)"
        if _kind(action) is list:
            names += " (repeatable)"
        rows.append(f"| {names.replace('|', chr(92) + '|')} | {_help(parser, action).replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def _marker(name: str) -> tuple[str, str]:
    return (f"<!-- flags:{name} (generated from checks/cli.py by tasks.flag_table; tests/test_tasks.py "
            f"keeps it in step) -->\n", f"<!-- /flags:{name} -->")


def readme_with_flag_tables(text: str) -> str:
    """``text`` (the README) with each generated task's flag table between its markers rewritten."""
    for name, generated in GENERATED.items():
        start, end = _marker(name)
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"README.md: expected one {start.strip()} ... {end} block")
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = f"{head}{start}{flag_table(generated.parser)}{end}{tail}"
    return text


def update_readme() -> None:
    """Rewrite the README's flag tables from the parsers: `.venv/bin/python -c 'import tasks;
    tasks.update_readme()'`."""
    README.write_text(readme_with_flag_tables(README.read_text(encoding="utf-8")), encoding="utf-8")


LINTERS = (
    ("ruff", [str(BIN / "ruff"), "check", "."]),
    ("yamllint", [str(BIN / "yamllint"), "-s", "."]),
    ("ansible-lint", [str(BIN / "ansible-lint"), "--offline"]),
    ("syntax-check", [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", "site.yml"]),
    # .github/workflows/*.yml; not installed -> fails saying to run scripts/install-actionlint
    ("actionlint", [str(ROOT / "scripts" / "actionlint")]),
)


@task
def lint(c):
    """Lint everything: ruff, yamllint, ansible-lint, ansible-playbook --syntax-check site.yml, actionlint."""
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
