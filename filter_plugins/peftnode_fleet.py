"""Which nodes measure the inter-node all-reduce together, and when (playbooks/verify.yml's pairs).

The nodes, sorted, form a ring: each node is paired with the next one and the last with the first, so
every node is measured against two neighbours and a bad NIC or cable shows as the two pairs that share
that node, both slow, while its neighbours' other pairs are fine. Two nodes give one pair; one node none.

The pairs of one round share no node, so a round runs all its pairs at once: a ring of an even number of
nodes takes two rounds, an odd one three (the pair that closes the ring alone in the third).

- ``peftnode_pair_rounds(hosts)``: ``[[[a, b], ...], ...]``, the rounds in order; in each pair the first
  node is node-rank 0 of torchrun (the rendezvous and the result file are on it).
- ``peftnode_pair_of(rounds, round, host)``: ``{"peer", "node_rank", "master", "hosts"}`` for the pair
  ``host`` is in during that round, or ``{}`` when it sits the round out.
"""

from __future__ import annotations


def pair_rounds(hosts) -> list[list[list[str]]]:
    nodes = sorted({str(h) for h in hosts or []})
    n = len(nodes)
    if n < 2:
        return []
    if n == 2:
        return [[nodes]]
    ring = [[nodes[i], nodes[(i + 1) % n]] for i in range(n)]
    rounds: list[list[list[str]]] = [ring[0:n - 1:2], ring[1:n - 1:2]]
    closing = ring[n - 1]  # the last node with the first
    if n % 2 == 0:
        rounds[1].append(closing)
    else:
        rounds.append([closing])
    return [r for r in rounds if r]


def pair_of(rounds, index, host) -> dict:
    try:
        pairs = rounds[int(index)]
    except (IndexError, TypeError, ValueError):
        return {}
    for pair in pairs:
        if host in pair:
            rank = pair.index(host)
            return {"peer": pair[1 - rank], "node_rank": rank, "master": pair[0], "hosts": list(pair)}
    return {}


class FilterModule:
    def filters(self):
        return {"peftnode_pair_rounds": pair_rounds, "peftnode_pair_of": pair_of}
