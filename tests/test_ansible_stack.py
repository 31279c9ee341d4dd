"""Real ansible-playbook runs: Ansible reads stacks through checks.stack and nothing else.

Every test runs the ansible-playbook that sits next to this interpreter (the project's venv), with
the repository's ansible.cfg, from the repository root, with HOME and Ansible's temp directories in
tmp_path. Results are read back as JSON: the default callback prints each task result as one JSON
object per line when ANSIBLE_CALLBACK_RESULT_FORMAT=json and ANSIBLE_CALLBACK_FORMAT_PRETTY=false.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from checks.stack import StackError, load_stack  # noqa: E402
from tests.helpers.ansible_env import ansible_env, results  # noqa: E402

BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"
ANSIBLE = BIN / "ansible"
STACK_NAMES = sorted(p.stem for p in (REPO / "stacks").glob("*.yml"))

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(), reason=f"ansible-playbook not installed next to {sys.executable}"
)

# "ok: [localhost] => {...}" / "fatal: [localhost]: FAILED! => {...}"; results without "=> {...}"
# (a plain "ok: [localhost]") carry nothing to check and are recorded with an empty result.


def run(tmp_path: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv],
        cwd=REPO,
        env=ansible_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def playbook(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run(tmp_path, [ANSIBLE_PLAYBOOK, *args], **env)


def result_of(stdout: str, task: str) -> dict:
    matching = [r for r in results(stdout) if r["task"] == task]
    assert len(matching) == 1, f"expected one result for task {task!r}, got {matching}\n{stdout}"
    return matching[0]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def write_bad_stack(tmp_path: Path) -> Path:
    """cu117 with a non-version nccl.version and a key the schema does not know."""
    data = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
    data["nccl"]["version"] = "two"
    data["colour"] = "blue"
    path = tmp_path / "stacks" / "broken.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def stack_problems(path: Path) -> list[str]:
    with pytest.raises(StackError) as caught:
        load_stack(str(path))
    return caught.value.problems


# --- playbooks/stack-info.yml --------------------------------------------------------------------


@pytest.mark.parametrize("name", STACK_NAMES)
def test_stack_info_returns_the_stack_as_checks_stack_reads_it(tmp_path, name):
    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", f"peftnode_stack_name={name}")
    assert proc.returncode == 0, explain(proc)

    expected = load_stack(name).data
    shown = result_of(proc.stdout, "Print the whole stack")["result"]["peftnode_stack"]
    assert shown == expected

    summary = result_of(proc.stdout, "Summarise the stack")["result"]["msg"]
    assert summary == (
        f"Stack {name}: driver {expected['nvidia_driver']['version']}, CUDA {expected['cuda']['version']}, "
        f"NCCL {expected['nccl']['version']}, cuDNN {expected['cudnn']['version']}, "
        f"Python {expected['python']['version']}, OpenSSL {expected['openssl']['version']}"
    )


def test_stack_info_shows_the_seed_versions_from_cu117(tmp_path):
    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", "peftnode_stack_name=cu117")
    assert proc.returncode == 0, explain(proc)
    shown = result_of(proc.stdout, "Print the whole stack")["result"]["peftnode_stack"]
    assert shown["nccl"]["version"] == "2.14.3"
    assert shown["nvidia_driver"]["version"] == "515.65.01"
    summary = result_of(proc.stdout, "Summarise the stack")["result"]["msg"]
    assert "NCCL 2.14.3" in summary and "driver 515.65.01" in summary


def test_stack_info_accepts_a_stack_file_path(tmp_path):
    data = yaml.safe_load((REPO / "stacks" / "cu124.yml").read_text(encoding="utf-8"))
    data["name"] = "site-a"
    data["nccl"]["artifact"]["sha256"] = "0" * 64
    path = tmp_path / "site-a.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", f"peftnode_stack_name={path}")
    assert proc.returncode == 0, explain(proc)
    shown = result_of(proc.stdout, "Print the whole stack")["result"]["peftnode_stack"]
    assert shown == load_stack(str(path)).data
    assert shown["name"] == "site-a"


def test_a_malformed_stack_fails_the_play_with_every_problem_checks_stack_reports(tmp_path):
    path = write_bad_stack(tmp_path)
    problems = stack_problems(path)
    # what the loader says about this file, so the test proves the play passes on exactly that
    assert any(p.startswith(f"{path}: nccl.version: 'two' is not an NCCL version") for p in problems), problems
    assert any(p.startswith(f"{path}: colour: unknown key") for p in problems), problems

    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", f"peftnode_stack_name={path}")
    assert proc.returncode != 0, explain(proc)

    failed = result_of(proc.stdout, "Load and validate the stack file")
    assert failed["status"] == "fatal", failed
    lines = failed["result"]["msg"].splitlines()
    assert lines[0] == f"peftnode_stack: cannot use stack '{path}':"
    assert lines[1:] == problems  # one problem per line, the loader's text verbatim

    # the play stopped at the stack: nothing after it ran
    assert [r["task"] for r in results(proc.stdout)] == ["Load and validate the stack file"]


def test_a_malformed_stack_is_shown_one_problem_per_line(tmp_path):
    # ansible.cfg's result format (YAML) prints the lookup's multi-line error as it is
    path = write_bad_stack(tmp_path)
    problems = stack_problems(path)
    proc = playbook(
        tmp_path,
        "playbooks/stack-info.yml",
        "-i",
        "localhost,",
        "-e",
        f"peftnode_stack_name={path}",
        ANSIBLE_CALLBACK_RESULT_FORMAT="yaml",
    )
    assert proc.returncode != 0, explain(proc)
    printed = [line.strip() for line in proc.stdout.splitlines()]
    for problem in problems:
        assert problem in printed, f"{problem!r} not on a line of its own\n{proc.stdout}"


def test_an_unknown_stack_name_fails_listing_the_known_stacks(tmp_path):
    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", "peftnode_stack_name=cu999")
    assert proc.returncode != 0, explain(proc)
    msg = result_of(proc.stdout, "Load and validate the stack file")["result"]["msg"]
    assert "no stack named 'cu999'" in msg
    for name in STACK_NAMES:
        assert name in msg


def test_query_returns_one_stack_per_term(tmp_path):
    proc = run(
        tmp_path,
        [
            ANSIBLE,
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.debug",
            "-a",
            "msg={{ query('peftnode_stack', 'cu117', 'cu124') | map(attribute='nccl.version') }}",
        ],
    )
    assert proc.returncode == 0, explain(proc)
    shown = json.loads(proc.stdout.split("=>", 1)[1])
    assert shown["msg"] == [load_stack("cu117").data["nccl"]["version"], load_stack("cu124").data["nccl"]["version"]]


# --- site.yml ------------------------------------------------------------------------------------


@pytest.mark.parametrize("book", ["site.yml", "playbooks/stack-info.yml"])
def test_playbook_syntax_check(tmp_path, book):
    proc = playbook(tmp_path, "--syntax-check", book, "-i", "localhost,")
    assert proc.returncode == 0, explain(proc)
    assert f"playbook: {book}" in proc.stdout


def site_check_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return playbook(
        tmp_path,
        "site.yml",
        "--check",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        f"ansible_python_interpreter={sys.executable}",
        *extra,
    )


def test_site_loads_the_stack_checks_the_os_and_summarises_in_check_mode(tmp_path):
    # --tags stack: the preflight (tagged always) still runs, but no role is selected.
    proc = site_check_run(tmp_path, "--tags", "stack")
    assert proc.returncode == 0, explain(proc)

    seen = [(r["task"], r["status"]) for r in results(proc.stdout)]
    assert seen[:4] == [
        ("Gathering Facts", "ok"),
        ("Load and validate the stack file", "ok"),
        ("Check the operating system is one peftnode supports", "ok"),
        ("Summarise the stack this node will get", "ok"),
    ]
    stack = load_stack("cu117").data
    summary = result_of(proc.stdout, "Summarise the stack this node will get")["result"]["msg"]
    assert summary == (
        f"Stack cu117: driver {stack['nvidia_driver']['version']}, CUDA {stack['cuda']['version']}, "
        f"NCCL {stack['nccl']['version']}, cuDNN {stack['cudnn']['version']}, "
        f"Python {stack['python']['version']}, OpenSSL {stack['openssl']['version']}"
    )
    assert "driver 515.65.01" in summary and "NCCL 2.14.3" in summary


def test_site_uses_the_stack_named_by_peftnode_stack_name(tmp_path):
    proc = site_check_run(tmp_path, "-e", "peftnode_stack_name=cu124", "--tags", "stack")
    assert proc.returncode == 0, explain(proc)
    summary = result_of(proc.stdout, "Summarise the stack this node will get")["result"]["msg"]
    assert summary.startswith("Stack cu124: driver 550.54.15,"), summary


def test_site_refuses_a_malformed_stack_before_checking_anything_else(tmp_path):
    path = write_bad_stack(tmp_path)
    proc = site_check_run(tmp_path, "-e", f"peftnode_stack_name={path}")
    assert proc.returncode != 0, explain(proc)
    failed = result_of(proc.stdout, "Load and validate the stack file")
    assert failed["status"] == "fatal"
    assert failed["result"]["msg"].splitlines()[1:] == stack_problems(path)
    assert "Summarise the stack this node will get" not in [r["task"] for r in results(proc.stdout)]


def test_site_refuses_an_unsupported_os_with_a_clear_message(tmp_path):
    # Only CentOS 7 supported: whatever else this machine runs, the assert must fail and say why.
    if platform.freedesktop_os_release().get("ID") == "centos":
        pytest.skip("this machine runs CentOS, the one release left in the list")
    only = [{"id": "centos", "distribution": "CentOS", "releases": ["7"]}]
    proc = site_check_run(tmp_path, "-e", json.dumps({"peftnode_supported_os": only}))
    assert proc.returncode != 0, explain(proc)
    failed = result_of(proc.stdout, "Check the operating system is one peftnode supports")
    assert failed["status"] == "fatal"
    msg = failed["result"]["msg"]
    assert re.match(r"localhost runs \S+ \S+; peftnode provisions CentOS 7 \(checks/supported_os\.yml\)\.$", msg), msg


def test_site_and_verify_read_one_list_of_supported_releases():
    """site.yml's OS assert and verify's system.os read the same file."""
    from checks import system

    plays = yaml.safe_load((REPO / "site.yml").read_text())
    assert "checks/supported_os.yml" in plays[0]["vars"]["peftnode_supported_os"]
    listed = yaml.safe_load(system.SUPPORTED_OS_FILE.read_text())
    assert system.SUPPORTED_OS == {e["id"]: tuple(e["releases"]) for e in listed}
    assert {"CentOS", "Rocky", "AlmaLinux", "RedHat", "Debian", "Ubuntu"} == {e["distribution"] for e in listed}


@pytest.mark.parametrize("name", ["alias-bomb-name.yml", "binary.yml"])
def test_a_hostile_stack_file_fails_the_play_quickly_at_the_stack(tmp_path, name):
    """An alias bomb or a binary file given to the Ansible lookup fails the play at its first task with the
    loader's own short text, in seconds (before, a bomb in `name` hung whatever loaded it)."""
    import time

    path = Path(__file__).resolve().parent / "data" / "stacks" / name
    with pytest.raises(StackError) as raised:
        load_stack(str(path))
    started = time.monotonic()
    proc = playbook(tmp_path, "playbooks/stack-info.yml", "-i", "localhost,", "-e", f"peftnode_stack_name={path}")
    took = time.monotonic() - started
    assert proc.returncode != 0, explain(proc)
    failed = result_of(proc.stdout, "Load and validate the stack file")
    assert failed["status"] == "fatal", failed
    msg = failed["result"]["msg"]
    assert raised.value.problems[0] in msg and len(msg) < 2000, msg
    assert [r["task"] for r in results(proc.stdout)] == ["Load and validate the stack file"]
    assert took < 60, f"{took:.1f} s"
