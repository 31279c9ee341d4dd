"""Editing parsed YAML/JSON documents in tests: stacks, manifests."""

import copy


def mutate(data, path, value):
    """A deep copy of ``data`` with the dotted ``path`` (list items by index) set to ``value``, or
    removed when ``value`` is ``KeyError``."""
    d = copy.deepcopy(data)
    *parents, last = path.split(".")
    cur = d
    for p in parents:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    if value is KeyError:
        del cur[last]
    elif isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value
    return d
