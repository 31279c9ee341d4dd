"""The stack loader: both shipped stacks load; every malformed case is refused naming file, key and reason."""

import copy

import pytest
import yaml

from checks.stack import (
    StackError,
    available_stacks,
    load_manifest,
    load_stack,
    resolve_stack,
    validate_stack,
)
from tests.helpers.documents import mutate


@pytest.fixture(scope="module")
def good():
    return load_stack("cu117").data


def test_seed_stack_pins_the_seed_versions(good):
    assert good["openssl"]["version"] == "1.1.1t"
    assert good["python"]["version"].startswith("3.10.")
    assert good["nvidia_driver"]["version"] == "515.65.01"
    assert good["cuda"]["version"] == "11.7.1"
    assert good["nccl"]["package"] == "2.14.3-1+cuda11.7"
    assert good["cudnn"]["version"] == "8.8.1.3"
    assert good["venv"]["name"] == "peft-venv-py310-cu117"
    assert "torch==1.13.1+cu117" in good["venv"]["requirements"]
    assert any(r.startswith("peft @ git+") and r.endswith("@42ab106") for r in good["venv"]["requirements"])
    assert good["finetune"]["methods"] == ["lora", "adalora", "ia3", "prefix_tuning", "p_tuning", "prompt_tuning"]


def test_both_stacks_load_and_differ():
    names = available_stacks()
    assert {"cu117", "cu124"} <= set(names)
    a, b = load_stack("cu117").data, load_stack("cu124").data
    for key in ("openssl", "python", "nvidia_driver", "cuda", "nccl", "cudnn"):
        assert a[key]["version"] != b[key]["version"], key


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("nccl.version", "two", "nccl.version: 'two' is not an NCCL version like 2.14.3"),
        ("nvidia_driver.version", 515.65, "nvidia_driver.version: expected a string, got float 515.65"),
        ("python.version", "3.10", "python.version: '3.10' is not a full Python version like 3.10.12"),
        ("cudnn.version", "8.8", "cudnn.version: '8.8' is not a cuDNN version like 8.8.1.3"),
        ("openssl.version", "1.1", "openssl.version: '1.1' is not an OpenSSL version"),
        ("cuda", KeyError, "cuda: missing (required)"),
        ("venv.requirements", [], "venv.requirements: needs at least 1 item(s)"),
        ("venv.requirements.0", "torch===", "venv.requirements[0]: 'torch===' is not a valid PEP 508 requirement"),
        ("openssl.artifact.sha256", "abc", "openssl.artifact.sha256: 'abc' is not a sha256"),
        ("openssl.artifact.file", "a/b.tgz", "openssl.artifact.file: 'a/b.tgz' is not a plain file name"),
        ("openssl.artifact.url", "ftp://x", "openssl.artifact.url: 'ftp://x' is not an http(s):// or file:// URL"),
        ("jupyterlab.port", 70000, "jupyterlab.port: 70000 is outside 1..65535"),
        ("jupyterlab.enabled", "yes", "jupyterlab.enabled: expected true or false"),
        ("model.path", "relative/dir", "model.path: 'relative/dir' is not an absolute path"),
        ("node.gpus", -1, "node.gpus: -1 is outside 0..64"),
        ("finetune.methods", ["lora", "lora"], "finetune.methods: duplicate item(s) 'lora'"),
        ("schema", 2, "schema: 2 is outside 1..1"),
        ("nccl.package", "2.14.3-1+cuda11.8x", "nccl.package: '2.14.3-1+cuda11.8x' is not an NCCL package version"),
    ],
)
def test_each_malformed_field_is_named_with_its_reason(good, path, value, expected):
    with pytest.raises(StackError) as err:
        validate_stack(mutate(good, path, value), "bad.yml")
    assert any(p.startswith(f"bad.yml: {expected}") for p in err.value.problems), err.value.problems


def test_unknown_key_is_refused_and_accepted_keys_listed(good):
    data = mutate(good, "cudnn.flavour", "cuda11")
    with pytest.raises(StackError) as err:
        validate_stack(data, "s.yml")
    assert err.value.problems == ["s.yml: cudnn.flavour: unknown key (accepted here: artifact, package, version)"]


def test_unknown_top_level_key(good):
    with pytest.raises(StackError, match=r"s.yml: torch: unknown key \(accepted here: cuda, cudnn"):
        validate_stack({**good, "torch": "1.13"}, "s.yml")


def test_torch_build_must_match_the_stack_cuda(good):
    data = mutate(good, "cuda.version", "11.8.0")
    with pytest.raises(StackError, match=r"torch==1.13.1\+cu117' is built for cu117 but cuda.version is 11.8.0"):
        validate_stack(data, "s.yml")


def test_nccl_package_must_match_nccl_version(good):
    with pytest.raises(StackError, match="does not match nccl.version '2.14.3'"):
        validate_stack(mutate(good, "nccl.package", "2.15.5-1+cuda11.7"), "s.yml")


def test_all_problems_are_reported_at_once(good):
    data = mutate(mutate(good, "nccl.version", "x"), "node.gpus", "8")
    with pytest.raises(StackError) as err:
        validate_stack(data, "s.yml")
    assert len(err.value.problems) == 2


def test_not_a_mapping():
    with pytest.raises(StackError, match="s.yml: top level: expected a mapping, got list"):
        validate_stack([1, 2], "s.yml")


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(StackError, match=r"nope.yml: no such file"):
        load_stack(str(tmp_path / "nope.yml"))
    with pytest.raises(StackError, match=r"no stack named 'cu999' \(known stacks: .*cu117"):
        load_stack("cu999")


def test_invalid_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "broken.yml"
    bad.write_text("schema: 1\nname: [unclosed\n")
    with pytest.raises(StackError, match=r"broken.yml:\d+:\d+: not valid YAML"):
        load_stack(str(bad))


def test_stack_dirs_from_environment(tmp_path, monkeypatch, good):
    (tmp_path / "mine.yml").write_text(yaml.safe_dump({**good, "name": "mine"}))
    monkeypatch.setenv("PEFTNODE_STACKS", str(tmp_path))
    assert resolve_stack("mine") == tmp_path / "mine.yml"
    assert load_stack("mine").name == "mine"


def test_manifest_embeds_stack_and_overrides_node(tmp_path, good):
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump({"schema": 1, "stack": good, "node": {"gpus": 2, "gpu_model": "H200"},
                                    "host": "gpu01", "written_at": "2026-11-29T00:00:00Z"}))
    stack = load_manifest(path)
    assert stack.name == "cu117"
    exp = stack.expectations()
    assert exp["gpus"] == 2 and exp["gpu_model"] == "H200" and exp["data_path"] == "/data"


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"schema": 1, "node": {}}, "stack: missing (required)"),
        ({"schema": 1, "stack": {}, "node": {"gpus": "eight"}}, "node.gpus: expected an integer"),
        ({"schema": 1, "stack": {}, "node": {"colour": 1}}, "node.colour: unknown key"),
        ({"schema": 1, "stack": {"name": "x"}}, "(stack): schema: missing (required)"),
    ],
)
def test_malformed_manifest(tmp_path, doc, expected):
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StackError) as err:
        load_manifest(path)
    assert any(expected in p for p in err.value.problems), err.value.problems



# --- NVIDIA pieces that cannot work together are refused before anything runs ------------------


def _problems(data) -> list[str]:
    with pytest.raises(StackError) as err:
        validate_stack(data, "s.yml")
    return err.value.problems


@pytest.mark.parametrize(
    ("driver", "cuda", "verdict"),
    [
        ("450.80.01", "11.7.1", "refused"),   # just below CUDA 11's minor-version-compatibility floor
        ("450.80.02", "11.7.1", "warned"),    # the floor itself: runs, with minor-version compatibility only
        ("515.48.06", "11.7.1", "warned"),    # below 11.7 Update 1's own driver
        ("515.48.07", "11.7.1", "fine"),
        ("515.65.01", "11.7.1", "fine"),      # the seed
        ("515.43.04", "11.7.0", "fine"),
        ("525.60.12", "12.4.1", "refused"),   # below CUDA 12's floor
        ("535.104.05", "12.4.1", "warned"),
        ("550.54.15", "12.4.1", "fine"),
    ],
)
def test_driver_against_the_cuda_floors(good, driver, cuda, verdict):
    from checks.stack import compatibility

    data = copy.deepcopy(good)
    data["nvidia_driver"]["version"] = driver
    data["cuda"]["version"] = cuda
    major = cuda.split(".")[0]
    # keep the other pieces consistent with the CUDA major under test
    data["nccl"]["package"] = f"{data['nccl']['version']}-1+cuda{major}.0"
    data["nccl"]["artifact"]["file"] = f"nccl_{data['nccl']['version']}-1+cuda{major}.0_x86_64.txz"
    data["cudnn"]["artifact"]["file"] = f"cudnn-linux-x86_64-{data['cudnn']['version']}_cuda{major}-archive.tar.xz"
    data["cudnn"]["package"] = f"{data['cudnn']['version']}-1.cuda{major}.0"
    data["venv"]["requirements"] = [r for r in data["venv"]["requirements"] if "+cu" not in r]
    problems, warnings = compatibility(data)
    if verdict == "refused":
        assert len(problems) == 1 and f"driver {driver} is below" in problems[0], problems
        assert any("nvidia_driver.version" in p for p in _problems(data))
    elif verdict == "warned":
        assert problems == [] and len(warnings) == 1 and "minor-version compatibility only" in warnings[0]
        validate_stack(data, "s.yml")
    else:
        assert problems == [] and warnings == [], (problems, warnings)


def test_nccl_and_cudnn_built_for_another_cuda_major_are_refused(good):
    data = copy.deepcopy(good)
    data["nccl"]["package"] = "2.14.3-1+cuda12.0"
    data["cudnn"]["artifact"]["file"] = "cudnn-linux-x86_64-8.8.1.3_cuda12-archive.tar.xz"
    problems = _problems(data)
    assert "s.yml: nccl.package: '2.14.3-1+cuda12.0' is built for CUDA 12, but cuda.version is 11.7.1" in problems
    assert ("s.yml: cudnn.artifact.file: 'cudnn-linux-x86_64-8.8.1.3_cuda12-archive.tar.xz' is built for CUDA 12, "
            "but cuda.version is 11.7.1") in problems


def test_fabric_manager_must_be_the_driver_version(good):
    data = copy.deepcopy(good)
    data["fabricmanager"] = {"version": "515.48.07"}
    assert any(p.startswith("s.yml: fabricmanager.version: 515.48.07 is not the driver's version 515.65.01")
               for p in _problems(data))
    data["fabricmanager"] = {"version": "515.65.01"}
    validate_stack(data, "s.yml")


def test_warnings_reach_the_loaded_stack(tmp_path, good):
    data = copy.deepcopy(good)
    data["nvidia_driver"]["version"] = "470.57.02"  # above 11.x's floor, below 11.7.1's own driver
    path = tmp_path / "old-driver.yml"
    path.write_text(yaml.safe_dump(data))
    stack = load_stack(str(path))
    assert len(stack.warnings) == 1 and stack.warnings[0].startswith(f"{path}: nvidia_driver.version: driver 470.57.02")
    assert load_stack("cu117").warnings == []


def test_local_version_requirements_are_listed(good):
    from checks.stack import local_version_requirements

    assert local_version_requirements(good) == ["torch==1.13.1+cu117", "torchvision==0.14.1+cu117"]
    assert good["venv"]["extra_index_url"].endswith("/cu117")
