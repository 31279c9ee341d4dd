"""Draining failing nodes in Slurm and resuming the ones peftnode drained, NHC's way.

- Node names: the short form (up to the first dot) of the inventory host name (``--node-names inventory``,
  the default), or of the hostname the node's verify report records (``--node-names hostname``: the name
  the node gives itself; a node without a report keeps its inventory name); an IP address is kept whole.
- State: one ``sinfo -h -N -o '%N|%t|%E'`` (node, compact state, reason) for the whole cluster.
- Drain: ``scontrol update NodeName=<n> State=DRAIN Reason=<r>`` for every node that failed, errored or
  produced no report; the reason is ``peftnode: <check>: <message>`` cut to 64 characters. A node that
  Slurm already shows drained, draining, down or failed for a reason that does not start with the word
  ``peftnode:`` is left alone (someone else's reason is not overwritten), and the output says so.
- Resume: ``scontrol update NodeName=<n> State=RESUME`` for nodes that now pass (or only warn) and that
  Slurm shows drained/down/failed with a reason whose first word is exactly ``peftnode:``; nodes held for
  any other reason are never touched.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from checks.fleet.judge import NO_REPORT, cause_check
from checks.registry import UsageError

REASON_MAX = 64
MARK = "peftnode:"
SINFO_ARGV = ["sinfo", "-h", "-N", "-o", "%N|%t|%E"]
HELD_STATES = ("drain", "drng", "drained", "draining", "down", "fail", "failg", "failing")
_NAME_OK = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,128}")


@dataclass(frozen=True)
class SlurmNode:
    state: str  # compact state without its flag characters (drain, drng, down, idle, ...)
    reason: str  # "" when none


@dataclass
class Plan:
    commands: list[list[str]]
    notes: list[str]  # what was left alone and why


def slurm_name(node: dict, names: str = "inventory") -> str:
    name = (node.get("hostname") if names == "hostname" else None) or node["host"]
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        return name.split(".", 1)[0] or name


def drain_reason(check: str, message: str) -> str:
    """``peftnode: <check>: <message>`` on one line of printable ASCII, at most 64 characters."""
    text = " ".join(f"{MARK} {check}: {message}".split())
    text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3].rstrip() + "..."


def node_reason(node: dict) -> str:
    if node["status"] == NO_REPORT:
        return drain_reason(NO_REPORT, (node["reason"] or "").removeprefix(f"{NO_REPORT}: "))
    first = node["failures"][0]
    return drain_reason(cause_check(first), first["message"])


def parse_sinfo(text: str) -> dict[str, SlurmNode]:
    out: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        parts = line.split("|", 2)
        if len(parts) != 3 or not parts[0].strip():
            continue
        name, state, reason = (p.strip() for p in parts)
        state = state.lower().rstrip("*~#!%$@^-+")
        reason = "" if reason.lower() in ("none", "(null)") else reason
        known = out.get(name)
        if known is None or (state in HELD_STATES and known.state not in HELD_STATES):
            out[name] = SlurmNode(state, reason)  # a node in several partitions is listed once per partition
    return out


def read_states(runner=subprocess.run) -> dict[str, SlurmNode]:
    if shutil.which("sinfo") is None:
        raise UsageError("sinfo not found on PATH: cannot see which nodes Slurm holds and why (run on a Slurm "
                         "controller or login node)")
    proc = runner(SINFO_ARGV, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UsageError(f"{shlex.join(SINFO_ARGV)} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[:200]}")
    return parse_sinfo(proc.stdout)


def held_by_peftnode(node: SlurmNode) -> bool:
    return node.state in HELD_STATES and node.reason.split(" ", 1)[0] == MARK


def held_by_others(node: SlurmNode) -> bool:
    return node.state in HELD_STATES and not held_by_peftnode(node)


def _checked(name: str) -> str:
    if not _NAME_OK.fullmatch(name):
        raise UsageError(f"{name!r} is not a Slurm node name peftnode will pass to scontrol")
    return name


def plan_drain(fleet: dict, states: dict[str, SlurmNode] | None, names: str = "inventory") -> Plan:
    """``states`` None: Slurm's view unknown (sinfo missing; only printing), every failing node listed."""
    plan = Plan([], [])
    for node in fleet["nodes"]:
        if node["status"] not in ("fail", "error", NO_REPORT):
            continue
        name = _checked(slurm_name(node, names))
        seen = states.get(name) if states is not None else None
        if states is not None and seen is None:
            plan.notes.append(f"{name}: not known to Slurm (sinfo does not list it): not drained")
            continue
        if seen is not None and held_by_others(seen):
            plan.notes.append(f"{name}: left alone: Slurm shows it {seen.state} for someone else's reason "
                              f"({seen.reason or 'none given'}); peftnode does not overwrite it")
            continue
        plan.commands.append(["scontrol", "update", f"NodeName={name}", "State=DRAIN",
                              f"Reason={node_reason(node)}"])
    return plan


def plan_resume(fleet: dict, states: dict[str, SlurmNode], names: str = "inventory") -> Plan:
    plan = Plan([], [])
    for node in fleet["nodes"]:
        if node["status"] not in ("pass", "warn"):
            continue
        name = _checked(slurm_name(node, names))
        seen = states.get(name)
        if seen is None or seen.state not in HELD_STATES:
            continue
        if held_by_peftnode(seen):
            plan.commands.append(["scontrol", "update", f"NodeName={name}", "State=RESUME"])
        else:
            plan.notes.append(f"{name}: passes, but Slurm shows it {seen.state} for someone else's reason "
                              f"({seen.reason or 'none given'}): not resumed")
    return plan


def shell_line(argv: list[str]) -> str:
    return shlex.join(argv)


def apply(commands: list[list[str]], runner=subprocess.run) -> list[str]:
    """Run each scontrol command; the lines of those that failed."""
    if commands and shutil.which("scontrol") is None:
        raise UsageError("scontrol not found on PATH: cannot --apply (run on a Slurm controller or login node, "
                         "or leave out --apply to print the commands)")
    failed = []
    for argv in commands:
        proc = runner(argv, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            failed.append(f"{shell_line(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}")
    return failed
