"""Fixtures of the converge tier: a real systemd container and what the roles install into it.

Session-wide: the host tools (installed with apt-get when missing), the cached bookworm tree, the
verified upstream tarballs and the wheelhouse. Per module: one booted container, torn down at the
end of the module, also when a test or the fixture itself fails (and at exit or on SIGTERM/SIGHUP).
"""

from __future__ import annotations

import os

import pytest

from tests.integration import container as ct
from tests.integration import materials


@pytest.fixture(scope="session")
def converge_host():
    """Root, the host tools, and no leftovers of a crashed earlier run."""
    if os.geteuid() != 0:
        pytest.skip("the converge tier needs root (debootstrap, systemd-nspawn)")
    ct.ensure_host_tools()
    ct.cleanup_stale()
    yield
    ct._stop_all()


@pytest.fixture(scope="session")
def rootfs_tarball(converge_host):
    return ct.rootfs_tarball()


@pytest.fixture(scope="module")
def node(rootfs_tarball):
    """A booted Debian bookworm container: systemd PID 1, sshd on a free 127.0.0.1 port."""
    c = ct.Container()
    try:
        c.start(rootfs_tarball)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def artifact_dir(converge_host):
    return materials.fetch_artifacts()


@pytest.fixture(scope="session")
def wheelhouse_dir(converge_host, tmp_path_factory):
    return materials.wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(directory, {file: sha256}) of the tiny model the model role copies into place."""
    d = tmp_path_factory.mktemp("model") / materials.MODEL_NAME
    return d, materials.write_tiny_model(d)
