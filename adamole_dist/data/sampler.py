"""Deterministic, resumable data order: a seeded permutation per epoch, cut into global batches.

Global micro batch b of an epoch is ``perm[b * W * m : (b + 1) * W * m]`` (W ranks, m examples
per rank) and rank r takes its r-th slice of m. So the examples of a step depend on the global
batch size only, not on how it is split: W ranks with m examples see, rank-major, exactly what
one process with W * m examples sees (the equivalence tests rely on it, and capacity over an EP
group orders tokens rank-major too). Every rank gets the same number of micro batches per epoch
(the tail is dropped), so ranks never disagree on how many collective steps an epoch has. The
position (epoch, micro batch) is all that a checkpoint needs to continue the exact same order.
"""

from __future__ import annotations

import torch


class ShardedBatches:
    def __init__(self, num_examples: int, micro_batch_size: int, *, rank: int, world_size: int, seed: int) -> None:
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = (num_examples // world_size) // micro_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples are fewer than micro_batch_size ({micro_batch_size}) x "
                f"world size ({world_size}): not one batch per rank"
            )

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_examples, generator=g).tolist()
        m, global_batch = self.micro_batch_size, self.micro_batch_size * self.world_size
        return [perm[b * global_batch + self.rank * m : b * global_batch + (self.rank + 1) * m]
                for b in range(self.batches_per_epoch)]

    def iterate(self, epoch: int, start_batch: int):
        """Yield (epoch, batch_index, indices) forever, starting at (epoch, start_batch)."""
        while True:
            batches = self.epoch_indices(epoch)
            for b in range(start_batch, len(batches)):
                yield epoch, b, batches[b]
            epoch, start_batch = epoch + 1, 0
