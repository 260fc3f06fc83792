"""The quantized frozen base (base_model/quantize.py, --quantize_base) with bitsandbytes on the CPU:
which layers are quantized, the adapters of every method on a quantized layer, the options' checks,
the record an adapter keeps, and a short nf4 training that lowers the loss."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("bitsandbytes")

from adamole_dist.adapters.inject import adapt_linear, inject_adapters  # noqa: E402
from adamole_dist.base_model.quantize import QuantSpec, is_quantized, quantize_base, weight_bytes  # noqa: E402
from adamole_dist.config.adapter import METHODS, AdapterConfig  # noqa: E402
from adamole_dist.config.fields import ConfigError  # noqa: E402
from adamole_dist.config.training import TrainConfig  # noqa: E402
from adamole_dist.data.examples import IGNORE  # noqa: E402
from adamole_dist.data.sft_task import SFTTask  # noqa: E402
from adamole_dist.train.step import train_step  # noqa: E402
from benchmarks.common.local_engine import LocalEngine  # noqa: E402

SCHEMES = ("nf4", "fp4", "int8")


def tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", METHODS)
def test_an_adapted_quantized_layer_is_the_quantized_base_plus_the_adapter_delta(scheme, method):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    holder = torch.nn.Sequential(linear)
    quantize_base(holder, QuantSpec(scheme))
    base = holder[0]
    assert is_quantized(base) and base.weight.dtype in (torch.uint8, torch.int8)
    cfg = AdapterConfig(method=method, num_experts=4, rank=2, dropout=0.0, top_k=2)
    layer = adapt_linear(base, cfg).train()
    assert (layer.in_features, layer.out_features) == (64, 48)
    with torch.no_grad():  # B starts at zero: give the adapter a delta
        for p in (layer.experts if layer.lora is None else layer.lora).parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 5, 64)
    torch.manual_seed(1)  # the same draws for sira's gate dropout in both calls
    out = layer(x)
    base_out = base(x)
    torch.manual_seed(1)
    delta = layer.delta(x).view(base_out.shape)
    assert delta.abs().max() > 0.1  # the adapter contributes
    assert torch.equal(out, base_out + delta)
    error = (base_out - linear(x)).abs().max()  # quantized, not the fp32 layer
    assert 0 < error < 0.5
    out.sum().backward()  # the adapter trains through the quantized layer
    trained = [p for p in layer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.dtype == torch.float32 for p in trained)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_linear_layers_are_quantized_and_embeddings_norms_head_and_kept_modules_are_not(scheme):
    model = tiny_llama(tied=True)
    fp32_bytes = weight_bytes(model) - model.lm_head.weight.numel() * 4
    names = quantize_base(model, QuantSpec(scheme), keep=["layers.1.mlp.down_proj"])
    assert len(names) == 2 * 7 - 1
    assert all(is_quantized(model.get_submodule(n)) for n in names)
    assert not is_quantized(model.model.layers[1].mlp.down_proj)
    assert not is_quantized(model.lm_head) and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.norm.weight.dtype == torch.float32
    quantized_bytes = weight_bytes(model) - model.lm_head.weight.numel() * 4 - 64 * 128 * 4
    assert quantized_bytes <= 0.3 * (fp32_bytes - 64 * 128 * 4)  # the quantized layers' weights
    ids = torch.randint(0, 128, (2, 9))
    assert model(input_ids=ids).logits.shape == (2, 9, 128)


def test_injection_wraps_the_quantized_layers():
    model = tiny_llama()
    quantize_base(model, QuantSpec("nf4"))
    adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=4, rank=2))
    q = model.model.layers[0].self_attn.q_proj
    assert is_quantized(q.base_layer) and q.in_features == q.out_features == 64
    assert all(p.dtype == torch.float32 for p in adapters.engine_parameters() + adapters.expert_parameters())


def test_the_record_round_trips_and_a_bad_one_names_the_file():
    spec = QuantSpec("fp4", double_quant=False, compute_dtype="bf16")
    assert QuantSpec.from_record(spec.to_record()) == spec
    assert QuantSpec().to_record() is None and not QuantSpec.from_record(None).enabled
    with pytest.raises(ConfigError, match="adapter_config.json: quantization"):
        QuantSpec.from_record({"scheme": "int3"})


def test_options_are_checked_and_compile_is_refused():
    with pytest.raises(ConfigError, match="quantize_base"):
        TrainConfig(quantize_base="int4")
    with pytest.raises(ConfigError, match=r"quantize_base \(nf4\) is not supported with compile"):
        TrainConfig(quantize_base="nf4", compile=True)
    assert TrainConfig(quantize_base="nf4", ep_size=2, adapter=AdapterConfig(num_experts=4)).quantize_base == "nf4"


@pytest.mark.slow  # 30 bitsandbytes CPU steps (~30 s); the default suite's nf4 run through launch/train.py trains too
def test_a_short_nf4_training_lowers_the_loss():
    model = tiny_llama(tied=True)
    quantize_base(model, QuantSpec("nf4"))
    cfg = AdapterConfig(method="adamole", num_experts=4, rank=4, dropout=0.0)
    adapters = inject_adapters(model, cfg)
    adapters.train(True)
    task = SFTTask(SimpleNamespace(pad_token_id=0, eos_token_id=1), max_length=32, device="cpu")
    g = torch.Generator().manual_seed(3)
    examples = []
    for _ in range(8):
        ids = torch.randint(2, 128, (24,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]})
    batch = task.collate(examples)
    engine = LocalEngine(model, adapters.engine_parameters() + adapters.expert_parameters(), lr=1e-2,
                         weight_decay=0.0, max_grad_norm=1.0, lr_lambda=lambda step: 1.0)
    losses = [train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)["task_loss"] for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5, losses
