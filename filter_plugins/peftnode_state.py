"""Whether an install on the node is complete: the stamp/marker protocol every installing role follows.

A role that installs into a prefix of its own (OpenSSL, Python, the venv, the NVIDIA archives):

1. writes ``<prefix>/.peftnode-incomplete`` before it puts anything there;
2. installs and proves the install;
3. writes ``<prefix>/.peftnode-stamp.json`` (its inputs: version, artifact sha256, flags, ...) and
   then removes the marker.

A run that is killed anywhere in 1-3 leaves the marker, or no stamp: the next run sees
``incomplete`` and starts that component again from an empty prefix. The probes of the role and of
its preflight read the same two files through ``peftnode_install_state``.

- ``peftnode_stamp``: the canonical stamp text of a mapping (sorted keys, one line).
- ``peftnode_install_state``: ``complete`` (stamp equal to the expected one, no marker),
  ``incomplete`` (the marker is there), ``outdated`` (a stamp from other inputs), ``unstamped``
  (neither file: nothing there, or an install peftnode did not make or made before stamps existed).
- ``peftnode_shared_dir``: true for directories peftnode must never remove as a "prefix"
  (``/``, ``/usr``, ``/usr/local``, ``/opt``, a home, ...).
"""

from __future__ import annotations

import base64
import json
import posixpath

STAMP = ".peftnode-stamp.json"
MARKER = ".peftnode-incomplete"

# Directories a prefix variable could be pointed at by mistake: removing one would wreck the node.
SHARED_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt", "/proc",
    "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin", "/usr/include", "/usr/lib",
    "/usr/lib64", "/usr/libexec", "/usr/local", "/usr/local/bin", "/usr/local/include", "/usr/local/lib",
    "/usr/local/lib64", "/usr/local/share", "/usr/sbin", "/usr/share", "/var", "/var/cache", "/var/lib",
    "/var/tmp", "/data", "/opt/peftnode",
})


def stamp_text(expected) -> str:
    """The stamp as written and compared: JSON with sorted keys, no spaces to disagree about."""
    return json.dumps(expected, sort_keys=True, separators=(",", ":"))


def _slurped_text(result) -> str | None:
    """The text of an ``ansible.builtin.slurp`` result, or None when the file could not be read."""
    if not isinstance(result, dict) or result.get("failed") or "content" not in result:
        return None
    try:
        return base64.b64decode(result["content"]).decode("utf-8", "replace")
    except (ValueError, TypeError):
        return None


def _exists(stat_result) -> bool:
    if not isinstance(stat_result, dict):
        return False
    return bool((stat_result.get("stat") or {}).get("exists"))


def install_state(stamp_result, marker_result, expected) -> str:
    """Classify a prefix from its slurped stamp, the stat of its marker and the expected inputs."""
    if _exists(marker_result):
        return "incomplete"
    text = _slurped_text(stamp_result)
    if text is None:
        return "unstamped"
    try:
        found = json.loads(text)
    except ValueError:
        return "outdated"  # a stamp that is not JSON was cut short or written by hand: start again
    return "complete" if found == json.loads(stamp_text(expected)) else "outdated"


def shared_dir(path) -> bool:
    """True when ``path`` is not a directory of its own: never remove it as a prefix."""
    if not isinstance(path, str) or not path.startswith("/"):
        return True
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm in SHARED_DIRS or norm.count("/") < 2


class FilterModule:
    def filters(self):
        return {
            "peftnode_stamp": stamp_text,
            "peftnode_install_state": install_state,
            "peftnode_shared_dir": shared_dir,
        }
