"""The expert bank (stacked LoRA experts) and the two ways to compute its weighted delta.

Tensor-name suffixes (T tokens, N experts, ...): adamole_dist/glossary.py.

Expert i computes scaling * B_i A_i x with A_i: R x D and B_i: O x R. The bank stores
``lora_A`` as A_NRD and ``lora_B`` as B_NRO (each B_i transposed) so both compute paths
reshape without copies. Saved files use the usual LoRA orientation (A: R x D, B: O x R).

* dense:   h_TK = x A_cat^T ; scale each R-block by the token's weight ; y = h B_cat.
           Work ~ T*K*(D+O); no gather, no Python loop. Fastest when K is small.
* grouped: sort the P selected pairs by expert, one grouped matmul in and one out.
           Work ~ P*R*(D+O) plus a gather/scatter of P*(D+O) values. Wins when few of
           many/large experts fire.

``choose_compute_path`` encodes the rule; benchmarks/layer/layer_bench.py --sweep-paths backs it.
For the paper's shapes (N=8, R=4) the dense path is always chosen.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
import torch.nn as nn

# The dense path's cost grows with N*R, the grouped path's with the active (token, expert) pairs
# (gathering D and scattering O values per pair dominates; the matmuls are small). Measured by
# benchmarks/layer/layer_bench.py --sweep-paths (benchmarks/README.md, "Measurements behind the
# defaults"): grouped wins when avg_active * 140 < N * R, e.g. N*R = 256 below ~1.8 active
# experts per token.
GROUPED_PAIR_COST = 140  # one active pair costs about as much as 140 dense rank columns
DENSE_ONLY_TOTAL_RANK = 128  # at N*R <= 128 grouped would need < 1 active expert per token


_grouped_mm: Any = getattr(torch, "_grouped_mm", None)  # private in torch (no public name yet); None if absent


def choose_compute_path(num_experts: int, rank: int, avg_active_experts: float) -> str:
    """Dense unless the pairs skipped by sparsity outweigh the per-pair gather/scatter cost."""
    if avg_active_experts * GROUPED_PAIR_COST < num_experts * rank:
        return "grouped"
    return "dense"


def dense_expert_delta(
    x_TD: torch.Tensor, weights_TN: torch.Tensor, A_NRD: torch.Tensor, B_NRO: torch.Tensor, scaling: float,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i w_i * scaling * B_i A_i x for every token, computing all experts and masking by weight;
    plus ``add_to`` (T x O) when given, inside the second matmul (one pass instead of a sum after it)."""
    N, R, D = A_NRD.shape
    return dense_delta_from_projection(x_TD @ A_NRD.reshape(N * R, D).t(), weights_TN, B_NRO, scaling, add_to)


def dense_delta_from_projection(
    h_TK: torch.Tensor, weights_TN: torch.Tensor, B_NRO: torch.Tensor, scaling: float,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense path after its first matmul: ``h_TK`` = x A_cat^T (a column slice of a wider product
    is fine: the rank blocks are split by a view)."""
    N, R, _ = B_NRO.shape
    T = h_TK.shape[0]
    w_TN1 = (weights_TN * scaling).to(h_TK.dtype).unsqueeze(-1)
    h_TK = (h_TK.view(T, N, R) * w_TN1).view(T, N * R)
    if add_to is not None:
        return torch.addmm(add_to, h_TK, B_NRO.reshape(N * R, -1))
    return h_TK @ B_NRO.reshape(N * R, -1)


@functools.lru_cache(maxsize=None)
def _grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs (forward and backward) for this device type and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
        _grouped_mm(x, w, offs=offs).mul(2.0).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_matmul(x_PI: torch.Tensor, w_NIF: torch.Tensor, counts_N: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group; group n (counts_N[n] rows) multiplies w_NIF[n]."""
    # The grouped kernel needs every row stride (forward and backward) to be a multiple of 16 bytes.
    aligned = all(n * x_PI.element_size() % 16 == 0 for n in (x_PI.shape[-1], w_NIF.shape[-1], w_NIF.shape[-2]))
    if aligned and _grouped_mm_supported(x_PI.device.type, x_PI.dtype):
        offs_N = counts_N.cumsum(0).to(torch.int32)
        return _grouped_mm(x_PI, w_NIF, offs=offs_N)
    # Fallback where no grouped kernel exists: one matmul per expert. Only reached on the
    # grouped path, i.e. for many/large experts where the loop overhead is amortised.
    chunks = torch.split(x_PI, counts_N.tolist())  # NOTE: device sync for the split sizes
    return torch.cat([c @ w_NIF[n] for n, c in enumerate(chunks)], dim=0)


def grouped_expert_delta(
    x_TD: torch.Tensor,
    weights_TN: torch.Tensor,
    mask_TN: torch.Tensor,
    A_NRD: torch.Tensor,
    B_NRO: torch.Tensor,
    scaling: float,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as dense_expert_delta, computing only the selected (token, expert) pairs."""
    T = x_TD.shape[0]
    N, R, D = A_NRD.shape
    O = B_NRO.shape[-1]
    # Pairs sorted by expert, then token: nonzero of the transposed mask gives exactly that order.
    expert_P, token_P = mask_TN.t().nonzero(as_tuple=True)
    counts_N = torch.bincount(expert_P, minlength=N)
    x_PD = x_TD.index_select(0, token_P)
    h_PR = grouped_matmul(x_PD, A_NRD.transpose(1, 2), counts_N)
    w_P1 = (weights_TN[token_P, expert_P] * scaling).to(h_PR.dtype).unsqueeze(-1)
    y_PO = grouped_matmul(h_PR * w_P1, B_NRO, counts_N)
    if add_to is not None:  # out of place: add_to may be needed elsewhere
        return add_to.index_add(0, token_P, y_PO)
    return torch.zeros(T, O, device=x_TD.device, dtype=y_PO.dtype).index_add_(0, token_P, y_PO)


class ExpertBank(nn.Module):
    """N LoRA experts of one adapted linear, stacked; holds experts [first_expert, first_expert + N).

    With expert parallelism each rank's bank holds a contiguous slice of the global experts;
    ``expert_ids`` are their global ids (used in checkpoints).
    """

    def __init__(
        self,
        num_experts: int,
        rank: int,
        in_features: int,
        out_features: int,
        scaling: float,
        *,
        first_expert: int = 0,
        total_experts: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = scaling
        self.first_expert = first_expert
        total = num_experts if total_experts is None else total_experts
        if not 0 <= first_expert <= total - num_experts:
            raise ValueError(f"experts [{first_expert}, {first_expert + num_experts}) do not fit in {total} experts")
        # Initialise all experts, keep this rank's slice: the same seed gives the same experts
        # whatever the expert-parallel layout (init-time loop only).
        A_full = torch.empty(total, rank, in_features, device=device, dtype=dtype)
        with torch.no_grad():
            for a_RD in A_full:  # kaiming-uniform(a=sqrt 5) per expert, as nn.Linear
                nn.init.kaiming_uniform_(a_RD, a=math.sqrt(5))
        self.lora_A = nn.Parameter(A_full[first_expert : first_expert + num_experts].clone())
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, out_features, device=device, dtype=dtype))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def expert_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_experts)

    def forward(self, x_TD: torch.Tensor, weights_TN: torch.Tensor | None = None, mask_TN: torch.Tensor | None = None,
                path: str = "dense", add_to: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted delta of this bank's experts; ``weights_TN`` columns are this bank's experts.
        ``add_to`` (T x O, the bank's dtype): added to the delta as it is written. No weights: plain LoRA
        (``lora_delta``), through this module call so that ZeRO-3's hooks gather the factors -- also in a
        compiled block, where dynamo reads parameters without DeepSpeed's fetch-on-access."""
        if weights_TN is None:
            return self.lora_delta(x_TD)
        A, B = self.lora_A, self.lora_B
        x_TD = x_TD.to(A.dtype)
        if path == "grouped":
            assert mask_TN is not None, "the grouped path needs the mask"
            return grouped_expert_delta(x_TD, weights_TN, mask_TN, A, B, self.scaling, add_to)
        return dense_expert_delta(x_TD, weights_TN, A, B, self.scaling, add_to)

    def a_rows(self) -> torch.Tensor:
        """Every expert's A as the rows of one K x D matrix (K = N * R): the dense path's first operand."""
        N, R, D = self.lora_A.shape
        return self.lora_A.reshape(N * R, D)

    def lora_delta(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Plain LoRA (a single expert with weight 1): scaling * B A x, two matmuls."""
        A_RD, B_RO = self.lora_A[0], self.lora_B[0]
        return ((x_TD.to(A_RD.dtype) @ A_RD.t()) * self.scaling) @ B_RO


# -- expert tensors in files -------------------------------------------------------------------
# Adapter files and checkpoints key each expert by its global id, so a file written under one
# expert-parallel layout loads under any other, and store it in nn.Linear / PEFT orientation:
#   <module>.experts.<global id>.lora_A   (R x D)   = bank.lora_A[i]
#   <module>.experts.<global id>.lora_B   (O x R)   = bank.lora_B[i].T  (the bank keeps R x O rows for x A^T B)
# A checkpoint's AdamW moments sit under the parameter's key + ".exp_avg" / ".exp_avg_sq", same orientation.
# file_orientation converts either way.
EXPERT_TENSORS = ("lora_A", "lora_B")


def expert_key(module: str, expert_id: int, tensor: str) -> str:
    return f"{module}.experts.{expert_id}.{tensor}"


# expert_key's inverse: groups layer, gid, tensor
EXPERT_KEY_RE = re.compile(r"^(?P<layer>.+)\.experts\.(?P<gid>\d+)\.(?P<tensor>lora_A|lora_B)$")


def file_orientation(tensor: str, t: torch.Tensor) -> torch.Tensor:
    """One expert's bank row (or its AdamW moment) as stored in files, and back: lora_B is
    transposed, which is its own inverse; lora_A is stored as it is."""
    return t.t() if tensor == "lora_B" else t
