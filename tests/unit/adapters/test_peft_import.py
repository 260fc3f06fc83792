"""PEFT in (adapters/peft_import.py, peft_init.py), against the real ``peft``: a PEFT LoRA folder loads
through from_pretrained, generate.py and the server with PEFT's own logits; --init_from_peft starts our
LoRA from it (same modules and rank, checked); --init_experts_from_peft splits it by rank into AdaMoLE
experts whose first delta, the gate at zero (uniform routing weights), is the LoRA's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adamole_dist
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.adapters.peft_init import init_experts_from_peft, init_from_peft
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from tests.helpers.tiny_models import write_tiny_llama

peft = pytest.importorskip("peft", reason="peft is a dev extra")
TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523]])


def plain_base(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def peft_lora(base_dir: Path, folder: Path, r: int, alpha: float, seed: int = 0) -> torch.Tensor:
    """A trained-looking PEFT LoRA (random A and B) saved to ``folder``; returns PEFT's logits on IDS."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(plain_base(base_dir), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_a_peft_lora_folder_loads_with_peft_s_logits(base_dir, tmp_path):
    expected = peft_lora(base_dir, tmp_path / "peft", r=4, alpha=8)
    model, tokenizer = adamole_dist.from_pretrained(tmp_path / "peft")
    assert model.adamole_adapters.cfg.method == "lora" and model.adamole_adapters.cfg.rank == 4
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-4)
    assert tokenizer is not None


def test_generate_and_the_server_take_a_peft_folder(base_dir, tmp_path, capsys):
    from adamole_dist.cli.generate import main
    from adamole_dist.serving.models import load_served_models

    peft_lora(base_dir, tmp_path / "peft", r=4, alpha=8)
    assert main(["--adapter", str(tmp_path / "peft"), "--prompt", "the cat", "--max_new_tokens", "2",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()
    models = load_served_models(None, {"p": tmp_path / "peft"}, "base", device="cpu")
    assert set(models) == {"base", "p"} and models["p"].adapters.cfg.method == "lora"


def test_init_from_peft_continues_the_lora(base_dir, tmp_path):
    expected = peft_lora(base_dir, tmp_path / "peft", r=4, alpha=8)
    model = plain_base(base_dir)
    adapters = inject_adapters(model, AdapterConfig(method="lora", rank=4, alpha=8, dropout=0.0,
                                                    target_modules=TARGETS))
    init_from_peft(adapters, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-4)
    wrong_rank = inject_adapters(plain_base(base_dir), AdapterConfig(method="lora", rank=8, target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"init_from_peft \(.*\): the PEFT LoRA has rank r=4, this run's --rank is 8"):
        init_from_peft(wrong_rank, tmp_path / "peft")
    other_modules = inject_adapters(plain_base(base_dir), AdapterConfig(method="lora", rank=4,
                                                                        target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"the adapted modules differ \(the PEFT LoRA adapts .*v_proj"):
        init_from_peft(other_modules, tmp_path / "peft")


@pytest.mark.parametrize("alpha", [16.0, 3.0])  # the expert scaling differs from the LoRA's: B is rescaled
def test_experts_split_by_rank_start_with_the_loras_delta(base_dir, tmp_path, alpha):
    expected = peft_lora(base_dir, tmp_path / "peft", r=8, alpha=16)
    base = plain_base(base_dir)
    with torch.no_grad():
        unadapted = base(IDS).logits
    adapters = inject_adapters(base, AdapterConfig(method="adamole", num_experts=4, rank=2, alpha=alpha,
                                                   dropout=0.0, target_modules=TARGETS))
    init_experts_from_peft(adapters, tmp_path / "peft")
    with torch.no_grad():
        logits = base.eval()(IDS).logits
    assert (expected - unadapted).abs().max() > 1e-2  # the LoRA moves the logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    misfit = inject_adapters(plain_base(base_dir), AdapterConfig(method="adamole", num_experts=8, rank=2,
                                                                 target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"rank r=8 must equal --num_experts x --rank \(8 x 2 = 16\)"):
        init_experts_from_peft(misfit, tmp_path / "peft")


def test_what_cannot_load_is_named(base_dir, tmp_path):
    peft_lora(base_dir, tmp_path / "peft", r=4, alpha=8)
    doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**doc, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"use_dora \(True\) is not supported"):
        adamole_dist.from_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**doc, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match=r"is a PEFT IA3 adapter; only PEFT LoRA"):
        adamole_dist.from_pretrained(tmp_path / "peft")
    with pytest.raises(ConfigError, match=r"init_from_peft starts method lora; adapter.method is 'adamole'"):
        TrainConfig(init_from_peft=str(tmp_path / "peft"))
    with pytest.raises(ConfigError, match=r"init_experts_from_peft \(.*\) is not a PEFT LoRA folder"):
        TrainConfig(init_experts_from_peft=str(tmp_path))
