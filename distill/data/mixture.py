"""Scheduled data mixtures: each training batch draws its rows from named sources with
proportions that follow a schedule over optimizer steps (e.g. general -> domain text, or a
labelled set -> an unlabelled transfer set).

Determinism: for global micro-batch m, the source of each of the `micro_batch_size * world_size`
rows is drawn from a generator seeded by (seed, m), the same on every rank; each source is read
in a seeded permutation, re-shuffled each time it is used up. Rank r takes its slice of the global
batch. Everything is a function of m, so a resumed run replays the counts up to its step (draws
only, no data) and continues with exactly the same batches.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Sequence

import torch
from torch.utils.data import Sampler


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:  # a simple, stable mix of the keys into one 63-bit seed
        seed = (seed * 1_000_003 + int(key) + 1) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


class MixtureBatchSampler(Sampler[List[int]]):
    """Yields this rank's micro-batches of dataset indices, without end.

    `source_rows[s]` lists the dataset indices of source s; `proportions(step)` gives the
    scheduled proportions (any non-negative weights) at an optimizer step."""

    def __init__(self, source_rows: Sequence[Sequence[int]], proportions: Callable[[int], Sequence[float]],
                 micro_batch_size: int, gradient_accumulation_steps: int, world_size: int, rank: int, seed: int):
        if any(len(rows) == 0 for rows in source_rows):
            raise ValueError("every mixture source needs at least one row")
        self.source_rows = [torch.as_tensor(list(rows), dtype=torch.long) for rows in source_rows]
        self.proportions = proportions
        self.micro_batch_size, self.accumulation = micro_batch_size, gradient_accumulation_steps
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.start_micro_step = 0

    def step_of(self, micro_step: int) -> int:
        return micro_step // self.accumulation

    def draw_sources(self, micro_step: int) -> torch.Tensor:
        """Source id of every row of the global micro-batch (identical on all ranks)."""
        weights = torch.tensor(list(self.proportions(self.step_of(micro_step))), dtype=torch.float64)
        count = self.micro_batch_size * self.world_size
        return torch.multinomial(weights / weights.sum(), count, replacement=True, generator=_generator(self.seed, micro_step))

    def _order(self, source: int, cycle: int) -> torch.Tensor:
        rows = self.source_rows[source]
        return rows[torch.randperm(len(rows), generator=_generator(self.seed, 7919, source, cycle))]

    def __iter__(self) -> Iterator[List[int]]:
        sources = len(self.source_rows)
        consumed = [0] * sources
        for micro_step in range(self.start_micro_step):  # replay the counts only
            drawn = torch.bincount(self.draw_sources(micro_step), minlength=sources)
            consumed = [c + int(d) for c, d in zip(consumed, drawn)]
        orders: Dict[int, tuple] = {}  # source -> (cycle, permutation): one shuffle per pass over a source
        micro_step = self.start_micro_step
        while True:
            drawn = self.draw_sources(micro_step)
            batch = []
            for source in drawn.tolist():
                cycle, position = divmod(consumed[source], len(self.source_rows[source]))
                if orders.get(source, (None,))[0] != cycle:
                    orders[source] = (cycle, self._order(source, cycle))
                batch.append(int(orders[source][1][position]))
                consumed[source] += 1
            start = self.rank * self.micro_batch_size
            yield batch[start:start + self.micro_batch_size]
            micro_step += 1

    def __len__(self) -> int:  # without end; DataLoader only needs a number for its own bookkeeping
        return 2 ** 31 - 1
