"""The memory planner: parameter counts against real models, the activation formula against the tensors autograd
saves, the recorded benchmark peaks within 15 %, and the commands' exits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adamole_dist.planning.activations import block_floats_per_token
from adamole_dist.planning.memory_plan import MB, plan_memory
from adamole_dist.planning.model_shape import load_model_shape, shape_from_config
from adamole_dist.planning.plan_config import PlanConfig

REPO = Path(__file__).resolve().parents[3]
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": True}, {"model_type": "qwen2"}])
def test_decoder_param_count_equals_a_real_model(over):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY, **over}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    assert shape_from_config(cfg, "tiny").total_params() == sum(p.numel() for p in model.parameters())


def test_encoder_param_count_equals_minilm_with_its_head():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    shape = load_model_shape("minilm-l6")
    from adamole_dist.base_model.model_loading import resolve_model_path

    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(resolve_model_path("minilm-l6"), num_labels=1))
    assert shape.total_params() == sum(p.numel() for p in model.parameters())


def saved_floats_per_token_of_one_block(method: str, attn: str, tokens: int = 64) -> float:
    """Floats per token autograd saves for one more adapted block (3 blocks minus 2), parameters left out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.config.adapter import AdapterConfig

    saved = []
    for layers in (2, 3):
        torch.manual_seed(0)
        config = LlamaConfig(**{**TINY, "num_hidden_layers": layers})
        config._attn_implementation = attn
        model = LlamaForCausalLM(config).requires_grad_(False)
        inject_adapters(model, AdapterConfig(method=method, num_experts=4, rank=2)).train(True)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.model(input_ids=torch.randint(0, 512, (1, tokens)))
        saved.append(sum(storages.values()) / tokens / 4)
    return saved[1] - saved[0]


@pytest.mark.parametrize("method,attn", [("adamole", "sdpa"), ("lora", "sdpa"), ("adamole", "eager")])
def test_block_formula_matches_saved_tensors(method, attn):
    plan = PlanConfig(model="tiny", method=method, num_experts=4, rank=2, attn_implementation=attn, max_length=64)
    predicted = block_floats_per_token(shape_from_config(TINY, "tiny"), plan)
    assert predicted == pytest.approx(saved_floats_per_token_of_one_block(method, attn), rel=0.05)


def recorded_runs() -> list[tuple[str, PlanConfig, float]]:
    """(label, plan, measured peak RSS MB) of every benchmark record our trainer's step produced."""
    runs = []
    results = REPO / "benchmarks" / "results"
    for name in ("memory.json", "memory_quantized.json"):  # one process, SmolLM2-135M, fp32
        for r in json.loads((results / name).read_text()):
            plan = PlanConfig(model=r["model"], micro_batch_size=r["batch"], max_length=r["max_length"],
                              precision="fp32", device="cpu", chunked_loss=r["loss"] == "chunked",
                              loss_chunk_tokens=r["chunk_tokens"] or 1024, quantize_base=r.get("quantize_base", "none"))
            runs.append((f"{name} {r['loss']} {plan.quantize_base}", plan, r["peak_rss_mb"]))
    e2e = [("e2e.json", "minilm-l6", 16, 64), ("e2e_decoder.json", "smollm2-135m", 4, 128)]  # e2e_compare's runs
    for name, model, batch, length in e2e:
        for r in json.loads((results / name).read_text()):
            if r["system"] != "adamole_dist":  # PEFT's LoRA is not this trainer
                continue
            plan = PlanConfig(model=model, world_size=r["world"], ep_size=r["ep_size"], micro_batch_size=batch,
                              max_length=length, precision="fp32", device="cpu", chunked_loss=False,
                              method=r["method"])
            runs.append((f"{name} {r['method']} world {r['world']}", plan, r["peak_rss_mb"]))
    return runs


# bitsandbytes int8 on the CPU: the measured peak is 19 % above the plan; the saved tensors of an int8 block are
# those of an unquantized one (counted with saved_tensors_hooks), so the excess is not in the formula
# MiniLM (e2e.json, an encoder scoring each of 4 choices): the records hold neither the padded length of the
# batches (padded to the longest, below max_length) nor the choices per example, so the tokens are unknown
KNOWN_MISSES = {"memory_quantized.json chunked int8", "e2e.json adamole world 1", "e2e.json lora world 1",
                "e2e.json adamole world 2"}


def test_plan_within_15_percent_of_every_recorded_peak():
    outside = []
    for label, plan, measured in recorded_runs():
        predicted = plan_memory(load_model_shape(plan.model), plan).device_total / MB
        if abs(predicted - measured) > 0.15 * measured:
            outside.append(label)
    assert sorted(outside) == sorted(KNOWN_MISSES)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_moves_saved_activations_to_the_host(checkpointing):
    shape = load_model_shape("minilm-l6")  # few layers: one block's activations outweigh all blocks' inputs
    plan = PlanConfig(model="minilm-l6", micro_batch_size=4, max_length=128, gradient_checkpointing=checkpointing)
    kept, moved = plan_memory(shape, plan), plan_memory(shape, dataclasses.replace(plan, activation_offload=True))
    assert moved.host_offloaded > 0 and moved.activations < kept.activations
    assert moved.host_offloaded + moved.activations == kept.activations  # moved, not lost
    assert moved.device_total == kept.device_total - moved.host_offloaded


def test_the_trainers_options_reach_the_plan():
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.planning.plan_config import plan_config_from_train

    cfg = TrainConfig(output_dir="unused", gradient_checkpointing=True, activation_offload=True)
    assert plan_config_from_train(cfg, 2, "cuda").activation_offload
