"""A CUDA-like prefix built from NVIDIA's real redistributable wheels, for the cuda.* tests (tests/test_cuda.py).

The wheels are downloaded with pip (once; kept under ``.cache/nvidia-wheels/wheels``), checked
against the sha256 sums below, unpacked and laid out the way the roles install a toolkit with NCCL
and cuDNN in it::

    <prefix>/include/   cuda_runtime_api.h ..., nccl.h, cudnn*.h
    <prefix>/lib64/     libcudart.so.11.0, libnccl.so.2, libcudnn.so.8, libcudnn_*.so.8
    <prefix>/bin/ptxas  (the nvcc wheel has no nvcc binary)
    <prefix>/nvvm/

The wheels ship no version.json, so the toolkit's runtime version comes from the header. The prefix
is rebuilt only when the marker file is missing or names other wheels. Set PEFTNODE_NVIDIA_CACHE to
put the cache elsewhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".cache" / "nvidia-wheels"

# (distribution, version, sha256 of the manylinux1_x86_64 wheel, {member prefix in the wheel: prefix dir})
WHEELS = [
    ("nvidia-nccl-cu11", "2.14.3", "5e5534257d1284b8e825bc3a182c6f06acd6eb405e9f89d49340e98cd8f136eb",
     {"nvidia/nccl/include/": "include/", "nvidia/nccl/lib/": "lib64/"}),
    ("nvidia-cudnn-cu11", "8.8.1.3", "37b570fa240b2d30b9ff28bdfef4000e73a25182485616af18adfdc6ead8381f",
     {"nvidia/cudnn/include/": "include/", "nvidia/cudnn/lib/": "lib64/"}),
    ("nvidia-cuda-runtime-cu11", "11.7.99", "cc768314ae58d2641f07eac350f40f99dcb35719c4faff4bc458a7cd2b119e31",
     {"nvidia/cuda_runtime/include/": "include/", "nvidia/cuda_runtime/lib/": "lib64/"}),
    ("nvidia-cuda-nvcc-cu11", "11.7.99", "34f6dfc39a85a5a6f57dfc5ed145a9f903c3f6520a86e7d24b548894769f5e48",
     {"nvidia/cuda_nvcc/bin/": "bin/", "nvidia/cuda_nvcc/include/": "include/", "nvidia/cuda_nvcc/nvvm/": "nvvm/"}),
]
LAYOUT_VERSION = 1
MARKER = ".peftnode-prefix.json"


class PrefixUnavailable(Exception):
    """The wheels could not be downloaded (``offline`` is True when pip could not reach the index)."""


@dataclass
class Prefix:
    path: Path
    built: bool  # built in this call (False: reused from the cache)
    download_s: float | None  # seconds pip took, when it ran
    download_bytes: int  # size of the four wheels
    build_s: float | None


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTNODE_NVIDIA_CACHE") or DEFAULT_CACHE)


def _wheel_file(wheels: Path, dist: str, version: str) -> Path | None:
    stem = dist.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download(wheels: Path) -> float | None:
    """Make sure the four wheels are in ``wheels``; pip downloads the missing ones. Seconds pip took."""
    missing = [f"{d}=={v}" for d, v, _, _ in WHEELS if _wheel_file(wheels, d, v) is None]
    if not missing:
        return None
    wheels.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-d", str(wheels), *missing],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise PrefixUnavailable(f"pip download {' '.join(missing)} failed (exit {proc.returncode}): "
                                + (" | ".join(lines[-3:]) or "no output"))
    return time.monotonic() - started


def _extract(wheel: Path, mapping: dict[str, str], dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or info.filename.endswith("__init__.py"):
                continue
            for src, dst in mapping.items():
                if info.filename.startswith(src):
                    target = dest / dst / info.filename[len(src):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as fin, open(target, "wb") as fout:
                        shutil.copyfileobj(fin, fout, 1 << 22)
                    mode = (info.external_attr >> 16) & 0o777
                    os.chmod(target, (mode | 0o644 | (0o111 if mode & 0o100 else 0)) if mode else 0o644)
                    break


def _marker_for(files: dict[str, str]) -> dict:
    return {"layout": LAYOUT_VERSION, "wheels": files}


def ensure_prefix() -> Prefix:
    """The prefix, downloading and building it when the cache does not hold it yet."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    wheels, prefix = root / "wheels", root / "prefix"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (parallel test runs)
        download_s = download(wheels)
        files = {d: _wheel_file(wheels, d, v) for d, v, _, _ in WHEELS}
        size = sum(f.stat().st_size for f in files.values())
        want = _marker_for({d: f.name for d, f in files.items()})
        try:
            have = json.loads((prefix / MARKER).read_text())
        except (OSError, ValueError):
            have = None
        if have == want:
            return Prefix(prefix, False, download_s, size, None)
        started = time.monotonic()
        for dist, _, sha, _ in WHEELS:
            got = _sha256(files[dist])
            if got != sha:
                files[dist].unlink()  # a damaged or substituted download: fetch it again next time
                raise RuntimeError(f"{files[dist].name}: sha256 {got}, expected {sha}; deleted, rerun to download "
                                   "it again")
        tmp = root / f"prefix.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for dist, _, _, mapping in WHEELS:
            _extract(files[dist], mapping, tmp)
        (tmp / MARKER).write_text(json.dumps(want, indent=1))
        shutil.rmtree(prefix, ignore_errors=True)
        os.replace(tmp, prefix)
        return Prefix(prefix, True, download_s, size, time.monotonic() - started)
