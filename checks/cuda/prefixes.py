"""Where the roles install the CUDA toolkit, NCCL and cuDNN, and so where the ``cuda.*`` checks look.

The node's ``cuda_home`` / ``nccl_home`` / ``cudnn_home`` (what node_verify writes into the manifest)
win; without them the roles' default prefixes are searched, then the dynamic loader.
"""

from __future__ import annotations

from pathlib import Path

from checks.cuda.versions import major_minor
from checks.node import Node


def cuda_home_candidates(node: Node, cuda_version: str) -> list[str]:
    """node.cuda_home when the manifest sets it; else /usr/local/cuda-X.Y, then /usr/local/cuda."""
    if node.cuda_home:
        return [str(node.cuda_home)]
    return [f"/usr/local/cuda-{major_minor(cuda_version)}", "/usr/local/cuda"]


def lib_dirs(home: str) -> list[Path]:
    return [Path(home, "lib64"), Path(home, "lib")]


def nccl_homes(node: Node, cuda_version: str, nccl_version: str | None = None) -> tuple[list[str], bool]:
    """Where to look for NCCL, and whether the dynamic loader may be asked after that:
    node.nccl_home alone when set; else the nccl role's versioned prefix /usr/local/nccl-<version>
    (unless node.cuda_home is set: NCCL copied into that toolkit, as the seed did), the CUDA prefix,
    then the loader."""
    if node.nccl_home:
        return [str(node.nccl_home)], False
    versioned = [f"/usr/local/nccl-{nccl_version}"] if nccl_version and not node.cuda_home else []
    return versioned + cuda_home_candidates(node, cuda_version), True


def cudnn_homes(node: Node, cuda_version: str, cudnn_version: str | None = None) -> tuple[list[str], bool]:
    """As nccl_homes: node.cudnn_home alone when set; else /usr/local/cudnn-<version> (the cudnn role's
    prefix; not when node.cuda_home is set), the CUDA prefix, then the loader."""
    if node.cudnn_home:
        return [str(node.cudnn_home)], False
    versioned = [f"/usr/local/cudnn-{cudnn_version}"] if cudnn_version and not node.cuda_home else []
    return versioned + cuda_home_candidates(node, cuda_version), True


def read_text(path: Path) -> str | None:
    """A file of an install; None when it is absent or unreadable."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None
