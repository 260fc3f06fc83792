"""The cost model's dry run of the expert-parallel dispatcher (costmodel/dry_run.py): what it counts
as written, and that a change to the dispatcher reaches the prediction with no edit to the model."""

import pytest
import torch

from adamole_dist.costmodel import dry_run
from adamole_dist.costmodel.dry_run import WrittenBytes, dispatch_traffic
from adamole_dist.costmodel.placement import CommModel, ComputeModel, Workload, predict_expert_parallel
from adamole_dist.moe import permute


def test_written_bytes_counts_fresh_outputs_and_in_place_writes_but_not_views():
    x, index, rows = torch.randn(8, 4), torch.tensor([1, 3]), torch.ones(2, 4)
    with WrittenBytes() as counter:
        x.view(32), x.t(), x[2:4]  # views: nothing written
    assert counter.bytes == 0
    with WrittenBytes() as counter:
        x.clone()
    assert counter.bytes == 8 * 4 * 4
    with WrittenBytes() as counter:
        x.add_(1.0)
    assert counter.bytes == 8 * 4 * 4
    with WrittenBytes() as counter:  # in place into the destination: only the source's rows
        x.index_add_(0, index, rows)
    assert counter.bytes == 2 * 4 * 4
    with WrittenBytes() as counter:  # out of place: the destination's copy besides
        x.index_add(0, index, rows)
    assert counter.bytes == (8 + 2) * 4 * 4
    with WrittenBytes() as counter:
        torch.empty(1000)
    assert counter.bytes == 0


def test_the_backward_is_counted_and_the_transport_is_not():
    got = dispatch_traffic(1024, 64, 64, 8, 4, 4, 2.0)
    # rows gathered (forward) and their gradient index-added into a zero-filled x gradient (backward), the
    # deltas index-added into the own share (forward) and gathered back (backward): at least these
    rows = got.rows_sent * 64 * 4
    assert got.copy_bytes >= 4 * rows
    # and the token-sized ones (the combine's copy of the own share, x's zero-filled and summed gradients,
    # about one more), the routing columns (fp32, L=2 per row, six times) ... but not the loopback's
    # stand-in for the transport (a clone of every exchange's rows, 4 * rows more)
    assert got.copy_bytes < 4 * rows + 5 * 1024 * 64 * 4 + 6 * got.rows_sent * 2 * 4


def test_a_change_to_the_dispatcher_reaches_the_prediction_without_an_edit_to_the_model(monkeypatch):
    w = Workload(layers=[(256, 256)], num_experts=8, rank=4, tokens_per_rank=2048, avg_active=2.0, world_size=4,
                 act_bytes=4)
    comp = ComputeModel(copy_s_per_byte=1e-9)
    before = predict_expert_parallel(w, 4, CommModel(), comp)
    real_gather = permute.gather_rows

    def gather_and_copy_twice(x_TD, plan, every_token_once):
        return real_gather(x_TD, plan, every_token_once).clone()

    # the dispatcher imported gather_rows by name: patch it where it is used
    monkeypatch.setattr("adamole_dist.parallel.ep_dispatcher.gather_rows", gather_and_copy_twice)
    dry_run._dry_run.cache_clear()
    try:
        after = predict_expert_parallel(w, 4, CommModel(), comp)
    finally:
        dry_run._dry_run.cache_clear()
    extra = after.detail["copy_s"] - before.detail["copy_s"]
    # one more copy of the rows sent (and its backward passes the gradient through: nothing more)
    assert extra == pytest.approx(before.detail["rows_sent"] * 256 * 4 * comp.copy_s_per_byte, rel=0.01)
    assert after.detail["a2a_bytes_sent"] == before.detail["a2a_bytes_sent"]
