"""Load and validate stack files (``stacks/*.yml``) and node manifests.

A stack file pins the whole software stack of a node. It is the single source of truth: Ansible
reads it through ``lookup_plugins/peftnode_stack.py`` (which calls :func:`load_stack`), and
``invoke verify`` reads the same file as its expectations. Every problem is reported as
``<file>: <key.path>: <reason>``, so a bad stack is refused before anything runs.

A node manifest (written by provisioning to ``/etc/peftnode/manifest.yml``) embeds the full stack
plus this host's expectations, so a node can be verified without the repository.

Hostile input is refused in one short line each, before any work that could hang: a file larger than
1 MiB, not a regular file, or not UTF-8; YAML aliases that expand past 100,000 values (an alias bomb)
or refer to themselves; a string longer than 4096 characters. Every value an error quotes is cut to 80
characters and escaped (:func:`quote`); the one-line message lists the first 3 problems, ``problems`` the
first 10, and both count the rest.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement

from checks.node import Node

SCHEMA_VERSION = 1
REPO_STACKS = Path(__file__).resolve().parent.parent / "stacks"
DEFAULT_MANIFEST = Path("/etc/peftnode/manifest.yml")
DEFAULT_STACK = "cu117"

MAX_BYTES = 1 << 20  # a stack file or manifest is a few KiB; more than 1 MiB is refused unread
MAX_VALUES = 100_000  # YAML values once aliases are expanded (a stack holds a few hundred)
MAX_TEXT = 4096  # characters in one string value
QUOTE_LIMIT = 80  # characters of a value an error message quotes
PATH_LIMIT = 200  # characters of a file name an error message shows
MAX_PROBLEMS = 10  # problems kept (Ansible shows them one per line); the rest are counted
LINE_PROBLEMS = 3  # problems in the one-line message (the CLI's); the rest are counted


def _counted(problems: list[str], keep: int) -> list[str]:
    return problems if len(problems) <= keep else [*problems[:keep], f"... and {len(problems) - keep} more problem(s)"]


def one_line(problems: list[str]) -> str:
    """Problems as one line: the first LINE_PROBLEMS, then how many more."""
    return "; ".join(_counted(problems, LINE_PROBLEMS))


class StackError(Exception):
    """A stack file or manifest that cannot be used. ``problems`` holds one line per problem (the first
    MAX_PROBLEMS, then one line counting the rest); ``str()`` is one line with the first LINE_PROBLEMS."""

    def __init__(self, problems: list[str]):
        self.problems = _counted(problems, MAX_PROBLEMS)
        super().__init__(one_line(problems))


# --- quoting values in error messages: bounded work, bounded length, one line --------------------

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 4


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message: non-printable characters escaped (so always one line), at
    most ``limit`` characters (cut with ``...``), and bounded work however large or nested the value."""
    if isinstance(value, (str, bytes)):
        text = repr(value[:limit])
        cut = len(value) > limit
    else:
        try:
            text = _REPR.repr(value)
        except (ValueError, RecursionError):  # an int past Python's digit limit, a pathological object
            text = f"<{type(value).__name__}>"
        cut = False
    if cut or len(text) > limit:
        text = text[:max(limit - 3, 1)] + "..."
    return text


def clip(text: str, limit: int = 120) -> str:
    """A message's own text (an exception's reason) as one line: non-printable characters escaped, cut to
    ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit + 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(text: str, limit: int = PATH_LIMIT) -> str:
    """A file name or key as it is when it is short and printable, else quoted (escaped and cut)."""
    text = str(text)
    return text if len(text) <= limit and text.isprintable() else quote(text, limit)


# --- a small schema language: enough to name the key and the reason for every problem -----------

Check = Callable[[Any, str, list], None]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def Str(pattern: str | None = None, what: str | None = None, choices: tuple[str, ...] | None = None) -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(value, path, problems):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_type_name(value)} {quote(value)}")
        elif len(value) > MAX_TEXT:
            problems.append(f"{path}: {quote(value)} is {len(value)} characters long (at most {MAX_TEXT})")
        elif choices is not None and value not in choices:
            problems.append(f"{path}: {quote(value)} is not one of {', '.join(choices)}")
        elif rx and not rx.fullmatch(value):
            problems.append(f"{path}: {quote(value)} is not {what or 'of the form ' + pattern}")

    return check


def Int(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_type_name(value)} {quote(value)}")
        elif (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            problems.append(f"{path}: {quote(value)} is outside {minimum}..{maximum if maximum is not None else ''}")

    return check


def Number(minimum: float = 0.0) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_type_name(value)} {quote(value)}")
        elif not math.isfinite(value):
            problems.append(f"{path}: {quote(value)} is not a finite number")
        elif value < minimum:
            problems.append(f"{path}: {quote(value)} is below {minimum}")

    return check


def Bool() -> Check:
    def check(value, path, problems):
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_type_name(value)} {quote(value)}")

    return check


def Nullable(inner: Check) -> Check:
    def check(value, path, problems):
        if value is not None:
            inner(value, path, problems)

    return check


def List(item: Check, min_items: int = 0, unique: bool = False) -> Check:
    def check(value, path, problems):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_type_name(value)}")
            return
        if len(value) < min_items:
            problems.append(f"{path}: needs at least {min_items} item(s)")
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]", problems)
        if unique:
            counts = Counter(quote(v) for v in value)
            dups = sorted(s for s, n in counts.items() if n > 1)
            if dups:
                more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
                problems.append(f"{path}: duplicate item(s) {', '.join(dups[:3])}{more}")

    return check


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def Map(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    optional = optional or {}

    def check(value, path, problems):
        if not isinstance(value, dict):
            problems.append(f"{path or 'top level'}: expected a mapping, got {_type_name(value)}")
            return
        prefix = f"{path}." if path else ""
        for key in value:
            if key not in required and key not in optional:
                accepted = ", ".join(sorted([*required, *optional]))
                name = key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else quote(key)
                problems.append(f"{prefix}{name}: unknown key (accepted here: {accepted})")
        for key, sub in required.items():
            if key not in value:
                problems.append(f"{prefix}{key}: missing (required)")
            else:
                sub(value[key], f"{prefix}{key}", problems)
        for key, sub in optional.items():
            if key in value:
                sub(value[key], f"{prefix}{key}", problems)

    return check


def _requirement(value, path, problems):
    if not isinstance(value, str):
        problems.append(f"{path}: expected a PEP 508 requirement string, got {_type_name(value)}")
        return
    if len(value) > MAX_TEXT:
        problems.append(f"{path}: {quote(value)} is {len(value)} characters long (at most {MAX_TEXT})")
        return
    try:
        Requirement(value)
    except InvalidRequirement as exc:
        reason = (str(exc).splitlines() or ["invalid"])[0]
        problems.append(f"{path}: {quote(value)} is not a valid PEP 508 requirement ({clip(reason)})")


SHA256 = Nullable(Str(r"[0-9a-f]{64}", "a sha256 (64 lowercase hex digits) or null"))
ARTIFACT = Map(
    {"file": Str(r"[^/\s]+", "a plain file name"), "sha256": SHA256},
    {"url": Nullable(Str(r"(https?|file)://\S+", "an http(s):// or file:// URL"))},
)


def _component(version_rx: str, what: str, **extra: Check) -> Check:
    return Map({"version": Str(version_rx, what), "artifact": ARTIFACT}, extra)


ABS_PATH = Str(r"/\S*", "an absolute path")

# What a node is expected to have. Stack files give defaults (the seed's node: 8 GPUs); the node
# manifest written by provisioning overrides them per host.
NODE_FIELDS: dict[str, Check] = {
    "gpus": Int(0, 64),  # GPUs this node must have; 0 = a node without GPUs (checks that need one skip)
    "gpu_model": Nullable(Str()),  # substring of the NVML product name, e.g. "A800"
    "data_path": ABS_PATH,  # where datasets and outputs live (free-disk check)
    "min_free_gib": Map({}, {"model": Number(), "data": Number()}),
    "jupyter_url": Nullable(Str(r"https?://\S+", "an http(s):// URL")),  # default: from jupyterlab.bind/port
    "mig": Bool(),  # MIG mode every GPU must be in (default false)
    # Where the roles put the CUDA toolkit, NCCL and cuDNN (defaults: /usr/local/cuda-X.Y, then the
    # dynamic loader's view). NCCL and cuDNN default to the CUDA prefix, as the seed installs them.
    "cuda_home": ABS_PATH,
    "nccl_home": ABS_PATH,
    "cudnn_home": ABS_PATH,
    # Performance expectations overriding the GPU-model table in checks/figures.py (per GPU, except busbw).
    "perf": Map({}, {
        "gemm_tflops": Number(),  # dense bf16 (fp16 where bf16 is absent) GEMM
        "copy_tbps": Number(),  # device-to-device copy, bytes read + written
        "h2d_gbps": Number(),  # pinned host -> device
        "d2h_gbps": Number(),  # pinned device -> host
        "allreduce_busbw_gbps": Number(),  # NCCL all-reduce bus bandwidth across the node's GPUs
        "allreduce_bytes": Int(1),  # message size of the all-reduce measurement
        "pair_busbw_gbps": Number(),  # all-reduce bus bandwidth between two nodes (verify.yml's pairs)
        "floor_ratio": Number(),  # below expected x floor_ratio -> fail
        "outlier_ratio": Number(),  # below the node's median x outlier_ratio -> fail
    }),
}

# NVIDIA's per-component CUDA archives: the redistrib_<version>.json manifest (itself an artifact,
# sha256-verified) names every component's archive with its sha256; the cuda role's redist method
# installs the components listed here.
CUDA_REDIST = Map(
    {"manifest": ARTIFACT, "components": List(Str(r"[a-z0-9_]+", "a component name like cuda_cudart"), 1, unique=True)},
)

STACK_SCHEMA = Map(
    {
        "schema": Int(SCHEMA_VERSION, SCHEMA_VERSION),
        "name": Str(r"[a-z0-9][a-z0-9_.-]*", "a lowercase name (letters, digits, . _ -)"),
        "description": Str(),
        "openssl": _component(r"\d+\.\d+\.\d+[a-z]?", "an OpenSSL version like 1.1.1t or 3.0.13"),
        "python": _component(r"3\.\d+\.\d+", "a full Python version like 3.10.12"),
        "nvidia_driver": _component(r"\d{3}\.\d+(\.\d+)?", "a driver version like 515.65.01"),
        "cuda": _component(r"\d+\.\d+\.\d+", "a full CUDA version like 11.7.1", redist=CUDA_REDIST),
        "nccl": _component(
            r"\d+\.\d+\.\d+", "an NCCL version like 2.14.3",
            package=Str(r"\d+\.\d+\.\d+-\d+\+cuda\d+\.\d+", "an NCCL package version like 2.14.3-1+cuda11.7"),
        ),
        "cudnn": _component(
            r"\d+\.\d+\.\d+\.\d+", "a cuDNN version like 8.8.1.3",
            package=Str(r"\d+\.\d+\.\d+\.\d+-\d+\.cuda\d+\.\d+",
                        "a cuDNN package version like 8.8.1.3-1.cuda11.8"),
        ),
        "venv": Map(
            {"name": Str(r"[A-Za-z0-9_.-]+", "a directory name"), "requirements": List(_requirement, 1)},
            {"path": ABS_PATH,
             # where +cuXYZ builds (torch==1.13.1+cu117) come from: PyTorch's own index for that CUDA
             # (index_url replaces the default index, extra_index_url adds to it)
             "index_url": Nullable(Str(r"(https?|file)://\S+", "a URL")),
             "extra_index_url": Nullable(Str(r"(https?|file)://\S+", "a URL"))},
        ),
        "jupyterlab": Map(
            {"enabled": Bool(), "port": Int(1, 65535)},
            {"bind": Str(), "base_url": Str(r"/\S*", "a path starting with /")},
        ),
        "model": Map(
            {"name": Str(), "path": ABS_PATH},
            {
                "repo": Nullable(Str()),
                "files": List(Map({"file": Str(r"\S+", "a relative file name"), "sha256": SHA256})),
            },
        ),
        "finetune": Map({"methods": List(Str(r"[a-z0-9_]+", "a method name"), 1, unique=True)},
                        # where `invoke finetune` / verify keep each method's adapter (--keep DIR wins)
                        {"keep_dir": Nullable(ABS_PATH)}),
        "node": Map({"gpus": NODE_FIELDS["gpus"]}, {k: v for k, v in NODE_FIELDS.items() if k != "gpus"}),
    },
    {
        # NVSwitch systems (HGX): fabric manager of exactly the driver's version. Optional: without
        # it the fabricmanager role installs the repository package of the driver's version.
        "fabricmanager": Map({"version": Str(r"\d{3}\.\d+(\.\d+)?", "a driver version like 515.65.01")},
                             {"artifact": ARTIFACT}),
        # DCGM (dcgmi diag for gpu.dcgm_diag): a repository package version, optionally an artifact.
        "dcgm": Map({"version": Str(r"\d+\.\d+\.\d+", "a DCGM version like 3.3.9")}, {"artifact": ARTIFACT}),
        # nccl-tests, built from this source archive against the stack's CUDA and NCCL.
        "nccl_tests": Map({"version": Str(r"\d+\.\d+\.\d+", "an nccl-tests version like 2.13.9"),
                           "artifact": ARTIFACT}),
    },
)

# The oldest driver each CUDA major runs on through minor-version compatibility: below it nothing
# built with that CUDA can run at all (docs.nvidia.com/deploy/cuda-compatibility,
# "minor-version-compatibility"). 12.x: 525.60.13 (the 12.0 release notes' figure).
CUDA_MINOR_COMPAT_DRIVER = {11: "450.80.02", 12: "525.60.13"}
# The driver each toolkit release was built with (CUDA release notes, Table 3): below it, but above
# the minor-compatibility floor, the toolkit runs with minor-version compatibility only (PTX JIT of
# newer PTX and a few APIs fail). Keyed by (major, minor, update); a release missing here is judged
# by the floor alone.
CUDA_TOOLKIT_DRIVER = {
    (11, 7, 0): "515.43.04",
    (11, 7, 1): "515.48.07",
    (11, 8, 0): "520.61.05",
    (12, 1, 1): "530.30.02",
    (12, 4, 0): "550.54.14",
    (12, 4, 1): "550.54.15",
}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _built_for_cuda(text: str) -> int | None:
    """The CUDA major an NVIDIA package or archive name says it was built for ('+cuda11.7', '_cuda11-')."""
    m = re.search(r"cuda(\d+)", text or "")
    return int(m.group(1)) if m else None


def compatibility(data: dict) -> tuple[list[str], list[str]]:
    """Combinations of the stack's NVIDIA pieces that cannot work (problems) or work only partly
    (warnings): the driver against CUDA's floors, NCCL and cuDNN built for another CUDA major, a
    fabric manager that is not the driver's version."""
    problems: list[str] = []
    warnings: list[str] = []
    cuda_text = str(data["cuda"]["version"])
    cuda = _version_tuple(cuda_text)
    driver_text = str(data["nvidia_driver"]["version"])
    driver = _version_tuple(driver_text)
    floor = CUDA_MINOR_COMPAT_DRIVER.get(cuda[0])
    own = CUDA_TOOLKIT_DRIVER.get(tuple((cuda + (0, 0, 0))[:3]))
    if floor and driver < _version_tuple(floor):
        problems.append(
            f"nvidia_driver.version: driver {shown(driver_text, QUOTE_LIMIT)} is below {floor}, the oldest driver "
            f"CUDA {cuda[0]}.x runs on (minor-version compatibility); CUDA {shown(cuda_text, QUOTE_LIMIT)} cannot "
            f"run on it")
    elif own and driver < _version_tuple(own):
        warnings.append(
            f"nvidia_driver.version: driver {shown(driver_text, QUOTE_LIMIT)} is below {own}, the driver CUDA "
            f"{cuda_text} was "
            f"released with: it runs under minor-version compatibility only (no PTX JIT of newer PTX)")
    for key, text in (("nccl.package", data["nccl"].get("package")),
                      ("nccl.artifact.file", data["nccl"]["artifact"]["file"]),
                      ("cudnn.package", data["cudnn"].get("package")),
                      ("cudnn.artifact.file", data["cudnn"]["artifact"]["file"])):
        built = _built_for_cuda(text)
        if built is not None and built != cuda[0]:
            problems.append(f"{key}: {quote(text)} is built for CUDA {built}, but cuda.version is "
                            f"{shown(cuda_text, QUOTE_LIMIT)}")
    fm = data.get("fabricmanager")
    if fm and str(fm["version"]) != driver_text:
        problems.append(
            f"fabricmanager.version: {shown(fm['version'], QUOTE_LIMIT)} is not the driver's version "
            f"{shown(driver_text, QUOTE_LIMIT)}; fabric manager "
            f"refuses to start unless both are the same")
    return problems, warnings


def _cross_checks(data: dict, problems: list[str]) -> None:
    """Rules that tie keys together: a torch build for CUDA X.Y needs the stack's CUDA to be X.Y;
    the NVIDIA pieces must be able to work together (compatibility())."""
    cuda = str(data["cuda"]["version"]).split(".")
    tag = f"cu{cuda[0]}{cuda[1]}" if len(cuda) >= 2 else None
    for i, text in enumerate(data["venv"]["requirements"]):
        req = Requirement(text)
        for spec in req.specifier:
            local = spec.version.partition("+")[2]
            if local.startswith("cu") and tag and local != tag:
                problems.append(
                    f"venv.requirements[{i}]: {quote(text)} is built for {shown(local, QUOTE_LIMIT)} but "
                    f"cuda.version is {shown(data['cuda']['version'], QUOTE_LIMIT)} ({shown(tag, QUOTE_LIMIT)})"
                )
    pkg = data["nccl"].get("package")
    if pkg and not pkg.startswith(data["nccl"]["version"] + "-"):
        problems.append(f"nccl.package: {quote(pkg)} does not match nccl.version {quote(data['nccl']['version'])}")
    pkg = data["cudnn"].get("package")
    if pkg and not pkg.startswith(data["cudnn"]["version"] + "-"):
        problems.append(f"cudnn.package: {quote(pkg)} does not match cudnn.version "
                        f"{quote(data['cudnn']['version'])}")
    problems.extend(compatibility(data)[0])


def local_version_requirements(data: dict) -> list[str]:
    """The venv requirements pinned to a +local build (torch==1.13.1+cu117): the default package
    index never serves those, so a wheelhouse or venv.index_url / extra_index_url must."""
    out = []
    for text in data["venv"]["requirements"]:
        if any("+" in spec.version for spec in Requirement(text).specifier):
            out.append(text)
    return out


def stack_warnings(data: dict) -> list[str]:
    """What a valid stack still deserves a warning for."""
    return compatibility(data)[1]


def validate_stack(data: Any, source: str = "<stack>") -> dict:
    """Validate a parsed stack mapping; return it, or raise StackError naming source, key and reason."""
    problems: list[str] = []
    STACK_SCHEMA(data, "", problems)
    if not problems:
        _cross_checks(data, problems)
    if problems:
        raise StackError([f"{source}: {p}" for p in problems])
    return data


class YamlRefused(ValueError):
    """YAML text that is not read: malformed, nested too deeply, or expanding past MAX_VALUES values."""

    def __init__(self, reason: str, line: int | None = None, column: int | None = None):
        self.reason, self.line, self.column = reason, line, column
        super().__init__(reason)

    @property
    def where(self) -> str:
        return f":{self.line}:{self.column}" if self.line is not None else ""


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root, limit: int = MAX_VALUES) -> None:
    """Refuse a composed YAML tree that holds more than ``limit`` values once every alias is expanded,
    or an alias inside the value it names. Aliases share one node, so the expanded count is summed
    once per distinct node (linear in the text), never by walking the expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    todo = [(root, False)]
    while todo:
        node, finished = todo.pop()
        key = id(node)
        if finished:
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            open_nodes.discard(key)
            if sizes[key] > limit:
                mark = node.start_mark
                raise YamlRefused(f"YAML aliases here expand to more than {limit} values (a stack holds a few "
                                  f"hundred)", mark.line + 1, mark.column + 1)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            mark = node.start_mark
            raise YamlRefused("a YAML alias inside the value it names (a recursive structure)",
                              mark.line + 1, mark.column + 1)
        open_nodes.add(key)
        todo.append((node, True))
        todo.extend((child, False) for child in _children(node) if id(child) not in sizes)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document whose aliases expand past MAX_VALUES values before
    anything is built from it (building shares aliased values; it is whatever walks them that hangs)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        """Refuse a key given twice in one mapping: YAML would keep the last silently, so an operator's
        second ``nccl:`` section (or a pasted ``version:``) would hide the first without a word."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                mark, key = key_node.start_mark, (key_node.tag, key_node.value)
                if key in seen:
                    raise YamlRefused(f"key {quote(key_node.value)} is given twice in one mapping (first on line "
                                      f"{seen[key]}); YAML would silently keep only the last", mark.line + 1,
                                      mark.column + 1)
                seen[key] = mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str) -> Any:
    """YAML text -> data (safe types only), or :class:`YamlRefused` with a one-line reason."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 -- a SafeLoader subclass
    except YamlRefused:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = getattr(exc, "problem", None) or (str(exc).splitlines() or ["malformed"])[0]
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise YamlRefused(f"not valid YAML ({clip(reason)})", line, column) from None
    except RecursionError:
        raise YamlRefused("not valid YAML (nested too deeply)") from None
    except ValueError as exc:  # an integer past Python's digit limit, a date like 2026-13-45
        raise YamlRefused(f"not valid YAML ({clip((str(exc).splitlines() or ['a value that cannot be read'])[0])})") \
            from None


def _read_text(path: Path) -> str:
    """The file's text: a regular file of at most MAX_BYTES bytes of UTF-8, or StackError."""
    where = shown(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise StackError([f"{where}: no such file"]) from None
    except OSError as exc:
        raise StackError([f"{where}: cannot read ({exc.strerror or type(exc).__name__})"]) from None
    if stat.S_ISDIR(info.st_mode):
        raise StackError([f"{where}: is a directory, not a stack file"])
    if not stat.S_ISREG(info.st_mode):
        raise StackError([f"{where}: not a regular file"])
    too_big = f"{where}: larger than {MAX_BYTES // 1024 // 1024} MiB (a stack file or manifest is a few KiB)"
    if info.st_size > MAX_BYTES:
        raise StackError([too_big])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise StackError([f"{where}: cannot read ({exc.strerror or type(exc).__name__})"]) from None
    if len(raw) > MAX_BYTES:
        raise StackError([too_big])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StackError([f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          f"a stack file or manifest is YAML in UTF-8"]) from None


def _read_yaml(path: Path) -> Any:
    text = _read_text(path)
    where = shown(path)
    try:
        data = load_yaml_text(text)
    except YamlRefused as exc:
        raise StackError([f"{where}{exc.where}: {exc.reason}"]) from None
    if data is None:
        raise StackError([f"{where}: empty (no YAML document)"])
    return data


def stack_dirs() -> list[Path]:
    """Where stacks are looked up by name: $PEFTNODE_STACKS (colon-separated), the repository's
    ``stacks/``, then ``/etc/peftnode/stacks``."""
    dirs = [Path(p) for p in os.environ.get("PEFTNODE_STACKS", "").split(":") if p]
    return [*dirs, REPO_STACKS, Path("/etc/peftnode/stacks")]


def available_stacks() -> list[str]:
    names: set[str] = set()
    for d in stack_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yml"))
    return sorted(names)


_STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def resolve_stack(name_or_path: str) -> Path:
    """A stack name (``cu117``) or a file path (``./my.yml``) → the file to load."""
    candidate = Path(name_or_path)
    looks_like_path = "/" in name_or_path or candidate.suffix in (".yml", ".yaml")
    if looks_like_path:
        return candidate
    known = ", ".join(available_stacks()) or "none found"
    if not _STACK_NAME.fullmatch(name_or_path):
        raise StackError([f"{quote(name_or_path)} is not a stack name (letters, digits, . _ -; known stacks: "
                          f"{known}) or a file path"])
    for d in stack_dirs():
        for suffix in (".yml", ".yaml"):
            path = d / f"{name_or_path}{suffix}"
            if path.is_file():
                return path
    raise StackError([f"no stack named {quote(name_or_path)} (known stacks: {known}; or give a file path)"])


@dataclass
class Stack:
    """A validated stack and where it came from."""

    data: dict
    source: str
    node: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.data["name"]

    def expectations(self) -> dict:
        """The node expectations: the stack's ``node`` defaults, overridden by the manifest's."""
        merged = dict(self.data.get("node", {}))
        merged.update(self.node)
        return merged

    def expect(self, overrides: dict | None = None) -> Node:
        """The typed node expectations checks read (``ctx.node``): the stack's ``node`` section, the
        manifest's overrides, then ``overrides`` (``--expect``, ``--gpus``)."""
        return Node.from_dict({**self.expectations(), **(overrides or {})})


def load_stack(name_or_path: str) -> Stack:
    path = resolve_stack(name_or_path)
    data = _read_yaml(path)
    data = validate_stack(data, shown(path))
    return Stack(data, str(path), warnings=[f"{shown(path)}: {w}" for w in stack_warnings(data)])


NODE_OVERRIDES = Map({}, NODE_FIELDS)


def load_manifest(path: str | os.PathLike = DEFAULT_MANIFEST) -> Stack:
    """Read a node manifest: ``{schema, stack: <full stack>, node: <overrides>, host, written_at}``."""
    path = Path(path)
    data = _read_yaml(path)
    problems: list[str] = []
    outer = dict(data) if isinstance(data, dict) else data
    if isinstance(outer, dict) and isinstance(outer.get("stack"), dict):
        outer["stack"] = {}  # the stack itself is validated in full below
    Map({"schema": Int(SCHEMA_VERSION, SCHEMA_VERSION), "stack": Map({}, {})},
        {"node": NODE_OVERRIDES, "host": Str(), "written_at": Str()})(outer, "", problems)
    if problems:
        raise StackError([f"{shown(path)}: {p}" for p in problems])
    stack = validate_stack(data["stack"], f"{shown(path)} (stack)")
    return Stack(stack, str(path), dict(data.get("node") or {}))
