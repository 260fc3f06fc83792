"""A PEFT LoRA through a real training run (launch/train.py's main, one process): ``--method lora
--init_from_peft DIR`` starts from the LoRA's weights -- its first step's loss is the loss of the same step on
the base with the LoRA merged in (peft's merge_and_unload), where our fresh LoRA (B = 0, on all-linear) adds
nothing. The
adapter it writes records its base's content hash and loads from another working directory. Slow: a LoRA we
exported, continued 2 steps by TRL's SFTTrainer, comes back through from_pretrained with PeftModel's logits
and through --init_from_peft with the merged model's loss."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

import adamole_dist
from adamole_dist.base_model.fingerprint import fingerprint_folder
from tests.helpers.forked_train import ForkedTrain
from tests.helpers.launch_utils import REPO, check, train_losses
from tests.helpers.tiny_models import write_tiny_llama

peft = pytest.importorskip("peft", reason="peft is a dev extra")
IDS = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523]])
THINGS = [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"), ("coal", "black")]
LORA = ["--method", "lora", "--rank", "4", "--alpha", "8", "--dropout", "0", "--target_modules", "q_proj,v_proj"]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    forked = ForkedTrain(tmp_path_factory.mktemp("forked_train"))
    yield forked
    forked.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peft_training")
    write_tiny_llama(root / "base")
    rng = random.Random(0)
    rows = [{"instruction": f"name the color of the {a}", "input": "", "output": b}
            for a, b in (rng.choice(THINGS) for _ in range(8))]
    (root / "alpaca").mkdir()
    for split in ("train", "test"):
        (root / "alpaca" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def merged_base(base: Path, peft_dir: Path, out: Path) -> Path:
    """The base with the PEFT LoRA merged into its weights (peft's own merge), saved as a model folder."""
    from transformers import AutoTokenizer

    merged = peft.PeftModel.from_pretrained(plain(base), str(peft_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def first_loss(train: ForkedTrain, model: Path | str, data: Path, out: Path, *extra: str) -> float:
    """Step 1's task loss of a 1-step run (the whole 8-row dataset in one batch, no dropout)."""
    check(train.run(["--model", str(model), "--dataset", str(data), "--output_dir", str(out), *LORA, *extra,
                     "--max_length", "48", "--micro_batch_size", "8", "--max_steps", "1", "--log_interval", "1",
                     "--eval_interval", "0", "--save_interval", "0", "--sample_prompts", "0", "--lr", "1e-3",
                     "--autocast", "none"]))
    return train_losses(out)[1]


def random_peft_lora(base: Path, folder: Path) -> Path:
    torch.manual_seed(0)
    model = peft.get_peft_model(plain(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=["q_proj", "v_proj"],
                                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    return folder


def test_init_from_peft_starts_training_from_the_peft_weights(train, work, tmp_path, monkeypatch):
    lora = random_peft_lora(work / "base", tmp_path / "peft")
    relative_base = os.path.relpath(work / "base", REPO)  # the run's working directory is the repository
    started = first_loss(train, relative_base, work / "alpaca", tmp_path / "continued", "--init_from_peft", lora)
    merged = first_loss(train, merged_base(work / "base", lora, tmp_path / "merged"), work / "alpaca",
                        tmp_path / "fresh", "--target_modules", "all-linear")  # a fresh LoRA adds nothing, anywhere
    assert started == pytest.approx(merged, rel=1e-5)
    fresh = json.loads((tmp_path / "fresh" / "adapter" / "adapter_config.json").read_text())
    assert fresh["target_modules_resolved"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    with torch.no_grad():  # the LoRA moves the model: the check above can fail
        assert (plain(tmp_path / "merged")(IDS).logits - plain(work / "base")(IDS).logits).abs().max() > 1e-2
    doc = json.loads((tmp_path / "continued" / "adapter" / "adapter_config.json").read_text())
    assert doc["base_model"] == str(work / "base")  # the relative --model, absolute
    assert doc["base_model_fingerprint"] == fingerprint_folder(work / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the adapter loads from any working directory
    model, _ = adamole_dist.from_pretrained(tmp_path / "continued" / "adapter")
    assert model.config._name_or_path == str(work / "base")


# -- TRL (slow) -------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def continue_with_trl(base: Path, peft_dir: Path, out: Path) -> Path:
    """Our exported LoRA, trained 2 more steps by TRL's SFTTrainer on a few chat rows, saved by PEFT."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": f"what color is the {a}"},
                          {"role": "assistant", "content": f"the {a} is {b}"}]} for a, b in THINGS]
    model = peft.PeftModel.from_pretrained(plain(base), str(peft_dir), is_trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=str(out / "trl"), max_steps=2, per_device_train_batch_size=2, learning_rate=5e-2,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=48, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "TRL's steps moved no LoRA weight"
    trainer.model.save_pretrained(str(out / "continued"))
    return out / "continued"


@pytest.mark.slow
def test_a_lora_continued_with_trl_comes_back(train, work, tmp_path):
    pytest.importorskip("trl", reason="trl is a dev extra")
    from tests.unit.adapters.test_export import export, trained_adapter

    _, ours, _ = trained_adapter(tmp_path, "lora")  # q_proj, v_proj, rank 4, alpha 8 on its own tiny llama
    base = tmp_path / "base"
    assert export(ours, "--out", tmp_path / "peft", "--format", "peft") == 0
    continued = continue_with_trl(base, tmp_path / "peft", tmp_path)
    model, _ = adamole_dist.from_pretrained(continued)
    theirs = peft.PeftModel.from_pretrained(plain(base), str(continued)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, atol=1e-5, rtol=0)
    started = first_loss(train, base, work / "alpaca", tmp_path / "init_run", "--init_from_peft", continued)
    merged_model = merged_base(base, continued, tmp_path / "merged")
    merged = first_loss(train, merged_model, work / "alpaca", tmp_path / "fresh_run")
    assert started == pytest.approx(merged, rel=1e-5)
