"""What keeps a converge that changes nothing cheap, read from the files (no ansible run):

- facts are gathered once, by site.yml's first play: every later play says gather_facts: false (the
  default is true) and no role task or handler runs setup / gather_facts again;
- ansible.cfg turns SSH pipelining on and enables the progress callback, which it can find.

The helpers here (every task of every role, blocks opened) also serve tests/test_async_steps.py.
"""

from __future__ import annotations

import configparser
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FACT_MODULES = {"setup", "gather_facts"}
FACT_PREFIXES = ("", "ansible.builtin.", "ansible.legacy.")


def walk_tasks(tasks) -> Iterator[dict]:
    """Every task of a task list, the tasks inside block / rescue / always included (not the blocks)."""
    for task in tasks or []:
        if not isinstance(task, dict):
            continue
        nested = [task.get(key) for key in ("block", "rescue", "always") if key in task]
        if nested:
            for part in nested:
                yield from walk_tasks(part)
        else:
            yield task


def role_task_files() -> list[Path]:
    """Every tasks/ and handlers/ YAML file of every role (task files may sit in subdirectories)."""
    found = []
    for role in sorted((REPO / "roles").iterdir()):
        for kind in ("tasks", "handlers"):
            if (role / kind).is_dir():
                found += sorted(p for p in (role / kind).rglob("*") if p.suffix in (".yml", ".yaml"))
    return found


def role_tasks() -> Iterator[tuple[Path, dict]]:
    for path in role_task_files():
        for task in walk_tasks(yaml.safe_load(path.read_text())):
            yield path, task


def where(path: Path, task: dict) -> str:
    return f"{path.relative_to(REPO)}: {task.get('name', '(unnamed)')}"


def fact_modules_in(task: dict) -> list[str]:
    return [key for key in task for prefix in FACT_PREFIXES for module in FACT_MODULES if key == prefix + module]


def test_the_task_walker_sees_every_role_and_opens_blocks():
    files = role_task_files()
    assert REPO / "roles" / "peftnode_python" / "tasks" / "main.yml" in files
    inner = list(walk_tasks([{"block": [{"name": "a"}, {"block": [{"name": "b"}]}], "rescue": [{"name": "c"}],
                              "always": [{"name": "d"}]}, {"name": "e"}]))
    assert [t["name"] for t in inner] == ["a", "b", "c", "d", "e"]
    assert sum(1 for _ in role_tasks()) > 100  # the roles hold hundreds of tasks, not a handful


def test_site_gathers_facts_in_its_first_play_only():
    plays = []
    for play in yaml.safe_load((REPO / "site.yml").read_text()):
        imported = play.get("ansible.builtin.import_playbook") or play.get("import_playbook")
        # an imported playbook's plays (playbooks/verify.yml with -t verify) run in the same run: same rule
        plays += yaml.safe_load((REPO / imported).read_text()) if imported else [play]
    assert len(plays) > 2 and "hosts" in plays[-1], "site.yml's imported plays were not read"
    assert plays[0].get("gather_facts") is True, "play 1 gathers the facts every later play uses"
    later = [p.get("name") for p in plays[1:] if p.get("gather_facts", True) is not False]
    assert not later, f"plays that gather facts again (gather_facts defaults to true): {later}"
    for play in plays:
        for task in walk_tasks(play.get("pre_tasks", []) + play.get("tasks", []) + play.get("post_tasks", [])):
            assert not fact_modules_in(task), f"site.yml play {play.get('name')!r} runs {fact_modules_in(task)}"


def test_no_role_gathers_facts_again():
    offenders = [f"{where(path, task)} ({', '.join(fact_modules_in(task))})"
                 for path, task in role_tasks() if fact_modules_in(task)]
    assert not offenders, "facts are gathered once, by site.yml's first play; these gather them again:\n" + \
        "\n".join(offenders)
    # the check itself finds a setup task however it is spelled
    assert fact_modules_in({"name": "x", "ansible.builtin.setup": {"gather_subset": ["min"]}})
    assert fact_modules_in({"setup": None}) and fact_modules_in({"ansible.legacy.gather_facts": {}})
    assert not fact_modules_in({"ansible.builtin.include_tasks": "setup-RedHat.yml"})


def test_ansible_cfg_pipelines_and_enables_the_progress_callback():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "ansible.cfg")
    assert cfg.getboolean("ssh_connection", "pipelining") is True
    enabled = [name.strip() for name in cfg.get("defaults", "callbacks_enabled").split(",")]
    assert "peftnode_progress" in enabled
    assert (REPO / cfg.get("defaults", "callback_plugins") / "peftnode_progress.py").is_file()
