"""The Python environment verify runs in (group ``python``): the interpreter's version and virtualenv,
the OpenSSL its ssl module links, and the stack's pinned packages.

Thin probes read this interpreter and the installed distributions' metadata; the pure ``judge_*``
functions hold the rules (versions and requirements through ``packaging``).
"""

from __future__ import annotations

import json
import platform
import re
import ssl
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from checks.registry import Context, check
from checks.result import Status, Verdict

# --- the interpreter -----------------------------------------------------------------------------

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


# --- packages ------------------------------------------------------------------------------------

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
