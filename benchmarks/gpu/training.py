"""What gpu_check's training sections share: the ZeRO-3 engine a model trains in, a batch of random tokens
(shapes are what count), and the causal-LM losses of it, every position but the last a target, through
transformers' own head and loss (the full logits) or through the chunked head."""

from __future__ import annotations

import torch

from adamole_dist.config.deepspeed import build_ds_config
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.examples import IGNORE
from adamole_dist.train.builders import build_engine, build_expert_optimizer


def zero3_engine(model, params, expert_params, micro: int, info, cuda: bool):
    """(engine, expert optimizer): batch sizes, clipping and AdamW's hyperparameters from a TrainConfig
    (config/deepspeed.py, as in training); ZeRO-3 with DeepSpeed's own defaults, bf16 on a GPU, torch's AdamW."""
    cfg = TrainConfig(micro_batch_size=micro, gradient_accumulation_steps=1, max_grad_norm=1.0, lr=1e-4)
    base = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": cuda},
            "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    engine = build_engine(model, params, build_ds_config(cfg, info.world_size, base=base))
    return engine, build_expert_optimizer(expert_params, info.world_size, cfg)


def random_batch(vocab_size: int, micro: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab_size, (micro, seq), generator=g).to(device),
            "attention_mask": torch.ones(micro, seq, dtype=torch.long, device=device)}


class RandomTokensLM:
    """transformers' own head and loss: the full [tokens x vocabulary] logits."""

    def loss(self, model, batch):
        # no KV cache, as the trainer's tasks (data/task.py): under --compile it recompiles every block
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["input_ids"], use_cache=False).loss


class ChunkedRandomTokensLM:
    """The same loss through the chunked head (base_model/chunked_loss.py, the trainer's default)."""

    def __init__(self, head) -> None:
        self.head = head

    def loss(self, model, batch):
        ids = batch["input_ids"]
        targets = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), IGNORE)], dim=1)
        with self.head.loss_of(targets):
            total = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        return total / (ids.shape[0] * (ids.shape[1] - 1))
