"""Every decoder family with a default target row (adapters/targets.py DEFAULT_TARGETS), on tiny random
models (tests/helpers/tiny_architectures.py): every default name matches, the defaults are exactly the
model's `attention` layers, `all-linear` takes every linear layer of the blocks and nothing else, and an
adapter on each trains; then, per type (slow, but for two in the default suite), the whole path: two
training steps through the trainer's own step on packed rows, packed rows equal separate sequences,
the exported adapter loads with from_pretrained from another working directory and reproduces the
trained model, and generation with the KV cache equals one full forward."""

from __future__ import annotations

import os

import pytest
import torch

from adamole_dist import AdapterConfig, ConfigError, from_pretrained, inject_adapters
from adamole_dist.adapters.export import export
from adamole_dist.adapters.files import adapter_state, read_adapter_config, save_adapter
from adamole_dist.adapters.targets import (
    DEFAULT_TARGETS,
    ROUTER_NAMES,
    block_path,
    find_target_modules,
    is_adaptable,
    resolved_names,
)
from adamole_dist.base_model.chunked_loss import output_embeddings
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.data.batching import PACKING_UNSUPPORTED_TYPES, check_packing_attention, collate_packed, model_inputs
from adamole_dist.data.sft_task import SFTTask
from adamole_dist.train.step import train_step
from benchmarks.common.local_engine import LocalEngine
from tests.helpers.saved_adapters import randomize_adapters
from tests.helpers.tiny_architectures import TINY, available, tiny_model, write_tiny_model
from tests.unit.data.test_packing import make_examples

# MoE bases whose experts are fused 3-D parameters in transformers 5: no linear layer in their MLP.
FUSED_EXPERTS = {"mixtral", "granitemoe", "qwen3_moe", "gpt_oss"}
IN_DEFAULT_SUITE = {"gpt2", "qwen3_moe"}  # the Conv1D family and a MoE base; the rest run with -m slow
# fp32, KV cache against one full forward: attention over a cache sums in another order (~1e-6 here).
ATOL, RTOL = 1e-5, 1e-4


def types():
    return [pytest.param(t, marks=pytest.mark.skipif(not available(t), reason=f"transformers lacks {t}"))
            for t in TINY]


def names(model, targets) -> list[str]:
    return sorted(n for n, _ in find_target_modules(model, targets))


def test_every_type_with_a_default_has_a_tiny_model():
    assert set(DEFAULT_TARGETS) - {"bert", "roberta"} == set(TINY)  # encoders: tests/unit/adapters/test_inject.py


@pytest.mark.parametrize("model_type", types())
def test_defaults_match_and_shorthands_take_the_blocks(model_type):
    model = tiny_model(model_type)
    for name in DEFAULT_TARGETS[model_type]:
        assert names(model, [name])  # raises ConfigError where a default name matches nothing
    attention = names(model, ["attention"])
    assert names(model, DEFAULT_TARGETS[model_type]) == attention
    head = output_embeddings(model)
    in_blocks = sorted(n for n, m in model.named_modules()
                       if is_adaptable(m) and block_path(n) and n.rsplit(".", 1)[-1] not in ROUTER_NAMES)
    assert head is not None and not block_path(next(n for n, m in model.named_modules() if m is head))
    assert names(model, ["all-linear"]) == in_blocks
    if model_type in FUSED_EXPERTS:
        with pytest.raises(ConfigError, match="fused 3-D parameters"):
            names(model, ["mlp"])
    else:
        mlp = names(model, ["mlp"])
        assert mlp and sorted(attention + mlp) == in_blocks


@pytest.mark.parametrize("model_type", sorted(t for t in FUSED_EXPERTS | {"deepseek_v3"} if available(t)))
def test_fused_experts_are_refused_naming_what_can_be_adapted(model_type):
    """A target naming the routed experts (the module or its 3-D parameters) says they are fused and lists
    what can be adapted; a name that also takes linear layers (DeepSeek's shared expert) takes those."""
    model = tiny_model(model_type)
    for target in ("experts", "gate_up_proj"):
        with pytest.raises(ConfigError, match=rf"{target!r} asks for the base's routed experts, which are fused "
                                              r"3-D parameters .*gate_up_proj \[4, .*Adaptable here: attention"):
            names(model, [target])
    if model_type == "deepseek_v3":  # a shared expert: mlp and down_proj take its layers (and the dense MLPs)
        assert names(model, ["down_proj"]) and all(".mlp.experts." not in n for n in names(model, ["mlp"]))


@pytest.mark.parametrize("model_type", types())
def test_all_linear_starts_at_the_base_and_every_adapter_learns(model_type):
    base, model = tiny_model(model_type), tiny_model(model_type)
    adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=2, rank=2, dropout=0.0,
                                                    target_modules=["all-linear"]))
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=0, rtol=0)
    assert adapters.targets == resolved_names(names(base, ["all-linear"]))
    randomize_adapters(adapters, std=0.1)
    adapters.train(True)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    for name, bank in adapters.expert_banks.items():
        assert bank.lora_A.grad is not None and bank.lora_A.grad.abs().max() > 0, name


# -- the whole path, per type --------------------------------------------------------------------------------
def pipeline_types():
    return [pytest.param(t, marks=[pytest.mark.skipif(not available(t), reason=f"transformers lacks {t}")]
                         + ([] if t in IN_DEFAULT_SUITE else [pytest.mark.slow])) for t in TINY]


def training_batch(task: SFTTask, model_type: str, seed: int) -> dict:
    examples = make_examples([6, 4, 5, 7], seed=seed, vocab=1000)
    if model_type in PACKING_UNSUPPORTED_TYPES:
        return task.collate(examples)
    return task.collate([examples[:2], examples[2:]])


def assert_packed_rows_equal_separate_sequences(model, model_type):
    if model_type in PACKING_UNSUPPORTED_TYPES:  # refused, not silently wrong
        with pytest.raises(ConfigError, match="packing"):
            check_packing_attention(model)
        return
    check_packing_attention(model)
    examples = make_examples([6, 4, 5], seed=5, vocab=1000)
    packed = collate_packed([examples[:2], examples[2:]], 0, 10)
    with torch.no_grad():
        logits = model(**model_inputs(packed)).logits
        for k, (row, at) in enumerate([(0, 0), (0, 6), (1, 0)]):
            alone = model(input_ids=torch.tensor([examples[k]["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[row, at:at + len(alone)], alone, atol=ATOL, rtol=0)


def train_two_steps(model, tokenizer, model_type):
    cfg = AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0)
    expected = resolved_names(names(model, DEFAULT_TARGETS[model_type]))
    adapters = inject_adapters(model, cfg)
    assert adapters.targets == expected
    adapters.train(True)
    task = SFTTask(tokenizer, max_length=16, device=torch.device("cpu"))
    engine = LocalEngine(model, adapters.engine_parameters() + adapters.expert_parameters(), lr=1e-2,
                         weight_decay=0.0, max_grad_norm=1.0, lr_lambda=lambda s: 1.0)
    for step in range(2):
        batch = training_batch(task, model_type, seed=step)
        task.prepare_step([batch], world_size=1)
        metrics = train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)
        assert torch.isfinite(torch.tensor([metrics["task_loss"], metrics["aux_loss"]])).all()
        assert metrics["grad_norm"] > 0
    assert all(bank.lora_B.abs().max() > 0 for bank in adapters.expert_banks.values())  # B left zero: learned
    adapters.train(False)
    return adapters


def assert_cached_generation_equals_full_forward(model):
    ids = torch.randint(5, 1000, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    new = 4
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True,
                             pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    # the prompt's last position (P - 1 = 4) predicts the first new token
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 4:4 + new], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("model_type", pipeline_types())
def test_trains_packs_exports_loads_elsewhere_and_generates(model_type, tmp_path, monkeypatch):
    base_dir = write_tiny_model(tmp_path / "base", model_type)
    model, tokenizer, _, path = load_model_and_tokenizer(str(base_dir), "causal_lm")
    adapters = train_two_steps(model, tokenizer, model_type)
    assert_packed_rows_equal_separate_sequences(model, model_type)

    save_adapter(tmp_path / "adapter", adapter_state(adapters), adapters.cfg,
                 {"base_model": str(base_dir), "base_model_path": path, "task_type": "causal_lm",
                  "trainable_modules": [], "target_modules_resolved": adapters.targets})
    export(tmp_path / "adapter", tmp_path / "export")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded, _ = from_pretrained(os.path.join("..", "export"))
    assert read_adapter_config("../export")["target_modules_resolved"] == adapters.targets
    ids = torch.randint(5, 1000, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert_cached_generation_equals_full_forward(loaded)
