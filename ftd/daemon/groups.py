"""EC group membership and the rotated parity layout (docs/ARCHITECTURE.md §5.1). Pure functions, no I/O.

Nodes 0..N-1 (the order of FTD_PEERS) form groups of about `k + m` consecutive nodes. When N is
not a multiple of k + m, the remainder is spread over the groups, which then use a larger k
(`k = size - m`), so every group still survives the loss of any `m` of its nodes.

Inside a group of size g, a node's data is split into `k = g - m` chunks. Over the g
rotations r = 0..g-1 the parity nodes are (r + j) mod g for j < m; every other node contributes
one data chunk (its next one, in rotation order). Codec index of a data chunk is its position
among the rotation's contributors (0..k-1); parity j has index k + j.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ftd.errors import ConfigError


@dataclass(frozen=True)
class ECShape:
    """`k` data and `m` parity chunks per stripe."""

    k: int
    m: int

    @classmethod
    def parse(cls, text: str) -> ECShape:
        match = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"EC shape {text!r} is not of the form k+m (e.g. 4+2)")
        k, m = int(match.group(1)), int(match.group(2))
        if k < 1 or m < 1 or k + m > 255:
            raise ConfigError(f"EC shape {k}+{m}: need k >= 1, m >= 1 and k + m <= 255")
        return cls(k, m)

    def __str__(self) -> str:
        return f"{self.k}+{self.m}"


@dataclass(frozen=True)
class Group:
    """One EC group: its index, its members (global node indices, in order) and its shape."""

    index: int
    members: tuple[int, ...]
    m: int

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def k(self) -> int:
        return self.size - self.m

    def position(self, node: int) -> int:
        """Index of `node` inside this group."""
        return self.members.index(node)


def plan_groups(nodes: int, shape: ECShape) -> list[Group]:
    """Split nodes 0..nodes-1 into groups that each tolerate `shape.m` losses."""
    g = shape.k + shape.m
    if nodes <= shape.m:
        raise ConfigError(f"{nodes} node(s) cannot tolerate {shape.m} losses: need more than m nodes")
    count = max(1, nodes // g)
    base, extra = divmod(nodes, count)
    groups, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        groups.append(Group(i, tuple(range(start, start + size)), shape.m))
        start += size
    return groups


def group_of(node: int, groups: list[Group]) -> Group:
    for group in groups:
        if node in group.members:
            return group
    raise ConfigError(f"node {node} is in no group")


@dataclass(frozen=True)
class Rotation:
    """Rotation r of a group: who contributes which data chunk, and who holds which parity."""

    r: int
    parity: tuple[int, ...]           # group positions holding parity 0..m-1 (codec index k + j)
    data: tuple[tuple[int, int], ...]  # (group position, that node's chunk number) for codec index 0..k-1

    @property
    def coordinator(self) -> int:
        """The first parity node: receives the k data chunks, encodes, forwards parity 1..m-1."""
        return self.parity[0]

    def codec_index(self, position: int) -> int:
        """Codec index (0..k+m-1) of `position`'s chunk in this rotation."""
        for i, (pos, _) in enumerate(self.data):
            if pos == position:
                return i
        return len(self.data) + self.parity.index(position)


def rotations(size: int, m: int) -> list[Rotation]:
    """The g rotations of a group of `size` nodes with `m` parity per rotation."""
    next_chunk = [0] * size
    result = []
    for r in range(size):
        parity = tuple((r + j) % size for j in range(m))
        data = []
        for pos in range(size):
            if pos not in parity:
                data.append((pos, next_chunk[pos]))
                next_chunk[pos] += 1
        result.append(Rotation(r, parity, tuple(data)))
    return result
