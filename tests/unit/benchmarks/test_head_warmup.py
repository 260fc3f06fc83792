"""The accuracy benchmark's head warm-up: extracted features reproduce the model's scores, the fit
touches only the head and draws no random numbers, the validation curve holds data out."""

import pytest
import torch

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.pooling import apply_pooling
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.data import Example
from adamole_dist.data.task_factory import build_task
from benchmarks.accuracy.head_warmup import extract_head_inputs, fit_head, head_accuracy, head_scores, validation_curve
from tests.conftest import make_tiny_bert


def tiny_bert(vocab_size: int, pooling: str):
    return apply_pooling(make_tiny_bert(vocab_size=vocab_size), pooling)


def examples() -> list[Example]:
    # two- and three-choice questions in one batch: padded choices must stay out of the scores
    yes_no = [Example(f"is {w} a colour?", ["true", "false"], "", [" true", " false"], int(i % 3 == 0), "")
              for i, w in enumerate(["red", "blue", "table", "green", "chair", "pink", "lamp", "grey"])]
    return yes_no + [Example("Which is a fruit?", ["hammer", "apple", "truck"], "", [" A", " B", " C"], 1, "")]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_features_reproduce_the_models_scores(minilm_tokenizer, pooling):
    model = tiny_bert(minilm_tokenizer.vocab_size, pooling)
    task = build_task("seq_cls", minilm_tokenizer, 32, device="cpu")
    data = examples()
    inputs = extract_head_inputs(model, task, data, batch_size=4)
    assert inputs.feats.shape == (len(data), 3, 32) and inputs.choice_mask.sum() == 2 * 8 + 3
    with torch.no_grad():
        direct = task.scores(model, task.collate(data))
        from_features = head_scores(model, inputs.feats, inputs.choice_mask)
    torch.testing.assert_close(from_features, direct)
    assert inputs.labels.tolist() == [ex.label for ex in data]


def test_fit_changes_only_the_head_lowers_the_loss_and_draws_no_random_numbers(minilm_tokenizer):
    model = tiny_bert(minilm_tokenizer.vocab_size, "mean")
    inject_adapters(model, AdapterConfig(method="adamole", num_experts=2, rank=2, target_modules=["query", "value"]),
                    trainable_modules=["pooler", "classifier"])
    task = build_task("seq_cls", minilm_tokenizer, 32, device="cpu")
    inputs = extract_head_inputs(model, task, examples(), batch_size=16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first_loss = fit_head(model, inputs, epochs=1, lr=1e-2)
    rng = torch.get_rng_state()
    last_loss = fit_head(model, inputs, epochs=300, lr=1e-2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert last_loss < first_loss and head_accuracy(model, inputs) == 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert all(p.grad is None for p in model.parameters())


def test_validation_curve_has_one_entry_per_seed_and_checkpoint(minilm_tokenizer):
    model = tiny_bert(minilm_tokenizer.vocab_size, "mean")
    task = build_task("seq_cls", minilm_tokenizer, 32, device="cpu")
    inputs = extract_head_inputs(model, task, examples() * 3, batch_size=16)
    curve = validation_curve(lambda: tiny_bert(minilm_tokenizer.vocab_size, "mean"), inputs, [0, 1], [1, 5], 1e-2,
                             fraction=0.3)
    assert sorted(curve) == [1, 5] and all(len(v) == 2 for v in curve.values())
    assert all(0.0 <= a <= 1.0 for v in curve.values() for a in v)
