"""Pure decisions of the cuda, nccl and cudnn roles, as Jinja filters (unit-tested in tests/test_nvidia_libs_roles.py).

- ``peftnode_redist_artifacts``: NVIDIA's ``redistrib_<version>.json`` + the stack's component list ->
  one artifact ``{file, sha256, url}`` per component, for the artifact role; missing components are errors.
- ``peftnode_redist_version_json``: the ``version.json`` the redist method writes into the prefix
  (the runfile writes the same file: ``{"cuda": {"name", "version"}, "<component>": {...}}``).
- ``peftnode_cuda_installed``: whether the prefix already holds the stack's CUDA (the version probe).
- ``peftnode_header_version``: NCCL_MAJOR/MINOR/PATCH of nccl.h, CUDNN_MAJOR/MINOR/PATCHLEVEL of
  cudnn_version.h (or cudnn.h), CUDART_VERSION of cuda_runtime_api.h, as a dotted string.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import sys

# Header parsing is verify's (checks/cuda/versions.py): this checkout's copy of the checks package, as
# lookup_plugins/peftnode_stack.py finds it, else an installed one.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_REPO, "checks", "__init__.py")) and _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from checks.cuda.versions import parse_cuda_runtime_header, parse_cudnn_header, parse_nccl_header  # noqa: E402

PLATFORM = "linux-x86_64"

HEADER_PARSERS = {"nccl": parse_nccl_header, "cudnn": parse_cudnn_header, "cudart": parse_cuda_runtime_header}


class RedistError(ValueError):
    """The manifest cannot deliver what the stack asks for."""


def _as_mapping(manifest) -> dict:
    if isinstance(manifest, (str, bytes)):
        manifest = json.loads(manifest)
    if not isinstance(manifest, dict):
        raise RedistError(f"the redistrib manifest is a {type(manifest).__name__}, not a JSON object")
    return manifest


def redist_artifacts(manifest, components: list[str], manifest_url: str | None = None,
                     platform: str = PLATFORM) -> list[dict]:
    """One artifact per component, in the stack's order: file = the basename of relative_path (what a
    controller directory or mirror holds), sha256 from the manifest, url = relative_path under the
    manifest's own directory (NVIDIA serves both from .../redist/)."""
    data = _as_mapping(manifest)
    base = posixpath.dirname(manifest_url) if manifest_url else None
    out, problems = [], []
    for comp in components:
        entry = data.get(comp)
        if not isinstance(entry, dict):
            listed = ", ".join(sorted(k for k in data if isinstance(data[k], dict)))
            problems.append(f"{comp}: not in the manifest (it lists {listed or 'no component'})")
            continue
        plat = entry.get(platform)
        if not isinstance(plat, dict) or not plat.get("relative_path"):
            problems.append(f"{comp}: no {platform} archive in the manifest")
            continue
        sha = str(plat.get("sha256") or "").lower() or None
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            problems.append(f"{comp}: sha256 {plat.get('sha256')!r} is not 64 hex digits")
            continue
        rel = str(plat["relative_path"])
        out.append({"file": posixpath.basename(rel), "sha256": sha,
                    "url": f"{base}/{rel}" if base else None,
                    "component": comp, "version": str(entry.get("version", ""))})
    if problems:
        raise RedistError("the redistrib manifest cannot give every component the stack lists: " + "; ".join(problems))
    return out


def redist_version_json(manifest, components: list[str], cuda_version: str) -> dict:
    """version.json for a prefix made of these components (NVIDIA's format, as the runfile writes it)."""
    data = _as_mapping(manifest)
    out = {"cuda": {"name": "CUDA SDK", "version": cuda_version}}
    for comp in components:
        entry = data.get(comp) or {}
        out[comp] = {"name": str(entry.get("name", comp)), "version": str(entry.get("version", ""))}
    return out


def _release(text: str | None) -> str | None:
    """'Cuda compilation tools, release 11.7, V11.7.99' -> '11.7'."""
    m = re.search(r"release\s+(\d+\.\d+)", text or "")
    return m.group(1) if m else None


def cuda_installed(version_json, compiler_out: str | None, stack_version: str, method: str,
                   components: list[str] | None = None) -> bool:
    """The version probe. version.json's cuda.version equal to the stack's (and, for redist, every
    component the stack lists recorded in it) means installed. Without a usable version.json, the
    runfile and repo methods accept nvcc/ptxas reporting the stack's major.minor; redist never does
    (its version.json is written last, so a missing one means an unfinished install)."""
    data = {}
    if isinstance(version_json, dict):
        data = version_json
    elif version_json:
        try:
            data = json.loads(version_json)
        except ValueError:
            data = {}
    if not isinstance(data, dict):
        data = {}
    cuda = data.get("cuda")
    recorded = cuda.get("version") if isinstance(cuda, dict) else None
    if recorded is not None:
        if str(recorded) != stack_version:
            return False
        if method == "redist":
            return all(isinstance(data.get(c), dict) for c in components or [])
        return True
    if method == "redist":
        return False
    return _release(compiler_out) == ".".join(stack_version.split(".")[:2])


def header_version(text: str | None, kind: str) -> str | None:
    """'2.14.3' from nccl.h, '8.8.1' from cudnn_version.h, '11.7' from cuda_runtime_api.h; None when absent."""
    found = HEADER_PARSERS[kind](text or "")
    return ".".join(str(part) for part in found) if found else None


def version_matches(found: str | None, wanted: str) -> bool:
    """'8.8.1' (what a header can say) matches the stack's '8.8.1.3': compare the parts both have, at least 3."""
    if not found:
        return False
    f, w = found.split("."), wanted.split(".")
    n = min(len(f), len(w))
    return n >= min(3, len(w)) and f[:n] == w[:n]


def _redist_artifacts_filter(manifest, components, manifest_url=None, platform=PLATFORM):
    try:
        return redist_artifacts(manifest, list(components or []), manifest_url, platform)
    except (RedistError, ValueError) as exc:
        from ansible.errors import AnsibleFilterError

        raise AnsibleFilterError(str(exc)) from exc


def redist_check(manifest, components, manifest_url=None, platform=PLATFORM) -> dict:
    """For preflight, never raising: {"artifacts": [{file, sha256, url}, ...], "problems": [str, ...]}."""
    try:
        found = redist_artifacts(manifest, list(components or []), manifest_url, platform)
    except (RedistError, ValueError) as exc:
        return {"artifacts": [], "problems": [str(exc)]}
    return {"artifacts": [{k: a[k] for k in ("file", "sha256", "url")} for a in found], "problems": []}


class FilterModule:
    def filters(self):
        return {
            "peftnode_redist_artifacts": _redist_artifacts_filter,
            "peftnode_redist_check": redist_check,
            "peftnode_redist_version_json": redist_version_json,
            "peftnode_cuda_installed": cuda_installed,
            "peftnode_header_version": header_version,
            "peftnode_version_matches": version_matches,
        }
