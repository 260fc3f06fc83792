"""The arithmetic of a resume at another world size (train/elastic.py) and the data order it relies
on (data/sampler.py): the global batch kept or refused with its numbers, the run's identity
checked, the data position carried over, and the examples of each step independent of the split."""

from __future__ import annotations

import pytest

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.train.elastic import (
    STEP_ORDER,
    BatchGeometry,
    batch_in_epoch,
    check_identity,
    keep_global_batch,
    plan_geometry,
)

SAVED = BatchGeometry(micro_batch_size=4, world_size=4, accumulation=2)  # global batch 32


@pytest.mark.parametrize("world, accumulation", [(4, 2), (2, 4), (1, 8), (8, 1)])
def test_accumulation_keeps_the_global_batch(world, accumulation):
    new = keep_global_batch(SAVED, BatchGeometry(4, world, 2), "accumulation")
    assert new == BatchGeometry(4, world, accumulation) and new.global_batch == 32


@pytest.mark.parametrize("world, micro", [(2, 8), (1, 16), (8, 2)])
def test_micro_batch_keeps_the_global_batch(world, micro):
    assert keep_global_batch(SAVED, BatchGeometry(4, world, 2), "micro_batch") == BatchGeometry(micro, world, 2)


def test_options_that_already_keep_it_are_taken_as_given_in_every_mode():
    for mode in ("accumulation", "micro_batch", "off"):
        assert keep_global_batch(SAVED, BatchGeometry(8, 2, 2), mode) == BatchGeometry(8, 2, 2)


@pytest.mark.parametrize("asked, mode, why", [
    (BatchGeometry(4, 3, 2), "accumulation", "32 is not a multiple of micro_batch_size x world size = 12"),
    (BatchGeometry(4, 16, 2), "accumulation", "32 is not a multiple of micro_batch_size x world size = 64"),
    (BatchGeometry(4, 3, 2), "micro_batch", "32 is not a multiple of gradient_accumulation_steps x world size = 6"),
    (BatchGeometry(4, 2, 2), "off", "--elastic off changes neither"),
])
def test_a_global_batch_no_integer_choice_keeps_is_refused_with_its_numbers(asked, mode, why):
    with pytest.raises(ConfigError) as e:
        keep_global_batch(SAVED, asked, mode)
    message = str(e.value)
    assert "global batch 32 (micro batch 4 x world 4 x accumulation 2)" in message
    assert str(asked) in message and f"--elastic {mode}" in message and why in message


@pytest.mark.parametrize("path, value", [("model", "other-model"), ("adapter.method", "mole_topk"),
                                         ("adapter.num_experts", 4), ("adapter.rank", 8)])
def test_what_shapes_the_trained_tensors_may_not_change(path, value):
    saved = TrainConfig().to_dict()
    now = TrainConfig().to_dict()
    section, _, key = path.rpartition(".")
    (now[section] if section else now)[key] = value
    check_identity(saved, saved, "ckpt")  # the same run passes
    with pytest.raises(ConfigError, match=rf"^--resume: checkpoint ckpt was trained with {path} "):
        check_identity(saved, now, "ckpt")


def state_of(cfg: TrainConfig, world: int, data_order: str | None = STEP_ORDER, batch: int = 6) -> dict:
    state = {"step": 3, "epoch": 0, "batch_in_epoch": batch, "world_size": world, "config": cfg.to_dict()}
    return state if data_order is None else {**state, "data_order": data_order}


def test_plan_changes_the_accumulation_and_says_so():
    written = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, ep_size=2)
    plan = plan_geometry(TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2), state_of(written, 4), 2, "c")
    assert (plan.cfg.micro_batch_size, plan.cfg.gradient_accumulation_steps) == (4, 4) and not plan.legacy_order
    assert plan.note.startswith("--resume: micro batch 4 x world 4 x accumulation 2 -> micro batch 4 x world 2 x "
                                "accumulation 4 (ep_size 2 -> 1) keeps the global batch 32")
    same = plan_geometry(written, state_of(written, 4), 4, "c")
    assert same.note is None and same.cfg == written
    auto = plan_geometry(TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, ep_size=0),
                         state_of(written, 4), 2, "c")
    assert "(ep_size 2 -> auto)" in auto.note  # 0 is how the config holds --ep_size auto


def test_plan_names_what_depends_on_the_layout():
    adapter = dict(capacity_factor=1.0, aux_loss_scope="global", aux_loss_coeff=1e-2)
    written = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, adapter=adapter)
    note = plan_geometry(written, state_of(written, 4), 2, "c").note
    assert "capacity is counted per EP group" in note and "global aux loss" in note


def test_a_checkpoint_from_before_world_independent_ones_resumes_only_as_written():
    written = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="world size 4 by a version without world-independent checkpoints; this "
                                          "run has 2: resume it with 4 ranks"):
        plan_geometry(written, state_of(written, 4, data_order=None), 2, "c")
    plan = plan_geometry(written, state_of(written, 4, data_order=None), 4, "c")
    assert plan.legacy_order and plan.cfg == written
    with pytest.raises(ConfigError, match="resume it with the same micro_batch_size"):
        plan_geometry(TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2),
                      state_of(written, 4, data_order=None), 4, "c")


def test_the_data_position_is_carried_over_in_steps():
    written = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2)
    assert batch_in_epoch(state_of(written, 4, batch=6), 4) == 12  # 3 steps into the epoch
    assert batch_in_epoch(state_of(written, 4, batch=6), 1) == 3


def step_sets(n: int, micro: int, world: int, accumulation: int, lengths=None) -> list[list[set[int]]]:
    """Per epoch step: the blocks of ``micro`` examples of each micro batch and rank, in global block order."""
    per_rank = [ShardedBatches(n, micro, rank=r, world_size=world, seed=7, lengths=lengths,
                               accumulation=accumulation).epoch_indices(0) for r in range(world)]
    steps = len(per_rank[0]) // accumulation
    return [[set(per_rank[r][s * accumulation + a]) for a in range(accumulation) for r in range(world)]
            for s in range(steps)]


@pytest.mark.parametrize("lengths", [None, [(i * 37) % 23 + 1 for i in range(70)]], ids=["plain", "by_length"])
def test_each_step_holds_the_same_blocks_of_examples_at_any_world_size(lengths):
    """Global batch 16 at 70 examples: 4 steps per epoch (the tail of 6 dropped), whatever the split; not
    a whole number of steps of micro batches (70 // 8 = 8 micro batches at world 2 and accumulation 1)."""
    reference = step_sets(70, 2, 4, 2, lengths)
    assert len(reference) == 4
    for world, accumulation in ((2, 4), (1, 8), (8, 1)):
        assert step_sets(70, 2, world, accumulation, lengths) == reference, (world, accumulation)
    regrouped = ShardedBatches(70, 2, rank=0, world_size=1, seed=7, accumulation=8).regrouped(1)
    assert regrouped.batches_per_epoch == 35  # the order before steps were the unit: micro batches
