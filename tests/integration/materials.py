"""What the converge test feeds the roles: real upstream tarballs, a wheelhouse, a tiny model, a stack.

- Artifacts: the real OpenSSL 1.1.1w and Python 3.11.2 upstream tarballs, as Debian ships them
  (``*.orig.tar.gz``), fetched with ``apt-get source --download-only`` from ``deb-src`` entries
  derived from the machine's own Debian mirror, through a private apt configuration (the host's
  sources are neither read for this nor changed). Checked against the sha256 values below.
- Wheelhouse: the stack's requirements for CPython 3.11 (the container builds 3.11.2), plus a wheel
  of peftnode built from this checkout.
- A tiny model (config.json, model.safetensors, tokenizer_config.json) written by the test.
- NVIDIA's archives (CUDA 11.7.1 redist components with their redistrib_11.7.1.json, NCCL 2.14.3,
  cuDNN 8.8.1.3), repacked from NVIDIA's redistributable wheels by tests/integration/nvidia_archives.py
  and served from the same controller directory as the tarballs.
- The test stack: stacks/cu117.yml with the pieces above swapped in, validated like any stack.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import yaml

from tests.integration import nvidia_archives as nv
from tests.integration.container import CACHE, ROOT, HarnessError, debian_mirror, log, run, sha256_file, timings

# file -> (source package, suite, sha256)
ARTIFACTS = {
    "openssl_1.1.1w.orig.tar.gz": (
        "openssl", "bullseye", "cf3098950cb4d853ad95c0841f1f9c6d3dc102dccfcacd521d93925208b76ac8"),
    "python3.11_3.11.2.orig.tar.gz": (
        "python3.11", "bookworm", "2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849"),
}
OPENSSL_VERSION = "1.1.1w"
PYTHON_VERSION = "3.11.2"

VENV_NAME = "peft-venv-py311-cpu"
VENV_PATH = f"/opt/peftnode/venvs/{VENV_NAME}"
REQUIREMENTS = ["torch==2.13.0", "jupyterlab", "invoke", "pyyaml", "packaging", "rich"]
# Installers the venv role may want to upgrade to, offline.
TOOLING = ["pip", "setuptools", "wheel"]
MODEL_NAME = "tiny-bloom"
MODEL_PATH = f"/data/models/{MODEL_NAME}"


# --- artifacts -----------------------------------------------------------------------------------


def _apt_options(base: Path, sources_list: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={sources_list}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={base / 'lists'}",
        "-o", f"Dir::Cache={base / 'cache'}",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]


def fetch_artifacts() -> Path:
    """``.cache/converge/artifacts``: exactly the two verified upstream tarballs."""
    dest = CACHE / "artifacts"
    dest.mkdir(parents=True, exist_ok=True)

    def good(name: str) -> bool:
        path = dest / name
        return path.is_file() and sha256_file(path) == ARTIFACTS[name][2]

    missing = [name for name in ARTIFACTS if not good(name)]
    if missing:
        t0 = time.monotonic()
        mirror = debian_mirror()
        apt = CACHE / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (apt / sub).mkdir(parents=True, exist_ok=True)
        signed = f"[signed-by={mirror.signed_by}] " if mirror.signed_by else ""
        suites = sorted({ARTIFACTS[name][1] for name in ARTIFACTS})
        sources = apt / "sources.list"
        sources.write_text("".join(f"deb-src {signed}{mirror.uris[0]} {s} main\n" for s in suites))
        opts = _apt_options(apt, sources)
        logfile = CACHE / "apt-source.log"
        logfile.unlink(missing_ok=True)
        log(f"apt-get source --download-only {', '.join(missing)} (deb-src from the machine's Debian mirror)")
        run(["apt-get", *opts, "update"], log_to=logfile, timeout=600)
        work = apt / "download"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        specs = [f"{ARTIFACTS[name][0]}/{ARTIFACTS[name][1]}" for name in missing]
        run(["apt-get", *opts, "source", "--download-only", *specs], log_to=logfile, timeout=900, cwd=work)
        for name in missing:
            got = work / name
            if not got.is_file():
                raise HarnessError(f"apt-get source did not yield {name}; got {sorted(os.listdir(work))}")
            digest = sha256_file(got)
            if digest != ARTIFACTS[name][2]:
                raise HarnessError(f"{name}: sha256 {digest} != expected {ARTIFACTS[name][2]}")
            os.replace(got, dest / name)
        shutil.rmtree(work, ignore_errors=True)
        timings["artifact_fetch_s"] = round(time.monotonic() - t0, 1)
        log(f"artifacts fetched and verified in {timings['artifact_fetch_s']} s")
    for extra in set(os.listdir(dest)) - set(ARTIFACTS):
        (dest / extra).unlink()
    return dest


# --- NVIDIA's archives ---------------------------------------------------------------------------

# What the converge installs with the cuda role's redist method: the two components the wheels carry.
CUDA_COMPONENTS = ["cuda_cudart", "cuda_nvcc"]


def nvidia_artifacts() -> nv.Archives:
    """NVIDIA's archives from the wheels (cached in .cache/nvidia-archives; built once, minutes)."""
    t0 = time.monotonic()
    archives = nv.ensure_archives()
    timings["nvidia_archives_s"] = round(time.monotonic() - t0, 1)
    if archives.built:
        timings["nvidia_archives_build_s"] = round(sum(archives.seconds.values()), 1)
        log(f"NVIDIA archives repacked from the wheels in {timings['nvidia_archives_build_s']} s: {archives.dir}")
    timings["nvidia_archives_mb"] = {f: round(n / 1e6, 1) for f, n in archives.sizes.items()}
    return archives


def merged_artifact_dir(dest: Path, *sources: Path) -> Path:
    """One controller directory (peftnode_artifact_dir) holding the files of every source, hard-linked."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name != nv.RECORD:
                target = dest / f.name
                target.unlink(missing_ok=True)
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
    return dest


# --- wheelhouse ----------------------------------------------------------------------------------


def wheelhouse(dest: Path) -> Path:
    """A wheelhouse in ``dest``: the third-party wheels for CPython 3.11.2 (cached in
    ``.cache/converge/wheelhouse``, downloaded once per requirement set) hard-linked in, plus a fresh
    peftnode wheel of this checkout."""
    cache = CACHE / "wheelhouse"
    key = hashlib.sha256(json.dumps([REQUIREMENTS, TOOLING, PYTHON_VERSION, "download"]).encode()).hexdigest()[:16]
    stamp = cache / f".complete-{key}"
    python = sys.executable
    logfile = CACHE / "wheelhouse.log"
    if not stamp.is_file():
        t0 = time.monotonic()
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        logfile.unlink(missing_ok=True)
        # Resolved for the node's Python, not this one: a dependency may require a newer 3.11.x than
        # the 3.11.2 the node builds (soupsieve 4 wants >= 3.11.5). Wheels only, so nothing is built
        # here for the wrong interpreter.
        log(f"pip download {' '.join(REQUIREMENTS + TOOLING)} for Python {PYTHON_VERSION} -> {cache}")
        run([python, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
             "--python-version", PYTHON_VERSION, "-d", str(cache), *REQUIREMENTS, *TOOLING],
            log_to=logfile, timeout=1800)
        stamp.touch()
        timings["wheelhouse_s"] = round(time.monotonic() - t0, 1)
    dest.mkdir(parents=True, exist_ok=True)
    for whl in cache.glob("*.whl"):
        target = dest / whl.name
        try:
            os.link(whl, target)
        except OSError:
            shutil.copy2(whl, target)
    t0 = time.monotonic()
    run([python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "-w", str(dest), str(ROOT)],
        log_to=logfile, timeout=600)
    timings["peftnode_wheel_s"] = round(time.monotonic() - t0, 1)
    if not list(dest.glob("peftnode-*.whl")):
        raise HarnessError(f"no peftnode wheel in {dest} after pip wheel {ROOT}")
    return dest


# --- the tiny model ------------------------------------------------------------------------------


def _safetensors(tensors: dict[str, list[list[float]]]) -> bytes:
    """A valid safetensors file of float32 tensors (header length, JSON header, raw data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, rows in tensors.items():
        flat = [v for row in rows for v in row]
        blob = struct.pack(f"<{len(flat)}f", *flat)
        header[name] = {"dtype": "F32", "shape": [len(rows), len(rows[0])],
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


def write_tiny_model(dest: Path) -> dict[str, str]:
    """A tiny Bloom-shaped model directory; returns {file: sha256}."""
    dest.mkdir(parents=True, exist_ok=True)
    hidden, vocab = 8, 16
    config = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": hidden, "n_head": 2,
              "n_layer": 1, "vocab_size": vocab, "layer_norm_epsilon": 1e-5}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {
        "transformer.word_embeddings.weight": [[((i * hidden + j) % 7 - 3) / 10 for j in range(hidden)]
                                               for i in range(vocab)],
        "transformer.ln_f.weight": [[1.0] * hidden],
    }
    (dest / "model.safetensors").write_bytes(_safetensors(weights))
    (dest / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "padding_side": "left"}) + "\n")
    return {p.name: sha256_file(p) for p in sorted(dest.iterdir())}


# --- the test stack ------------------------------------------------------------------------------


def converge_stack(model_files: dict[str, str], *, wrong_sha_for: str | None = None,
                   nvidia: nv.Archives | None = None) -> dict:
    """stacks/cu117.yml turned into the converge stack; ``wrong_sha_for`` (openssl or python) gets a
    checksum that no file has. With ``nvidia``, CUDA (redist: the manifest and its components), NCCL
    and cuDNN are the repacked archives with their sha256."""
    from checks.stack import validate_stack

    data = copy.deepcopy(yaml.safe_load((ROOT / "stacks" / "cu117.yml").read_text()))
    data["name"] = "converge"
    data["description"] = "converge test: Debian bookworm container, OpenSSL 1.1.1w, Python 3.11.2, CPU torch"
    data["openssl"] = {"version": OPENSSL_VERSION,
                       "artifact": {"file": "openssl_1.1.1w.orig.tar.gz",
                                    "sha256": ARTIFACTS["openssl_1.1.1w.orig.tar.gz"][2]}}
    data["python"] = {"version": PYTHON_VERSION,
                      "artifact": {"file": "python3.11_3.11.2.orig.tar.gz",
                                   "sha256": ARTIFACTS["python3.11_3.11.2.orig.tar.gz"][2]}}
    data["venv"] = {"name": VENV_NAME, "path": VENV_PATH, "requirements": list(REQUIREMENTS)}
    data["model"] = {"name": MODEL_NAME, "path": MODEL_PATH,
                     "files": [{"file": f, "sha256": s} for f, s in sorted(model_files.items())]}
    data["node"] = {"gpus": 0, "data_path": "/data", "min_free_gib": {"model": 0.1, "data": 0.1}}
    if nvidia is not None:
        data["cuda"] = {"version": nv.CUDA_VERSION, "artifact": data["cuda"]["artifact"],
                        "redist": {"manifest": {"file": nv.MANIFEST_FILE, "sha256": nvidia.sha256(nv.MANIFEST_FILE)},
                                   "components": list(CUDA_COMPONENTS)}}
        data["nccl"] = {"version": nv.NCCL_VERSION, "package": "2.14.3-1+cuda11.7",
                        "artifact": {"file": nv.NCCL_FILE, "sha256": nvidia.sha256(nv.NCCL_FILE)}}
        data["cudnn"] = {"version": nv.CUDNN_VERSION, "package": "8.8.1.3-1.cuda11.8",
                         "artifact": {"file": nv.CUDNN_FILE, "sha256": nvidia.sha256(nv.CUDNN_FILE)}}
    if wrong_sha_for:
        real = data[wrong_sha_for]["artifact"]["sha256"]
        data[wrong_sha_for]["artifact"]["sha256"] = hashlib.sha256(real.encode()).hexdigest()
    return validate_stack(data, "converge stack")


def write_stack(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def jupyter_password_hash(password: str) -> str:
    from jupyter_server.auth import passwd

    return passwd(password)

