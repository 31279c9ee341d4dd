"""Every long remote step runs asynchronously (async + a poll that is not 0), so the progress callback
can say "still running" while it works and the step runner can tie it to the run's lock.

Long steps, found in the role's task files (blocks opened, handlers too): a command or shell task
that runs `make` (compile, install, install_sw, altinstall), one that runs `pip install` (not a
`--dry-run`), the pip module, and in the NVIDIA library roles (cuda, cudnn, nccl) any unpacking of
NVIDIA's archives: tar, unarchive, or running the CUDA runfile. Names the command takes from the
role's vars/ and defaults/ (venv_pip) are read through, so `{{ venv_pip + ... }}` counts as pip install.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_converge_speed_static import REPO, role_tasks, where  # noqa: E402

COMMAND_MODULES = {p + m for p in ("", "ansible.builtin.", "ansible.legacy.") for m in ("command", "shell")}
PIP_MODULES = {p + "pip" for p in ("", "ansible.builtin.", "ansible.legacy.")}
UNARCHIVE_MODULES = {p + "unarchive" for p in ("", "ansible.builtin.", "ansible.legacy.")}
NVIDIA_ROLES = {"peftnode_cuda", "peftnode_cudnn", "peftnode_nccl"}
CONDITIONAL_DRY_RUN = re.compile(r"\(\s*\[\s*['\"]--dry-run['\"]\s*\]\s*if\b[^)]*\)")


def role_names(role: Path) -> dict:
    """The role's vars and defaults (vars win), for reading names a command is built from."""
    names: dict = {}
    for kind in ("defaults", "vars"):
        for path in sorted((role / kind).glob("*.yml")) if (role / kind).is_dir() else []:
            names.update(yaml.safe_load(path.read_text()) or {})
    return names


def command_text(task: dict, names: dict) -> str | None:
    """The command a command/shell task runs, as text, with the role's names it uses read through."""
    module = next((key for key in task if key in COMMAND_MODULES), None)
    if module is None:
        return None
    args = task[module]
    parts = [args] if isinstance(args, str) else [args.get(k) for k in ("argv", "cmd", "_raw_params")
                                                  if isinstance(args, dict) and args.get(k) is not None]
    text = " ".join(" ".join(map(str, p)) if isinstance(p, list) else str(p) for p in parts)
    for _ in range(3):  # names built from names
        text += "".join(f" {names[word]}" for word in set(re.findall(r"\b[a-z_][a-z0-9_]*\b", text))
                        if word in names)
    return text


def long_step(role: str, task: dict, names: dict) -> str | None:
    """Why task is a long step, or None."""
    if any(key in task for key in PIP_MODULES):
        return "pip module"
    if role in NVIDIA_ROLES and any(key in task for key in UNARCHIVE_MODULES):
        return "unarchive of an NVIDIA archive"
    text = command_text(task, names)
    if text is None:
        return None
    if re.search(r"(?<![\w.-])make(?![\w.-])", text):
        return "make"
    if re.search(r"\bpip\b", text) and re.search(r"\binstall\b", text) and \
            "--dry-run" not in CONDITIONAL_DRY_RUN.sub("", text):
        return "pip install"
    if role in NVIDIA_ROLES and (re.search(r"(?<![\w.-])tar(?![\w.-])", text) or "--toolkit" in text):
        return "unpack of an NVIDIA archive"
    return None


def is_async(task: dict) -> bool:
    value = task.get("async")
    return value not in (None, 0, "0", False, "") and str(task.get("poll", 10)).strip() not in ("0", "")


def long_steps() -> list[tuple[str, str, bool]]:
    names_of: dict[str, dict] = {}
    found = []
    for path, task in role_tasks():
        role = path.relative_to(REPO / "roles").parts[0]
        names = names_of.setdefault(role, role_names(REPO / "roles" / role))
        why = long_step(role, task, names)
        if why:
            found.append((where(path, task), why, is_async(task)))
    return found


def test_the_finder_knows_a_long_step_when_it_sees_one():
    names = {"venv_pip": ["/v/bin/python", "-m", "pip", "install"]}
    assert long_step("peftnode_python", {"ansible.builtin.command": {"argv": ["make", "-j2"]}}, {}) == "make"
    assert long_step("peftnode_openssl", {"command": "make install_sw chdir=/x"}, {}) == "make"
    assert long_step("x", {"ansible.builtin.command": {"argv": "{{ venv_pip + venv_requirements }}"}},
                     names) == "pip install"
    assert long_step("x", {"ansible.builtin.command": {
        "argv": "{{ venv_pip + (['--dry-run'] if ansible_check_mode else []) + r }}"}}, names) == "pip install"
    assert long_step("x", {"ansible.builtin.command": {"argv": "{{ venv_pip + ['--dry-run'] + r }}"}}, names) is None
    assert long_step("peftnode_nccl", {"ansible.builtin.command": {"argv": ["tar", "-xf", "a.txz"]}}, {})
    assert long_step("peftnode_cuda", {"ansible.builtin.unarchive": {"src": "a"}}, {})
    assert long_step("peftnode_cuda", {"ansible.builtin.command": {"argv": "{{ ['sh', p, '--toolkit'] }}"}}, {})
    # not long steps: cmake-like words, a version probe, tar outside the NVIDIA roles
    assert long_step("x", {"ansible.builtin.command": {"argv": ["cmake", "--version"]}}, {}) is None
    assert long_step("x", {"ansible.builtin.command": {"argv": ["/v/bin/python", "-m", "pip", "--version"]}},
                     {}) is None
    assert long_step("peftnode_model", {"ansible.builtin.command": {"argv": ["tar", "-xf", "m.tar"]}}, {}) is None
    assert is_async({"async": "{{ peftnode_step_timeout }}", "poll": "{{ peftnode_step_poll }}"})
    assert not is_async({"async": 600, "poll": 0}) and not is_async({})


def test_every_long_step_runs_async():
    steps = long_steps()
    kinds = {why for _, why, _ in steps}
    assert {"make", "pip install", "unpack of an NVIDIA archive"} <= kinds, steps  # the finder still finds them
    offenders = [f"{name} ({why})" for name, why, ok in steps if not ok]
    assert not offenders, "long steps without async/poll (the progress callback cannot show them):\n" + \
        "\n".join(offenders)
