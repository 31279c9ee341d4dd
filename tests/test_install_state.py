"""filter_plugins/peftnode_state.py: the stamp text, the install state of a prefix from its slurped
stamp and the stat of its marker, and the directories never to be removed as a prefix."""

from __future__ import annotations

import base64
import json

import pytest

from filter_plugins.peftnode_state import FilterModule, install_state, shared_dir, stamp_text

EXPECTED = {"component": "nccl", "version": "2.14.3", "prefix": "/usr/local/nccl-2.14.3", "method": "archive",
            "artifact": "nccl_2.14.3-1+cuda11.7_x86_64.txz", "sha256": "ab" * 32}


def slurped(text: str) -> dict:
    """What ansible.builtin.slurp registers for a file holding text."""
    return {"content": base64.b64encode(text.encode()).decode(), "encoding": "base64", "source": "/x"}


MISSING = {"failed": True, "msg": "file not found: /x"}  # slurp with failed_when: false, no file
MARKER = {"stat": {"exists": True}}
NO_MARKER = {"stat": {"exists": False}}


def test_stamp_text_is_canonical_whatever_the_key_order():
    reordered = dict(reversed(list(EXPECTED.items())))
    assert stamp_text(reordered) == stamp_text(EXPECTED)
    assert " " not in stamp_text({"a": 1, "b": [1, 2]}) and "\n" not in stamp_text(EXPECTED)
    assert json.loads(stamp_text(EXPECTED)) == EXPECTED


@pytest.mark.parametrize("stamp, marker, want", [
    (slurped(stamp_text(EXPECTED) + "\n"), NO_MARKER, "complete"),
    # how a copy task writes it when Ansible turned the text back into a mapping: other spacing, same data
    (slurped(json.dumps(EXPECTED, indent=2)), NO_MARKER, "complete"),
    (slurped(stamp_text(EXPECTED)), MARKER, "incomplete"),  # the marker wins over a stamp
    (MISSING, MARKER, "incomplete"),
    (slurped(stamp_text({**EXPECTED, "version": "2.18.1"})), NO_MARKER, "outdated"),
    (slurped(stamp_text({**EXPECTED, "sha256": "cd" * 32})), NO_MARKER, "outdated"),
    (slurped(stamp_text({k: v for k, v in EXPECTED.items() if k != "sha256"})), NO_MARKER, "outdated"),
    (slurped(stamp_text({**EXPECTED, "extra": 1})), NO_MARKER, "outdated"),
    (slurped('{"component": "nccl", "vers'), NO_MARKER, "outdated"),  # cut short
    (slurped(""), NO_MARKER, "outdated"),
    (MISSING, NO_MARKER, "unstamped"),
    ({"skipped": True}, {"skipped": True}, "unstamped"),  # probe tasks skipped (another method)
    (None, None, "unstamped"),
    ({"content": "%%% not base64"}, NO_MARKER, "unstamped"),
])
def test_install_state(stamp, marker, want):
    assert install_state(stamp, marker, EXPECTED) == want


def test_install_state_compares_data_not_types_of_number_text():
    assert install_state(slurped('{"n": 1}'), NO_MARKER, {"n": 1}) == "complete"
    assert install_state(slurped('{"n": "1"}'), NO_MARKER, {"n": 1}) == "outdated"


@pytest.mark.parametrize("path", [
    "/", "/usr", "/usr/local", "/usr/local/", "/usr/local/.", "//usr/local", "/usr/local/lib/..", "/opt",
    "/opt/peftnode", "/home", "/tmp", "/var/lib", "/srv", "/data", "/nccl", "/cuda-11.7", "usr/local/nccl",
    "", None, 7,
])
def test_shared_dirs_are_never_a_prefix(path):
    assert shared_dir(path) is True


@pytest.mark.parametrize("path", [
    "/usr/local/nccl-2.14.3", "/usr/local/cuda-11.7", "/usr/local/cudnn-8.8.1.3/", "/opt/nccl",
    "/opt/peftnode/venvs/x", "/usr/local/lib/../nccl-2.14.3",
])
def test_prefixes_of_their_own(path):
    assert shared_dir(path) is False


def test_filters_are_registered_under_their_names():
    assert FilterModule().filters() == {"peftnode_stamp": stamp_text, "peftnode_install_state": install_state,
                                        "peftnode_shared_dir": shared_dir}
