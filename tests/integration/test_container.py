"""The converge harness alone: a booted systemd container that Ansible reaches over SSH."""

from __future__ import annotations

import pytest

from tests.integration import container as ct

pytestmark = pytest.mark.converge


def test_systemd_is_pid1(node):
    assert node.ssh("cat /proc/1/comm").stdout.strip() == "systemd"
    assert node.ssh("systemctl is-system-running").stdout.strip() in ("running", "degraded")
    print(f"\n[converge] harness timings: {ct.timings}")


def test_ansible_ping(node):
    r = ct.ansible(node, "-m", "ansible.builtin.ping")
    assert r.rc == 0, r.tail()
    assert "pong" in r.output


def test_ansible_starts_a_real_unit(node):
    node.ssh("systemctl stop dbus.socket dbus.service")
    assert node.ssh("systemctl is-active dbus.service", check=False).stdout.strip() == "inactive"
    r = ct.ansible(node, "-m", "ansible.builtin.systemd_service", "-a", "name=dbus state=started")
    assert r.rc == 0, r.tail()
    assert "changed: true" in r.output or '"changed": true' in r.output, r.tail()
    assert node.ssh("systemctl is-active dbus.service").stdout.strip() == "active"


def test_sshd_listens_only_on_loopback(node):
    assert ct.port_in_use(node.port, "127.0.0.1")
    dropin = node.ssh("sshd -T | grep -E '^(port|listenaddress) '").stdout.split()
    assert dropin == ["port", str(node.port), "listenaddress", f"127.0.0.1:{node.port}"]
