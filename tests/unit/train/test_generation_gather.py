"""The evaluation's generation gathers the whole model once where it fits, and layer by layer where it does not
(a decision every rank takes together)."""

import contextlib

import torch

from adamole_dist.train import generation_gather as gg


def partitioned(numel: int, dtype=torch.bfloat16) -> torch.nn.Parameter:
    """A parameter as ZeRO-3 leaves it: an empty placeholder that knows its full size."""
    p = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    p.ds_id, p.ds_numel = 1, numel
    return p


class Model(torch.nn.Module):
    def __init__(self, *params):
        super().__init__()
        self.weights = torch.nn.ParameterList(params)


def test_the_bytes_of_a_whole_gather_count_only_partitioned_parameters():
    model = Model(partitioned(1000), partitioned(10, torch.float32), torch.nn.Parameter(torch.ones(7)))
    assert gg.gathered_bytes(list(model.parameters())) == 1000 * 2 + 10 * 4


def test_a_gpu_must_hold_the_copy_with_headroom_and_a_cpu_is_not_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(1100 * gg.HEADROOM), 10**12))
    assert gg.fits_here(1000, torch.device("cuda", 0))
    assert not gg.fits_here(1101, torch.device("cuda", 0))
    assert gg.fits_here(10**15, torch.device("cpu")) and gg.fits_here(0, torch.device("cuda", 0))


def test_every_rank_gathers_or_none_does(monkeypatch):
    model = Model(partitioned(1000))
    whole = contextlib.nullcontext("whole")
    monkeypatch.setattr(gg, "gathered", lambda params: whole)
    told = []
    monkeypatch.setattr(gg.collectives, "sum_over_ranks", lambda values: [0.0])  # fits on every rank
    assert gg.generation_gather(model, torch.device("cpu"), told.append) is whole and told == []
    monkeypatch.setattr(gg.collectives, "sum_over_ranks", lambda values: [1.0])  # one rank lacks the memory
    context = gg.generation_gather(model, torch.device("cpu"), told.append)
    assert context is not whole and told and "layer by layer" in told[0] and "1 rank(s)" in told[0]
    assert gg.generation_gather(Model(torch.nn.Parameter(torch.ones(3))), torch.device("cpu")) is not whole
