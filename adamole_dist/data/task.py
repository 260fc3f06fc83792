"""The task interface: how examples become batches, losses and predictions (``Task``), and the padding
helpers every task shares. The task types are data/choice_tasks.py (multiple choice: ``causal_lm``,
``seq_cls``) and data/sft_task.py (free-form data); data/task_factory.py builds the one a run needs.

Models are always called with keyword arguments, ``attention_mask=`` included: the model may be
a DeepSpeed engine, and the adapters' forward hook reads the mask to keep padding out of
routing. Every ``predict`` call is exactly one forward pass, so ranks that evaluate the same
number of batches run the same number of ZeRO-3 parameter gathers.

``collate`` / ``eval_batch`` return CPU tensors; ``loss`` / ``predict`` move them to the task's
device (the constructor's ``device``, else the device of the model's first parameter).

Every model call goes through :meth:`Task.forward`, which runs it under ``torch.autocast`` when the
task has an ``autocast`` dtype (``"bf16"``): matmuls in bf16, parameters, gradients, optimizer
states and the loss's softmax in fp32. The backward follows the forward's dtypes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from adamole_dist.config.training import AUTOCASTS
from adamole_dist.data.batching import hf_config
from adamole_dist.data.examples import IGNORE, Example

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}  # config.training.AUTOCASTS, auto resolved by the caller
assert set(AUTOCAST_DTYPES) == set(AUTOCASTS) - {"auto"}
# Sums host numbers over every rank in one collective (parallel/collectives.py's sum_over_ranks); data/
# cannot import parallel/, so a caller passes it in. In one process, the numbers themselves.
SumOverRanks = Callable[[list[float]], list[float]]


def one_process_sum(values: list[float]) -> list[float]:
    return [float(v) for v in values]


class LossHead(Protocol):
    """An LM head that computes the loss itself (base_model/chunked_loss.py's ChunkedHead; data/ sits
    beside base_model/ and cannot import it): inside ``loss_of``, the model's ``.logits`` are the loss."""

    def loss_of(self, targets: torch.Tensor, summed: bool = True) -> AbstractContextManager: ...


def builds_kv_cache(model) -> bool:
    """Whether ``model`` (or the model inside a DeepSpeed engine) builds a KV cache by default."""
    return bool(getattr(hf_config(model), "use_cache", False))


class Task:
    """Common interface; see the module docstring."""

    chunked_head: LossHead | None = None  # set by the run for causal LMs (train/builders.py)
    # A decoder's forward builds a KV cache unless told not to (its config's use_cache); a loss needs none. Under
    # --compile each layer's cache entry specialised the compiled block: a recompilation per layer, and the
    # blocks past torch._dynamo's recompile limit ran eagerly (train/compile.py).
    decoder = False

    def __init__(self, tokenizer, max_length: int, device: torch.device | str | None = None,
                 autocast: str = "none") -> None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast ({autocast!r}) must be one of {', '.join(AUTOCAST_DTYPES)}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else None
        self.autocast = autocast
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]

    def forward(self, model, **inputs):
        """``model(**inputs)``, under autocast when the task has an autocast dtype; a decoder without a KV cache
        unless ``inputs`` ask for one."""
        device = next(iter(inputs.values())).device
        if self.decoder and "use_cache" not in inputs and builds_kv_cache(model):
            inputs["use_cache"] = False
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return model(**inputs)

    def chunked_loss(self, model, b: dict, inputs: dict, summed: bool = True) -> torch.Tensor:
        """Through ``chunked_head``: the summed cross entropy of ``b``'s shifted labels (position t predicts
        label t+1), or (``summed=False``, no gradients) each position's [B, S-1]."""
        assert self.chunked_head is not None
        labels = b["labels"]
        targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE)], dim=1)
        with self.chunked_head.loss_of(targets, summed):
            loss = self.forward(model, **inputs).logits
        return loss if summed else loss[:, :-1]

    def device_for(self, model) -> torch.device:
        if self.device is not None:
            return self.device
        param = next(iter(model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def collate(self, examples: list[Example]) -> dict:
        """Training batch (CPU tensors)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Mean task loss of a ``collate`` batch."""
        raise NotImplementedError

    def eval_batch(self, examples: list[Example]) -> dict:
        """Evaluation inputs (CPU tensors and plain data)."""
        raise NotImplementedError

    def predict(self, model, batch: dict) -> torch.Tensor:
        """Predicted choice index per example: CPU LongTensor [B]."""
        raise NotImplementedError

    metrics = ("acc",)

    def prepare_step(self, micro_batches: list[dict], world_size: int,
                     sum_over_ranks: SumOverRanks | None = None) -> None:
        """Called once per optimizer step with its collated micro batches (SFT: the loss normaliser, summed
        over the ranks by ``sum_over_ranks``: a collective where one is given)."""

    def predictions(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Predicted choice indices by metric (``metrics``), from one forward: {"acc": [B], ...}."""
        return {"acc": self.predict(model, batch)}


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def mask_of(seqs: list[list[int]]) -> torch.Tensor:
    return pad_right([[1] * len(s) for s in seqs], 0)


def tail(ids: list[int], n: int) -> list[int]:
    """The last ``n`` ids: all of them when there are fewer, none for n <= 0 (``ids[-0:]`` would be
    all of them, and a negative start would keep only the last n - len(ids))."""
    return ids[max(len(ids) - n, 0):] if n > 0 else []
