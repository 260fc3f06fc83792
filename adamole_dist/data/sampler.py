"""Deterministic, resumable data order: a seeded permutation per epoch, cut into optimizer steps.

An epoch's permutation is cut into steps of G = W * m * k examples (W ranks, m examples per rank
per micro batch, k accumulation steps; the tail short of a whole step is dropped). Micro batch a
of step s is ``perm[s * G + a * W * m : s * G + (a + 1) * W * m]`` and rank r takes its r-th slice
of m. So the examples of a step depend on the global batch G only, not on how it is split: W ranks
with m examples see, rank-major, exactly what one process with W * m examples sees (the
equivalence tests rely on it, and capacity over an EP group orders tokens rank-major too), and a
run resumed at another world size with the same G (train/elastic.py) sees step s's examples --
even in the same blocks of m, block a * W + r. Every rank gets the same number of micro batches
per epoch, so ranks never disagree on how many collective steps an epoch has. The position
(epoch, micro batch) is all that a checkpoint needs to continue the exact same order.
Checkpoints from before steps were the unit (no "data_order" in their state) continue with
``accumulation=1``: the epoch cut into global micro batches, a step's micro batches running on
across an epoch's end, as they were written.

Length grouping (``lengths=``, for padded batches of variable-length examples): the epoch's
permutation (whole global batches of it) is cut into groups of ``GROUP_BATCHES`` global batches;
each group is sorted by length (longest first, ties in permutation order) and cut into global
batches, so a micro batch holds examples of similar length and little padding; then the epoch's
global batches are shuffled (seeded), so lengths do not drift over an epoch. All of it depends on
the global batch size only, and rank r still takes the r-th slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_BATCHES = 32  # steps (global batches) sorted together: more = less padding, less mixing of lengths


class ShardedBatches:
    def __init__(self, num_examples: int, micro_batch_size: int, *, rank: int, world_size: int, seed: int,
                 lengths: Sequence[int] | None = None, accumulation: int = 1) -> None:
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_examples} examples")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accumulation = accumulation
        self.lengths = None if lengths is None else torch.as_tensor(list(lengths), dtype=torch.long)
        self.global_batch = micro_batch_size * world_size * accumulation
        self.batches_per_epoch = (num_examples // self.global_batch) * accumulation
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples are fewer than micro_batch_size ({micro_batch_size}) x "
                f"world size ({world_size})" + (f" x gradient_accumulation_steps ({accumulation})"
                                                if accumulation > 1 else "") + ": not one step's batch per rank"
            )

    def regrouped(self, accumulation: int) -> "ShardedBatches":
        """The same examples and seed cut into steps of ``accumulation`` micro batches."""
        return ShardedBatches(self.num_examples, self.micro_batch_size, rank=self.rank, world_size=self.world_size,
                              seed=self.seed, lengths=self.lengths, accumulation=accumulation)

    def epoch_indices(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_examples, generator=g)
        m, global_batch = self.micro_batch_size, self.micro_batch_size * self.world_size
        if self.lengths is not None:
            perm = self._grouped_by_length(perm[: self.batches_per_epoch * global_batch], self.global_batch, g)
        perm = perm.tolist()
        return [perm[b * global_batch + self.rank * m : b * global_batch + (self.rank + 1) * m]
                for b in range(self.batches_per_epoch)]

    def _grouped_by_length(self, perm: torch.Tensor, global_batch: int, g: torch.Generator) -> torch.Tensor:
        """``perm`` (whole steps of ``global_batch``) regrouped so each step holds similar lengths."""
        group = GROUP_BATCHES * global_batch
        parts = []
        for start in range(0, len(perm), group):
            chunk = perm[start:start + group]
            parts.append(chunk[torch.sort(-self.lengths[chunk], stable=True).indices])
        global_batches = torch.cat(parts).view(-1, global_batch)
        return global_batches[torch.randperm(len(global_batches), generator=g)].reshape(-1)

    def iterate(self, epoch: int, start_batch: int):
        """Yield (epoch, batch_index, indices) forever, starting at (epoch, start_batch)."""
        while True:
            batches = self.epoch_indices(epoch)
            for b in range(start_batch, len(batches)):
                yield epoch, b, batches[b]
            epoch, start_batch = epoch + 1, 0
