"""The stack loader: both shipped stacks load; every malformed case is refused naming file, key and reason."""

import copy
import math
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from checks.stack import (
    MAX_BYTES,
    MAX_PROBLEMS,
    QUOTE_LIMIT,
    REPO_STACKS,
    StackError,
    available_stacks,
    load_manifest,
    load_stack,
    load_yaml_text,
    quote,
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


# --- hostile files: refused in one short line, before anything walks what they hold -------------------------

DATA = Path(__file__).resolve().parent / "data" / "stacks"
BOMB_LEVELS = 9  # nine levels of nine aliases: the last expands to 9**9 = 387,420,489 values


def flow_bomb(levels: int = BOMB_LEVELS) -> str:
    """A YAML alias bomb as one flow value: it can stand in for any scalar, list or mapping of a stack."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def one_problem(load, path) -> str:
    """The single problem ``load`` refuses ``path`` with, checked to be one short line."""
    with pytest.raises(StackError) as err:
        load(str(path))
    (problem,) = err.value.problems
    assert str(err.value) == problem and "\n" not in problem and len(problem) <= 400, problem
    assert "Traceback" not in problem
    return problem


HOSTILE_FILES = [
    ("alias-bomb-name.yml", ":12:5: YAML aliases here expand to more than 100000 values"),
    ("alias-recursive.yml", ":5:17: a YAML alias inside the value it names (a recursive structure)"),
    ("binary.yml", ": not UTF-8 text (byte 0x8b at offset 1)"),
    ("latin1.yml", ": not UTF-8 text (byte 0xe9 at offset 5)"),
    ("empty.yml", ": empty (no YAML document)"),
    ("comments-only.yml", ": empty (no YAML document)"),
]


@pytest.mark.parametrize("load", [load_stack, load_manifest], ids=["stack", "manifest"])
@pytest.mark.parametrize("name, needle", HOSTILE_FILES, ids=[f for f, _ in HOSTILE_FILES])
def test_a_hostile_file_is_refused_in_one_line(load, name, needle):
    started = time.monotonic()
    problem = one_problem(load, DATA / name)
    assert problem == f"{DATA / name}{needle}" or problem.startswith(f"{DATA / name}{needle}"), problem
    assert time.monotonic() - started < 2  # the alias bomb hung the loader for good before


def test_the_shipped_stacks_use_no_yaml_anchors():
    """The expansion bound cannot refuse a shipped stack: none uses an anchor or an alias at all."""
    for path in REPO_STACKS.glob("*.yml"):
        events = list(yaml.parse(path.read_text(encoding="utf-8")))
        assert not [e for e in events if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)], path


def _stack_text_with(good, path, replacement: str) -> tuple[str, int]:
    """cu117 as YAML text with the value at ``path`` replaced by ``replacement``; and that value's line."""
    marker = "VALUE_UNDER_TEST"
    text = yaml.safe_dump(mutate(good, path, marker), sort_keys=False, width=10_000)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if marker in t)
    return text.replace(marker, replacement), line


BOMB_FIELDS = ["name", "description", "python.version", "venv.requirements", "venv.requirements.0", "node.gpus",
               "node.perf", "model.path", "finetune.methods", "jupyterlab.port", "cuda.redist.components"]


@pytest.mark.parametrize("field", BOMB_FIELDS)
def test_an_alias_bomb_in_any_field_is_refused_at_that_field(good, tmp_path, field):
    text, line = _stack_text_with(good, field, flow_bomb())
    path = tmp_path / "bomb.yml"
    path.write_text(text)
    problem = one_problem(load_stack, path)
    assert problem.startswith(f"{path}:{line}:") and "YAML aliases here expand to more than 100000" in problem


def test_an_alias_bomb_in_a_manifest_is_refused(good, tmp_path):
    path = tmp_path / "manifest.yml"
    manifest = yaml.safe_dump({"schema": 1, "stack": good, "host": "gpu01"})
    path.write_text(manifest + f"node: {{gpu_model: {flow_bomb()}}}\n")
    assert "YAML aliases here expand to more than 100000 values" in one_problem(load_manifest, path)


def test_modest_anchors_are_still_read(good, tmp_path):
    """The bound is on the expanded size, not on anchors: one path named once and reused loads as written."""
    text = yaml.safe_dump(good, sort_keys=False, width=10_000)
    text += "  cuda_home: &cuda /usr/local/cuda-11.7\n  nccl_home: *cuda\n  cudnn_home: *cuda\n"
    path = tmp_path / "anchored.yml"
    path.write_text(text)
    node = load_stack(str(path)).data["node"]
    assert node["cuda_home"] == node["nccl_home"] == node["cudnn_home"] == "/usr/local/cuda-11.7"


def test_an_expansion_just_under_the_bound_is_read_and_quoted_briefly(good, tmp_path):
    """Five levels (9**5 = 59,049 values) pass the bound; the wrong type is then named, its value quoted in
    at most 80 characters, in well under a second."""
    text, _ = _stack_text_with(good, "name", flow_bomb(5))
    path = tmp_path / "small-bomb.yml"
    path.write_text(text)
    started = time.monotonic()
    problem = one_problem(load_stack, path)
    assert time.monotonic() - started < 2
    assert problem.startswith(f"{path}: name: expected a string, got list [") and problem.endswith("...")
    quoted = problem.split("got list ", 1)[1]
    assert len(quoted) == QUOTE_LIMIT


@pytest.mark.parametrize("build, needle", [
    (lambda p: p.mkdir(), ": is a directory, not a stack file"),
    (lambda p: os.mkfifo(p), ": not a regular file"),  # opening a FIFO with no writer would block for good
    (lambda p: p.write_bytes(b"#" * (MAX_BYTES + 1)), ": larger than 1 MiB"),
    (lambda p: p.write_text("[" * 20_000), ": not valid YAML (nested too deeply)"),
    (lambda p: p.write_text("schema: 1\nname: \x00cu117\n"), ": not valid YAML (unacceptable character #x0000"),
    (lambda p: p.write_text("schema: 1\nname: \x1b[2Jcu117\n"), ": not valid YAML (unacceptable character #x001b"),
    (lambda p: p.write_text("schema: " + "9" * 5000 + "\n"), ": not valid YAML (Exceeds the limit (4300 digits)"),
    (lambda p: p.write_text("schema: 1\n---\nschema: 1\n"), ":2:1: not valid YAML (but found another document)"),
    (lambda p: p.write_text("schema: 1\ndescription: 2026-13-45\n"), ": not valid YAML (month must be in 1..12)"),
])
def test_more_hostile_files(tmp_path, build, needle):
    path = tmp_path / "hostile.yml"
    build(path)
    assert one_problem(load_stack, path).startswith(f"{path}{needle}")


def test_a_file_of_exactly_the_size_bound_is_read(tmp_path):
    text = (REPO_STACKS / "cu117.yml").read_text(encoding="utf-8")
    padding = MAX_BYTES - len(text.encode()) - 1
    path = tmp_path / "padded.yml"
    path.write_text(text + "#" * padding + "\n")
    assert path.stat().st_size == MAX_BYTES and load_stack(str(path)).name == "cu117"


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path):
    problem = one_problem(load_stack, str(tmp_path / ("x" * 5000 + ".yml")))
    assert problem.endswith("...: cannot read (File name too long)") and len(problem) < 300


def test_a_stack_name_that_cannot_be_one_is_refused_quoted():
    for name, needle in (("", "'' is not a stack name"), ("cu 117", "'cu 117' is not a stack name"),
                         ("c\x1bu", "'c\\x1bu' is not a stack name"), ("c" * 5000, "'ccc")):
        with pytest.raises(StackError) as err:
            resolve_stack(name)
        (problem,) = err.value.problems
        assert problem.startswith(needle) and len(problem) < 300, problem


# --- what an error quotes: escaped, cut to 80 characters, bounded work ---------------------------------------


def test_quote_escapes_cuts_and_bounds_its_work():
    assert quote("cu117") == "'cu117'"
    assert quote("a\nb\x1b[31m\u202e") == "'a\\nb\\x1b[31m\\u202e'"  # one line, no terminal escapes
    long = quote("x" * 1_000_000)
    assert len(long) == QUOTE_LIMIT and long.startswith("'xxx") and long.endswith("...")
    assert len(quote(b"\xff" * 1000)) == QUOTE_LIMIT
    nested: list = []
    for _ in range(10_000):
        nested = [nested, nested]  # 2**10000 leaves when walked: quote must not walk it
    started = time.monotonic()
    assert len(quote(nested)) <= QUOTE_LIMIT and time.monotonic() - started < 1
    loop: list = []
    loop.append(loop)
    assert quote(loop) == "[[[...]]]"
    assert len(quote(10 ** 5000)) <= QUOTE_LIMIT  # past Python's int-to-text digit limit: still quoted
    assert quote("x" * 200, 20) == "'xxxxxxxxxxxxxxxx..."


@pytest.mark.parametrize("path, value, needle", [
    ("python.version", "3." * 3000, "python.version: '3.3.3.3"),
    ("description", "d" * 5000, "description: 'ddd"),
    ("venv.requirements.0", "torch" * 1000, "venv.requirements[0]: 'torchtorch"),
    ("node.data_path", "\x1b]0;pwned\x07" * 50, "node.data_path: '\\x1b]0;pwned\\x07"),
    ("node.gpus", 10 ** 300, "node.gpus: 1000000000"),
    ("node.perf", {"gemm_tflops": math.nan}, "node.perf.gemm_tflops: nan is not a finite number"),
    ("node.min_free_gib.data", math.inf, "node.min_free_gib.data: inf is not a finite number"),
    ("finetune.methods", ["lora"] * 50_000, "finetune.methods: duplicate item(s) 'lora'"),
])
def test_a_huge_or_odd_value_is_quoted_briefly(good, path, value, needle):
    started = time.monotonic()
    with pytest.raises(StackError) as err:
        validate_stack(mutate(good, path, value), "s.yml")
    assert time.monotonic() - started < 2  # the duplicate check counted in O(n**2) before
    (problem,) = err.value.problems
    assert problem.startswith(f"s.yml: {needle}") and "\n" not in problem and len(problem) < 250, problem


def test_an_odd_unknown_key_is_quoted(good):
    with pytest.raises(StackError) as err:
        validate_stack({**good, "bad\nkey" * 100: 1}, "s.yml")
    (problem,) = err.value.problems
    assert problem.startswith("s.yml: 'bad\\nkeybad\\nkey") and "\n" not in problem and len(problem) < 400


def test_many_problems_are_counted_not_all_listed(good):
    data = {**good, **{f"unknown{i}": i for i in range(10_000)}}
    with pytest.raises(StackError) as err:
        validate_stack(data, "s.yml")
    problems = err.value.problems
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == f"... and {10_000 - MAX_PROBLEMS} more problem(s)"
    line = str(err.value)
    assert "\n" not in line and line.count("unknown key") == 3 and line.endswith("; ... and 9997 more problem(s)")


# --- property: any mutation of a shipped stack loads or is refused in one line, never a traceback -------------

JUNK = ["&a ", "*a", "*nope", "[", "]", "{", "}", ": ", "- ", "\t", "\x00", "\x1b[31m", "'", '"', "!!binary ",
        "!!set ", "!!python/object:os.system ", "<<: *a", "~", ".nan", "-.inf", "1e999", "0x1F", "9" * 5000,
        "\ufeff", "\u202e", "#", "? ", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "\\", "é", "\udc80"]


def mutations(text: str, seed: int, count: int):
    """``count`` seeded mutations of ``text`` (as bytes): lines dropped, doubled, swapped, truncated,
    junk inserted, bytes flipped; one to three edits each."""
    rng = random.Random(seed)
    for _ in range(count):
        lines = text.splitlines(keepends=True)
        for _ in range(rng.randint(1, 3)):
            op, i, j = rng.randrange(6), rng.randrange(len(lines)), rng.randrange(len(lines))
            if op == 0 and len(lines) > 1:
                del lines[i]
            elif op == 1:
                lines.insert(i, lines[j])
            elif op == 2:
                lines[i], lines[j] = lines[j], lines[i]
            elif op == 3:
                lines = lines[:i + 1]
                lines[-1] = lines[-1][:rng.randrange(len(lines[-1]) + 1)]
            elif op == 4:
                at = rng.randrange(len(lines[i]) + 1)
                lines[i] = lines[i][:at] + rng.choice(JUNK) + lines[i][at:]
            else:
                at = rng.randrange(len(lines[i]) + 1)
                lines[i] = lines[i][:at] + chr(rng.randrange(0x110000)) + lines[i][at:]
        data = "".join(lines).encode("utf-8", "surrogatepass")
        if data and rng.random() < 0.1:
            k = rng.randrange(len(data))
            data = data[:k] + bytes([data[k] ^ (1 << rng.randrange(8))]) + data[k + 1:]
        yield data


@pytest.mark.parametrize("stack", ["cu117", "cu124"])
def test_random_mutations_load_or_are_refused_in_one_line(stack, tmp_path):
    text = (REPO_STACKS / f"{stack}.yml").read_text(encoding="utf-8")
    path = tmp_path / "mutated.yml"
    outcomes = {"loaded": 0, "refused": 0}
    started = time.monotonic()
    for n, data in enumerate(mutations(text, seed=11, count=300)):
        path.write_bytes(data)
        try:
            load_stack(str(path))
            outcomes["loaded"] += 1
        except StackError as exc:
            line = str(exc)
            assert line and "\n" not in line and len(line) < 2000, (n, data, line)
            assert all("\n" not in p for p in exc.problems), (n, data)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 150 and outcomes["loaded"] > 0, outcomes  # both outcomes are exercised
    assert time.monotonic() - started < 20


def test_random_mutations_through_the_cli_exit_2_on_one_line_or_reach_the_run(tmp_path, monkeypatch, capsys):
    """The same property through peftnode-verify's own entry point: exit 2 with one line on stderr, or the stack
    is accepted and the run is reached (it is stopped there: running the checks is not what is tested)."""
    import checks.cli as cli

    reached = []
    monkeypatch.setattr(cli, "execute", lambda *args, **kwargs: reached.append(1) or 0)
    path = tmp_path / "mutated.yml"
    text = (REPO_STACKS / "cu117.yml").read_text(encoding="utf-8")
    codes = []
    for data in mutations(text, seed=1111, count=60):
        path.write_bytes(data)
        code = cli.main(["--stack", str(path), "--no-progress"])
        err = capsys.readouterr().err
        if code == 2:
            assert err.startswith("peftnode verify: error: ") and err.count("\n") == 1, err
        else:
            assert code == 0 and err == "", (code, err)
        codes.append(code)
    assert codes.count(2) > 20 and codes.count(0) == len(reached) > 0, codes


@pytest.mark.parametrize("where, text", [
    ("top level", "description: first\ndescription: second\n"),
    ("nested", "site_notes:\n  version: 2.14.3\n  home: /opt/nccl\n  version: 2.18.1\n"),
    ("flow mapping", "site_notes: {name: a, name: b}\n"),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, capsys, where, text):
    """YAML keeps the last of two equal keys without a word, so an operator's second section would hide
    the first; the stack is refused instead, by the loader and by the CLI (exit 2, nothing run)."""
    from checks.cli import main

    path = tmp_path / "dup.yml"
    path.write_text((REPO_STACKS / "cu117.yml").read_text() + text)
    with pytest.raises(StackError) as raised:
        load_stack(str(path))
    assert "is given twice in one mapping" in str(raised.value), where
    report = tmp_path / "r.json"
    assert main(["--stack", str(path), "--only", "system.os", "--no-progress", "--json", str(report)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "given twice" in err[0] and not report.exists()


def test_a_merge_key_may_still_override_what_it_merges():
    assert load_yaml_text("base: &b {x: 1, y: 2}\nmine: {<<: *b, x: 3}\n")["mine"] == {"x": 3, "y": 2}
