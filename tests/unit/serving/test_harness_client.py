"""lm-evaluation-harness's ``local-completions`` model type against the server: the local multiple-choice task
scored through HTTP (prompt log-likelihoods from ``echo`` + ``logprobs``, token-id prompts) gets the same
accuracy, question by question, as ``launch/eval.py --harness`` (lm-eval's HFLM in process) on the same
adamole adapter."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[harness]'")
pytest.importorskip("tenacity", reason="lm-eval's API models need its api extra: pip install 'lm-eval[api]'")

from adamole_dist.serving.models import load_served_models  # noqa: E402
from tests.helpers.serving import running_server  # noqa: E402
from tests.unit.cli.test_harness import QUESTIONS, bos_tokenizer, record  # noqa: E402


@pytest.fixture(scope="module")
def adapter_and_data(tmp_path_factory):
    """A tiny Llama with a BOS-adding tokenizer, an adamole adapter on it (random experts), the task's data."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from adamole_dist.adapters.files import adapter_state, save_adapter
    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.config.adapter import AdapterConfig

    root = tmp_path_factory.mktemp("harness_serving")
    tok = bos_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    adapters = inject_adapters(model, AdapterConfig(method="adamole", num_experts=4, rank=2,
                                                    target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for p in adapters.expert_parameters():
            p.normal_(0.0, 0.5)
    meta = {"base_model": str(root / "model"), "base_model_path": str(root / "model"), "task_type": "causal_lm",
            "pooling": "cls", "trainable_modules": [], "step": 1}
    save_adapter(root / "adapter", adapter_state(adapters), adapters.cfg, meta)
    (root / "data" / "ARC-Easy").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "data" / "ARC-Easy" / f"{split}.json").write_text(json.dumps([record(*q) for q in QUESTIONS]))
    return root


@pytest.mark.slow  # lm-eval over HTTP (~25 s); the openai client's tests of the server stay in the default suite
def test_local_completions_through_the_server_scores_as_launch_eval_harness(adapter_and_data):
    from lm_eval.tasks import TaskManager

    from adamole_dist.cli import eval as eval_cli  # launch/eval.py --harness: HFLM in process

    root = adapter_and_data
    out = root / "res.json"
    assert eval_cli.main(["--adapter", str(root / "adapter"), "--dataset", str(root / "data" / "ARC-Easy"),
                          "--lm_framing", "question_answer", "--batch_size", "4", "--json", str(out),
                          "--autocast", "none",  # the server computes in fp32: the same numbers, not bf16's
                          "--harness", "arc_easy_local", "--harness_data", str(root / "data")]) == 0
    in_process = json.loads((root / "res.harness.json").read_text())["results"]["arc_easy_local"]
    samples = [json.loads(line) for line in (root / "res.harness_samples.jsonl").read_text().splitlines()]

    models = load_served_models(None, {"adamole": root / "adapter"}, "base", device="cpu")
    with running_server(models, max_model_len=256) as (url, engine):
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["arc_easy_local"], num_fewshot=0, log_samples=True,
            model_args={"base_url": f"{url}/v1/completions", "model": "adamole", "tokenizer": str(root / "model"),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": True,
                        "num_concurrent": 4, "max_retries": 1},
            task_manager=TaskManager(include_path=str(root / "res.harness_tasks")))
        assert engine.health()["requests"]["completed"] == len(QUESTIONS) * 4  # one request per choice
    results = served["results"]["arc_easy_local"]
    assert results["acc,none"] == pytest.approx(in_process["acc,none"])
    assert results["acc_norm,none"] == pytest.approx(in_process["acc_norm,none"])
    rows = sorted(served["samples"]["arc_easy_local"], key=lambda r: r["doc_id"])
    expected = {s["doc_id"]: s["loglikelihoods"] for s in samples}
    for row in rows:
        assert [float(r[0]) for r in row["filtered_resps"]] == pytest.approx(expected[row["doc_id"]], abs=1e-4)
