"""--activation_offload's saved-tensor hooks: the round trip gives the same tensors and the same gradients, small
tensors and parameters stay as they are. On the CPU the copy is a plain one (no streams, no pinned memory): what is
tested is the pack/unpack logic, not a GPU's overlap."""

from __future__ import annotations

import torch

from adamole_dist.train.activation_offload import ActivationOffload, OnHost


def test_a_large_tensor_goes_to_a_host_copy_and_comes_back_equal():
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1024)
    t = torch.randn(64, 64)
    packed = offload.pack(t)
    assert isinstance(packed, OnHost)
    assert packed.host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # a copy, not the tensor
    back = offload.unpack(packed)
    torch.testing.assert_close(back, t, rtol=0, atol=0)
    assert offload.offloaded_bytes == t.numel() * 4


def test_small_tensors_and_parameters_are_kept_as_they_are():
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1024)
    small, weight = torch.randn(8), torch.nn.Parameter(torch.randn(64, 64))
    assert offload.pack(small) is small and offload.unpack(small) is small
    assert offload.pack(weight) is weight
    assert offload.pack(weight.t()) is not None and not isinstance(offload.pack(weight.t()), OnHost)  # a view of it
    assert offload.offloaded_bytes == 0


def test_tensors_off_the_runs_device_are_kept():
    offload = ActivationOffload(torch.device("meta"), min_bytes=1)  # a run on another device: CPU tensors stay
    t = torch.randn(64, 64)
    assert offload.pack(t) is t


def test_gradients_under_the_hooks_equal_the_plain_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    x = torch.randn(16, 32)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1024)
    with offload.hooks():
        loss = model(x).square().sum()
    loss.backward()
    assert offload.offloaded_bytes > 0  # the hidden activations went through the host copy
    for got, want in zip((p.grad for p in model.parameters()), plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_with_checkpointed_blocks_their_inputs_go_to_the_host_and_gradients_hold():
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU()) for _ in range(3))
    x = torch.randn(64, 32, requires_grad=True)

    def forward(h):
        for block in blocks:
            h = checkpoint(block, h, use_reentrant=False)  # as adapters/checkpointing.py checkpoints
        return h.square().sum()

    forward(x).backward()
    plain = [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad()
    offload = ActivationOffload(torch.device("cpu"), min_bytes=1024)
    with offload.hooks():
        loss = forward(x)
    assert offload.offloaded_bytes >= 3 * x.numel() * 4  # each block's input (the checkpoint keeps only those)
    loss.backward()
    for got, want in zip((p.grad for p in blocks.parameters()), plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
