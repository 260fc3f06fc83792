"""train/compile.py's CompileReport: what it reads of torch._dynamo's guard failures (pure unit: the failures
are planted; tests/integration/test_compile.py compiles real blocks)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from adamole_dist.train.compile import CompileReport


def planted_block(monkeypatch, reasons: list[str]) -> nn.Module:
    from torch._dynamo.utils import guard_failures

    def forward(x):
        return x

    block = nn.Identity()
    block.forward = forward
    forward.compiled_code = forward.__code__  # as compiled_when_training marks it
    monkeypatch.setitem(guard_failures, forward.__code__, reasons)
    return block


def test_blocks_at_the_recompile_limit_are_reported_once_with_the_latest_reason(monkeypatch, caplog):
    limit = torch._dynamo.config.recompile_limit
    reasons = ["tensor 'args[0]' requires_grad mismatch"] + [
        f"kwargs['cache'].layers[{i}].is_initialized == False\nUser stack trace: ..." for i in range(1, limit)]
    report = CompileReport([planted_block(monkeypatch, reasons)])
    with caplog.at_level(logging.WARNING, logger="adamole_dist.train.compile"):
        first, second = report.metrics(), report.metrics()
    assert first["block_recompiles"] == second["block_recompiles"] == limit
    assert first["block_size_recompiles"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"recompile_limit {limit}" in warnings[0] and f"layers[{limit - 1}].is_initialized" in warnings[0]
    assert "User stack trace" not in warnings[0]  # the reason's first line only


def test_blocks_below_the_limit_are_not_warned_about(monkeypatch, caplog):
    report = CompileReport([planted_block(monkeypatch, ["tensor 'args[0]' requires_grad mismatch"])])
    with caplog.at_level(logging.WARNING, logger="adamole_dist.train.compile"):
        assert report.metrics()["block_recompiles"] == 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
