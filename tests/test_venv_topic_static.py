"""The handler topic "peftnode venv changed", read from the roles: who notifies it, who listens.

The behaviour on a node with systemd (JupyterLab restarted once after Python or the venv changed,
started once on a first install) is the converge test's; here: the wiring that makes it so.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"
TOPIC = "peftnode venv changed"


def load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def tasks(role: str) -> list[dict]:
    out = []

    def walk(items):
        for task in items or []:
            out.append(task)
            for key in ("block", "rescue", "always"):
                walk(task.get(key))

    for path in sorted((ROLES / role / "tasks").glob("*.yml")):
        walk(load(path))
    return out


def listens(handler: dict) -> list[str]:
    topics = handler.get("listen") or []
    return [topics] if isinstance(topics, str) else topics


def test_the_venv_role_notifies_the_topic_when_it_makes_the_venv_or_installs():
    notifying = {t["name"] for t in tasks("peftnode_venv") if t.get("notify") == TOPIC}
    assert notifying == {"Create the virtualenv {{ peftnode_stack.venv.name }}",
                         "Install the stack's requirements and peftnode with pip",
                         "Install the hashed requirements with pip --require-hashes"}


def test_jupyterlab_restarts_on_the_topic_but_not_right_after_it_was_started():
    handlers = load(ROLES / "peftnode_jupyterlab" / "handlers" / "main.yml")
    ask, restart = handlers
    assert restart["name"] == "Restart JupyterLab" and listens(restart) == [TOPIC]
    # the systemd question runs first, for the topic and for a notify by name alike
    assert set(listens(ask)) == {TOPIC, "Restart JupyterLab"} and ask["failed_when"] is False
    assert restart["ansible.builtin.systemd_service"] == {"name": "jupyterlab", "state": "restarted"}
    conditions = " ".join(restart["when"])
    assert "LoadState=loaded" in conditions and "ActiveState=active" in conditions
    assert "jupyterlab_start is not changed" in conditions
    start = [t for t in tasks("peftnode_jupyterlab") if t.get("name") == "Enable and start JupyterLab"]
    assert start[0]["register"] == "jupyterlab_start"
    names = [t.get("name") for t in tasks("peftnode_jupyterlab")]
    assert names.index("Enable and start JupyterLab") < next(
        i for i, t in enumerate(tasks("peftnode_jupyterlab")) if t.get("ansible.builtin.meta") == "flush_handlers")


def test_the_shared_role_listens_so_a_play_without_jupyterlab_may_notify():
    handlers = load(ROLES / "peftnode" / "handlers" / "main.yml")
    assert [listens(h) for h in handlers] == [[TOPIC]]
    assert handlers[0]["ansible.builtin.debug"]["verbosity"] == 1
    for role in ("peftnode_venv", "peftnode_jupyterlab", "peftnode_python"):
        assert {"role": "peftnode"} in load(ROLES / role / "meta" / "main.yml")["dependencies"]
