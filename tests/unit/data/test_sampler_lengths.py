"""ShardedBatches with length grouping (lengths=): less padding, same guarantees as without it."""

import pytest
import torch

from adamole_dist.data.sampler import GROUP_BATCHES, ShardedBatches

N = 1000
LENGTHS = torch.randint(1, 200, (N,), generator=torch.Generator().manual_seed(7)).tolist()


def padding_fraction(batches, lengths):
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / slots


def test_grouped_batches_pad_far_less():
    plain = ShardedBatches(N, 8, rank=0, world_size=1, seed=0).epoch_indices(0)
    grouped = ShardedBatches(N, 8, rank=0, world_size=1, seed=0, lengths=LENGTHS).epoch_indices(0)
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # same examples
    assert padding_fraction(plain, LENGTHS) > 0.3
    assert padding_fraction(grouped, LENGTHS) < padding_fraction(plain, LENGTHS) / 4


def test_grouped_batch_order_is_shuffled_not_sorted():
    grouped = ShardedBatches(N, 4, rank=0, world_size=1, seed=0, lengths=LENGTHS).epoch_indices(0)
    longest = [max(LENGTHS[i] for i in b) for b in grouped[:GROUP_BATCHES]]
    assert longest != sorted(longest, reverse=True)


def test_grouping_is_deterministic_and_changes_by_epoch():
    sb = ShardedBatches(N, 4, rank=1, world_size=2, seed=3, lengths=LENGTHS)
    assert sb.epoch_indices(0) == ShardedBatches(N, 4, rank=1, world_size=2, seed=3, lengths=LENGTHS).epoch_indices(0)
    assert sb.epoch_indices(1) != sb.epoch_indices(0)


@pytest.mark.parametrize("world", [2, 4])
def test_grouped_step_sees_the_same_examples_whatever_the_world_size(world):
    one = ShardedBatches(N, 8, rank=0, world_size=1, seed=3, lengths=LENGTHS).epoch_indices(0)
    split = [ShardedBatches(N, 8 // world, rank=r, world_size=world, seed=3, lengths=LENGTHS).epoch_indices(0)
             for r in range(world)]
    assert all(len(s) == len(one) == N // 8 for s in split)
    for b, batch in enumerate(one):
        assert [i for r in range(world) for i in split[r][b]] == batch


def test_grouped_ranks_are_disjoint():
    shards = [ShardedBatches(103, 4, rank=r, world_size=3, seed=5, lengths=LENGTHS[:103]).epoch_indices(0)
              for r in range(3)]
    flat = [i for s in shards for b in s for i in b]
    assert all(len(s) == 8 for s in shards) and len(flat) == len(set(flat)) == 96


def test_grouped_iterate_resumes_exactly():
    sb = ShardedBatches(40, 4, rank=0, world_size=1, seed=1, lengths=LENGTHS[:40])
    full = sb.iterate(0, 0)
    first = [next(full) for _ in range(25)]
    resumed = sb.iterate(1, 3)
    assert [next(resumed) for _ in range(12)] == first[13:25]


def test_lengths_must_match_the_examples():
    with pytest.raises(ValueError, match="lengths has 3 entries for 4 examples"):
        ShardedBatches(4, 2, rank=0, world_size=1, seed=0, lengths=[1, 2, 3])
