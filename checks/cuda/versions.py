"""Version numbers of the CUDA stack: the strings a stack pins, the integers the libraries return, the
``#define``s of their headers and the files a toolkit ships. Pure functions, no I/O.

A version is a release tuple, ``(11, 7, 1)``: what ``packaging`` reads from a stack's ``"11.7.1"``
and what the decoders build from ``ncclGetVersion``'s 21403. Components are compared as integers,
on as many of them as the source carries (``same``): cuDNN reports 8.8.1 of the stack's 8.8.1.3.
"""

from __future__ import annotations

import json
import re

from packaging.version import InvalidVersion, Version

Release = tuple[int, ...]


def parse_version(text: str | None) -> Release | None:
    """'11.7.1' -> (11, 7, 1), '8.8.1.3' -> (8, 8, 1, 3); None for anything that is not a plain
    release (empty, a pre-/post-/dev-release, a local label such as '+cu117', an epoch, not a version)."""
    if not text:
        return None
    try:
        version = Version(text)
    except InvalidVersion:
        return None
    if version.epoch or version.pre or version.post is not None or version.dev is not None or version.local:
        return None
    return version.release


def fmt(version: Release | None) -> str | None:
    return ".".join(str(p) for p in version) if version is not None else None


def same(found: Release | None, expected: Release, parts: int) -> bool:
    """``found`` equals ``expected`` on their first ``parts`` components."""
    return found is not None and found[:parts] == expected[:parts]


def major_minor(version: str) -> str:
    """'11.7.1' -> '11.7' (the toolkit's directory name)."""
    release = parse_version(version)
    return fmt(release[:2]) if release else version


# --- the integers the libraries return -----------------------------------------------------------


def decode_cudart(code: int) -> Release:
    """CUDART_VERSION / cudaRuntimeGetVersion: major*1000 + minor*10 (11070 -> 11.7, 12040 -> 12.4)."""
    return (code // 1000, (code % 1000) // 10)


def decode_nccl(code: int) -> Release:
    """ncclGetVersion / NCCL_VERSION_CODE. NCCL >= 2.9 encodes major*10000 + minor*100 + patch
    (21403 -> 2.14.3); older releases major*1000 + minor*100 + patch (2708 -> 2.7.8)."""
    if code >= 10000:
        return (code // 10000, (code % 10000) // 100, code % 100)
    return (code // 1000, (code % 1000) // 100, code % 100)


def decode_cudnn(code: int) -> Release:
    """cudnnGetVersion / CUDNN_VERSION. cuDNN <= 8 encodes major*1000 + minor*100 + patch
    (8801 -> 8.8.1); cuDNN 9 major*10000 + minor*100 + patch (90100 -> 9.1.0)."""
    if code >= 10000:
        return (code // 10000, (code % 10000) // 100, code % 100)
    return (code // 1000, (code % 1000) // 100, code % 100)


# --- headers -------------------------------------------------------------------------------------


def _defines(text: str) -> dict[str, int]:
    """Integer ``#define NAME 123`` lines of a C header."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\d+)\b", text, re.MULTILINE)}


def parse_cuda_runtime_header(text: str) -> Release | None:
    """``#define CUDART_VERSION 11070`` in include/cuda_runtime_api.h -> (11, 7)."""
    code = _defines(text).get("CUDART_VERSION")
    return decode_cudart(code) if code is not None else None


def parse_nccl_header(text: str) -> Release | None:
    """NCCL_MAJOR / NCCL_MINOR / NCCL_PATCH of include/nccl.h."""
    d = _defines(text)
    if {"NCCL_MAJOR", "NCCL_MINOR", "NCCL_PATCH"} <= d.keys():
        return (d["NCCL_MAJOR"], d["NCCL_MINOR"], d["NCCL_PATCH"])
    return None


def parse_cudnn_header(text: str) -> Release | None:
    """CUDNN_MAJOR / CUDNN_MINOR / CUDNN_PATCHLEVEL of include/cudnn_version.h (cudnn.h before cuDNN 8)."""
    d = _defines(text)
    if {"CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL"} <= d.keys():
        return (d["CUDNN_MAJOR"], d["CUDNN_MINOR"], d["CUDNN_PATCHLEVEL"])
    return None


# --- a toolkit's own files and tools -------------------------------------------------------------


def parse_version_json(text: str) -> dict[str, str]:
    """A toolkit's version.json: ``{"cuda": {"version": "11.7.1"}, "cuda_cudart": {...}, ...}`` ->
    component -> version string. Unreadable input gives an empty mapping."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: str(v["version"]) for k, v in data.items() if isinstance(v, dict) and "version" in v}


def parse_version_txt(text: str) -> Release | None:
    """Toolkits before 11.1 ship version.txt: 'CUDA Version 10.2.89'."""
    match = re.search(r"CUDA Version\s+(\d+(?:\.\d+)+)", text)
    return parse_version(match.group(1)) if match else None


def parse_compiler_version(text: str) -> Release | None:
    """``nvcc --version`` / ``ptxas --version``: 'Cuda compilation tools, release 11.7, V11.7.99'
    -> (11, 7, 99); the release alone when the V-number is missing."""
    match = re.search(r"release\s+(\d+)\.(\d+)(?:,\s*V(\d+)\.(\d+)\.(\d+))?", text)
    if not match:
        return None
    if match.group(3):
        return (int(match.group(3)), int(match.group(4)), int(match.group(5)))
    return (int(match.group(1)), int(match.group(2)))
