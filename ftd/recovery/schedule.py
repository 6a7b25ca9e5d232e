"""CheckFree+ out-of-order pipelining: on alternate micro-batches the two first and the two last stages swap.

Stages 1 and n-2 thereby learn to stand in for stages 0 and n-1, so a lost edge stage can be
rebuilt as a copy of its neighbour (`rebuild_edge`). The order covers the stages' blocks only:
the embedding always comes before the first stage in the order and the de-embedding after the
last one. In a swapped micro-batch stage 1 runs first, so it needs the embedding (run it from the
first stage's module, or from stage 1's kept copy with its gradient added to the first stage's),
and likewise stage n-2 runs last and needs the de-embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftd.errors import CheckFreeError


@dataclass(frozen=True)
class SwapSchedule:
    """The stage order of each micro-batch: the identity on even ones, edges swapped on odd ones.

    For 6 stages: even micro-batches run 0 1 2 3 4 5, odd ones 1 0 2 3 5 4. Needs at least 4
    stages, so that the two swapped pairs are distinct.
    """

    num_stages: int

    def __post_init__(self) -> None:
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 4:
            raise CheckFreeError(f"CheckFree+ swapping needs at least 4 stages, got {self.num_stages!r}")

    def swapped(self, micro_batch: int) -> bool:
        """Whether `micro_batch` (counted from 0 over the whole run or within a step) runs out of order."""
        if micro_batch < 0:
            raise CheckFreeError(f"micro-batch index must be >= 0, got {micro_batch}")
        return micro_batch % 2 == 1

    def order(self, micro_batch: int) -> list[int]:
        """The stages in the order they process `micro_batch`."""
        stages = list(range(self.num_stages))
        if self.swapped(micro_batch):
            n = self.num_stages
            stages[0], stages[1] = 1, 0
            stages[n - 2], stages[n - 1] = n - 1, n - 2
        return stages

    def position(self, stage: int, micro_batch: int) -> int:
        """Where `stage` runs in `micro_batch`'s order (0 = first)."""
        self._check(stage)
        return self.order(micro_batch).index(stage)

    def upstream(self, stage: int, micro_batch: int) -> int | None:
        """The stage `stage` receives activations from for `micro_batch` (None: it runs first)."""
        pos = self.position(stage, micro_batch)
        return self.order(micro_batch)[pos - 1] if pos > 0 else None

    def downstream(self, stage: int, micro_batch: int) -> int | None:
        """The stage `stage` sends activations to for `micro_batch` (None: it runs last)."""
        pos = self.position(stage, micro_batch)
        order = self.order(micro_batch)
        return order[pos + 1] if pos + 1 < len(order) else None

    def _check(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise CheckFreeError(f"stage {stage} does not exist in a pipeline of {self.num_stages} stages")
