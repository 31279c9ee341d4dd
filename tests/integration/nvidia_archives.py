"""NVIDIA's distribution archives, rebuilt from NVIDIA's own redistributable wheels, for the converge test.

The cuda (redist), nccl and cudnn roles install NVIDIA's archives: the per-component CUDA archives
listed in ``redistrib_<version>.json``, ``nccl_<ver>-1+cuda<X.Y>_x86_64.txz`` and
``cudnn-linux-x86_64-<ver>_cuda<X>-archive.tar.xz``. Those are not reachable here, but NVIDIA
publishes the same binaries as wheels on PyPI (tests/helpers/cuda_prefix.py downloads them, checked
against their sha256). This module repacks the wheels into NVIDIA's layouts and names:

    cuda_cudart-linux-x86_64-11.7.99-archive.tar.xz   cuda_cudart-linux-x86_64-11.7.99-archive/{include,lib}
    cuda_nvcc-linux-x86_64-11.7.99-archive.tar.xz     cuda_nvcc-linux-x86_64-11.7.99-archive/{bin,include,nvvm}
    redistrib_11.7.1.json                             NVIDIA's manifest schema, listing the two above
    nccl_2.14.3-1+cuda11.7_x86_64.txz                 nccl_2.14.3-1+cuda11.7_x86_64/{include,lib}
    cudnn-linux-x86_64-8.8.1.3_cuda11-archive.tar.xz  cudnn-linux-x86_64-8.8.1.3_cuda11-archive/{include,lib}

Libraries get NVIDIA's symlink chains (libnccl.so -> libnccl.so.2 -> libnccl.so.2.14.3, the real
file), so the roles' "symlinks kept" is tested for real. What the wheels do not carry is not there
either: no nvcc binary (the nvcc wheel has ptxas, nvvm and the crt headers), no static libraries,
no pkg-config file. Every library of the wheels is included (cuDNN's six sub-libraries too).

Everything is cached under ``.cache/nvidia-archives/<key>/`` (git-ignored), the key being a hash of
the wheels' sha256 sums, the layout revision and the xz settings; never committed. xz runs with
fast settings (LZMA2 preset 0 with a short match search, about half the CPU of ``-1`` for a 14 %
larger cuDNN archive): the point is NVIDIA's format and layout, not the ratio.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import cuda_prefix

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "nvidia-archives"
LAYOUT_REVISION = 1
XZ = ["xz", "-T0", "--lzma2=preset=0,nice=8,depth=1", "-c"]
MTIME = 1659484800  # 2022-08-03, CUDA 11.7.1's release date: reproducible tar members

CUDA_VERSION = "11.7.1"
CUDA_RELEASE_DATE = "2022-08-03"
CUDART_VERSION = "11.7.99"
NCCL_VERSION = "2.14.3"
NCCL_FILE = "nccl_2.14.3-1+cuda11.7_x86_64.txz"
CUDNN_VERSION = "8.8.1.3"
CUDNN_FILE = "cudnn-linux-x86_64-8.8.1.3_cuda11-archive.tar.xz"
MANIFEST_FILE = f"redistrib_{CUDA_VERSION}.json"


@dataclass(frozen=True)
class Spec:
    """One archive: its file and top directory, the wheel it comes from, and how members map."""

    file: str
    top: str
    dist: str
    mapping: dict[str, str]  # member prefix in the wheel -> directory in the archive
    # library (as the wheel names it) -> full version: the real file becomes lib<x>.so.<full>, with
    # lib<x>.so.<major> and lib<x>.so linking to it, as NVIDIA ships them
    chains: dict[str, str]
    # redistrib manifest entry (CUDA components only): (component, name, license)
    component: tuple[str, str, str] | None = None


def _cudnn_chains() -> dict[str, str]:
    libs = ["libcudnn", *(f"libcudnn_{s}" for s in ("adv_infer", "adv_train", "cnn_infer", "cnn_train",
                                                     "ops_infer", "ops_train"))]
    return {f"{lib}.so.8": "8.8.1" for lib in libs}


SPECS = [
    Spec(f"cuda_cudart-linux-x86_64-{CUDART_VERSION}-archive.tar.xz",
         f"cuda_cudart-linux-x86_64-{CUDART_VERSION}-archive", "nvidia-cuda-runtime-cu11",
         {"nvidia/cuda_runtime/include/": "include/", "nvidia/cuda_runtime/lib/": "lib/"},
         {"libcudart.so.11.0": CUDART_VERSION},
         ("cuda_cudart", "CUDA Runtime (cudart)", "CUDA Toolkit")),
    Spec(f"cuda_nvcc-linux-x86_64-{CUDART_VERSION}-archive.tar.xz",
         f"cuda_nvcc-linux-x86_64-{CUDART_VERSION}-archive", "nvidia-cuda-nvcc-cu11",
         {"nvidia/cuda_nvcc/bin/": "bin/", "nvidia/cuda_nvcc/include/": "include/", "nvidia/cuda_nvcc/nvvm/": "nvvm/"},
         {},
         ("cuda_nvcc", "CUDA NVCC", "CUDA Toolkit")),
    Spec(NCCL_FILE, NCCL_FILE.removesuffix(".txz"), "nvidia-nccl-cu11",
         {"nvidia/nccl/include/": "include/", "nvidia/nccl/lib/": "lib/"},
         {"libnccl.so.2": NCCL_VERSION}),
    Spec(CUDNN_FILE, CUDNN_FILE.removesuffix(".tar.xz"), "nvidia-cudnn-cu11",
         {"nvidia/cudnn/include/": "include/", "nvidia/cudnn/lib/": "lib/"},
         _cudnn_chains()),
]


@dataclass
class Archives:
    dir: Path  # holds every archive and the manifest
    files: dict[str, str]  # file -> sha256 (archives and manifest)
    sizes: dict[str, int]  # file -> bytes
    built: bool  # built in this call
    seconds: dict[str, float]  # file -> seconds its build took (from the cache's record when reused)
    download_s: float | None  # seconds pip took for the wheels, when it ran

    def sha256(self, file: str) -> str:
        return self.files[file]

    @property
    def manifest(self) -> dict:
        return json.loads((self.dir / MANIFEST_FILE).read_text())


def _chain_names(wheel_name: str, full: str) -> tuple[str, str, str]:
    """'libnccl.so.2', '2.14.3' -> ('libnccl.so.2.14.3' real file, 'libnccl.so.2', 'libnccl.so')."""
    stem = wheel_name.split(".so.")[0]
    major = wheel_name.split(".so.")[1]
    return f"{stem}.so.{full}", f"{stem}.so.{major}", f"{stem}.so"


def _info(name: str, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = MTIME, 0, 0, "root", "root"
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _write_archive(spec: Spec, wheel: Path, dest: Path) -> None:
    """Stream the wheel's members through tar into xz, as NVIDIA lays the archive out."""
    partial = dest.with_name(dest.name + f".part-{os.getpid()}")
    with open(partial, "wb") as out:
        xz = subprocess.Popen(XZ, stdin=subprocess.PIPE, stdout=out)
        try:
            with tarfile.open(fileobj=xz.stdin, mode="w|", format=tarfile.GNU_FORMAT) as tar, \
                    zipfile.ZipFile(wheel) as zf:
                members = []
                for info in zf.infolist():
                    if info.is_dir() or info.filename.endswith("__init__.py"):
                        continue
                    for src, dst in spec.mapping.items():
                        if info.filename.startswith(src):
                            members.append((dst + info.filename[len(src):], info))
                            break
                dirs = {d.rstrip("/") for d in spec.mapping.values()}
                for name, _ in members:
                    dirs.update(str(p) for p in Path(name).parents if str(p) != ".")
                tar.addfile(_info(spec.top, type=tarfile.DIRTYPE, mode=0o755))
                for d in sorted(dirs):
                    tar.addfile(_info(f"{spec.top}/{d}", type=tarfile.DIRTYPE, mode=0o755))
                for name, info in sorted(members):
                    path = Path(name)
                    chain = spec.chains.get(path.name) if path.parent.name == "lib" else None
                    mode = (info.external_attr >> 16) & 0o777
                    executable = bool(mode & 0o100) or name.startswith("bin/") or ".so" in path.name
                    real = path.with_name(_chain_names(path.name, chain)[0]) if chain else path
                    with zf.open(info) as fh:
                        tar.addfile(_info(f"{spec.top}/{real}", size=info.file_size,
                                          mode=0o755 if executable else 0o644), fh)
                    if chain:
                        full, major, bare = _chain_names(path.name, chain)
                        tar.addfile(_info(f"{spec.top}/{path.with_name(major)}", type=tarfile.SYMTYPE,
                                          linkname=full, mode=0o777))
                        tar.addfile(_info(f"{spec.top}/{path.with_name(bare)}", type=tarfile.SYMTYPE,
                                          linkname=major, mode=0o777))
                license_text = (f"Repacked by peftnode's tests from NVIDIA's {spec.dist} wheel; NVIDIA's license "
                                "terms of that wheel apply.\n").encode()
                tar.addfile(_info(f"{spec.top}/LICENSE", size=len(license_text), mode=0o644),
                            io.BytesIO(license_text))
        finally:
            xz.stdin.close()
            rc = xz.wait()
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(XZ)} exited {rc} while writing {dest.name}")
    os.replace(partial, dest)


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _key(wheel_shas: dict[str, str]) -> str:
    spec = {"layout": LAYOUT_REVISION, "xz": XZ, "wheels": wheel_shas, "cuda": CUDA_VERSION,
            "files": [s.file for s in SPECS]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


RECORD = "archives.json"


def ensure_archives() -> Archives:
    """The archives and the manifest, built from the wheels when the cache does not hold them yet.
    Raises cuda_prefix.PrefixUnavailable when the wheels cannot be downloaded."""
    wheels = cuda_prefix.cache_dir() / "wheels"
    expected = {dist: sha for dist, _, sha, _ in cuda_prefix.WHEELS}
    versions = {dist: version for dist, version, _, _ in cuda_prefix.WHEELS}
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = _key(expected)
        dest = CACHE / key
        try:
            record = json.loads((dest / RECORD).read_text())
            if all((dest / f).is_file() and (dest / f).stat().st_size == record["sizes"][f] for f in record["files"]):
                return Archives(dest, record["files"], record["sizes"], False, record["seconds"], None)
        except (OSError, ValueError, KeyError):
            pass
        download_s = cuda_prefix.download(wheels)
        files = {}
        for dist in expected:
            wheel = cuda_prefix._wheel_file(wheels, dist, versions[dist])
            got = cuda_prefix._sha256(wheel)
            if got != expected[dist]:
                wheel.unlink()
                raise RuntimeError(f"{wheel.name}: sha256 {got}, expected {expected[dist]}; deleted, rerun to "
                                   "download it again")
            files[dist] = wheel
        work = CACHE / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        shas, sizes, seconds = {}, {}, {}
        manifest: dict = {"release_date": CUDA_RELEASE_DATE}
        for spec in SPECS:
            t0 = time.monotonic()
            _write_archive(spec, files[spec.dist], work / spec.file)
            seconds[spec.file] = round(time.monotonic() - t0, 1)
            sha, md5 = _digests(work / spec.file)
            shas[spec.file], sizes[spec.file] = sha, (work / spec.file).stat().st_size
            if spec.component:
                comp, name, license_ = spec.component
                manifest[comp] = {
                    "name": name, "license": license_, "version": CUDART_VERSION,
                    "linux-x86_64": {"relative_path": f"{comp}/linux-x86_64/{spec.file}", "sha256": sha,
                                     "md5": md5, "size": str(sizes[spec.file])},
                }
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=4) + "\n")
        shas[MANIFEST_FILE] = _digests(work / MANIFEST_FILE)[0]
        sizes[MANIFEST_FILE] = (work / MANIFEST_FILE).stat().st_size
        (work / RECORD).write_text(json.dumps({"files": shas, "sizes": sizes, "seconds": seconds,
                                               "wheels": {d: f.name for d, f in files.items()}}, indent=1) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(work, dest)
        for old in CACHE.iterdir():  # earlier keys: their inputs changed
            if old.is_dir() and old.name != key and not old.name.startswith(f"{key}.tmp"):
                shutil.rmtree(old, ignore_errors=True)
        return Archives(dest, shas, sizes, True, seconds, download_s)


if __name__ == "__main__":  # python -m tests.integration.nvidia_archives: build (or find) and describe them
    t0 = time.monotonic()
    a = ensure_archives()
    print(json.dumps({"dir": str(a.dir), "built": a.built, "total_s": round(time.monotonic() - t0, 1),
                      "seconds": a.seconds, "sizes_mb": {f: round(s / 1e6, 1) for f, s in a.sizes.items()},
                      "sha256": a.files}, indent=1))
