"""The one training step (adamole_dist/train/step.py) that the trainer, the step benchmark and the
accuracy grid all call: its loss is task + coeff x aux, it accumulates like DeepSpeed through an
engine-shaped object, and its phase clock sees every phase."""

from __future__ import annotations

import torch

from adamole_dist import AdapterConfig, inject_adapters
from adamole_dist.train.step import PhaseClock, micro_batch_loss, train_step
from benchmarks.common.local_engine import LocalEngine
from tests.conftest import make_tiny_llama


class SquareTask:
    """Stands in for a data task: any differentiable loss of the model's output will do here."""

    def loss(self, model, batch):
        return model(**batch).logits.float().pow(2).mean()


def batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 6), generator=g),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)} for _ in range(n)]


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0, aux_loss_coeff=0.5)
    adapters = inject_adapters(make_tiny_llama(seed), cfg)
    for bank in adapters.expert_banks.values():  # non-zero B: experts contribute to the output
        torch.nn.init.normal_(bank.lora_B, std=0.1)
    adapters.train(True)
    return adapters


def test_step_equals_the_written_out_definition_with_accumulation_and_clipping():
    micro = batches(4)
    ours = build()
    params = ours.engine_parameters() + ours.expert_parameters()
    engine = LocalEngine(ours.model, params, lr=1e-2, weight_decay=0.0, max_grad_norm=1e-3, lr_lambda=lambda s: 1.0,
                         gradient_accumulation_steps=2)
    metrics = [train_step(engine, SquareTask(), ours, None, micro[i:i + 2], 0.5) for i in (0, 2)]

    ref = build()
    ref_params = ref.engine_parameters() + ref.expert_parameters()
    opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    for i in (0, 2):
        task_losses, aux_losses = [], []
        for batch in micro[i:i + 2]:
            task = ref.model(**batch).logits.float().pow(2).mean()
            aux = ref.aux_loss()
            ((task + 0.5 * aux) / 2).backward()
            task_losses.append(task.item())
            aux_losses.append(aux.item())
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1e-3)
        opt.step()
        opt.zero_grad()
        got = metrics[i // 2]
        assert abs(got["task_loss"] - sum(task_losses) / 2) < 1e-6
        assert abs(got["aux_loss"] - sum(aux_losses) / 2) < 1e-6 and got["aux_loss"] > 0
        assert abs(got["grad_norm"] - norm.item()) < 1e-6 and norm.item() > 1e-3  # clipping was active
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_micro_batch_loss_without_adapters_or_aux_is_the_task_loss():
    model = make_tiny_llama()
    batch = batches(1)[0]
    total, task, aux = micro_batch_loss(model, SquareTask(), None, batch, 0.5)
    assert aux is None and torch.equal(total, task)


def test_phase_clock_times_every_phase_of_the_step():
    adapters = build()
    engine = LocalEngine(adapters.model, adapters.engine_parameters() + adapters.expert_parameters(), lr=1e-3,
                         weight_decay=0.0, max_grad_norm=1.0, lr_lambda=lambda s: 1.0)
    clock = PhaseClock()
    train_step(engine, SquareTask(), adapters, None, batches(1), 0.5, clock)
    assert set(clock.seconds) == {"forward", "backward", "optimizer"}
    assert all(v > 0 for v in clock.seconds.values())
    clock.reset()
    assert clock.seconds == {}
