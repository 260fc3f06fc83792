"""Mean pooling for seq_cls heads: the value, padding invariance, names kept, bad input."""

import pytest
import torch

from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.pooling import MaskedMeanPooler, apply_pooling
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from tests.conftest import make_tiny_bert, make_tiny_llama


def test_mean_pooling_equals_manual_masked_mean():
    model = apply_pooling(make_tiny_bert(), "mean")
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        means = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])
        expected = model.classifier(torch.tanh(model.bert.pooler.dense(means)))
    torch.testing.assert_close(out.logits, expected)


def test_padding_does_not_change_the_mean_pooled_score():
    model = apply_pooling(make_tiny_bert(), "mean")
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
        padded = model(input_ids=torch.tensor([[5, 6, 7, 0, 0]]),
                       attention_mask=torch.tensor([[1, 1, 1, 0, 0]])).logits
        positional = model(torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])).logits
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(positional, alone)


def test_mean_pooling_differs_from_cls_and_keeps_parameter_names():
    cls_model, mean_model = make_tiny_bert(seed=3), apply_pooling(make_tiny_bert(seed=3), "mean")
    assert [n for n, _ in cls_model.named_parameters()] == [n for n, _ in mean_model.named_parameters()]
    ids, mask = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert not torch.allclose(cls_model(input_ids=ids, attention_mask=mask).logits,
                                  mean_model(input_ids=ids, attention_mask=mask).logits)
    adapters = inject_adapters(mean_model, AdapterConfig(method="adamole", num_experts=2, rank=2,
                                                         target_modules=["query", "value"]),
                               trainable_modules=["pooler", "classifier"])
    trainable = {n for n, p in mean_model.named_parameters() if p.requires_grad}
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= trainable
    assert adapters.trainable_modules


def test_cls_pooling_leaves_the_model_alone():
    model = make_tiny_bert()
    pooler = model.bert.pooler
    assert apply_pooling(model, "cls").bert.pooler is pooler


def test_bad_pooling_is_named():
    with pytest.raises(ConfigError, match=r"pooling \('max'\) must be one of cls, mean"):
        apply_pooling(make_tiny_bert(), "max")
    with pytest.raises(ConfigError, match="pooling 'mean' needs a BERT-style pooler"):
        apply_pooling(make_tiny_llama(), "mean")
