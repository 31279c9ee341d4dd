"""System and Python-environment checks that need no GPU: OS, Python, OpenSSL, packages, disk.

Each check is a thin probe plus a pure ``judge_*`` function; the judges hold the rules and are
unit-tested on captured data.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import shutil
import socket
import ssl
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from checks.registry import Context, check
from checks.result import Status, Value, Verdict

GIB = 1024**3

# Targets peftnode provisions (os-release ID -> accepted VERSION_IDs or their majors), from the one
# list site.yml reads too.
SUPPORTED_OS_FILE = Path(__file__).resolve().parent / "supported_os.yml"
SUPPORTED_OS = {entry["id"]: tuple(str(r) for r in entry["releases"])
                for entry in yaml.safe_load(SUPPORTED_OS_FILE.read_text(encoding="utf-8"))}


# --- OS ------------------------------------------------------------------------------------------

def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            out[key] = value.strip().strip('"').strip("'")
    return out


def probe_os(os_release: str = "/etc/os-release") -> dict[str, str]:
    try:
        facts = parse_os_release(Path(os_release).read_text())
    except OSError:
        facts = {}
    uname = platform.uname()
    facts["kernel"] = uname.release
    facts["arch"] = uname.machine
    return facts


def host_facts() -> dict[str, str]:
    """What the reports say about the machine they describe."""
    facts = probe_os()
    return {
        "hostname": socket.gethostname(),
        "os": facts.get("PRETTY_NAME", "unknown"),
        "kernel": facts["kernel"],
        "arch": facts["arch"],
        "python": platform.python_version(),
    }


def judge_os(facts: dict[str, str]) -> Verdict:
    measured = {"os": facts.get("PRETTY_NAME", "unknown"), "kernel": facts.get("kernel", "?"),
                "arch": facts.get("arch", "?")}
    expected = {"os": ", ".join(f"{k} {'/'.join(v)}" for k, v in SUPPORTED_OS.items()), "arch": "x86_64"}
    os_id, version = facts.get("ID", ""), facts.get("VERSION_ID", "")
    accepted = SUPPORTED_OS.get(os_id)
    problems = []
    if not os_id:
        problems.append("no /etc/os-release: cannot tell the distribution")
    elif accepted is None:
        problems.append(f"{os_id} is not a distribution peftnode provisions")
    elif version not in accepted and version.split(".")[0] not in accepted:
        problems.append(f"{os_id} {version} is not a supported release ({'/'.join(accepted)})")
    if facts.get("arch") != "x86_64":
        problems.append(f"architecture {facts.get('arch')} (the stack's NVIDIA artifacts are x86_64)")
    if problems:
        return Verdict(Status.WARN, "; ".join(problems), measured, expected,
                       "Provisioning and the pinned artifacts are tested on the listed targets only.")
    summary = f"{measured['os']}, kernel {measured['kernel']}, {measured['arch']}"
    return Verdict(Status.PASS, summary, measured, expected)


@check("system.os", "Operating system is a supported target")
def system_os(ctx: Context) -> Verdict:
    return judge_os(probe_os())


# --- Python and OpenSSL --------------------------------------------------------------------------

@dataclass
class PythonProbe:
    version: str
    executable: str
    prefix: str
    base_prefix: str


def judge_python(probe: PythonProbe, expected_version: str, venv_name: str | None) -> Verdict:
    measured = {"version": probe.version, "executable": probe.executable}
    expected = {"version": expected_version, "venv": venv_name or "-"}
    have, want = Version(probe.version), Version(expected_version)
    if (have.major, have.minor) != (want.major, want.minor):
        return Verdict(Status.FAIL, f"Python {probe.version} runs this check; the stack pins {expected_version}",
                       measured, expected,
                       f"Run verify from the stack's virtualenv ({venv_name}), built on Python {expected_version} "
                       "by the python and venv roles.")
    notes = []
    if have != want:
        notes.append(f"patch release {probe.version} differs from the pinned {expected_version}")
    in_venv = probe.prefix != probe.base_prefix
    if not in_venv:
        notes.append("not running inside a virtualenv")
    elif venv_name and Path(probe.prefix).name != venv_name:
        notes.append(f"running in virtualenv {Path(probe.prefix).name!r}, not {venv_name!r}")
    if notes:
        return Verdict(Status.WARN, f"Python {probe.version}: " + "; ".join(notes), measured, expected,
                       f"Activate the stack's virtualenv {venv_name} before running verify.")
    return Verdict(Status.PASS, f"Python {probe.version} in virtualenv {venv_name}", measured, expected)


@check("python.version", "Python is the stack's version, inside the stack's virtualenv")
def python_version(ctx: Context) -> Verdict:
    probe = PythonProbe(platform.python_version(), sys.executable, sys.prefix, sys.base_prefix)
    return judge_python(probe, ctx.stack["python"]["version"], ctx.stack["venv"]["name"])


OPENSSL_RX = re.compile(r"OpenSSL\s+(\d+\.\d+\.\d+[a-z]*)")


def judge_openssl(openssl_version_text: str | None, expected: str) -> Verdict:
    if openssl_version_text is None:
        return Verdict(Status.FAIL, "this Python has no ssl module", {}, {"openssl": expected},
                       "Python was built without OpenSSL: rebuild it with --with-openssl=<prefix> (python role).")
    match = OPENSSL_RX.search(openssl_version_text)
    found = match.group(1) if match else None
    measured = {"openssl": found or openssl_version_text}
    if found != expected:
        return Verdict(Status.FAIL, f"Python's ssl links {openssl_version_text}; the stack pins OpenSSL {expected}",
                       measured, {"openssl": expected},
                       "Rebuild Python against the stack's OpenSSL (--with-openssl=<prefix> "
                       "--with-openssl-rpath=auto), as the openssl and python roles do.")
    return Verdict(Status.PASS, f"Python's ssl links {openssl_version_text}", measured, {"openssl": expected})


@check("python.openssl", "Python's ssl module links the stack's OpenSSL")
def python_openssl(ctx: Context) -> Verdict:
    return judge_openssl(getattr(ssl, "OPENSSL_VERSION", None), ctx.stack["openssl"]["version"])


# --- Packages ------------------------------------------------------------------------------------

@dataclass
class PackageProbe:
    version: str | None  # None: not installed
    direct_url: dict | None  # PEP 610 direct_url.json, when installed from a URL


def probe_package(name: str) -> PackageProbe:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return PackageProbe(None, None)
    raw = dist.read_text("direct_url.json")
    try:
        direct = json.loads(raw) if raw else None
    except ValueError:
        direct = None
    return PackageProbe(dist.version, direct)


def _vcs_ref(url: str) -> str | None:
    """The revision after '@' in a VCS direct reference (git+https://host/repo.git@REV)."""
    tail = url.rsplit("/", 1)[-1]
    return tail.split("@", 1)[1].split("#", 1)[0] if "@" in tail else None


def judge_package(requirement: str, probe: PackageProbe) -> Verdict:
    req = Requirement(requirement)
    expected = {"requirement": requirement}
    if probe.version is None:
        return Verdict(Status.FAIL, f"{req.name} is not installed", {}, expected,
                       f"Install it into the stack's virtualenv: pip install '{requirement}' (venv role).",
                       subject=req.name)
    measured = {"version": probe.version}
    try:
        Version(probe.version)
    except InvalidVersion:
        return Verdict(Status.FAIL, f"{req.name} reports an invalid version {probe.version!r}", measured, expected,
                       subject=req.name)
    if req.specifier and not req.specifier.contains(probe.version, prereleases=True):
        return Verdict(Status.FAIL, f"{req.name} {probe.version} does not satisfy {req.specifier}", measured, expected,
                       f"pip install '{requirement}' in the stack's virtualenv.", subject=req.name)
    if req.url:
        ref = _vcs_ref(req.url)
        commit = ((probe.direct_url or {}).get("vcs_info") or {}).get("commit_id")
        if commit:
            measured["commit"] = commit
        if ref and not commit:
            return Verdict(Status.WARN, f"{req.name} {probe.version} was not installed from {req.url}, so its "
                                        f"revision cannot be confirmed", measured, expected,
                           f"pip install '{requirement}' to pin the revision.", subject=req.name)
        if ref and not commit.startswith(ref):
            return Verdict(Status.FAIL, f"{req.name} is at commit {commit[:12]}, the stack pins {ref}",
                           measured, expected, f"pip install '{requirement}'.", subject=req.name)
        return Verdict(Status.PASS, f"{req.name} {probe.version} at commit {(commit or '?')[:12]}", measured,
                       expected, subject=req.name)
    return Verdict(Status.PASS, f"{req.name} {probe.version}", measured, expected, subject=req.name)


@check("python.packages", "The stack's Python packages are installed at the pinned versions")
def python_packages(ctx: Context) -> list[Verdict]:
    return [judge_package(r, probe_package(Requirement(r).name)) for r in ctx.stack["venv"]["requirements"]]


# --- Disk ----------------------------------------------------------------------------------------

@dataclass
class DiskProbe:
    path: str
    measured_at: str  # the path itself, or its nearest existing parent
    free_bytes: int
    total_bytes: int


def probe_disk(path: str) -> DiskProbe:
    at = Path(path)
    while not at.exists() and at != at.parent:
        at = at.parent
    usage = shutil.disk_usage(at)
    return DiskProbe(path, str(at), usage.free, usage.total)


def judge_disk(probe: DiskProbe, role: str, min_free_gib: float) -> Verdict:
    free_gib = probe.free_bytes / GIB
    measured = {"free": Value(round(free_gib, 2), "GiB"), "total": Value(round(probe.total_bytes / GIB, 2), "GiB")}
    where = probe.path
    if probe.measured_at != probe.path:
        where = f"{probe.path} (not there yet; measured on {probe.measured_at})"
    expected = {"free": Value(min_free_gib, "GiB")}
    if free_gib < min_free_gib:
        return Verdict(Status.FAIL, f"{free_gib:.1f} GiB free for the {role} at {where}; needs {min_free_gib:g} GiB",
                       measured, expected, f"Free space on the filesystem of {probe.measured_at} or move the {role} "
                                           "path (stack model.path / node.data_path) to a larger one.", subject=role)
    return Verdict(Status.PASS, f"{free_gib:.1f} GiB free for the {role} at {where}", measured, expected, subject=role)


# Defaults when neither the stack nor the manifest sets node.min_free_gib (bloomz-560m is 1.1 GB).
DEFAULT_MIN_FREE_GIB = {"model": 5.0, "data": 20.0}


@check("system.disk", "Enough free disk for the model and the data")
def system_disk(ctx: Context) -> list[Verdict]:
    mins = {**DEFAULT_MIN_FREE_GIB, **dataclasses.asdict(ctx.node.min_free_gib)}
    paths = {"model": ctx.stack["model"]["path"], "data": ctx.node.data_path}
    return [judge_disk(probe_disk(p), role, float(mins[role])) for role, p in paths.items()]
