"""The GitHub Actions workflows (.github/workflows): clean under the real actionlint (the WebAssembly build that
scripts/install-actionlint installs and scripts/actionlint runs, as `invoke lint` does), the linter shown to be
live on broken copies, and what actionlint cannot know checked against the repository itself: CI runs the
README's and .ci/run's commands over the whole suite; the GPU workflow's triggers, runner labels, reports,
permissions and its input reaching scripts only through the environment."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from invoke import Config, Context, Exit

import tasks
from checks import cli
from tests.helpers import tools

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CONFIG = ROOT / ".github" / "actionlint.yaml"
ACTIONLINT = ROOT / "scripts" / "actionlint"
INSTALLER = ROOT / "scripts" / "install-actionlint"
TOOL = Path(os.environ.get("PEFTNODE_ACTIONLINT_DIR") or ROOT / ".cache" / "tools" / "actionlint")
GPU_LABELS = ["self-hosted", "linux", "gpu"]


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def steps(doc: dict):
    """(job id, job, step) for every step of every job."""
    for job_id, job in doc["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, job, step


def run_scripts(doc: dict) -> list[str]:
    return [step["run"] for _, _, step in steps(doc) if "run" in step]


def commands(script: str) -> list[str]:
    """The simple commands of a run script: split at newlines, `&&`, `||` and `;`."""
    return [c.strip() for c in re.split(r"\n|&&|\|\||;", script) if c.strip()]


def actionlint(*files: Path, tool: Path = TOOL, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTNODE_ACTIONLINT_DIR": str(tool)}
    return subprocess.run([str(ACTIONLINT), *map(str, files)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def installed() -> Path:
    """The installed actionlint, else skip (or fail under PEFTNODE_REQUIRE_TOOLS=1, as in CI)."""
    tools.require_tool("node", "scripts/actionlint runs actionlint's WebAssembly build in Node.js")
    if not (TOOL / "main.wasm").is_file():
        tools.missing(f"actionlint is not installed in {TOOL}: run scripts/install-actionlint")
    return TOOL


def project(base: Path, config: bool) -> Path:
    """A directory actionlint takes for a repository (.git and .github/workflows), with or without our config."""
    (base / ".git").mkdir(parents=True)
    (base / ".github" / "workflows").mkdir(parents=True)
    if config:
        shutil.copy(CONFIG, base / ".github" / "actionlint.yaml")
    return base / ".github" / "workflows"


def problems(stdout: str) -> list[tuple[str, int, str, str]]:
    """(file name, line, message, rule) per `file:line:col: message [rule]` line."""
    found = []
    for line in stdout.splitlines():
        m = re.fullmatch(r"(.+?):(\d+):\d+: (.*) \[([\w-]+)\]", line)
        if m:
            found.append((Path(m[1]).name, int(m[2]), m[3], m[4]))
    return found


def line_of(text: str, fragment: str) -> int:
    return text[: text.index(fragment)].count("\n") + 1


# --- actionlint itself ------------------------------------------------------------------------------------

def test_both_workflows_are_clean_under_actionlint(installed):
    names = sorted(p.name for p in WORKFLOWS.iterdir() if p.suffix in (".yml", ".yaml"))
    assert names == ["ci.yml", "gpu-node.yml"]
    proc = actionlint(tool=installed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(names)} file(s), no problems" in proc.stdout


# (workflow, text replaced (exactly once), replacement, rule, message fragment, the line reported: where this
# fragment of the mutated text starts; actionlint reports an expression in a `run: |` block on the `run:` line)
MUTATIONS = {
    "runs-on-missing": ("ci.yml", "    name: invoke lint\n    runs-on: ubuntu-latest\n", "    name: invoke lint\n",
                        "syntax-check", '"runs-on" section is missing', "  lint:\n"),
    "undefined-input": ("gpu-node.yml", "STACK: ${{ inputs.stack }}", "STACK: ${{ inputs.stak }}",
                        "expression", 'property "stak" is not defined', "inputs.stak"),
    "untrusted-in-script": ("gpu-node.yml", "mkdir -p reports\n",
                            'mkdir -p reports "${{ github.event.head_commit.message }}"\n',
                            "expression", "potentially untrusted", "run: |\n          mkdir -p reports"),
    "bad-cron": ("gpu-node.yml", '"23 2 * * *"', '"23 25 * * *"', "events", "invalid CRON format", "23 25"),
    "bad-permission": ("gpu-node.yml", "checks: write", "checks: admin", "permissions",
                       '"admin" is invalid for permission', "checks: admin"),
    "bad-function": ("ci.yml", "if: failure()", "if: failed()", "expression", 'undefined function "failed"',
                     "failed()"),
}


def test_actionlint_catches_broken_workflows(installed, tmp_path):
    """Each broken copy gets its rule's error on its line; the unbroken copies beside them, none (so the errors
    come from the changes). Without .github/actionlint.yaml the runner label `gpu` is unknown: the config is read."""
    wf = project(tmp_path / "repo", config=True)
    bare = project(tmp_path / "bare", config=False)
    expected = {}
    for name in ("ci.yml", "gpu-node.yml"):
        shutil.copy(WORKFLOWS / name, wf / f"control-{name}")
    for key, (name, old, new, rule, fragment, at) in MUTATIONS.items():
        text = (WORKFLOWS / name).read_text()
        assert text.count(old) == 1, f"{key}: {old!r} is not in {name} exactly once; update the mutation"
        mutated = text.replace(old, new)
        (wf / f"{key}.yml").write_text(mutated)
        expected[f"{key}.yml"] = (line_of(mutated, at), rule, fragment)
    shutil.copy(WORKFLOWS / "gpu-node.yml", bare / "gpu-node.yml")
    gpu_text = (WORKFLOWS / "gpu-node.yml").read_text()
    expected["gpu-node.yml"] = (line_of(gpu_text, "runs-on:"), "runner-label", 'label "gpu" is unknown')

    proc = actionlint(*sorted(wf.iterdir()), bare / "gpu-node.yml", tool=installed)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = problems(proc.stdout)
    assert not [p for p in found if p[0].startswith("control-")], proc.stdout
    for fname, (line, rule, fragment) in expected.items():
        hits = [p for p in found if p[0] == fname and p[3] == rule and fragment in p[2]]
        assert hits, f"{fname}: no [{rule}] '{fragment}' in:\n{proc.stdout}"
        assert line in [h[1] for h in hits], f"{fname}: [{rule}] reported on {[h[1] for h in hits]}, not {line}"


def test_a_config_actionlint_refuses_is_one_line_exit_2(installed, tmp_path):
    wf = project(tmp_path, config=False)
    (tmp_path / ".github" / "actionlint.yaml").write_text("self-hosted-runner:\n  labels: [gpu\n")
    shutil.copy(WORKFLOWS / "gpu-node.yml", wf / "gpu-node.yml")
    proc = actionlint(wf / "gpu-node.yml", tool=installed)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "actionlint.yaml" in proc.stderr, proc.stderr
    assert "goroutine" not in proc.stdout + proc.stderr


def test_invoke_lint_fails_naming_the_installer_when_actionlint_is_missing(tmp_path, monkeypatch, capfd):
    """tasks.LINTERS' actionlint entry, run by the real `lint` task body, with no actionlint installed."""
    entry = [e for e in tasks.LINTERS if e[0] == "actionlint"]
    assert entry and entry[0][1] == [str(ACTIONLINT)]
    monkeypatch.setattr(tasks, "LINTERS", tuple(entry))
    monkeypatch.setenv("PEFTNODE_ACTIONLINT_DIR", str(tmp_path / "nothing"))
    with pytest.raises(Exit) as exc:
        tasks.lint(Context(Config(overrides={"run": {"in_stream": False}})))
    assert exc.value.code == 1 and "actionlint" in str(exc.value.message)
    out, err = capfd.readouterr()
    assert "not installed" in err and "run scripts/install-actionlint" in err, out + err


def test_installer_checks_the_tarball_and_installs_once(installed, tmp_path):
    """From the kept tarball (no registry): a changed byte is refused and nothing installed; the real one
    installs, a second run changes nothing, and an install whose stamp is not the pinned one is refused."""
    tgz = installed / "package.tgz"
    if not tgz.is_file():
        tools.missing(f"{tgz} missing: run scripts/install-actionlint again")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(tgz.read_bytes() + b"\0")
    dest = tmp_path / "tool"

    def install(path: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "PEFTNODE_ACTIONLINT_DIR": str(dest), "ACTIONLINT_TGZ": str(path)}
        return subprocess.run([str(INSTALLER)], env=env, capture_output=True, text=True, timeout=120)

    proc = install(bad)
    assert proc.returncode == 1 and "sha256" in proc.stderr, proc.stdout + proc.stderr
    assert not dest.exists()

    proc = install(tgz)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "actionlint 1.7.7" in proc.stdout
    stamp = dest / ".installed"
    before = stamp.stat().st_mtime_ns
    proc = install(bad)  # installed and pinned: the tarball is not even looked at
    assert proc.returncode == 0 and proc.stdout == "" and stamp.stat().st_mtime_ns == before

    stamp.write_text(stamp.read_text().replace("actionlint:1.7.7", "actionlint:1.7.6"))
    proc = actionlint(WORKFLOWS / "ci.yml", tool=dest)
    assert proc.returncode == 2 and "run scripts/install-actionlint" in proc.stderr, proc.stderr


# --- what actionlint cannot know: the GPU workflow ----------------------------------------------------------

def expressions_in_scripts(doc: dict) -> list[str]:
    """Every `run:` script that carries a `${{ }}` expression (inputs must come in through env instead)."""
    return [f"{job_id}: {step.get('name', step['run'][:40])}" for job_id, _, step in steps(doc)
            if "run" in step and "${{" in step["run"]]


def test_no_expression_is_pasted_into_a_script():
    """actionlint flags untrusted github.event.* text in scripts but not `inputs.*`; here no `${{ }}` at all
    is pasted into a script, in either workflow. The check itself is shown to bite on a changed copy."""
    for name in ("ci.yml", "gpu-node.yml"):
        assert expressions_in_scripts(load(name)) == [], name
    gpu = load("gpu-node.yml")
    assert gpu["jobs"]["verify"]["env"]["STACK"] == "${{ inputs.stack }}"
    broken = yaml.safe_load((WORKFLOWS / "gpu-node.yml").read_text().replace(
        'args+=(--stack "$STACK")', 'args+=(--stack "${{ inputs.stack }}")'))
    assert expressions_in_scripts(broken) == ["verify: invoke verify"]


def test_gpu_workflow_triggers_and_runner():
    doc = load("gpu-node.yml")
    on = doc["on"]
    assert on["push"] == {"branches": ["main"]}
    assert len(on["schedule"]) == 1 and len(on["schedule"][0]["cron"].split()) == 5
    stack = on["workflow_dispatch"]["inputs"]["stack"]
    assert stack["default"] == "cu117" and stack["type"] in ("string", "choice")
    assert (ROOT / "stacks" / f"{stack['default']}.yml").is_file()
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == GPU_LABELS
    declared = yaml.safe_load(CONFIG.read_text())["self-hosted-runner"]["labels"]
    assert declared == ["gpu"]  # self-hosted and linux are GitHub's own labels
    assert doc["concurrency"] == {"group": "gpu-node", "cancel-in-progress": False}


def verify_command(doc: dict) -> list[str]:
    """The argv of the `invoke verify` run, with the script's args=(...) array expanded."""
    (script,) = [s for s in run_scripts(doc) if " verify " in s]
    argv: list[str] = []
    for m in re.finditer(r"args\+?=\((.*?)\)", script):
        argv += shlex.split(m[1])
    return argv


def test_gpu_workflow_runs_the_full_verify_and_publishes_every_report():
    doc = load("gpu-node.yml")
    argv = verify_command(doc)
    flags = dict(zip(argv[::2], argv[1::2], strict=False))
    assert {"--json", "--junit", "--html"} <= set(flags)
    # full: the smoke fine-tune and the benchmarks are in
    assert not {"--quick", "--only", "--skip"} & set(argv)
    # every flag the workflow passes is verify's own (a renamed or removed flag breaks this, not a GPU night)
    known = {o for a in cli.build_parser()._actions for o in a.option_strings}
    assert {a for a in argv if a.startswith("--")} <= known
    uploads = [s for _, _, s in steps(doc) if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and all("always()" in s.get("if", "") for s in uploads)
    uploaded = {p.strip() for s in uploads for p in s["with"]["path"].splitlines() if p.strip()}
    assert {flags["--json"], flags["--junit"], flags["--html"]} <= uploaded
    (junit,) = [s for _, _, s in steps(doc) if s.get("uses", "").startswith("mikepenz/action-junit-report@")]
    assert "always()" in junit["if"] and junit["with"]["report_paths"] == flags["--junit"]


def test_permissions_are_minimal():
    for name in ("ci.yml", "gpu-node.yml"):
        doc = load(name)
        assert doc["permissions"] == {"contents": "read"}, name
        for job_id, job in doc["jobs"].items():
            granted = job.get("permissions", {})
            writes = {k for k, v in granted.items() if v == "write"}
            reporter = any(s.get("uses", "").startswith("mikepenz/action-junit-report@")
                           for s in job.get("steps", []))
            assert writes == ({"checks"} if reporter else set()), f"{name}: {job_id}: {granted}"


def test_every_job_has_a_time_limit_and_every_action_a_commit():
    for name in ("ci.yml", "gpu-node.yml"):
        for job_id, job in load(name)["jobs"].items():
            assert 0 < job["timeout-minutes"] <= 180, f"{name}: {job_id}"
        for line in (WORKFLOWS / name).read_text().splitlines():
            if "uses:" in line:
                assert re.search(r"uses: [\w.-]+/[\w./-]+@[0-9a-f]{40}  # v\d+(\.\d+)*$", line), line


# --- CI runs what the README and .ci/run run ------------------------------------------------------------

def readme_test_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"\*\*Run the tests\*\*.*?```sh\n(.*?)\n```", text, re.S)
    assert m, "README: no **Run the tests** command block"
    return commands(m[1])


def test_ci_runs_the_readme_test_command_and_ci_run():
    doc = load("ci.yml")
    assert set(doc["on"]) == {"push", "pull_request"}
    ran = [c for s in run_scripts(doc) for c in commands(s)]
    for wanted in readme_test_commands():
        assert any(c == wanted or c.startswith(wanted + " ") for c in ran), f"README's `{wanted}` not in ci.yml"
    ci_run = (ROOT / ".ci" / "run").read_text()
    code = "\n".join(line.split(" #")[0] for line in ci_run.splitlines() if not line.lstrip().startswith("#"))
    for script in sorted(set(re.findall(r"(?<![\w/.])(scripts/[\w-]+)", code))):
        assert any(c.split()[0] == script for c in ran), f".ci/run runs {script}; ci.yml does not"
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", ci_run, re.M))
    assert exports and {k: str(doc["env"].get(k)) for k in exports} == exports


def test_ci_test_and_converge_jobs_split_the_whole_suite():
    doc = load("ci.yml")
    selections = {}
    for job_id, _, step in steps(doc):
        for c in commands(step.get("run", "")):
            if c.startswith(".venv/bin/invoke test"):
                selections[job_id] = shlex.split(shlex.split(c)[-1])
    assert selections == {"test": ["-m", "not converge"], "converge": ["-m", "converge"]}
    cache = [s for _, _, s in steps(doc) if s.get("uses", "").startswith("actions/cache@")
             and ".cache/converge" in s["with"]["path"]]
    assert len(cache) == 1 and "hashFiles('tests/integration/**'" in cache[0]["with"]["key"]
    assert "sudo" in doc["jobs"]["converge"]["defaults"]["run"]["shell"]
    lint = [c for s in run_scripts({"jobs": {"lint": doc["jobs"]["lint"]}}) for c in commands(s)]
    assert "scripts/install-actionlint" in lint and ".venv/bin/invoke lint" in lint
    assert doc["concurrency"]["cancel-in-progress"]
