"""Judging a fleet: pure functions from the loaded reports to the fleet JSON (``peftnode.fleet.report/1``).

- a node's status is the worst of its results (skips count as pass), ``no report`` when it produced none;
  a fleet finding (an outlier or drift) raises a passing node to ``warn`` (healthy, but named);
- failures (fail and error results) are grouped by cause: the check plus its message with what differs
  from node to node (GPU index, UUID, PCI bus id, serial, host name, standalone numbers) replaced, so
  "GPU 3 ... 2 uncorrectable" on one node and "GPU 0 ... 5 uncorrectable" on another are one cause;
- outliers: each per-GPU figure (gemm_tflops, copy_tbps, h2d_gbps, d2h_gbps) and each node's all-reduce
  busbw is compared with the fleet median of the same GPU model; below median x outlier_ratio is an
  outlier even when the node's own check passed (its floor is absolute, its median is the node's own);
- drift: driver, CUDA, NCCL, cuDNN, torch and peft versions that differ from the fleet majority (the
  single most common value, when there is one) or do not satisfy the stack given.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from datetime import datetime, timezone
from functools import lru_cache

import checks
from checks.fleet.load import FLEET_REPORT_SCHEMA
from checks.result import Status

FLEET_SCHEMA = FLEET_REPORT_SCHEMA  # one name for the schema, defined where the loader needs it too
NO_REPORT = "no report"
STATUSES = ("pass", "warn", "fail", "error", NO_REPORT)
PER_GPU_METRICS = ("gemm_tflops", "copy_tbps", "h2d_gbps", "d2h_gbps")
NODE_METRICS = ("allreduce_busbw_gbps",)
METRIC_UNITS = {"gemm_tflops": "TFLOP/s", "copy_tbps": "TB/s", "h2d_gbps": "GB/s", "d2h_gbps": "GB/s",
                "allreduce_busbw_gbps": "GB/s"}
COMPONENTS = ("driver", "cuda", "nccl", "cudnn", "torch", "peft")
# where each version is measured: (check name, measured key)
VERSION_SOURCES = {"driver": ("gpu.driver", "driver"), "cuda": ("cuda.toolkit", "runtime"),
                   "nccl": ("cuda.nccl", "version"), "cudnn": ("cuda.cudnn", "version"),
                   "torch": ("python.packages[torch]", "version"), "peft": ("python.packages[peft]", "version")}


def base_check(name: str) -> str:
    """``gpu.ecc`` for ``gpu.ecc[gpu3]``."""
    return name[: name.index("[")] if name.endswith("]") and "[" in name else name


def cause_check(failure: dict) -> str:
    """The check a failure is grouped and drained under: without the subject when the subject is a GPU (the
    same fault on GPU 1 and GPU 5 is one cause), with it otherwise (system.disk[data] and
    python.packages[torch] are not system.disk and python.packages)."""
    return base_check(failure["check"]) if failure.get("gpu") else failure["check"]


def _value(result: dict, key: str):
    got = (result.get("measured") or {}).get(key)
    return got.get("value") if isinstance(got, dict) else got


def _status(label: str) -> Status:
    try:
        return Status.parse(label)
    except ValueError:
        return Status.ERROR


def node_status(report: dict) -> str:
    worst = max((_status(r["status"]) for r in report["results"]), default=Status.PASS)
    return "pass" if worst <= Status.SKIP else worst.label


def group_statuses(report: dict) -> dict[str, str]:
    out: dict[str, Status] = {}
    for r in report["results"]:
        out[r["group"]] = max(out.get(r["group"], Status.PASS), _status(r["status"]))
    return {g: s.label for g, s in out.items()}


def versions(report: dict) -> dict[str, str | None]:
    by_name = {r["name"]: r for r in report["results"]}
    out: dict[str, str | None] = {}
    for component, (name, key) in VERSION_SOURCES.items():
        got = _value(by_name[name], key) if name in by_name else None
        out[component] = str(got) if got not in (None, "") else None
    return out


def gpu_model(report: dict) -> str | None:
    """The GPU model the node measured with (perf's or the all-reduce's device; else the inventory's)."""
    for r in report["results"]:
        if base_check(r["name"]) in ("perf.gemm", "perf.memory", "perf.pcie", "nccl.allreduce"):
            device = _value(r, "device")
            if isinstance(device, str) and device:
                return device
    for r in report["results"]:
        if base_check(r["name"]) == "gpu.inventory":
            for key in ("model", "name", "models"):
                got = _value(r, key)
                if isinstance(got, str) and got:
                    return got
    return None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def metrics(report: dict) -> dict:
    out: dict = {m: {} for m in PER_GPU_METRICS}
    out["allreduce_busbw_gbps"] = None
    for r in report["results"]:
        check = base_check(r["name"])
        if check.startswith("perf.") and isinstance(r.get("gpu"), dict):
            for metric in PER_GPU_METRICS:
                value = _number(_value(r, metric))
                if value is not None:
                    out[metric][str(r["gpu"].get("index"))] = value
        elif r["name"] == "nccl.allreduce[torch]" or (check == "nccl.allreduce" and "[" not in r["name"]):
            value = _number(_value(r, "busbw"))
            if value is not None:
                out["allreduce_busbw_gbps"] = value
    return out


def failures(report: dict) -> list[dict]:
    bad = [r for r in report["results"] if _status(r["status"]) >= Status.ERROR]
    bad.sort(key=lambda r: (-int(_status(r["status"])), r["group"], r["name"]))
    return [{"check": r["name"], "status": r["status"], "message": str(r.get("message") or ""),
             "remediation": r.get("remediation"), "gpu": r.get("gpu")} for r in bad]


# --- causes --------------------------------------------------------------------------------------------

_UUID = re.compile(r"\b(?:GPU|MIG)-[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}\b")
_PCI = re.compile(r"\b(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]\b")
_GPU_INDEX = re.compile(r"\b(GPU|gpu)[ #]?\d+\b")
_SERIAL = re.compile(r"\bserial\s+\S+", re.IGNORECASE)
_XID = re.compile(r"\b(Xid)\s+(\d+)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)*(?![\w])")


_WORD = re.compile(r"(?<![\w.-])[\w.-]+")  # a run of host-name characters, from where a host name can start


@lru_cache(maxsize=8)
def _host_replacer(hosts: tuple[str, ...]):
    """A function replacing every host name of ``hosts`` in a text by ``<host>``, in one pass over the text
    whatever the number of hosts (a regex per host made fleet-report quadratic: 5 s of 6.6 for 300 nodes).
    A host name is a whole run of host-name characters, or its part before a dot (node01 in node01.cluster);
    names with other characters (rare in an inventory) get a regex of their own."""
    plain = frozenset(h for h in hosts if h and _WORD.fullmatch(h))
    odd = [re.compile(rf"(?<![\w.-]){re.escape(h)}(?![\w-])")
           for h in sorted((h for h in hosts if h and h not in plain), key=len, reverse=True)]

    def one(m: re.Match) -> str:
        word = m.group(0)
        cut = len(word)
        while cut > 0:  # the longest leading part that is a host: the whole word, then before each dot
            if word[:cut] in plain:
                return "<host>" + word[cut:]
            cut = word.rfind(".", 0, cut)
        return word

    def replace(text: str) -> str:
        for rx in odd:
            text = rx.sub("<host>", text)
        return _WORD.sub(one, text) if plain else text

    return replace


def normalise(message: str, hosts: list[str] = ()) -> str:
    """The message with what differs between nodes and GPUs replaced: the grouping key of a cause. Xid
    numbers stay (Xid 79 and Xid 48 are different causes)."""
    text = _host_replacer(tuple(hosts))(" ".join(message.split()))
    text = _UUID.sub("GPU-<uuid>", text)
    text = _PCI.sub("<pci>", text)
    text = _SERIAL.sub("serial <serial>", text)
    text = _GPU_INDEX.sub(lambda m: f"{m.group(1)} N" if " " in m.group(0) or "#" in m.group(0) else f"{m.group(1)}N",
                          text)
    xids: list[str] = []
    text = _XID.sub(lambda m: (xids.append(m.group(2)), f"{m.group(1)} xidkeep{len(xids) - 1}x")[1], text)
    text = _NUMBER.sub("N", text)  # the placeholders are words: left as they are
    return re.sub(r"xidkeep(\d+)x", lambda m: xids[int(m.group(1))], text)


def causes(nodes: list[dict]) -> list[dict]:
    hosts = [n["host"] for n in nodes]
    groups: dict[tuple, dict] = {}
    for node in nodes:
        if node["status"] == NO_REPORT:
            key = (NO_REPORT, NO_REPORT, normalise(node["reason"] or "", hosts))
            entry = groups.setdefault(key, {"cause": f"{NO_REPORT}: {key[2].removeprefix('no report: ')}",
                                            "check": NO_REPORT, "status": NO_REPORT, "hosts": [],
                                            "remediation": "Rerun verify.yml for this host (see its reason: "
                                                           "reachability, the per-node time limit, the stderr "
                                                           "tail in <host>.noreport.json).",
                                            "examples": []})
            if node["host"] not in entry["hosts"]:
                entry["hosts"].append(node["host"])
            if node["reason"] not in entry["examples"] and len(entry["examples"]) < 3:
                entry["examples"].append(node["reason"])
            continue
        for f in node["failures"]:
            check = cause_check(f)
            text = normalise(f["message"], hosts)
            key = (check, f["status"], text)
            entry = groups.setdefault(key, {"cause": f"{check}: {text}", "check": check, "status": f["status"],
                                            "hosts": [], "remediation": f["remediation"], "examples": []})
            if node["host"] not in entry["hosts"]:
                entry["hosts"].append(node["host"])
            if f["message"] not in entry["examples"] and len(entry["examples"]) < 3:
                entry["examples"].append(f["message"])
    order = {"fail": 0, NO_REPORT: 1, "error": 2}
    return sorted(groups.values(), key=lambda c: (-len(c["hosts"]), order.get(c["status"], 3), c["cause"]))


# --- outliers ------------------------------------------------------------------------------------------

def outliers(nodes: list[dict], outlier_ratio: float) -> list[dict]:
    """Per metric and GPU model: every value below the fleet median x ``outlier_ratio``. A median needs
    figures from at least two nodes (one node's own GPUs are its verify run's business)."""
    found: list[dict] = []
    for metric in PER_GPU_METRICS + NODE_METRICS:
        samples: dict[str, list[tuple[str, str | None, float]]] = {}
        for node in nodes:
            if node["status"] == NO_REPORT or not node["gpu_model"]:
                continue
            got = node["metrics"].get(metric)
            pairs = got.items() if isinstance(got, dict) else [(None, got)] if got is not None else []
            for gpu, value in pairs:
                samples.setdefault(node["gpu_model"], []).append((node["host"], gpu, value))
        for model, values in samples.items():
            if len({host for host, _, _ in values}) < 2:
                continue
            med = float(statistics.median(v for _, _, v in values))
            if med <= 0:
                continue
            for host, gpu, value in values:
                if value < med * outlier_ratio:
                    found.append({"host": host, "metric": metric, "gpu": gpu, "gpu_model": model,
                                  "value": value, "median": round(med, 6), "ratio": round(value / med, 3),
                                  "threshold": outlier_ratio})
    return sorted(found, key=lambda o: (o["host"], o["metric"], int(o["gpu"]) if o["gpu"] else -1))


# --- drift ---------------------------------------------------------------------------------------------

def _release(text: str) -> tuple[int, ...] | None:
    parts = re.findall(r"\d+", text.split("+")[0])
    return tuple(int(p) for p in parts) if parts else None


def matches(component: str, found: str, wanted: str) -> bool:
    """Whether a measured version satisfies the stack's: a requirement specifier for torch/peft
    (``==2.5.1+cu124``, ``>=0.13,<1``), else the same release to the shorter one's precision
    (CUDA ``12.4`` measured satisfies ``12.4.1``; cuDNN ``9.1.0`` satisfies ``9.1.0.70``)."""
    if component in ("torch", "peft"):
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            return SpecifierSet(wanted).contains(Version(found), prereleases=True)
        except (InvalidSpecifier, InvalidVersion):
            return found == wanted
    a, b = _release(found), _release(wanted)
    if a is None or b is None:
        return found == wanted
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def stack_versions(stack_data: dict) -> dict[str, str | None]:
    """What a stack pins for each component (None: it pins nothing there, e.g. a git reference for peft)."""
    from packaging.requirements import InvalidRequirement, Requirement

    def section(name: str) -> str | None:
        got = (stack_data.get(name) or {}).get("version")
        return str(got) if got is not None else None

    out = {"driver": section("nvidia_driver"), "cuda": section("cuda"), "nccl": section("nccl"),
           "cudnn": section("cudnn"), "torch": None, "peft": None}
    for line in (stack_data.get("venv") or {}).get("requirements") or []:
        try:
            req = Requirement(str(line))
        except InvalidRequirement:
            continue
        name = req.name.lower()
        if name in ("torch", "peft") and not req.url and str(req.specifier):
            out[name] = str(req.specifier)
    return out


def majority(values: list[str]) -> str | None:
    """The single most common value (None on a tie or with fewer than two values)."""
    counts = Counter(values).most_common()
    if len(values) < 2 or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def drift(nodes: list[dict], stack: dict[str, str | None] | None = None) -> list[dict]:
    found: list[dict] = []
    reported = [n for n in nodes if n["status"] != NO_REPORT]
    for component in COMPONENTS:
        values = [n["versions"][component] for n in reported if n["versions"].get(component)]
        most = majority(values)
        wanted = (stack or {}).get(component)
        for node in reported:
            value = node["versions"].get(component)
            if value is None:
                continue
            off_majority = most is not None and value != most
            off_stack = wanted is not None and not matches(component, value, wanted)
            if off_majority or off_stack:
                found.append({"host": node["host"], "component": component, "value": value, "majority": most,
                              "stack": wanted})
    return found


# --- the fleet ---------------------------------------------------------------------------------------------

def _node(host: str, run) -> dict:
    report = run.reports.get(host)
    if report is None:
        why = run.missing[host]
        said = why.reason if why.kind in why.reason else f"{why.kind}: {why.reason}"
        reason = f"{NO_REPORT}: {said}"
        return {"host": host, "status": NO_REPORT, "reason": reason, "groups": {}, "gpu_model": None,
                "versions": {c: None for c in COMPONENTS}, "metrics": {**{m: {} for m in PER_GPU_METRICS},
                                                                      "allreduce_busbw_gbps": None},
                "failures": [], "report": None, "hostname": None}
    bad = failures(report)
    first = bad[0] if bad else None
    return {"host": host, "status": node_status(report),
            "reason": f"{first['check']}: {first['message']}" if first else None,
            "groups": group_statuses(report), "gpu_model": gpu_model(report), "versions": versions(report),
            "metrics": metrics(report), "failures": bad, "report": run.files.get(host),
            "hostname": (report.get("host") or {}).get("hostname")}


def pair_suspects(pairs: list[dict]) -> list[dict]:
    """The nodes that the failing pairs point at. Around verify.yml's ring every node is in two pairs, so a
    bad NIC or cable shows as both pairs of one node failing while its neighbours' other pairs pass: a node
    in two or more failing pairs is the suspect. One failing pair alone names both of its nodes."""
    bad: dict[str, int] = {}
    for p in pairs:
        if p.get("status") not in ("pass", "warn"):
            for host in p.get("hosts") or []:
                bad[str(host)] = bad.get(str(host), 0) + 1
    twice = sorted(h for h, n in bad.items() if n >= 2)
    chosen = twice or sorted(bad)
    return [{"host": h, "failing_pairs": bad[h]} for h in chosen]


def build_fleet(run, stack=None, outlier_ratio: float | None = None, now: datetime | None = None) -> dict:
    """The fleet JSON of a loaded :class:`checks.fleet.load.Run`. ``stack``: a :class:`checks.stack.Stack`
    to judge drift against (and whose node.perf.outlier_ratio applies); ``outlier_ratio`` overrides it."""
    from checks.figures import thresholds

    if outlier_ratio is None:
        outlier_ratio = thresholds(stack.expect().perf if stack is not None else None)[1]
    nodes = [_node(host, run) for host in run.hosts]
    groups: list[str] = []
    for host in run.hosts:
        for r in (run.reports.get(host) or {}).get("results", []):
            if r["group"] not in groups:
                groups.append(r["group"])
    found_outliers = outliers(nodes, outlier_ratio)
    found_drift = drift(nodes, stack_versions(stack.data) if stack is not None else None)
    flagged = {o["host"] for o in found_outliers} | {d["host"] for d in found_drift}
    for node in nodes:
        if node["status"] == "pass" and node["host"] in flagged:
            node["status"] = "warn"
    counts = {"nodes": len(nodes), **{s: sum(n["status"] == s for n in nodes) for s in STATUSES}}
    bad_pairs = [p for p in run.pairs if p.get("status") not in ("pass", "warn")]
    counts["pairs"], counts["pairs_failed"] = len(run.pairs), len(bad_pairs)
    unhealthy = counts["fail"] + counts["error"] + counts[NO_REPORT] + len(bad_pairs)
    return {
        "schema": FLEET_SCHEMA, "run_id": run.run_id,
        "generated_at": (now or datetime.now(timezone.utc)).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "peftnode_version": checks.__version__,
        "verdict": "UNHEALTHY" if unhealthy else "HEALTHY", "exit_code": 1 if unhealthy else 0,
        "counts": counts, "groups": groups, "nodes": nodes, "causes": causes(nodes),
        "outliers": found_outliers, "drift": found_drift, "pairs": list(run.pairs),
        "pair_suspects": pair_suspects(run.pairs),
        "outlier_ratio": outlier_ratio, "stack": stack.name if stack is not None else None,
        "notes": list(run.notes),
    }
