"""``--compile`` (train/compile.py): through the real trainer (launch/train.py, DeepSpeed ZeRO-3, one process)
losses, gradient norms and the trained adapter equal eager's within fp32 noise over 3 steps, with packing
and with gradient checkpointing, and no block recompiles for a size (torch._dynamo's guard failures,
logged by the trainer); in one process, batches of three sequence lengths compile the blocks once.
Dropout is off in the comparisons: compiled dropout draws other masks than eager's (the same distribution;
train/compile.py, random_numbers_for)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers.launch_utils import check, python_cmd, records, run, train_losses
from tests.helpers.tiny_models import write_tiny_llama
from tests.integration.test_sft_train import CHAT_TEMPLATE, conversation, write_jsonl


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    write_tiny_llama(root / "model")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    rng = random.Random(3)
    write_jsonl(root / "chat" / "train.jsonl", [conversation(rng) for _ in range(48)])
    write_jsonl(root / "chat" / "test.jsonl", [conversation(rng) for _ in range(4)])
    # Every parameter partitioned (no persistence threshold): the tiny model's would all stay whole, and a
    # compiled block must see its parameters gathered by ZeRO-3's module hooks.
    ds = json.loads(Path("ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(ds))
    return root


def train(work, out, *extra):
    return check(run(python_cmd(
        "--ds_config", str(work / "zero3.json"), "--model", str(work / "model"), "--dataset", str(work / "chat"),
        "--chat_template", str(work / "chat.jinja"), "--output_dir", str(out), "--packing", "--max_length", "64",
        "--micro_batch_size", "1", "--max_steps", "3", "--log_interval", "1", "--eval_interval", "0",
        "--save_interval", "0", "--lr", "1e-2", "--sample_prompts", "0", "--no-group_by_length", "--seed", "5",
        "--dropout", "0", *extra), timeout=900))


@pytest.mark.slow
@pytest.mark.parametrize("method,checkpointing", [("adamole", False), ("adamole", True), ("lora", False)],
                         ids=["plain", "gradient_checkpointing", "lora"])
def test_compiled_blocks_train_as_eager_and_compile_once(work, tmp_path, method, checkpointing):
    # lora: its factors are gathered by a module call (no routing module call gathers them first)
    extra = ("--method", method, *(("--gradient_checkpointing",) if checkpointing else ()))
    train(work, tmp_path / "eager", *extra)
    proc = train(work, tmp_path / "compiled", "--compile", *extra)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    windows = records(tmp_path / "compiled", "train")
    norms = [(r["grad_norm"], r.get("expert_grad_norm")) for r in records(tmp_path / "eager", "train")]
    for r, (grad, expert) in zip(windows, norms):
        assert r["grad_norm"] == pytest.approx(grad, rel=1e-4)
        assert (r.get("expert_grad_norm") is None) == (expert is None)  # lora has no expert optimizer
        if expert is not None:
            assert r["expert_grad_norm"] == pytest.approx(expert, rel=1e-4)
    assert "torch.compile: 2 blocks" in proc.stdout and windows[0]["compiled_blocks"] == 2
    assert windows[0]["compile_s"] > 0 and windows[0]["compiled_graphs"] > 0
    assert [r["block_size_recompiles"] for r in windows] == [0, 0, 0]
    assert json.loads((tmp_path / "compiled" / "run_config.json").read_text())["compile"] is True
    a = load_file(str(tmp_path / "eager" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4 * max(a[key].abs().max(), 1e-3), key


@pytest.mark.slow
def test_batches_of_other_lengths_reuse_the_compiled_blocks():
    """Three sequence lengths through compiled blocks (adapters inside): the same losses and gradients as
    eager, and the graphs of the first length serve the others (dynamic shapes: no recompilation)."""
    import torch
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.train.compile import compile_blocks
    from tests.conftest import make_tiny_llama

    models, handles = [], []
    for _ in range(2):
        model = make_tiny_llama(seed=0).train()
        adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=4, rank=2, dropout=0.0,
                                                        target_modules=["q_proj", "v_proj"]))
        models.append(model)
        handles.append(adapters)
    compile_blocks(models[1], torch.device("cpu"))
    assert inductor_config.fallback_random  # on a CPU the masks come from ATen's generator (faster there)
    counters.clear()
    graphs = []
    for length in (9, 13, 17):
        x = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        losses, grads = [], []
        for model, adapters in zip(models, handles):
            params = list(model.parameters()) + adapters.expert_parameters()  # the experts live outside the tree
            for p in params:
                p.grad = None
            loss = model(input_ids=x, attention_mask=mask, labels=x).loss
            loss = loss + adapters.context.take_aux_loss()
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad for p in params if p.grad is not None])
        assert losses[1] == pytest.approx(losses[0], rel=1e-6), length
        for eager, compiled in zip(*grads):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
        graphs.append(int(counters["stats"]["unique_graphs"]))
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, graphs


@pytest.mark.slow
def test_every_block_of_a_padded_decoder_batch_runs_the_same_compiled_code():
    """A padded batch through the task (no packing): the blocks recompile once, for the first block's input that
    needs no gradient, and not per layer (a KV cache built by default did that: train/compile.py)."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.data.sft_task import SFTTask
    from adamole_dist.train.compile import CompileReport, compile_blocks

    torch._dynamo.reset()  # the blocks' forward is transformers' code: other tests' models compiled it too
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).train()
    inject_adapters(model, AdapterConfig(method="adamole", num_experts=4, rank=2, target_modules=["q_proj", "v_proj"]))
    report = CompileReport(compile_blocks(model, torch.device("cpu")))
    task = SFTTask(SimpleNamespace(pad_token_id=0, eos_token_id=1), max_length=16, device="cpu")
    rows = [list(range(2, 2 + n)) for n in (11, 7)]
    batch = task.collate([{"input_ids": row, "labels": row} for row in rows])
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded, not packed
    task.loss(model, batch).backward()
    assert report.metrics()["block_recompiles"] == 1
