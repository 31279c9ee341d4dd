"""System checks that need no GPU: the operating system and free disk; and the host facts reports show.

Each check is a thin probe plus a pure ``judge_*`` function; the judges hold the rules and are
unit-tested on captured data. The Python environment's checks (``python.*``) are in checks/python.py.
"""

from __future__ import annotations

import platform
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from checks.registry import Context, check
from checks.result import Status, Value, Verdict

GIB = 1024**3

# Targets peftnode provisions (os-release ID -> accepted VERSION_IDs or their majors), from the one
# list site.yml reads too.
SUPPORTED_OS_FILE = Path(__file__).resolve().parent / "supported_os.yml"
SUPPORTED_OS = {entry["id"]: tuple(str(r) for r in entry["releases"])
                for entry in yaml.safe_load(SUPPORTED_OS_FILE.read_text(encoding="utf-8"))}


# --- OS ------------------------------------------------------------------------------------------

# os-release(5): KEY=VALUE lines, the value optionally in matching quotes, with \\ \$ \" \' \` escaped;
# NAME, ID and PRETTY_NAME default to Linux / linux / Linux. The rules platform.freedesktop_os_release()
# applies, for a file given by path (a captured os-release in a test, another root's).
_OS_RELEASE_LINE = re.compile(r"""^(?P<key>[A-Za-z0-9_]+)=(?P<q>["']?)(?P<value>.*)(?P=q)$""")
_OS_RELEASE_ESCAPE = re.compile(r"""\\([\\$"'`])""")
OS_RELEASE_DEFAULTS = {"NAME": "Linux", "ID": "linux", "PRETTY_NAME": "Linux"}


def parse_os_release(text: str) -> dict[str, str]:
    out = dict(OS_RELEASE_DEFAULTS)
    for line in text.splitlines():
        match = _OS_RELEASE_LINE.match(line)
        if match:
            out[match["key"]] = _OS_RELEASE_ESCAPE.sub(r"\1", match["value"])
    return out


def probe_os(os_release: str | Path | None = None) -> dict[str, str]:
    """os-release fields (``platform.freedesktop_os_release()``, or the file ``os_release`` parsed by
    the same rules; none when it is absent) plus the kernel release and architecture."""
    try:
        facts = parse_os_release(Path(os_release).read_text()) if os_release is not None \
            else dict(platform.freedesktop_os_release())
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


@check("system.disk", "Enough free disk for the model and the data")
def system_disk(ctx: Context) -> list[Verdict]:
    mins = ctx.node.min_free_gib  # defaults when neither the stack nor the manifest sets them (checks/node.py)
    return [judge_disk(probe_disk(ctx.stack["model"]["path"]), "model", mins.model),
            judge_disk(probe_disk(ctx.node.data_path), "data", mins.data)]
