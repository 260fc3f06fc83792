"""Resume across expert-parallel layouts through launch/train.py's own save and load (2 gloo ranks,
ZeRO-3, torchrun): a run checkpointed at ep_size 2 continues at ep_size 1 and one checkpointed at
ep_size 1 continues at ep_size 2. The following losses equal the uninterrupted run's, and so do the
expert parameters and AdamW moments, compared by global expert id at the final checkpoint (moments
on the wrong experts would change both). Clipping and accumulation are on, so the resumed expert
optimizer must also restore its schedule position."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.launch_utils import check, copy_run_at, run, torchrun_cmd, train_losses
from tests.helpers.tiny_models import write_tiny_bert

pytestmark = pytest.mark.slow

STEPS, SAVE_AT = 6, 3


def args_for(model, out, ep: int) -> list[str]:
    return ["--model", str(model), "--output_dir", str(out), "--ep_size", str(ep), "--max_steps", str(STEPS),
            "--save_interval", str(SAVE_AT), "--keep_checkpoints", "3", "--max_train_examples", "64",
            "--max_eval_examples", "8", "--micro_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_length", "32", "--eval_interval", "0", "--no-eval_at_start", "--log_interval", "1", "--lr", "1e-2",
            "--max_grad_norm", "1e-3", "--num_experts", "8", "--rank", "2", "--dropout", "0",
            "--aux_loss_coeff", "1e-2", "--aux_loss_scope", "global", "--ds_config", "ds_configs/zero3.json",
            "--report_to", "none"]


def experts_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((run_dir / "checkpoints" / f"step_{step:07d}").glob("experts_ep*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    model = write_tiny_bert(root / "tiny_bert")
    runs = {}
    for ep in (2, 1):
        runs[ep] = root / f"ep{ep}"
        check(run(torchrun_cmd(2, *args_for(model, runs[ep], ep))))
    return model, runs


def test_the_two_layouts_train_alike(uninterrupted):
    _, runs = uninterrupted
    a, b = train_losses(runs[2]), train_losses(runs[1])
    assert sorted(a) == list(range(1, STEPS + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step


@pytest.mark.parametrize("saved_ep, resumed_ep", [(2, 1), (1, 2)], ids=["ep2_to_ep1", "ep1_to_ep2"])
def test_resume_at_another_ep_size(uninterrupted, tmp_path, saved_ep, resumed_ep):
    model, runs = uninterrupted
    original = runs[saved_ep]
    resumed = tmp_path / "resumed"
    copy_run_at(original, resumed, SAVE_AT)
    saved = experts_at(resumed, SAVE_AT)
    assert len(list((resumed / "checkpoints" / f"step_{SAVE_AT:07d}").glob("experts_ep*"))) == saved_ep
    proc = check(run(torchrun_cmd(2, *args_for(model, resumed, resumed_ep), "--resume", "latest")))
    assert f"resumed from {resumed / 'checkpoints' / f'step_{SAVE_AT:07d}'}" in proc.stdout
    expected, got = train_losses(original), train_losses(resumed)
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"
    # the checkpoint the resumed run read is intact, and its final one is in the new layout
    assert experts_at(resumed, SAVE_AT).keys() == saved.keys()
    final, reference = experts_at(resumed, STEPS), experts_at(original, STEPS)
    assert len(list((resumed / "checkpoints" / f"step_{STEPS:07d}").glob("experts_ep*"))) == resumed_ep
    assert final.keys() == reference.keys()
    moments = [k for k in reference if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments
    for key, value in reference.items():
        scale = value.abs().max().item()
        tol = 1e-4 * scale if key in moments else 1e-4  # moments relative, parameters absolute (lr 1e-2)
        assert (final[key] - value).abs().max().item() <= tol + 1e-12, key
