"""adamole_dist.from_pretrained: a saved adapter loads into a plain transformers model (no process
group, no DeepSpeed) with the logits it had when saved; the experts are in the module tree for
inference (.to(dtype), .half(), state_dict()), not for training; bad directories are named; an adapter
trained with expert parallelism (2 gloo ranks, ep_size 2) gives the training processes' logits."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import adamole_dist
from adamole_dist.adapters.files import CONFIG_NAME, adapter_state, save_adapter
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from tests.helpers.launch_utils import check, run
from tests.helpers.saved_adapters import CHAT_TEMPLATE, randomize_adapters
from tests.helpers.tiny_models import write_tiny_llama

INPUT_IDS = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102],
                          [101, 7592, 2088, 102, 2023, 2003, 1037, 3231]])
METHODS = ["adamole", "mole_topk", "lora"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def saved_adapter(folder, base_dir, method, meta=None):
    """(adapter dir, the logits of the adapted model that was saved) -- inject, randomise, save."""
    model, _, _, path = load_model_and_tokenizer(str(base_dir), "causal_lm")
    model.eval()
    cfg = AdapterConfig(method=method, dropout=0.0)
    adapters = inject_adapters(model, cfg)
    randomize_adapters(adapters)
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
    meta = {"base_model": str(base_dir), "base_model_path": path, "task_type": "causal_lm", "pooling": "cls",
            "trainable_modules": [], "step": 0, **(meta or {})}
    save_adapter(folder, adapter_state(adapters), cfg, meta)
    return folder, logits


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_adapter_loads_with_its_logits(tmp_path, base_dir, method):
    folder, saved = saved_adapter(tmp_path / "adapter", base_dir, method)
    model, tokenizer = adamole_dist.from_pretrained(folder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.adamole_adapters.cfg.method == method
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(logits, saved, atol=1e-6, rtol=1e-6)
    base, _, _, _ = load_model_and_tokenizer(str(base_dir), "causal_lm")
    with torch.no_grad():
        plain = base(input_ids=INPUT_IDS).logits
    assert (logits - plain).abs().max() > 1e-2  # the adapter changes the logits: the check above can fail
    assert tokenizer.pad_token_id is not None


def test_an_encoder_adapter_loads_with_its_head_and_pooling(tmp_path):
    """seq_cls: the trained head (modules_to_save) and the pooling recorded in the config come back."""
    from tests.helpers.tiny_models import write_tiny_bert

    base_dir = write_tiny_bert(tmp_path / "tiny_bert")
    model, _, _, path = load_model_and_tokenizer(str(base_dir), "seq_cls", pooling="mean")
    model.eval()
    cfg = AdapterConfig(method="adamole", dropout=0.0)
    adapters = inject_adapters(model, cfg, trainable_modules=["classifier"])
    randomize_adapters(adapters)
    with torch.no_grad():
        model.classifier.weight.normal_()
        saved = model(input_ids=INPUT_IDS).logits
    save_adapter(tmp_path / "adapter", adapter_state(adapters), cfg,
                 {"base_model": str(base_dir), "base_model_path": path, "task_type": "seq_cls", "pooling": "mean",
                  "trainable_modules": ["classifier"], "step": 0})
    loaded, _ = adamole_dist.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT_IDS).logits, saved, atol=1e-6, rtol=1e-6)


def test_model_argument_takes_a_path_or_an_instance(tmp_path, base_dir):
    folder, saved = saved_adapter(tmp_path / "adapter", base_dir, "adamole")
    by_path, _ = adamole_dist.from_pretrained(folder, model=str(base_dir))
    instance, _, _, _ = load_model_and_tokenizer(str(base_dir), "causal_lm")
    by_instance, tokenizer = adamole_dist.from_pretrained(folder, model=instance)
    assert by_instance is instance and tokenizer is not None
    with torch.no_grad():
        for model in (by_path, by_instance):
            torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, saved, atol=1e-6, rtol=1e-6)


def test_experts_are_in_the_module_tree_for_inference_only(tmp_path, base_dir):
    folder, saved = saved_adapter(tmp_path / "adapter", base_dir, "adamole")
    model, _ = adamole_dist.from_pretrained(folder)
    q = model.model.layers[0].self_attn.q_proj
    state = model.state_dict()
    expert_keys = sorted(k for k in state if ".experts." in k)
    assert len(expert_keys) == 2 * 8  # lora_A and lora_B of 8 adapted linears (q, k, v, o of 2 layers)
    assert state["model.layers.0.self_attn.q_proj.experts.lora_A"].shape == (8, 4, 32)
    assert any(p is q.experts.lora_A for p in model.parameters())

    model.to(torch.float64)
    assert q.experts.lora_A.dtype == torch.float64 and q.router.gate_weight.dtype == torch.float64
    with torch.no_grad():
        logits64 = model(input_ids=INPUT_IDS).logits
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64.float(), saved, atol=1e-3, rtol=1e-3)  # fp32 reference
    model.half()
    assert q.experts.lora_A.dtype == torch.float16 and q.experts.lora_B.dtype == torch.float16
    assert model.adamole_adapters.expert_banks["model.layers.0.self_attn.q_proj"] is q.experts
    model.train()
    assert q.experts.training
    model.eval()
    assert not q.experts.training

    # Training (inject_adapters alone) keeps them out of the tree: ZeRO-3 must never see them.
    fresh, _, _, _ = load_model_and_tokenizer(str(base_dir), "causal_lm")
    inject_adapters(fresh, AdapterConfig(method="adamole"))
    assert not any(".experts." in k for k in fresh.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_adapted_model_gives_the_cpu_logits(tmp_path, base_dir):
    folder, saved = saved_adapter(tmp_path / "adapter", base_dir, "adamole")
    model, _ = adamole_dist.from_pretrained(folder, device="cuda")
    assert model.model.layers[0].self_attn.q_proj.experts.lora_A.is_cuda
    mask = torch.ones_like(INPUT_IDS)
    mask[1, :3] = 0
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS.cuda()).logits
        model(input_ids=INPUT_IDS.cuda(), attention_mask=mask.cuda())  # a padding mask on the device
        out = model.generate(input_ids=INPUT_IDS.cuda(), attention_mask=mask.cuda(), max_new_tokens=3,
                             do_sample=False, pad_token_id=0)
    assert out.is_cuda
    torch.testing.assert_close(logits.cpu(), saved, atol=1e-4, rtol=1e-4)  # TF32/kernels differ from CPU
    stats = model.adamole_adapters.context.pop_stats()
    assert all(s.is_cuda for s in stats.values())


def test_the_chat_template_training_used_is_set_on_the_tokenizer(tmp_path, base_dir):
    folder, _ = saved_adapter(tmp_path / "adapter", base_dir, "lora",
                              meta={"prompt_format": "chat", "chat_template": CHAT_TEMPLATE})
    _, tokenizer = adamole_dist.from_pretrained(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_bad_adapter_directories_are_named(tmp_path, base_dir):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}") + ".*does not exist"):
        adamole_dist.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{empty / CONFIG_NAME} not found")):
        adamole_dist.from_pretrained(empty)
    folder, _ = saved_adapter(tmp_path / "adapter", base_dir, "adamole")
    config = folder / CONFIG_NAME
    config.write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"{config} is not valid JSON")):
        adamole_dist.from_pretrained(folder)
    config.write_text(json.dumps({"format_version": 1, "adapter": {"method": "adamole", "experts": 3}}))
    with pytest.raises(ConfigError, match=re.escape(f"{config}: adapter config has unknown fields: experts")):
        adamole_dist.from_pretrained(folder)
    config.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match=re.escape(f"{config} holds no adapter configuration")):
        adamole_dist.from_pretrained(folder)


def test_import_stays_light():
    """`import adamole_dist` does not load transformers; from_pretrained loads it when asked for."""
    code = "import sys, adamole_dist; assert 'transformers' not in sys.modules; adamole_dist.from_pretrained"
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- an adapter trained with expert parallelism -------------------------------------------------------
# The training-time logits come from the training processes themselves: this driver runs the trainer
# exactly as launch/train.py does (parse the options, start the process group, build the run, train,
# export the adapter), then makes one more forward through the DeepSpeed engine -- ZeRO-3 base, experts
# split over the 2 EP ranks, tokens dispatched between them -- and rank 0 saves its logits.
EP_DRIVER = """
import sys
import torch
from adamole_dist.config.cli import parse_train_config
from adamole_dist.runtime.process_group import init_distributed, shutdown_distributed
from adamole_dist.train.assembly import build_run
from adamole_dist.train.loop import Trainer

out_file, argv = sys.argv[1], sys.argv[2:]
cfg = parse_train_config(argv)
info = init_distributed(timeout_s=cfg.comm_timeout, backend=cfg.dist_backend)
run = build_run(cfg, info)
try:
    Trainer(run).train()
    assert run.layout.ep_size == 2
    run.adapters.train(False)
    run.engine.eval()
    ids = torch.tensor({ids})
    with torch.no_grad():
        logits = run.engine(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if info.is_main:
        torch.save(logits.cpu(), out_file)
finally:
    run.close()
shutdown_distributed()
"""


@pytest.mark.slow
def test_an_adapter_trained_at_ep_size_2_gives_the_training_logits(tmp_path):
    from tests.helpers.launch_utils import BIN, free_port

    model_dir = write_tiny_llama(tmp_path / "tiny_llama")
    driver = tmp_path / "ep_driver.py"
    driver.write_text(EP_DRIVER.format(ids=INPUT_IDS.tolist()))
    out, logits_file = tmp_path / "run", tmp_path / "train_logits.pt"
    args = ["--model", str(model_dir), "--task_type", "causal_lm", "--ds_config", "ds_configs/zero3.json",
            "--dataset", "builtin:word_categories", "--autocast", "none",
            "--output_dir", str(out), "--ep_size", "2", "--max_steps", "4", "--micro_batch_size", "4",
            "--max_length", "32", "--max_train_examples", "64", "--max_eval_examples", "8", "--eval_batch_size", "4",
            "--no-eval_at_start", "--eval_interval", "0", "--log_interval", "1", "--lr", "1e-2", "--dropout", "0"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(driver),
           str(logits_file), *args]
    check(run(cmd, timeout=900))
    trained = torch.load(logits_file)

    assert not torch.distributed.is_initialized()
    model, _ = adamole_dist.from_pretrained(out / "adapter")
    assert not torch.distributed.is_initialized()  # loading needed no process group
    assert all(bank.num_experts == 8 for bank in model.adamole_adapters.expert_banks.values())
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)
    base, _, _, _ = load_model_and_tokenizer(str(model_dir), "causal_lm")
    with torch.no_grad():
        plain = base(input_ids=INPUT_IDS).logits
    assert (trained - plain).abs().max() > 1e-3  # training moved the logits well beyond the tolerance
