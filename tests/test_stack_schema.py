"""stacks/stack.schema.json (for editors) and checks.stack's loader (for provisioning and verify) say
the same about every stack: both accept the shipped stacks and a stack using every optional key; both
refuse every broken variant; every mapping accepts the same keys and requires the same ones in both.

The loader also ties keys together (a +cuXYZ torch for another CUDA, a driver below CUDA's floor...):
no JSON Schema can say that, so those rules are the loader's alone (the last test shows one).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from checks.stack import REPO_STACKS, STACK_SCHEMA, StackError, load_manifest, load_stack, validate_stack
from tests.helpers.documents import mutate

SCHEMA_PATH = REPO_STACKS / "stack.schema.json"
MODELINE = "# yaml-language-server: $schema=stack.schema.json"
STACK_FILES = sorted(REPO_STACKS.glob("*.yml"))
UNKNOWN = "zz_not_a_key"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validator(schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def manifest_validator(schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/manifest"})


def _seed() -> dict:
    return yaml.safe_load((REPO_STACKS / "cu117.yml").read_text(encoding="utf-8"))


def _full() -> dict:
    """The seed stack with every optional key the loader knows set (so no key goes unexercised)."""
    data = _seed()
    url = "https://mirror.invalid/files/x"
    data["fabricmanager"] = {"version": data["nvidia_driver"]["version"],
                             "artifact": {"file": "fabricmanager.tar.xz", "sha256": None, "url": url}}
    data["dcgm"]["artifact"] = {"file": "datacenter-gpu-manager-3.3.9-1-x86_64.rpm", "sha256": "0" * 64, "url": None}
    data["nccl"]["artifact"]["url"] = url
    data["venv"]["index_url"] = "https://mirror.invalid/simple"
    data["jupyterlab"]["base_url"] = "/lab"
    data["finetune"]["keep_dir"] = "/data/peftnode/adapters"
    data["node"].update({
        "jupyter_url": "http://127.0.0.1:9999/lab", "mig": False,
        "cuda_home": "/usr/local/cuda-11.7", "nccl_home": "/usr/local/cuda-11.7", "cudnn_home": "/usr/local/cuda-11.7",
        "perf": {"gemm_tflops": 250, "copy_tbps": 1.6, "h2d_gbps": 20, "d2h_gbps": 20, "allreduce_busbw_gbps": 150,
                 "allreduce_bytes": 1 << 28, "pair_busbw_gbps": 40.0, "floor_ratio": 0.7, "outlier_ratio": 0.85},
    })
    return data


def _validate_problems(data) -> list[str]:
    """What validate_stack (load_stack after reading the file) says about ``data``: [] when it accepts it."""
    try:
        validate_stack(data, "s.yml")
    except StackError as exc:
        return [p.removeprefix("s.yml: ") for p in exc.problems]
    return []


def _loader_problems(data, tmp_path: Path) -> list[str]:
    """What load_stack says about ``data`` written as a stack file: [] when it accepts it."""
    path = tmp_path / "variant.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    try:
        load_stack(str(path))
    except StackError as exc:
        return [p.removeprefix(f"{path}: ") for p in exc.problems]
    return []


def _schema_errors(validator, data) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def _get(data, path: tuple):
    for key in path:
        data = data[key]
    return data


def _dotted(path: tuple) -> str:
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    return out


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node and node["$ref"].startswith("#/$defs/"):
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def _objects(schema: dict, node: dict, data, path: tuple = ()):
    """(path, object schema, data) for every mapping in ``data`` the schema describes as an object."""
    node = _resolve(schema, node)
    if node.get("type") == "object" and isinstance(data, dict):
        yield path, node, data
        for key, sub in node.get("properties", {}).items():
            if key in data:
                yield from _objects(schema, sub, data[key], (*path, key))
    elif node.get("type") == "array" and isinstance(data, list):
        for i, item in enumerate(data):
            yield from _objects(schema, node["items"], item, (*path, i))


def _leaves(data, path: tuple = ()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(data, list):
        if all(not isinstance(value, (dict, list)) for value in data):
            yield path, data  # a list of scalars (requirements, components, methods) is a leaf too
        for i, value in enumerate(data):
            yield from _leaves(value, (*path, i))
    else:
        yield path, data


# --------------------------------------------------------------------------- the file itself


def test_the_schema_is_a_valid_draft_2020_12_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$ref"] == "#/$defs/stack"


@pytest.mark.parametrize("path", STACK_FILES, ids=lambda p: p.name)
def test_every_shipped_stack_passes_both(path, validator):
    assert path.read_text(encoding="utf-8").splitlines()[0] == MODELINE  # editors find the schema
    assert (path.parent / MODELINE.split("=", 1)[1]).is_file()
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert _schema_errors(validator, data) == []
    assert load_stack(str(path)).name == data["name"]


def test_a_stack_with_every_optional_key_passes_both(validator, tmp_path):
    data = _full()
    assert _schema_errors(validator, data) == []
    assert _loader_problems(data, tmp_path) == []


# --------------------------------------------------------------------------- broken variants


def _set(path: str, value):
    return lambda data: mutate(data, path, value)


BROKEN = {
    # wrong type
    "gpus-a-string": _set("node.gpus", "8"),
    "gpus-a-bool": _set("node.gpus", True),
    "gpus-a-float": _set("node.gpus", 8.5),
    "port-a-string": _set("jupyterlab.port", "9999"),
    "enabled-yes": _set("jupyterlab.enabled", "yes"),
    "driver-version-a-float": _set("nvidia_driver.version", 515.65),
    "description-null": _set("description", None),
    "keep-dir-relative": _set("finetune.keep_dir", "adapters"),
    "requirements-a-string": _set("venv.requirements", "torch"),
    "node-a-list": _set("node", [8]),
    "perf-ratio-a-string": _set("node.perf.floor_ratio", "0.7"),
    "min-free-negative": _set("node.min_free_gib.data", -1),
    # unknown key
    "unknown-top-level": _set("torch", "1.13"),
    "unknown-in-component": _set("cudnn.flavour", "x"),
    "unknown-in-artifact": _set("openssl.artifact.md5", "abc"),
    "unknown-in-node": _set("node.gpu_count", 8),
    "unknown-in-perf": _set("node.perf.tflops", 1),
    "unknown-in-model-file": _set("model.files.0.size", 3),
    # bad version / pattern
    "python-3.10": _set("python.version", "3.10"),
    "cuda-11.7": _set("cuda.version", "11.7"),
    "driver-4-digits": _set("nvidia_driver.version", "5150.65"),
    "cudnn-3-parts": _set("cudnn.version", "8.8.1"),
    "openssl-2-parts": _set("openssl.version", "1.1"),
    "nccl-package": _set("nccl.package", "2.14.3-1+cuda11.7x"),
    "dcgm-version": _set("dcgm.version", "3.3"),
    "name-uppercase": _set("name", "CU117"),
    "schema-2": _set("schema", 2),
    "requirement-no-version": _set("venv.requirements.0", "torch==="),
    "requirement-no-name": _set("venv.requirements.0", "==1.0"),
    "file-with-dir": _set("openssl.artifact.file", "a/b.tgz"),
    "url-ftp": _set("openssl.artifact.url", "ftp://x"),
    "relative-path": _set("model.path", "data/models"),
    "base-url-relative": _set("jupyterlab.base_url", "lab"),
    "component-name": _set("cuda.redist.components.0", "Cuda-Cudart"),
    # out of range, list rules
    "port-0": _set("jupyterlab.port", 0),
    "port-70000": _set("jupyterlab.port", 70000),
    "gpus-65": _set("node.gpus", 65),
    "allreduce-bytes-0": _set("node.perf.allreduce_bytes", 0),
    "no-requirements": _set("venv.requirements", []),
    "no-methods": _set("finetune.methods", []),
    "duplicate-method": _set("finetune.methods", ["lora", "lora"]),
    "duplicate-component": _set("cuda.redist.components", ["cuda_nvcc", "cuda_nvcc"]),
    # missing required key
    "no-cuda": _set("cuda", KeyError),
    "no-name": _set("name", KeyError),
    "no-node-gpus": _set("node.gpus", KeyError),
    "no-artifact-sha256": _set("openssl.artifact.sha256", KeyError),
    "no-artifact-file": _set("python.artifact.file", KeyError),
    "no-redist-components": _set("cuda.redist.components", KeyError),
    "no-nccl-tests-artifact": _set("nccl_tests.artifact", KeyError),
    "no-model-file-sha256": _set("model.files.0.sha256", KeyError),
    # bad sha256
    "sha256-uppercase": _set("openssl.artifact.sha256", "ABCDEF0123456789" * 4),
    "sha256-63-digits": _set("python.artifact.sha256", "a" * 63),
    "sha256-65-digits": _set("cudnn.artifact.sha256", "a" * 65),
    "sha256-not-hex": _set("model.files.0.sha256", "g" * 64),
    "sha256-a-number": _set("openssl.artifact.sha256", 12345),
    "top-level-a-list": lambda data: [data],
}


@pytest.mark.parametrize("name", BROKEN)
def test_both_refuse_each_broken_variant(name, validator, tmp_path):
    data = _full()
    replaced = BROKEN[name](data)  # mutates in place, or returns a whole new document
    data = data if replaced is None else replaced
    assert _schema_errors(validator, data), f"the schema accepts {name}"
    assert _loader_problems(data, tmp_path), f"the loader accepts {name}"


# --------------------------------------------------------------------------- mapping by mapping


def test_every_mapping_accepts_and_requires_the_same_keys_in_both(schema, validator):
    full = _full()
    objects = list(_objects(schema, schema, full))
    assert len(objects) > 25  # every component, artifact, node, perf, model file...
    for path, node, _ in objects:
        where = _dotted(path) or "top level"
        data = copy.deepcopy(full)
        _get(data, path)[UNKNOWN] = 1
        assert _schema_errors(validator, data), f"{where}: the schema accepts an unknown key"
        problems = _validate_problems(data)
        prefix = f"{_dotted(path)}.{UNKNOWN}" if path else UNKNOWN
        found = [p for p in problems if p.startswith(f"{prefix}: unknown key (accepted here: ")]
        assert found, f"{where}: the loader does not refuse the unknown key: {problems}"
        accepted = re.search(r"accepted here: ([^)]*)\)", found[0]).group(1).split(", ")
        assert sorted(accepted) == sorted(node["properties"]), f"{where}: the keys differ"

        for key in node["properties"]:
            data = copy.deepcopy(full)
            del _get(data, path)[key]
            schema_ok = not _schema_errors(validator, data)
            loader_says = _validate_problems(data)
            if key in node["required"]:
                assert not schema_ok, f"{where}.{key}: the schema does not require it"
                assert f"{prefix.removesuffix(UNKNOWN)}{key}: missing (required)" in loader_says, (where, key)
            else:
                assert schema_ok, f"{where}.{key}: the schema requires an optional key"
                assert loader_says == [], f"{where}.{key}: the loader requires an optional key: {loader_says}"


CANDIDATES = [None, [1], {"a": 1}, "", "x y", 0, -1, 1.5, True, "3.10.12", "/abs/path", "0" * 64]


def _structure_problems(data) -> list[str]:
    """The loader's structural half (STACK_SCHEMA; load_stack adds the rules across keys)."""
    problems: list[str] = []
    STACK_SCHEMA(data, "", problems)
    return problems


def test_every_value_is_judged_alike_by_both(schema, validator):
    """Every leaf of the full stack, set to each candidate value: the schema accepts it exactly when
    the loader's structure (STACK_SCHEMA) does. Against the structure, not load_stack: a candidate
    such as nccl.version = '3.10.12' is well-formed but no longer the package's version, which only
    the loader's rules across keys can see. (The schema validates the changed top-level section
    only: the rest of the document is unchanged and valid, and a whole document takes 10x longer.)"""
    full = _full()
    sections = {
        key: jsonschema.Draft202012Validator({"$defs": schema["$defs"], **sub})
        for key, sub in schema["$defs"]["stack"]["properties"].items()
    }
    disagreements = []
    checked = 0
    for path, _ in _leaves(full):
        for candidate in CANDIDATES:
            data = copy.deepcopy(full)
            *parents, last = path
            _get(data, tuple(parents))[last] = candidate
            if len(path) == 1:
                schema_ok = validator.is_valid(data)
            else:
                schema_ok = sections[path[0]].is_valid(data[path[0]])
            loader_ok = not _structure_problems(data)
            checked += 1
            if schema_ok != loader_ok:
                disagreements.append(f"{_dotted(path)} = {candidate!r}: schema {schema_ok}, loader {loader_ok}")
    assert checked > 1000
    assert disagreements == []


# --------------------------------------------------------------------------- node manifests


def _manifest(node: dict | None = None) -> dict:
    out = {"schema": 1, "stack": _seed(), "host": "gpu-node-01", "written_at": "2024-05-01T12:00:00Z"}
    if node is not None:
        out["node"] = node
    return out


def _manifest_problems(data, tmp_path: Path) -> list[str]:
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    try:
        load_manifest(path)
    except StackError as exc:
        return exc.problems
    return []


def test_a_manifest_overriding_every_node_field_passes_both(manifest_validator, tmp_path):
    node = copy.deepcopy(_full()["node"])
    node["gpus"] = 0
    for data in (_manifest(node), _manifest({}), _manifest()):
        assert _schema_errors(manifest_validator, data) == []
        assert _manifest_problems(data, tmp_path) == []


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: m["node"].update(gpus="8"), id="gpus-a-string"),
        pytest.param(lambda m: m["node"].update(gpu_count=8), id="unknown-node-key"),
        pytest.param(lambda m: m["node"]["perf"].update(tflops=1), id="unknown-perf-key"),
        pytest.param(lambda m: m["node"].update(data_path="data"), id="relative-data-path"),
        pytest.param(lambda m: m.update(schema=2), id="schema-2"),
        pytest.param(lambda m: m.pop("stack"), id="no-stack"),
        pytest.param(lambda m: m.update(extra=1), id="unknown-top-key"),
        pytest.param(lambda m: m["stack"]["python"].update(version="3.10"), id="bad-stack-inside"),
        pytest.param(lambda m: m["stack"]["openssl"]["artifact"].update(sha256="abc"), id="bad-sha256-inside"),
    ],
)
def test_both_refuse_a_broken_manifest(mutate, manifest_validator, tmp_path):
    data = _manifest(copy.deepcopy(_full()["node"]))
    mutate(data)
    assert _schema_errors(manifest_validator, data)
    assert _manifest_problems(data, tmp_path)


def test_the_manifest_node_section_accepts_the_same_keys_in_both(schema, tmp_path):
    data = _manifest({UNKNOWN: 1})
    problems = _manifest_problems(data, tmp_path)
    found = [p for p in problems if f"node.{UNKNOWN}: unknown key (accepted here: " in p]
    assert found, problems
    accepted = re.search(r"accepted here: ([^)]*)\)", found[0]).group(1).split(", ")
    assert sorted(accepted) == sorted(schema["$defs"]["node_overrides"]["properties"])
    assert schema["$defs"]["node_overrides"]["required"] == []


# --------------------------------------------------------------------------- what only the loader can say


def test_rules_across_keys_are_the_loaders_alone(validator, tmp_path):
    data = _full()
    data["venv"]["requirements"][0] = "torch==2.0.1+cu118"  # a torch built for CUDA 11.8 on an 11.7 stack
    assert _schema_errors(validator, data) == []
    assert any("built for cu118 but cuda.version is 11.7.1" in p for p in _loader_problems(data, tmp_path))
