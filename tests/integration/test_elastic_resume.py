"""Resume at another world size through launch/train.py under torchrun (real DeepSpeed ZeRO-3, gloo):
a world-4 run (ep_size 2) checkpointed at step 3 continues at world 2 (ep_size 1, accumulation
doubled) and at world 1 (accumulation x 4), and a world-2 run continues at world 4; the next steps'
losses, the final parameters and AdamW moments equal the uninterrupted world-4 run's. Free-form chat
data on a tiny Llama with the token-normalised loss over the whole step, a local aux loss (per rank
micro batch: the same blocks of examples at every world size, data/sampler.py), clipping active on
both norms, and a warm-up + linear lr schedule, so its position must continue too."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch_utils import check, copy_run_at, records, run, torchrun_cmd, train_losses
from tests.helpers.tiny_models import write_tiny_llama
from tests.integration.test_sft_train import CHAT_TEMPLATE, conversation, write_jsonl

pytestmark = pytest.mark.slow

STEPS, SAVE_AT, MICRO, GLOBAL_BATCH, MAX_NORM = 6, 3, 2, 16, 1e-3
TOL_LOSS, TOL_PARAM, TOL_MOMENT = 1e-5, 1e-4, 1e-4  # relative, absolute (lr 1e-2), relative


def args_for(work, out, world: int, ep: int) -> list[str]:
    return ["--model", str(work / "model"), "--dataset", str(work / "chat"), "--chat_template",
            str(work / "chat.jinja"), "--output_dir", str(out), "--ds_config", "ds_configs/zero3.json",
            "--max_length", "64", "--micro_batch_size", str(MICRO),
            "--gradient_accumulation_steps", str(GLOBAL_BATCH // (MICRO * world)), "--max_steps", str(STEPS),
            "--save_interval", str(SAVE_AT), "--keep_checkpoints", "3", "--log_interval", "1", "--eval_interval", "0",
            "--no-eval_at_start", "--sample_prompts", "0", "--eval_batch_size", "4", "--lr", "1e-2",
            "--warmup_steps", "2", "--lr_scheduler", "linear", "--max_grad_norm", str(MAX_NORM),
            "--num_experts", "4", "--rank", "2", "--dropout", "0", "--aux_loss_coeff", "1e-2",
            "--ep_size", str(ep), "--peer_timeout", "0", "--report_to", "none"]


def final_state(out) -> dict[str, torch.Tensor]:
    """Parameters (the exported adapter) and AdamW moments (experts by global id, the engine's by name)."""
    tensors = {f"adapter:{k}": v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    ckpt = out / "checkpoints" / f"step_{STEPS:07d}"
    for f in [*ckpt.glob("experts_ep*.safetensors"), ckpt / "engine_state.safetensors"]:
        where = "engine" if f.name.startswith("engine") else "experts"  # experts by global id, whatever the shard
        tensors.update({f"{where}:{k}": v for k, v in load_file(str(f)).items() if "exp_avg" in k})
    return tensors


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_tiny_llama(root / "model")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    rng = random.Random(0)
    write_jsonl(root / "chat" / "train.jsonl", [conversation(rng) for _ in range(96)])
    write_jsonl(root / "chat" / "test.jsonl", [conversation(rng) for _ in range(8)])
    return root


@pytest.fixture(scope="module")
def uninterrupted(work):
    runs = {}
    for world, ep in ((4, 2), (2, 1)):
        runs[world] = work / f"w{world}"
        check(run(torchrun_cmd(world, *args_for(work, runs[world], world, ep))))
    return runs


def assert_continues_like(reference, resumed) -> None:
    expected, got = train_losses(reference), train_losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=TOL_LOSS), f"step {step}"
    for r in records(reference, "train"):  # clipping was active on both norms
        assert r["grad_norm"] > MAX_NORM and r["expert_grad_norm"] > MAX_NORM and r["aux_loss"] > 0, r
    lrs = {r["step"]: r["lr"] for r in records(reference, "train")}
    assert {r["step"]: r["lr"] for r in records(resumed, "train")} == pytest.approx(lrs, rel=1e-9)
    want, have = final_state(reference), final_state(resumed)
    assert set(have) == set(want) and any("exp_avg" in k for k in want)
    for key, value in want.items():
        if "exp_avg" in key:
            scale = value.abs().max().item()
            assert (have[key] - value).abs().max().item() <= TOL_MOMENT * scale + 1e-12, key
        else:
            torch.testing.assert_close(have[key], value, atol=TOL_PARAM, rtol=0, msg=key)


def test_the_two_worlds_train_alike(uninterrupted):
    a, b = train_losses(uninterrupted[4]), train_losses(uninterrupted[2])
    assert sorted(a) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=TOL_LOSS), step


@pytest.mark.parametrize("saved, resumed, ep", [(4, 2, 1), (4, 1, 1), (2, 4, 2)], ids=["w4_to_w2", "w4_to_w1",
                                                                                      "w2_to_w4"])
def test_resume_at_another_world_size(work, uninterrupted, tmp_path, saved, resumed, ep):
    out = tmp_path / "resumed"
    copy_run_at(uninterrupted[saved], out, SAVE_AT)
    proc = check(run(torchrun_cmd(resumed, *args_for(work, out, saved, ep), "--resume", "latest")))
    accumulation = GLOBAL_BATCH // (MICRO * resumed)
    assert (f"micro batch {MICRO} x world {saved} x accumulation {GLOBAL_BATCH // (MICRO * saved)} -> micro batch "
            f"{MICRO} x world {resumed} x accumulation {accumulation}") in proc.stdout + proc.stderr
    assert len(list((out / "checkpoints" / f"step_{STEPS:07d}").glob("experts_ep*"))) == ep
    assert_continues_like(uninterrupted[4], out)
