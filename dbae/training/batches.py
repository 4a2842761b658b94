"""Batches as a pure function of (seed, step), so a resumed run sees exactly the same data."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import torch
from torch.utils.data import Sampler


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct 63-bit seed for every (seed, step, stream)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


class StepBatchSampler(Sampler[list[int]]):
    """Yields the index lists of steps ``start_step .. end_step - 1``.

    The data is walked epoch by epoch, each epoch a fresh permutation seeded by
    (seed, epoch) (as DistributedSampler's ``set_epoch`` seeding, but with no state to
    set); the global batch of a step depends only on (seed, step, batch size).

    With ``world_size`` ranks each yields its contiguous share of every global batch
    (rank r: positions ``r*b .. (r+1)*b - 1``, ``b = batch_size / world_size``), so the
    ranks together see exactly the batch a single process would.
    """

    def __init__(
        self, length: int, batch_size: int, seed: int, start_step: int, end_step: int,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if length < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        if batch_size % world_size or not (0 <= rank < world_size):
            raise ValueError(f"batch {batch_size} cannot be split evenly into {world_size} ranks (rank {rank})")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size = rank, world_size

    @lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, stream=1))
        return torch.randperm(self.length, generator=g)

    def indices(self, step: int) -> list[int]:
        first = step * self.batch_size
        out = []
        for q in range(first, first + self.batch_size):
            epoch, pos = divmod(q, self.length)
            out.append(int(self._permutation(epoch)[pos]))
        return out

    def rank_indices(self, step: int) -> list[int]:
        """This rank's share of the global batch of ``step``."""
        share = self.batch_size // self.world_size
        return self.indices(step)[self.rank * share : (self.rank + 1) * share]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.rank_indices(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)
