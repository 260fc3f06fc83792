"""The memory planner: parameter counts against real models, the activation formula against the tensors autograd
saves, the recorded benchmark peaks within 15 %, and the commands' exits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from adamole_dist.config.fields import ConfigError
from adamole_dist.planning.activations import block_floats_per_token
from adamole_dist.planning.memory_plan import MB, plan_memory
from adamole_dist.planning.model_shape import load_model_shape, shape_from_config
from adamole_dist.planning.plan_config import PlanConfig
from adamole_dist.planning.render import plan_text

REPO = Path(__file__).resolve().parents[3]
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


GEMMA3 = {"model_type": "gemma3_text", "head_dim": 32, "tie_word_embeddings": True}  # q wider than the hidden size
WIDE_Q = {"head_dim": 32}  # a Llama whose q (4 heads x 32) is twice its hidden size


@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": True}, {"model_type": "qwen2"}, GEMMA3])
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


def tensors_held_by_nodes(output: torch.Tensor) -> list[torch.Tensor]:
    """Tensors custom autograd nodes keep as attributes (bitsandbytes' 8-bit matmul: ``A``, ``tensors``), which
    saved_tensors_hooks do not see."""
    held, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        held += [t for t in [getattr(node, "A", None), *(getattr(node, "tensors", None) or ())]
                 if isinstance(t, torch.Tensor)]
        stack += [next_node for next_node, _ in node.next_functions]
    return held


def saved_floats_per_token_of_one_block(method: str, attn: str, tokens: int = 64, quantize: str = "none",
                                        over: dict | None = None) -> float:
    """Floats per token autograd keeps for one more adapted block (3 blocks minus 2), parameters left out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.base_model.quantize import QuantSpec, quantize_base
    from adamole_dist.config.adapter import AdapterConfig

    saved = []
    for layers in (2, 3):
        torch.manual_seed(0)
        config = AutoConfig.for_model(**{**TINY, **(over or {}), "num_hidden_layers": layers})
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config).requires_grad_(False)
        if quantize != "none":
            quantize_base(model, QuantSpec(scheme=quantize))
        inject_adapters(model, AdapterConfig(method=method, num_experts=4, rank=2)).train(True)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = model.model(input_ids=torch.randint(0, 512, (1, tokens))).last_hidden_state
        for t in tensors_held_by_nodes(out):
            keep(t)
        saved.append(sum(storages.values()) / tokens / 4)
    return saved[1] - saved[0]


@pytest.mark.parametrize("method,attn,over", [("adamole", "sdpa", {}), ("lora", "sdpa", {}), ("adamole", "eager", {}),
                                              ("lora", "sdpa", WIDE_Q), ("adamole", "sdpa", GEMMA3),
                                              ("lora", "sdpa", GEMMA3)], ids=str)
def test_block_formula_matches_saved_tensors(method, attn, over):
    plan = PlanConfig(model="tiny", method=method, num_experts=4, rank=2, attn_implementation=attn, max_length=64)
    predicted = block_floats_per_token(shape_from_config({**TINY, **over}, "tiny"), plan)
    assert predicted == pytest.approx(saved_floats_per_token_of_one_block(method, attn, over=over), rel=0.05)


@pytest.mark.parametrize("method", ["adamole", "lora"])
@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_block_formula_counts_what_a_quantized_base_keeps(method, quantize):
    """int8 layers keep their inputs (for adamole the routers keep q/k/v's and o's already, for lora not); an nf4
    block keeps what an unquantized one does."""
    pytest.importorskip("bitsandbytes")
    plan = PlanConfig(model="tiny", method=method, num_experts=4, rank=2, max_length=64, quantize_base=quantize)
    shape = shape_from_config(TINY, "tiny")
    measured = saved_floats_per_token_of_one_block(method, "sdpa", quantize=quantize)
    assert block_floats_per_token(shape, plan) == pytest.approx(measured, rel=0.05)
    if quantize == "int8":  # the inputs are really there, and the formula has them
        assert measured - saved_floats_per_token_of_one_block(method, "sdpa") >= TINY["intermediate_size"]
        unquantized = dataclasses.replace(plan, quantize_base="none")
        assert block_floats_per_token(shape, plan) - block_floats_per_token(shape, unquantized) >= TINY[
            "intermediate_size"]


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
            # the rows a batch really had: padded to its longest, an encoder's choices each a row
            plan = PlanConfig(model=model, world_size=r["world"], ep_size=r["ep_size"], micro_batch_size=batch,
                              max_length=r.get("padded_length_max", length), choices=r.get("rows_per_example", 0),
                              precision="fp32", device="cpu", chunked_loss=False, method=r["method"])
            compiled = " compiled" if r.get("compiled") else ""
            runs.append((f"{name} {r['method']}{compiled} world {r['world']}", plan, r["peak_rss_mb"]))
    return runs


# MiniLM (e2e.json, rows of 19 tokens): the plan is 17-38 % under the measured peak RSS. A 90 MB model's peak is
# not its step: loading and DeepSpeed's partitioning already reach ~645 MB at world 1, and at world 2 ZeRO-3's
# CPU gathers add ~260 MB over the steps (docs/memory_planner.md, "Misses")
# SmolLM2 (e2e_decoder.json, 2026-12-08, the first record with its real padded length: 95 tokens, not 128): the
# plan is 15-22 % under. The first step adds 1.3 GB over the RSS before it, and ten steps 0.2 GB more (heap
# growth the plan does not model); the previous records hid it behind 128-token rows.
KNOWN_MISSES = {"e2e.json adamole world 1", "e2e.json lora world 1", "e2e.json adamole world 2",
                "e2e.json lora world 2", "e2e_decoder.json lora world 1", "e2e_decoder.json lora compiled world 1"}


def test_plan_within_15_percent_of_every_recorded_peak():
    outside = []
    for label, plan, measured in recorded_runs():
        predicted = plan_memory(load_model_shape(plan.model), plan).device_total / MB
        if abs(predicted - measured) > 0.15 * measured:
            outside.append(label)
    assert sorted(outside) == sorted(KNOWN_MISSES)


def test_the_chunked_loss_plans_the_logits_of_target_tokens_only():
    shape = load_model_shape("smollm2-135m")
    every = PlanConfig(model="smollm2-135m", micro_batch_size=4, max_length=256, precision="fp32")
    tenth = dataclasses.replace(every, target_fraction=0.1)
    assert plan_memory(shape, every).logits_and_loss == 3 * 1024 * shape.vocab * 4
    assert plan_memory(shape, tenth).logits_and_loss == 3 * 103 * shape.vocab * 4  # ceil(1024 x 0.1)
    plain = dataclasses.replace(tenth, chunked_loss=False)  # the plain loss computes every position's logits
    assert plan_memory(shape, plain).logits_and_loss == plan_memory(shape, dataclasses.replace(
        every, chunked_loss=False)).logits_and_loss
    with pytest.raises(ConfigError, match="target_fraction"):
        PlanConfig(target_fraction=0)


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


def test_a_cpu_autocast_run_keeps_fp32_weights_and_saves_bf16_copies_of_them():
    """--autocast bf16 on a CPU: DeepSpeed bf16 is off, so the base stays fp32; activations are bf16, and every
    frozen linear's bf16 cast is saved for its backward. A GPU run is DeepSpeed bf16."""
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.planning.activations import saved_activation_bytes
    from adamole_dist.planning.memory_plan import base_bytes
    from adamole_dist.planning.plan_config import plan_config_from_train

    cpu = plan_config_from_train(TrainConfig(autocast="bf16"), 1, "cpu")
    assert cpu.precision == "autocast-bf16" and plan_config_from_train(TrainConfig(autocast="none"), 1,
                                                                       "cpu").precision == "fp32"
    assert plan_config_from_train(TrainConfig(autocast="none"), 1, "cuda").precision == "bf16"
    shape = load_model_shape("smollm2-135m")
    fp32, bf16 = (dataclasses.replace(cpu, precision=p) for p in ("fp32", "bf16"))
    assert base_bytes(shape, cpu) == base_bytes(shape, fp32) == 2 * base_bytes(shape, bf16)
    copies = shape.layers * shape.block_linear_params() * 2
    assert saved_activation_bytes(shape, cpu)[0] == saved_activation_bytes(shape, bf16)[0] + copies
    nf4 = dataclasses.replace(cpu, quantize_base="nf4")  # bitsandbytes dequantizes in its own kernels
    assert saved_activation_bytes(shape, nf4)[0] == saved_activation_bytes(shape, dataclasses.replace(
        nf4, precision="bf16"))[0]


def test_generating_evaluation_gathers_the_whole_base_on_top_on_a_cpu_and_into_free_memory_on_a_gpu():
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.planning.memory_plan import CPU_HEAP_RETENTION, base_bytes
    from adamole_dist.planning.plan_config import plan_config_from_train

    shape = load_model_shape("smollm2-135m")
    assert plan_config_from_train(TrainConfig(), 1, "cpu").generates  # samples by default (free-form data)
    assert not plan_config_from_train(TrainConfig(sample_prompts=0, answer_accuracy="off"), 1, "cpu").generates
    assert not plan_config_from_train(TrainConfig(), 1, "cpu", generates=False).generates  # the data decided
    cpu = PlanConfig(model="smollm2-135m", micro_batch_size=4, max_length=256, device="cpu")
    without, with_ = (plan_memory(shape, dataclasses.replace(cpu, generates=g)) for g in (False, True))
    assert with_.generation == base_bytes(shape, cpu) and without.generation == 0
    assert with_.device_total - without.device_total == pytest.approx(with_.generation * CPU_HEAP_RETENTION, abs=2)
    # a GPU gathers only into free memory (else layer by layer): the step bounds the peak, the term is shown
    big = load_model_shape("llama-3.1-70b")
    gpu = PlanConfig(model="llama-3.1-70b", world_size=8, micro_batch_size=1, max_length=2048)
    step, gen = (plan_memory(big, dataclasses.replace(gpu, generates=g)) for g in (False, True))
    assert gen.device_total == step.device_total and gen.generation == base_bytes(big, gpu) > 100e9
    assert "into free memory only, else layer by layer" in plan_text(big, dataclasses.replace(gpu, generates=True))
