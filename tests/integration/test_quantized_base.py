"""--quantize_base through the trainer: a one-process nf4 run whose adapter records the quantization and
loads back onto the same quantized base (from_pretrained), and (slow) two ranks under ZeRO-3, with and
without expert parallelism, against one process on the same global batch."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tests.helpers.launch_utils import check, python_cmd, records, run, train_losses  # noqa: E402
from tests.helpers.tiny_models import write_tiny_llama  # noqa: E402
from tests.integration.test_sft_train import CHAT_TEMPLATE, conversation, train_cases, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbase")
    write_tiny_llama(root / "model")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    rng = random.Random(0)
    write_jsonl(root / "chat" / "train.jsonl", [conversation(rng) for _ in range(64)])
    write_jsonl(root / "chat" / "test.jsonl", [conversation(rng) for _ in range(8)])
    return root


def test_an_nf4_run_trains_records_and_loads_back_quantized(work, tmp_path):
    from adamole_dist.adapters.files import load_adapter
    from adamole_dist.adapters.pretrained import from_pretrained
    from adamole_dist.base_model.model_loading import load_model_and_tokenizer
    from adamole_dist.base_model.quantize import QuantSpec, is_quantized

    out, steps = tmp_path / "run", 16
    check(run(python_cmd(
        "--model", str(work / "model"), "--dataset", str(work / "chat"), "--chat_template", str(work / "chat.jinja"),
        "--output_dir", str(out), "--quantize_base", "nf4", "--max_length", "64", "--micro_batch_size", "4",
        "--max_steps", str(steps), "--log_interval", "1", "--eval_interval", "0", "--save_interval", "0",
        "--lr", "1e-2", "--sample_prompts", "0"), timeout=600))
    losses = train_losses(out)
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(steps - 3, steps + 1)) / 4
    assert last < first - 0.05, losses
    evals = records(out, "eval")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["quantization"] == {"scheme": "nf4", "double_quant": True, "compute_dtype": "fp32"}
    assert json.loads((out / "run_config.json").read_text())["quantize_base"] == "nf4"

    net, _ = from_pretrained(out / "adapter")
    assert is_quantized(net.model.layers[0].self_attn.q_proj.base_layer) and not is_quantized(net.lm_head)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        loaded = net(input_ids=ids).logits

    def by_hand(spec: QuantSpec) -> torch.Tensor:
        base, _, _, _ = load_model_and_tokenizer(str(work / "model"), "causal_lm", quantization=spec)
        base.eval()
        adapters = load_adapter(base, out / "adapter")
        adapters.register_experts()
        with torch.no_grad():
            return base(input_ids=ids).logits

    assert torch.equal(loaded, by_hand(QuantSpec("nf4")))
    assert not torch.allclose(loaded, by_hand(QuantSpec()), atol=1e-4)  # the unquantized base differs


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2])
def test_two_ranks_under_zero3_equal_one_process(work, tmp_path, ep):
    """The packed 4-bit weights partitioned by ZeRO-3 (and the experts split over ranks with ep 2): the
    losses, norms, held-out loss and adapter of one process on the same global batch."""
    from safetensors.torch import load_file

    from tests.helpers.mp_harness import run_ranks

    def config(world: int) -> dict:
        return dict(model=str(work / "model"), dataset=str(work / "chat"), chat_template=str(work / "chat.jinja"),
                    max_length=64, micro_batch_size=8 // world, max_steps=3, lr=1e-2, lr_scheduler="constant",
                    warmup_steps=0, log_interval=1, eval_interval=0, eval_at_start=False, save_interval=0,
                    sample_prompts=0, eval_batch_size=4, peer_timeout=0.0, report_to="none",
                    ds_config="ds_configs/zero3.json", quantize_base="nf4", ep_size=ep if world > 1 else 1,
                    output_dir=str(tmp_path / f"w{world}"), autocast="none", packing=False,
                    adapter=dict(num_experts=4, rank=2, dropout=0.0, aux_loss_scope="global"))

    run_ranks(train_cases, 1, [config(1)], timeout=600)
    run_ranks(train_cases, 2, [config(2)], timeout=600)
    memory = records(tmp_path / "w2", "memory")[0]["per_rank"]["0"]
    assert memory["frozen_local"] < memory["frozen_full"]  # the quantized base is partitioned
    ref, got = records(tmp_path / "w1", "train"), records(tmp_path / "w2", "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for key in ("task_loss", "aux_loss", "grad_norm"):
        for a, b in zip(got, ref):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, got, ref)
    final_ref, final_got = (records(tmp_path / w, "eval")[-1] for w in ("w1", "w2"))
    assert final_got["eval_loss"] == pytest.approx(final_ref["eval_loss"], rel=1e-5)
    a = load_file(str(tmp_path / "w1" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "w2" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)
