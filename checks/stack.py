"""Load and validate stack files (``stacks/*.yml``) and node manifests.

A stack file pins the whole software stack of a node. It is the single source of truth: Ansible
reads it through ``lookup_plugins/peftnode_stack.py`` (which calls :func:`load_stack`), and
``invoke verify`` reads the same file as its expectations. Every problem is reported as
``<file>: <key.path>: <reason>``, so a bad stack is refused before anything runs.

A node manifest (written by provisioning to ``/etc/peftnode/manifest.yml``) embeds the full stack
plus this host's expectations, so a node can be verified without the repository.
"""

from __future__ import annotations

import os
import re
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


class StackError(Exception):
    """A stack file or manifest that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


# --- a small schema language: enough to name the key and the reason for every problem -----------

Check = Callable[[Any, str, list], None]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def Str(pattern: str | None = None, what: str | None = None, choices: tuple[str, ...] | None = None) -> Check:
    rx = re.compile(pattern) if pattern else None

    def check(value, path, problems):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_type_name(value)} {value!r}")
        elif choices is not None and value not in choices:
            problems.append(f"{path}: {value!r} is not one of {', '.join(choices)}")
        elif rx and not rx.fullmatch(value):
            problems.append(f"{path}: {value!r} is not {what or 'of the form ' + pattern}")

    return check


def Int(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_type_name(value)} {value!r}")
        elif (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            problems.append(f"{path}: {value} is outside {minimum}..{maximum if maximum is not None else ''}")

    return check


def Number(minimum: float = 0.0) -> Check:
    def check(value, path, problems):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_type_name(value)} {value!r}")
        elif value < minimum:
            problems.append(f"{path}: {value} is below {minimum}")

    return check


def Bool() -> Check:
    def check(value, path, problems):
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_type_name(value)} {value!r}")

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
            seen = [repr(v) for v in value]
            dups = sorted({s for s in seen if seen.count(s) > 1})
            if dups:
                problems.append(f"{path}: duplicate item(s) {', '.join(dups)}")

    return check


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
                problems.append(f"{prefix}{key}: unknown key (accepted here: {accepted})")
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
    try:
        Requirement(value)
    except InvalidRequirement as exc:
        problems.append(f"{path}: {value!r} is not a valid PEP 508 requirement ({str(exc).splitlines()[0]})")


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
        "finetune": Map({"methods": List(Str(r"[a-z0-9_]+", "a method name"), 1, unique=True)}),
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
            f"nvidia_driver.version: driver {driver_text} is below {floor}, the oldest driver CUDA "
            f"{cuda[0]}.x runs on (minor-version compatibility); CUDA {cuda_text} cannot run on it")
    elif own and driver < _version_tuple(own):
        warnings.append(
            f"nvidia_driver.version: driver {driver_text} is below {own}, the driver CUDA {cuda_text} was "
            f"released with: it runs under minor-version compatibility only (no PTX JIT of newer PTX)")
    for key, text in (("nccl.package", data["nccl"].get("package")),
                      ("nccl.artifact.file", data["nccl"]["artifact"]["file"]),
                      ("cudnn.package", data["cudnn"].get("package")),
                      ("cudnn.artifact.file", data["cudnn"]["artifact"]["file"])):
        built = _built_for_cuda(text)
        if built is not None and built != cuda[0]:
            problems.append(f"{key}: {text!r} is built for CUDA {built}, but cuda.version is {cuda_text}")
    fm = data.get("fabricmanager")
    if fm and str(fm["version"]) != driver_text:
        problems.append(
            f"fabricmanager.version: {fm['version']} is not the driver's version {driver_text}; fabric manager "
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
                    f"venv.requirements[{i}]: {text!r} is built for {local} but cuda.version is "
                    f"{data['cuda']['version']} ({tag})"
                )
    pkg = data["nccl"].get("package")
    if pkg and not pkg.startswith(data["nccl"]["version"] + "-"):
        problems.append(f"nccl.package: {pkg!r} does not match nccl.version {data['nccl']['version']!r}")
    pkg = data["cudnn"].get("package")
    if pkg and not pkg.startswith(data["cudnn"]["version"] + "-"):
        problems.append(f"cudnn.package: {pkg!r} does not match cudnn.version {data['cudnn']['version']!r}")
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


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StackError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise StackError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StackError([f"{path}{where}: not valid YAML ({reason})"]) from None


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


def resolve_stack(name_or_path: str) -> Path:
    """A stack name (``cu117``) or a file path (``./my.yml``) → the file to load."""
    candidate = Path(name_or_path)
    looks_like_path = "/" in name_or_path or candidate.suffix in (".yml", ".yaml")
    if looks_like_path:
        return candidate
    for d in stack_dirs():
        for suffix in (".yml", ".yaml"):
            path = d / f"{name_or_path}{suffix}"
            if path.is_file():
                return path
    known = ", ".join(available_stacks()) or "none found"
    raise StackError([f"no stack named {name_or_path!r} (known stacks: {known}; or give a file path)"])


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
    data = validate_stack(data, str(path))
    return Stack(data, str(path), warnings=[f"{path}: {w}" for w in stack_warnings(data)])


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
        raise StackError([f"{path}: {p}" for p in problems])
    stack = validate_stack(data["stack"], f"{path} (stack)")
    return Stack(stack, str(path), dict(data.get("node") or {}))
