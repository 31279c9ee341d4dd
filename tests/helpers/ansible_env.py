"""How the tests run ansible / ansible-playbook (the environment) and read what it printed."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


def ansible_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any ANSIBLE_* or PEFTNODE_STACKS setting (the user's own
    configuration must not change what a test sees), the repository's ansible.cfg, a private HOME
    and temp dirs under tmp_path, one JSON line per task result, and this venv's tools first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") and k != "PEFTNODE_STACKS"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-local"),
        ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-remote"),
        # async jobs (the roles' long steps): with HOME moved, "~/.ansible_async" is not read back
        # from where the job wrote it
        ANSIBLE_ASYNC_DIR=str(tmp_path / "ansible-async"),
        ANSIBLE_CALLBACK_RESULT_FORMAT="json",
        ANSIBLE_CALLBACK_FORMAT_PRETTY="false",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


# With ANSIBLE_CALLBACK_RESULT_FORMAT=json the default callback prints one line per task result.
RESULT_LINE = re.compile(r"^(ok|changed|fatal|failed|skipping): \[([^\]]+)\](.*)$")
TASK_LINE = re.compile(r"^TASK \[(.*)\] \**\s*$")


def results(stdout: str) -> list[dict]:
    """Task results in order: {"task", "status", "host", "item", "result"}; a loop gives one per item."""
    task, found = None, []
    for line in stdout.splitlines():
        if m := TASK_LINE.match(line):
            task = m.group(1)
        elif m := RESULT_LINE.match(line):
            rest = m.group(3)
            cut = rest.find(" => {")
            item = re.search(r"\(item=(.*?)\)", rest if cut < 0 else rest[:cut])
            found.append({"task": task, "status": m.group(1), "host": m.group(2),
                          "item": item.group(1) if item else None,
                          "result": json.loads(rest[cut + 4:]) if cut >= 0 else {}})
    return found
