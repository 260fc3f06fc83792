"""launch/train.py --ep_size 2 with every routing method, under the deepspeed launcher and torchrun
(2 gloo ranks, ZeRO-3): trains, logs traffic close to the minimum, exports all experts (one run under bf16
autocast, one with a bf16 wire)."""

import json

import pytest

from tests.helpers.launch_utils import SMALL_RUN, check, deepspeed_cmd, records, run, torchrun_cmd

pytestmark = pytest.mark.slow

RUNS = [
    ("adamole", deepspeed_cmd, []),
    ("mole_topk", torchrun_cmd, ["--capacity_factor", "1.0", "--drop_policy", "position"]),
    ("mole_threshold", deepspeed_cmd, ["--aux_loss_scope", "global", "--autocast", "bf16"]),
    ("sira", torchrun_cmd, ["--balance_bias_rate", "0.001", "--dispatch_dtype", "bf16"]),
]


@pytest.mark.parametrize("method, launcher, extra", RUNS, ids=[r[0] for r in RUNS])
def test_train_with_expert_parallelism(tmp_path, method, launcher, extra):
    out = tmp_path / "run"
    args = ["--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", "6",
            "--method", method, "--ep_size", "2", "--save_interval", "3", "--no-eval_at_start", *SMALL_RUN, *extra]
    check(run(launcher(2, *args)))
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    last = train[-1]
    assert last["a2a_bytes_per_step"] > 0
    # a bf16 wire halves the fp32 minimum, plus each row's routing columns (3 of 384 per expert pair here)
    limit = 0.53 if "--dispatch_dtype" in extra else 1.05
    assert last["a2a_bytes_per_step"] <= limit * last["a2a_bytes_min_per_step"]
    adapter = out / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["adapter"]["method"] == method
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        experts = {k.split(".experts.")[1].split(".")[0] for k in f.keys() if ".experts." in k}
    assert experts == {str(i) for i in range(8)}  # experts of both EP ranks gathered
    shards = sorted(p.name for p in (out / "checkpoints" / "step_0000006").glob("experts_ep*.safetensors"))
    assert shards == ["experts_ep0.safetensors", "experts_ep1.safetensors"]


def test_ep_size_auto_follows_the_cost_model(tmp_path):
    """At MiniLM sizes replicated experts are cheapest; under a memory budget that replicated experts
    exceed, the cost model must choose expert parallelism — and training runs with it."""
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--max_steps", "2", "--ep_size", "auto", "--expert_memory_budget_mb", "6",
            "--no-eval_at_start", *SMALL_RUN]
    proc = check(run(torchrun_cmd(2, *args)))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("--ep_size auto:"))
    assert "ep_size 2 (expert_parallel)" in line and "replicated" in line
    shards = sorted(p.name for p in (out / "checkpoints" / "step_0000002").glob("experts_ep*.safetensors"))
    assert shards == ["experts_ep0.safetensors", "experts_ep1.safetensors"]


def test_world_8_with_ep_size_4_under_the_deepspeed_launcher(tmp_path):
    """Oversubscribed smoke run: 8 gloo ranks on this machine, two EP groups of 4 (experts split 2 per
    rank, the expert-data-parallel reduction over pairs of ranks), tiny Llama, ZeRO-3, a few steps with
    clipping and accumulation: it finishes (no hang), trains every step, and writes all 8 expert shards'
    worth of experts (4 shard files, all 8 experts in the adapter)."""
    from tests.helpers.tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny_llama")
    out = tmp_path / "run"
    args = ["--model", str(model), "--task_type", "causal_lm", "--ds_config", "ds_configs/zero3.json",
            "--output_dir", str(out), "--ep_size", "4", "--max_steps", "3", "--gradient_accumulation_steps", "2",
            "--micro_batch_size", "2", "--max_length", "48", "--max_train_examples", "64", "--max_eval_examples", "16",
            "--eval_batch_size", "2", "--no-eval_at_start", "--eval_interval", "0", "--log_interval", "1",
            "--max_grad_norm", "0.01", "--aux_loss_scope", "global", "--peer_timeout", "120"]
    proc = check(run(deepspeed_cmd(8, *args), timeout=900))
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["expert_grad_norm"] > 0 and r["a2a_bytes_per_step"] > 0 for r in train)
    memory = records(out, "memory")[0]
    assert sorted(memory["per_rank"], key=int) == [str(r) for r in range(8)]
    shards = sorted(p.name for p in (out / "checkpoints" / "step_0000003").glob("experts_ep*.safetensors"))
    assert shards == [f"experts_ep{k}.safetensors" for k in range(4)]
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        experts = {k.split(".experts.")[1].split(".")[0] for k in f.keys() if ".experts." in k}
    assert experts == {str(i) for i in range(8)}
    assert "done: 3 steps" in proc.stdout
