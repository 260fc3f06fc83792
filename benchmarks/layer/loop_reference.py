"""A per-expert Python-loop AdaMoLE layer shaped like the public reference implementation.

Written here for comparison only: one nn.Linear pair and one dropout per expert, a gate and
a threshold Linear, and a loop that indexes the tokens of each expert. Like the public code,
expert 0 runs on every token just to get the output's shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoopExpert(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LoopAdaMoLE(nn.Module):
    """Adapter delta only (no base layer), as timed by layer_bench.py."""

    def __init__(self, d_in: int, d_out: int, num_experts: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.experts = nn.ModuleList(LoopExpert(d_in, d_out, rank, alpha, dropout) for _ in range(num_experts))
        self.router = nn.Linear(d_in, num_experts, bias=False)
        self.threshold_fn = nn.Linear(d_in, 1)
        self.max_threshold = 1.0 / num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(x), dim=-1)
        tau = torch.sigmoid(self.threshold_fn(x)) * self.max_threshold
        adapted = probs - tau
        selected = (adapted >= 0).to(x.dtype)
        weights = adapted * selected
        sums = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
        out = torch.zeros_like(self.experts[0](x))
        for i, expert in enumerate(self.experts):
            idx = torch.where(selected[:, i])[0]
            if len(idx) > 0:
                out[idx] += weights[idx, i, None] * expert(x[idx])
        return out
