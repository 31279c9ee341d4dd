"""The provisioning roles, without provisioning anything.

Static checks read the roles' files (defaults, argument specs, tasks). The other tests run the
project's ansible-playbook against localhost with connection=local in --check mode, so nothing on
this machine changes; every node-side path they name is under tmp_path anyway. They prove:

- a variable of the wrong type or an unknown choice is refused by a role's meta/argument_specs.yml,
  at the role's first task, and by site.yml's preflight before any role runs;
- with peftnode_offline and an empty artifact directory, the preflight fails listing every missing
  artifact (and every other problem) at once, having changed nothing;
- with everything in place, site.yml runs through in check + diff mode without changing anything
  and never prints the JupyterLab password hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.ansible_env import ansible_env as shared_ansible_env
from tests.helpers.ansible_env import results  # noqa: F401  (test_roles_local imports it from here)

REPO = Path(__file__).resolve().parent.parent
ROLES = REPO / "roles"
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK.exists(), reason=f"ansible-playbook not installed next to {sys.executable}"
)

# The roles site.yml applies, in order, and the shared artifact role.
def _site_roles() -> list[str]:
    """The roles site.yml's second play applies, in order (read from site.yml itself)."""
    plays = yaml.safe_load((REPO / "site.yml").read_text(encoding="utf-8"))
    # the roles are imported in one block (its always: releases the node lock)
    block = next(task["block"] for task in plays[1]["tasks"] if "block" in task)
    return [task["ansible.builtin.import_role"]["name"] for task in block if "ansible.builtin.import_role" in task]


SITE_ROLES = _site_roles()
# the shared settings, the artifact path and the preflight: used by the others, not listed in site.yml's roles
HELPER_ROLES = ["peftnode", "peftnode_artifact", "peftnode_preflight"]
ALL_ROLES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks" / "main.yml").is_file())

# A real jupyter_server password hash (of "not-the-password"); what matters is that it never shows up.
PASSWORD_HASH = (
    "argon2:$argon2id$v=19$m=10240,t=10,p=8$WRZHqK3Zfr0ZcF1yqkSJRg$Vq2s2y8ykqUdl0JWbqv0t5xQ3jDCGkCqCY1yuD3Z3jc"
)

# "ok: [host] => {...}", "fatal: [host]: FAILED! => {...}", "failed: [host] (item=x) => {...}", "ok: [host] => (item=x)"
RECAP_LINE = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


# --- running ansible-playbook --------------------------------------------------------------------


def ansible_env(tmp_path: Path) -> dict[str, str]:
    # local connection: pipelining copies no module files around, much faster
    return shared_ansible_env(tmp_path, ANSIBLE_PIPELINING="True")


def playbook(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), *map(str, args)],
        cwd=REPO,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def recap(stdout: str) -> dict[str, dict[str, int]]:
    out = {}
    for line in stdout.splitlines():
        if m := RECAP_LINE.match(line):
            out[m.group(1)] = {"ok": int(m.group(2)), "changed": int(m.group(3)), "failed": int(m.group(5))}
    return out


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-12000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- a tiny stack and its artifacts --------------------------------------------------------------


def tiny_stack(tmp_path: Path, artifacts: Path, model: Path, checksums: bool = True) -> Path:
    """cu117 with the converge test's source artifacts (Debian's upstream tarballs, whose names do not
    match their top directories), a two-file model and every node path under tmp_path. The artifact
    files themselves are stand-ins written next to it; their sha256 is what the stack records."""
    data = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
    artifacts.mkdir(parents=True, exist_ok=True)
    model.mkdir(parents=True, exist_ok=True)
    files = {
        "openssl": artifacts / "openssl_1.1.1w.orig.tar.gz",
        "python": artifacts / "python3.11_3.11.2.orig.tar.gz",
        "config.json": model / "config.json",
        "model.safetensors": model / "model.safetensors",
    }
    for name, path in files.items():
        path.write_bytes(f"stand-in for {name}\n".encode())

    def digest(key):
        return sha256(files[key]) if checksums else None

    data["name"] = "tiny"
    data["openssl"] = {"version": "1.1.1w", "artifact": {"file": files["openssl"].name, "sha256": digest("openssl")}}
    data["python"] = {"version": "3.11.2", "artifact": {"file": files["python"].name, "sha256": digest("python")}}
    data["venv"] = {"name": "tiny-venv", "path": str(tmp_path / "node" / "venv"), "requirements": ["jupyterlab"]}
    data["model"] = {
        "name": "tiny-model",
        "path": str(tmp_path / "node" / "model"),
        "files": [{"file": "config.json", "sha256": digest("config.json")},
                  {"file": "model.safetensors", "sha256": digest("model.safetensors")}],
    }
    data["node"]["gpus"] = 0
    return write_yaml(tmp_path / "tiny.yml", data)


def node_vars(tmp_path: Path, **extra) -> Path:
    """Variables that keep every node-side path of the roles under tmp_path."""
    data = {
        "ansible_python_interpreter": sys.executable,
        "peftnode_install_packages": False,
        "peftnode_cache_dir": str(tmp_path / "node" / "cache"),
        "peftnode_openssl_prefix": str(tmp_path / "node" / "openssl"),
        "peftnode_openssl_link": str(tmp_path / "node" / "openssl-link"),
        "peftnode_python_prefix": str(tmp_path / "node" / "python"),
        "peftnode_jupyter_home": str(tmp_path / "node" / "jupyter"),
        "peftnode_jupyter_config_dir": str(tmp_path / "node" / "etc" / "jupyter"),
        "peftnode_manifest_path": str(tmp_path / "node" / "etc" / "manifest.yml"),
        # the NVIDIA roles have tests of their own
        "peftnode_gpu": False,
        # the node lock and its script (taken and installed in check mode too)
        "peftnode_lock_path": str(tmp_path / "lock" / "peftnode.lock"),
        "peftnode_lock_script": str(tmp_path / "lock" / "bin" / "peftnode-lock"),
        "peftnode_steps_dir": str(tmp_path / "lock" / "steps"),
        "peftnode_step_poll": 1,  # async steps polled every second, not every 10 s
        **extra,
    }
    return write_yaml(tmp_path / "vars.yml", data)


def site_check(tmp_path: Path, variables: Path, *extra: str) -> subprocess.CompletedProcess:
    return playbook(tmp_path, "site.yml", "--check", "-i", "localhost,", "-c", "local", "-e", f"@{variables}", *extra)


def diff_after(stdout: str, task: str) -> str:
    """The "after" side of the diff the default callback printed for a task (the lines added)."""
    lines = stdout.split(f"TASK [{task}] ", 1)[1].splitlines()[1:]
    added = []
    for line in lines:
        if line.startswith("TASK ["):
            break
        if line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:])
    return "\n".join(added) + "\n"


def role_tasks_ran(stdout: str) -> list[str]:
    """Tasks of the provisioning roles that ran in site.yml's second play (their argument checks
    aside; the roles' read-only preflight tasks run in the first play)."""
    provision = stdout.split("PLAY [Provision the node]", 1)
    return [r["task"] for r in results(provision[1] if len(provision) > 1 else "")
            if r["task"] and r["task"].split(" : ")[0] in SITE_ROLES + ["peftnode_artifact"]
            and "Validating arguments" not in r["task"] and r["status"] != "skipping"]


def preflight_problems(proc: subprocess.CompletedProcess) -> list[str]:
    failed = [r for r in results(proc.stdout) if r["status"] == "fatal"]
    assert len(failed) == 1, explain(proc)
    assert failed[0]["task"] == "peftnode_preflight : Fail with every problem found, before anything is changed", failed
    lines = failed[0]["result"]["msg"].splitlines()
    assert re.fullmatch(r"peftnode preflight: \d+ problem\(s\); nothing was changed:", lines[0]), lines[0]
    assert lines[0].split()[2] == str(len(lines) - 1), lines
    return lines[1:]


# --- static: every role has what the design asks of it -------------------------------------------


def load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def defaults(role: str) -> dict:
    path = ROLES / role / "defaults" / "main.yml"
    return (load(path) or {}) if path.exists() else {}


def spec_options(role: str) -> dict:
    return load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]


def task_files(role: str) -> list[Path]:
    return sorted((ROLES / role).glob("*/*.yml"))


def test_site_roles_all_exist_with_their_files():
    assert set(SITE_ROLES + HELPER_ROLES) == set(ALL_ROLES)
    for role in ALL_ROLES:
        assert role == "peftnode" or role.startswith("peftnode_"), f"roles/{role}: not prefixed, it would clash"
        for part in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
            assert (ROLES / role / part).is_file(), f"roles/{role}/{part} is missing"
    for role in SITE_ROLES:
        assert (ROLES / role / "tasks" / "preflight.yml").is_file(), f"roles/{role} has no tasks/preflight.yml"


@pytest.mark.parametrize("role", [r for r in ALL_ROLES if r != "peftnode"])
def test_every_role_depends_on_the_shared_settings(role):
    deps = load(ROLES / role / "meta" / "main.yml").get("dependencies") or []
    assert {"role": "peftnode"} in deps or "peftnode" in deps, f"roles/{role}/meta/main.yml: no dependency on peftnode"


@pytest.mark.parametrize("role", ALL_ROLES)
def test_every_default_is_commented(role):
    """Each variable in defaults/main.yml has a comment right above it, or is a repeat of one that has."""
    documented = {}
    for other in ALL_ROLES:
        lines = (ROLES / other / "defaults" / "main.yml").read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"^([a-z_][a-z0-9_]*):", line):
                above = next((x for x in reversed(lines[:i]) if x.strip()), "")
                documented.setdefault(m.group(1), False)
                documented[m.group(1)] |= above.startswith("#")
    for name in defaults(role):
        assert documented.get(name), f"roles/{role}/defaults/main.yml: {name} has no comment above it in any role"


@pytest.mark.parametrize("role", [r for r in ALL_ROLES if r != "peftnode_preflight"])
def test_argument_specs_cover_exactly_the_defaults(role):
    options = spec_options(role)
    required = {k for k, v in options.items() if v.get("required")}
    assert set(defaults(role)) <= set(options), f"{role}: defaults without a spec: {set(defaults(role)) - set(options)}"
    assert set(options) - required <= set(defaults(role)), (
        f"{role}: spec options without a default: {set(options) - required - set(defaults(role))}")
    assert "peftnode_stack" in required or role in ("peftnode_artifact", "peftnode")


def test_every_variable_has_one_owner():
    """A variable is defined in one role's defaults only: the shared ones in roles/peftnode."""
    owners: dict[str, list[str]] = {}
    for role in ALL_ROLES:
        for name in defaults(role):
            owners.setdefault(name, []).append(role)
    repeated = {name: roles for name, roles in owners.items() if len(roles) > 1}
    assert not repeated, repeated
    shared = set(defaults("peftnode"))
    assert {"peftnode_offline", "peftnode_cache_dir", "peftnode_openssl_prefix", "peftnode_venv_path"} <= shared


def walk_tasks(items):
    for task in items or []:
        if not isinstance(task, dict):
            continue
        yield task
        for key in ("block", "rescue", "always"):
            yield from walk_tasks(task.get(key))


def reads(task: dict, name: str) -> bool:
    """Whether a task evaluates variable `name`: in a {{ }} expression, or a bare condition."""
    body = {k: v for k, v in task.items() if k not in ("block", "rescue", "always", "name")}
    text = json.dumps(body, default=str)
    expressions = [re.sub(r"'[^']*'", "''", e) for e in re.findall(r"\{\{.*?\}\}", text)]
    conditions = [json.dumps(body.get(k), default=str) for k in ("when", "changed_when", "failed_when")]
    module_args = [v for k, v in body.items() if k.endswith(".assert") or k == "assert"]
    conditions += [json.dumps(a.get("that"), default=str) for a in module_args if isinstance(a, dict)]
    return any(re.search(rf"\b{name}\b", t) for t in expressions + conditions)


def test_every_task_that_touches_the_password_hash_has_no_log():
    touching = []
    for role in ALL_ROLES:
        for path in task_files(role):
            if path.parent.name not in ("tasks", "handlers"):
                continue
            for task in walk_tasks(load(path)):
                if reads(task, "peftnode_jupyter_password_hash"):
                    touching.append(f"{path.relative_to(REPO)}: {task.get('name')}")
                    assert task.get("no_log") is True, f"{touching[-1]} lacks no_log: true"
    assert touching, "no task reads peftnode_jupyter_password_hash at all"
    spec = spec_options("peftnode_jupyterlab")["peftnode_jupyter_password_hash"]
    assert spec.get("no_log") is True


def test_jupyterlab_unit_and_config_are_safe_by_default():
    unit = (ROLES / "peftnode_jupyterlab" / "templates" / "jupyterlab.service.j2").read_text(encoding="utf-8")
    for line in ("Restart=on-failure", "NoNewPrivileges=true", "ProtectSystem=full",
                 "User={{ peftnode_jupyter_user }}"):
        assert line in unit
    assert "allow-root" not in unit and "nohup" not in unit
    config = (ROLES / "peftnode_jupyterlab" / "templates" / "jupyter_server_config.py.j2").read_text(encoding="utf-8")
    assert 'c.IdentityProvider.token = ""' in config
    assert "c.ServerApp.allow_root = False" in config
    assert "c.PasswordIdentityProvider.password_required = True" in config
    assert (ROLES / "peftnode_jupyterlab" / "vars" / "main.yml").read_text().count("jupyterlab_unit: jupyterlab") == 1
    assert load(ROLES / "peftnode_jupyterlab" / "defaults" / "main.yml")["peftnode_jupyter_allow_origin"] is None


# --- argument specs refuse bad variables before any change ---------------------------------------

# One bad variable per role, and (a regex for) the line its argument spec answers with. The type in
# "is of type <class ...>" depends on where the value came from (str from -e, AnsibleUnicode from YAML).
def unconvertible(name: str, kind: str) -> str:
    return rf"argument '{name}' is of type <class '[^']+'> and we were unable to convert to {kind}"


BAD_VARIABLES = {
    "peftnode": ({"peftnode_build_jobs": "many"}, unconvertible("peftnode_build_jobs", "int")),
    "peftnode_base": ({"peftnode_install_packages": "perhaps"}, unconvertible("peftnode_install_packages", "bool")),
    "peftnode_openssl": ({"peftnode_openssl_system_cas": "many"}, unconvertible("peftnode_openssl_system_cas", "bool")),
    "peftnode_python": ({"peftnode_python_enable_optimizations": "sometimes"},
                        unconvertible("peftnode_python_enable_optimizations", "bool")),
    "peftnode_venv": ({"peftnode_pip_require_hashes": "yes please"},
                      unconvertible("peftnode_pip_require_hashes", "bool")),
    "peftnode_jupyterlab": ({"peftnode_jupyter_log_level": "LOUD"},
                            r"value of peftnode_jupyter_log_level must be one of: "
                            r"DEBUG, INFO, WARN, ERROR, CRITICAL, got: LOUD"),
    "peftnode_model": ({"peftnode_model_allow_network": "maybe"},
                       unconvertible("peftnode_model_allow_network", "bool")),
    "peftnode_node_verify": ({"peftnode_node_expectations": {"gpus": 8, "colour": "blue"}},
                             r"peftnode_node_expectations\.colour\. Supported parameters include: cuda_home, "),
    "peftnode_artifact": ({"artifact": {"file": "x.tgz", "sha256": None}, "artifact_timeout": "soon"},
                          unconvertible("artifact_timeout", "int")),
    # (its kernel default comes from gathered facts, which this play does not gather)
    "peftnode_nvidia_driver": ({"peftnode_nvidia_driver_method": "magic", "peftnode_nvidia_driver_kernel": "6.1.0-x"},
                               r"value of peftnode_nvidia_driver_method must be one of: runfile, repo, got: magic"),
    "peftnode_fabricmanager": ({"peftnode_fabricmanager_method": "magic"},
                               r"value of peftnode_fabricmanager_method must be one of: repo, archive, got: magic"),
    "peftnode_cuda": ({"peftnode_cuda_method": "magic"},
                      r"value of peftnode_cuda_method must be one of: runfile, repo, redist, got: magic"),
    "peftnode_nccl": ({"peftnode_nccl_method": "magic"},
                      r"value of peftnode_nccl_method must be one of: archive, repo, got: magic"),
    "peftnode_cudnn": ({"peftnode_cudnn_method": "magic"},
                       r"value of peftnode_cudnn_method must be one of: archive, repo, got: magic"),
    "peftnode_dcgm": ({"peftnode_dcgm_method": "magic"},
                      r"value of peftnode_dcgm_method must be one of: repo, artifact, got: magic"),
    "peftnode_nccl_tests": ({"peftnode_nccl_tests_enabled": "perhaps"},
                            unconvertible("peftnode_nccl_tests_enabled", "bool")),
}


def test_each_role_refuses_a_bad_variable_at_its_first_task(tmp_path):
    """Each role on its own local host with its bad variable, in one ansible-playbook run (check mode)."""
    stack = yaml.safe_load((REPO / "stacks" / "cu117.yml").read_text(encoding="utf-8"))
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    hosts = {f"bad-{role}": {**local, "role_under_test": role, "peftnode_stack": stack, **bad}
             for role, (bad, _) in BAD_VARIABLES.items()}
    hosts["no-stack"] = {**local, "role_under_test": "peftnode_openssl"}
    plays = [{"name": "Apply each host's role", "hosts": "all", "gather_facts": False,
              "tasks": [{"name": "Apply the role", "ansible.builtin.include_role": {"name": "{{ role_under_test }}"}}]}]
    inventory = write_yaml(tmp_path / "inventory.yml", {"all": {"hosts": hosts}})
    book = write_yaml(tmp_path / "bad-vars.yml", plays)  # roles_path comes from the repository's ansible.cfg
    proc = playbook(tmp_path, book, "--check", "-i", inventory)
    assert proc.returncode != 0, explain(proc)

    everything = results(proc.stdout)
    for role, (_, message) in BAD_VARIABLES.items():
        mine = [r for r in everything if r["host"] == f"bad-{role}"]
        # the shared settings (a dependency of every role) are validated first, then the role's own
        mine = [r for r in mine if r["task"] != "Apply the role"
                and not (role != "peftnode" and r["task"].startswith("peftnode : ") and r["status"] != "fatal")]
        assert len(mine) == 1, f"{role}: more than the argument check ran\n{mine}"
        assert mine[0]["status"] == "fatal" and mine[0]["task"].startswith(f"{role} : Validating arguments"), mine
        errors = mine[0]["result"].get("argument_errors") or [mine[0]["result"].get("msg", "")]
        assert any(re.match(message, e) for e in errors), (role, errors)
    # without a stack the role's own defaults cannot even be worked out: refused at the same task
    nostack = [r for r in everything if r["host"] == "no-stack" and r["task"] != "Apply the role"]
    assert [r["status"] for r in nostack] == ["fatal"] and "Validating arguments" in nostack[0]["task"]
    assert "'peftnode_stack' is undefined" in nostack[0]["result"]["msg"]
    assert all(counts["changed"] == 0 for counts in recap(proc.stdout).values()), proc.stdout[-3000:]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"peftnode_offline": "maybe"}, unconvertible("peftnode_offline", "bool")),
        ({"peftnode_jupyter_log_level": "LOUD"},
         "value of peftnode_jupyter_log_level must be one of: DEBUG, INFO, WARN, ERROR, CRITICAL, got: LOUD"),
    ],
    ids=["type", "choice"],
)
def test_site_refuses_a_bad_variable_in_preflight_before_any_role_runs(tmp_path, bad, message):
    stack = tiny_stack(tmp_path, tmp_path / "artifacts", tmp_path / "model")
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_jupyter_password_hash=PASSWORD_HASH, **bad)
    proc = site_check(tmp_path, variables)
    assert proc.returncode != 0, explain(proc)
    failed = [r for r in results(proc.stdout) if r["status"] in ("fatal", "failed")]
    # a shared setting is refused by the peftnode role's own argument check (the preflight depends on
    # it), a role's setting by the preflight's check of every selected role: both before any role runs
    assert len(failed) == 1 and failed[0]["task"] in {
        "peftnode_preflight : Check the variables of every role this run applies against its argument specs",
        "peftnode : Validating arguments against arg spec 'main' - The settings every peftnode role shares"}, failed
    errors = [e for r in failed for e in r["result"].get("argument_errors", [])]
    assert any(re.match(message, e) for e in errors), errors
    assert role_tasks_ran(proc.stdout) == []
    assert recap(proc.stdout)["localhost"]["changed"] == 0


# --- preflight: every missing artifact, in one failure --------------------------------------------


def test_offline_preflight_lists_every_missing_artifact_and_changes_nothing(tmp_path):
    stack = tiny_stack(tmp_path, tmp_path / "stack-artifacts", tmp_path / "stack-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_offline=True,
                          peftnode_artifact_dir=str(empty), peftnode_model_source_dir=str(empty),
                          peftnode_wheelhouse=str(empty), peftnode_jupyter_password_hash=PASSWORD_HASH)
    proc = site_check(tmp_path, variables)
    assert proc.returncode != 0, explain(proc)
    assert preflight_problems(proc) == [
        f"openssl: openssl_1.1.1w.orig.tar.gz: missing: not in {empty}, no peftnode_mirror_url is set, "
        "and peftnode_offline is true",
        f"python: python3.11_3.11.2.orig.tar.gz: missing: not in {empty}, no peftnode_mirror_url is set, "
        "and peftnode_offline is true",
        f"model: config.json: missing: not in {empty}, no peftnode_mirror_url is set, and peftnode_offline is true",
        f"model: model.safetensors: missing: not in {empty}, no peftnode_mirror_url is set, "
        "and peftnode_offline is true",
    ]
    assert role_tasks_ran(proc.stdout) == []
    assert recap(proc.stdout)["localhost"]["changed"] == 0
    assert not (tmp_path / "node").exists()


def test_preflight_reports_checksums_sources_and_password_together(tmp_path):
    """Null checksums, a damaged controller copy, no pip source and no password: all in one list."""
    artifacts = tmp_path / "artifacts"
    stack = tiny_stack(tmp_path, artifacts, tmp_path / "model", checksums=False)
    data = load(stack)
    data["openssl"]["artifact"]["sha256"] = "0" * 64  # the file in artifacts/ does not match this
    write_yaml(stack, data)
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_offline=True,
                          peftnode_artifact_dir=str(artifacts), peftnode_model_source_dir="model-dir")
    proc = site_check(tmp_path, variables)
    assert proc.returncode != 0, explain(proc)
    openssl = artifacts / "openssl_1.1.1w.orig.tar.gz"
    # each role's own problems in site.yml's order, then every needed artifact's
    assert preflight_problems(proc) == [
        "venv: peftnode_offline is true, but neither peftnode_wheelhouse nor peftnode_pip_index_url is set: "
        "pip has nowhere to install the stack's requirements from",
        "jupyterlab: peftnode_jupyter_password_hash is not set: give the hash of the JupyterLab password "
        "(jupyter_server.auth.passwd()), kept with ansible-vault; JupyterLab is never started without one",
        "peftnode_model_source_dir: model-dir is not an absolute path",
        f"openssl: openssl_1.1.1w.orig.tar.gz: {openssl} has sha256 {sha256(openssl)}, but the stack says {'0' * 64}",
        "python: python3.11_3.11.2.orig.tar.gz: no sha256 in the stack; record the sha256 of the file you use "
        "(or set peftnode_allow_unverified_artifacts: true)",
        "model: config.json: no sha256 in the stack; record the sha256 of the file you use "
        "(or set peftnode_allow_unverified_artifacts: true)",
        "model: config.json: missing: not in model-dir, no peftnode_mirror_url is set, and peftnode_offline is true",
        "model: model.safetensors: no sha256 in the stack; record the sha256 of the file you use "
        "(or set peftnode_allow_unverified_artifacts: true)",
        "model: model.safetensors: missing: not in model-dir, no peftnode_mirror_url is set, "
        "and peftnode_offline is true",
    ]
    assert role_tasks_ran(proc.stdout) == []


def test_preflight_refuses_a_password_instead_of_a_hash_without_showing_it(tmp_path):
    stack = tiny_stack(tmp_path, tmp_path / "artifacts", tmp_path / "model")
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_artifact_dir=str(tmp_path / "artifacts"),
                          peftnode_model_source_dir=str(tmp_path / "model"),
                          peftnode_jupyter_password_hash="hunter2-plain-password")
    proc = site_check(tmp_path, variables)
    assert proc.returncode != 0, explain(proc)
    assert preflight_problems(proc) == [
        "jupyterlab: peftnode_jupyter_password_hash does not look like a Jupyter password hash "
        "(argon2:... or sha1:salt:digest); give the hash, not the password"]
    assert "hunter2" not in proc.stdout + proc.stderr


def test_preflight_checks_only_what_the_selected_roles_need(tmp_path):
    stack = tiny_stack(tmp_path, tmp_path / "artifacts", tmp_path / "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_offline=True,
                          peftnode_artifact_dir=str(empty))
    proc = site_check(tmp_path, variables, "--tags", "python")
    assert proc.returncode != 0, explain(proc)
    assert [p.split(":")[0] for p in preflight_problems(proc)] == ["python"]


def test_preflight_excuses_a_missing_artifact_of_an_installed_component_but_not_a_wrong_one(tmp_path):
    """The node's Python (the one running this test) is at the stack's version: its source artifact
    is not needed, but a copy in the artifact directory must still match the stack's sha256."""
    import platform
    import ssl

    binary = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if not binary.is_file():
        pytest.skip(f"{binary} does not exist")
    artifacts = tmp_path / "artifacts"
    stack = tiny_stack(tmp_path, artifacts, tmp_path / "model")
    data = load(stack)
    data["python"]["version"] = platform.python_version()
    data["openssl"]["version"] = ssl.OPENSSL_VERSION.split()[1]  # what the python role's proof will see
    write_yaml(stack, data)
    python_tarball = artifacts / data["python"]["artifact"]["file"]
    python_tarball.unlink()
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_offline=True,
                          peftnode_artifact_dir=str(artifacts), peftnode_python_prefix=sys.base_prefix)

    fine = site_check(tmp_path, variables, "--tags", "python")
    assert fine.returncode == 0, explain(fine)
    shown = [r for r in results(fine.stdout)
             if r["task"] == "peftnode_preflight : Show where each artifact will come from"]
    assert shown[0]["result"]["msg"] == [
        f"python: {python_tarball.name}: not needed, the node has python {platform.python_version()} already"]

    python_tarball.write_bytes(b"not the file the stack names")
    wrong = site_check(tmp_path, variables, "--tags", "python")
    assert wrong.returncode != 0, explain(wrong)
    assert preflight_problems(wrong) == [
        f"python: {python_tarball.name}: {python_tarball} has sha256 {sha256(python_tarball)}, "
        f"but the stack says {data['python']['artifact']['sha256']}"]


# --- check mode: with everything in place, a whole site.yml run changes nothing ------------------


def test_site_check_and_diff_mode_run_through_without_changing_or_printing_secrets(tmp_path):
    artifacts, model = tmp_path / "artifacts", tmp_path / "model"
    stack = tiny_stack(tmp_path, artifacts, model)
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), peftnode_offline=True,
                          peftnode_artifact_dir=str(artifacts), peftnode_model_source_dir=str(model),
                          peftnode_wheelhouse=str(wheelhouse), peftnode_jupyter_password_hash=PASSWORD_HASH,
                          peftnode_gpu=False)
    proc = site_check(tmp_path, variables, "--diff")
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout + proc.stderr
    assert PASSWORD_HASH not in out and PASSWORD_HASH.split("$")[-1] not in out

    seen = results(proc.stdout)
    by_task = {r["task"]: r for r in seen}
    # check mode reports the builds it cannot do, and every role got its turn
    assert by_task["peftnode_openssl : Report the build check mode skips"]["status"] == "changed"
    assert by_task["peftnode_python : Report the build check mode skips"]["status"] == "changed"
    assert by_task["peftnode_artifact : Copy the artifact to the node"]["status"] == "changed"
    assert by_task["peftnode_jupyterlab : Install the systemd unit jupyterlab"]["status"] == "changed"
    assert by_task["peftnode_node_verify : Write the node manifest"]["status"] == "changed"
    for role in SITE_ROLES:
        assert any(r["task"].startswith(f"{role} : ") for r in seen if r["task"]), f"{role} did not run"
    # diff mode shows the manifest that would be written, and never the JupyterLab configuration
    written = yaml.safe_load(diff_after(proc.stdout, "peftnode_node_verify : Write the node manifest"))
    assert written["schema"] == 1 and written["stack"] == load(stack) and written["node"] == {"gpus": 0}
    assert written["host"] == "localhost" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", written["written_at"])
    config = by_task["peftnode_jupyterlab : Write the JupyterLab server configuration"]
    assert config["status"] == "changed" and set(config["result"]) <= {"censored", "changed"}
    assert diff_after(proc.stdout, "peftnode_jupyterlab : Write the JupyterLab server configuration").strip() == ""
    assert "PasswordIdentityProvider" not in out
    # ... and nothing on the "node" side exists
    assert not (tmp_path / "node").exists()


# --- CentOS 7: the yum repair's regular expressions, on repository files shaped like CentOS 7's ----

CENTOS7_BASE_REPO = """\
[base]
name=CentOS-$releasever - Base
mirrorlist=http://mirrorlist.example.org/?release=$releasever&arch=$basearch&repo=os&infra=$infra
#baseurl=http://mirror.example.org/centos/$releasever/os/$basearch/
gpgcheck=1

[updates]
name=CentOS-$releasever - Updates
mirrorlist=http://mirrorlist.example.org/?release=$releasever&arch=$basearch&repo=updates&infra=$infra
#baseurl=http://mirror.example.org/centos/$releasever/updates/$basearch/
gpgcheck=1
"""
CENTOS7_SCL_REPO = """\
[centos-sclo-rh]
name=CentOS-7 - SCLo rh
# baseurl=http://mirror.example.org/centos/7/sclo/$basearch/rh/
mirrorlist=http://mirrorlist.example.org?arch=$basearch&release=7&repo=sclo-rh
gpgcheck=1
"""


def centos7_repair(text: str, mirror: str) -> str:
    """Apply the role's two replace tasks the way ansible.builtin.replace does (re.MULTILINE)."""
    repos = load(ROLES / "peftnode_base" / "tasks" / "centos7-repos.yml")
    tasks = {t["name"]: t["ansible.builtin.replace"] for t in repos if "ansible.builtin.replace" in t}
    for name in ("Comment out the dead mirrorlist lines", "Point baseurl at the mirror"):
        args = tasks[name]
        replacement = args["replace"].replace("{{ peftnode_centos7_mirror | regex_replace('/+$', '') }}",
                                              mirror.rstrip("/"))
        assert "{{" not in replacement
        text = re.compile(args["regexp"], re.MULTILINE).sub(replacement.replace("\\", "\\\\"), text)
    return text


@pytest.mark.parametrize("mirror", ["https://vault.example.net/7.9.2009", "http://10.0.0.5/centos/7/"])
def test_centos7_repair_points_every_repository_at_the_mirror_and_is_idempotent(mirror):
    base = mirror.rstrip("/")
    fixed = centos7_repair(CENTOS7_BASE_REPO, mirror)
    assert [line for line in fixed.splitlines() if line.startswith(("baseurl", "mirrorlist", "#mirrorlist"))] == [
        "#mirrorlist=http://mirrorlist.example.org/?release=$releasever&arch=$basearch&repo=os&infra=$infra",
        f"baseurl={base}/os/$basearch/",
        "#mirrorlist=http://mirrorlist.example.org/?release=$releasever&arch=$basearch&repo=updates&infra=$infra",
        f"baseurl={base}/updates/$basearch/",
    ]
    scl = centos7_repair(CENTOS7_SCL_REPO, mirror)
    assert f"baseurl={base}/sclo/$basearch/rh/" in scl.splitlines()
    assert "#mirrorlist=http://mirrorlist.example.org?arch=$basearch&release=7&repo=sclo-rh" in scl.splitlines()
    # a second pass changes nothing (the replace tasks then report ok)
    assert centos7_repair(fixed, mirror) == fixed
    assert centos7_repair(scl, mirror) == scl


# --- the venv: a +local build (torch==1.13.1+cu117) needs a source that serves it -----------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("online, the stack names no index", "a +local build, which the default package index never serves"),
        ("offline, the wheelhouse lacks the wheel", "no torch-1.13.1+cu117-*.whl in the wheelhouse"),
        ("online, the stack names PyTorch's index", None),
        ("offline, the wheel is in the wheelhouse", None),
    ],
)
def test_venv_preflight_names_a_local_build_nothing_serves(tmp_path, case, expected):
    stack = tiny_stack(tmp_path, tmp_path / "artifacts", tmp_path / "model")
    data = load(stack)
    data["venv"]["requirements"] = ["torch==1.13.1+cu117", "jupyterlab"]
    if "PyTorch's index" in case:
        data["venv"]["extra_index_url"] = "https://pytorch.example.org/whl/cu117"
    write_yaml(stack, data)
    extra = {}
    if case.startswith("offline"):
        wheelhouse = tmp_path / "wheelhouse"
        wheelhouse.mkdir()
        (wheelhouse / "jupyterlab-4.0.0-py3-none-any.whl").write_bytes(b"")
        if "is in the wheelhouse" in case:
            (wheelhouse / "torch-1.13.1+cu117-cp310-cp310-linux_x86_64.whl").write_bytes(b"")
        extra = {"peftnode_offline": True, "peftnode_wheelhouse": str(wheelhouse)}
    variables = node_vars(tmp_path, peftnode_stack_name=str(stack), **extra)
    proc = site_check(tmp_path, variables, "--tags", "venv")
    if expected is None:
        assert proc.returncode == 0, explain(proc)
        return
    assert proc.returncode != 0, explain(proc)
    problems = preflight_problems(proc)
    assert len(problems) == 1 and problems[0].startswith("venv: torch==1.13.1+cu117: "), problems
    assert expected in problems[0], problems
    assert role_tasks_ran(proc.stdout) == []


# --- the NVIDIA roles: every missing artifact of the seed's GPU stack, in the same one failure -----


def test_offline_preflight_lists_the_seed_gpu_stack_artifacts(tmp_path):
    """cu117 as the seed pins it, offline, nothing in the artifact directory, the driver forced (this
    machine has no NVIDIA device): the NVIDIA roles' own preflights name every missing file and every
    checksum the stack does not know, and nothing changes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    variables = node_vars(tmp_path, peftnode_stack_name="cu117", peftnode_offline=True, peftnode_gpu=True,
                          peftnode_artifact_dir=str(empty), peftnode_nvidia_driver_force=True)
    proc = site_check(tmp_path, variables, "--tags", "nvidia_driver,cuda,nccl,cudnn")
    assert proc.returncode != 0, explain(proc)
    problems = preflight_problems(proc)
    missing = f"missing: not in {empty}, no peftnode_mirror_url is set, and peftnode_offline is true"
    no_sha = "no sha256 in the stack; record the sha256 of the file you use"
    for component, file, has_sha in [
        ("nvidia_driver", "NVIDIA-Linux-x86_64-515.65.01.run", False),
        ("cuda", "cuda_11.7.1_515.65.01_linux.run", False),
        ("nccl", "nccl_2.14.3-1+cuda11.7_x86_64.txz", False),
        ("cudnn", "cudnn-linux-x86_64-8.8.1.3_cuda11-archive.tar.xz", True),
    ]:
        assert f"{component}: {file}: {missing}" in problems, problems
        assert any(p.startswith(f"{component}: {file}: {no_sha}") for p in problems) != has_sha, problems
    assert role_tasks_ran(proc.stdout) == []
    assert recap(proc.stdout)["localhost"]["changed"] == 0


def test_node_verify_accepts_every_node_expectation_verify_knows():
    """peftnode_node_expectations is written into the manifest verify reads: its argument spec takes exactly
    the keys of checks.node.Node (and of its perf and min_free_gib parts), so a key added to verify cannot be
    refused by the role (pair_busbw_gbps was, until this test)."""
    from dataclasses import fields

    from checks.node import MinFree, Node, PerfExpect

    spec = yaml.safe_load((ROLES / "peftnode_node_verify/meta/argument_specs.yml").read_text())
    options = spec["argument_specs"]["main"]["options"]["peftnode_node_expectations"]["options"]
    assert set(options) == {f.name for f in fields(Node)}
    assert set(options["perf"]["options"]) == {f.name for f in fields(PerfExpect)}
    assert set(options["min_free_gib"]["options"]) == {f.name for f in fields(MinFree)}
