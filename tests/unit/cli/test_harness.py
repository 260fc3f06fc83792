"""lm-evaluation-harness against our scorer: on a tiny Llama and a local task YAML over records this test
writes, the harness's acc and acc_norm equal ours question by question (CausalLMTask with the
question_answer framing), directly and through launch/eval.py --harness with the shipped YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -e '.[harness]'")

from adamole_dist.data import to_examples  # noqa: E402
from adamole_dist.data.choice_tasks import CausalLMTask  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
QUESTIONS = [  # choice texts of different lengths, so that acc and acc_norm (and its divisor) matter
    ("what is the sun", ["a star", "a very large planet", "ice", "the moon of earth"], 0),
    ("which animal barks", ["dog", "a small cat", "fish", "an old horse"], 0),
    ("what do plants need", ["water and light", "sand", "a car", "music"], 0),
    ("where do fish live", ["in trees", "water", "in the desert sand", "on clouds"], 1),
    ("what melts ice", ["heat", "cold air from the north", "a rock", "dark"], 0),
    ("which is a color", ["blue", "seven", "the running of a dog", "table"], 0),
    ("what is two plus two", ["four", "five hundred", "one", "a number larger than ten"], 0),
    ("what gives milk", ["a cow", "stone", "the wind", "a green leaf on a tree"], 0),
    ("what is frozen water", ["fire", "ice", "the sky", "a long wooden table"], 1),
    ("what do bees make", ["honey", "iron", "paper money", "loud music at night"], 0),
    ("which is a fruit", ["an apple", "a brick", "car", "the afternoon"], 0),
    ("what lights the day", ["the sun", "a lamp in the small house", "shoes", "rain"], 0),
]


def record(question: str, texts: list[str], label: int) -> dict:
    answers = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(texts))
    labels = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    return {"instruction": f"Please choose the correct answer to the question: {question}\n\n{answers}\n\n"
                           f"Answer format: {labels}",
            "input": "", "output": f"the correct answer is answer{label + 1}", "answer": f"answer{label + 1}"}


def bos_tokenizer():
    """The MiniLM word-piece vocabulary as a Llama-like tokenizer: [CLS] prepended as BOS, nothing appended
    (BERT's trailing [SEP] would end every context the harness encodes and misplace its continuation)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from tests.helpers.tiny_models import minilm_tokenizer

    backend = minilm_tokenizer().backend_tokenizer
    cls = backend.token_to_id("[CLS]")
    backend.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", cls)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]",
                                   pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = bos_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.5,  # log-likelihoods far apart: the divisor decides some answers
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "ARC-Easy").mkdir()
    records = [record(*q) for q in QUESTIONS]
    for split in ("train", "test"):
        (root / "ARC-Easy" / f"{split}.json").write_text(json.dumps(records))
    return root


def ours_per_question(model, tokenizer, records: list[dict]) -> dict[str, list[int]]:
    """Our per-question correctness by metric, acc_norm's predicted choices, and those of the old divisor
    (len(" " + text)) for contrast."""
    task = CausalLMTask(tokenizer, max_length=128, framing="question_answer")
    examples = to_examples(records)
    batch = task.eval_batch(examples)
    with torch.no_grad():
        scores = task.candidate_scores(model, batch)
        preds = task.predictions(model, batch)
    spaced = [int((s / torch.tensor([len(" " + t) for t in ex.choice_texts])).argmax())
              for s, ex in zip(scores, examples)]
    return {"acc": [int(p == ex.label) for p, ex in zip(preds["acc"].tolist(), examples)],
            "acc_norm": [int(p == ex.label) for p, ex in zip(preds["acc_norm"].tolist(), examples)],
            "norm_pred": preds["acc_norm"].tolist(), "spaced_pred": spaced,
            "scores": [s.tolist() for s in scores]}


TASK_YAML = """
task: tiny_local
dataset_path: json
dataset_kwargs:
  data_dir: {data_dir}
  data_files:
    test: ARC-Easy/test.json
output_type: multiple_choice
test_split: test
process_docs: !function utils.process_docs
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow  # the base model's parity; the adamole adapter's parity below stays in the default suite
def test_harness_scores_equal_ours_question_by_question(model_dir, data_dir, tmp_path):
    import shutil

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local.yaml").write_text(TASK_YAML.format(data_dir=json.dumps(str(data_dir))))
    shutil.copy2(REPO / "adamole_dist" / "evaluation" / "harness_tasks" / "utils.py", tasks / "utils.py")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = json.loads((data_dir / "ARC-Easy" / "test.json").read_text())
    ours = ours_per_question(model, tokenizer, records)
    assert ours["norm_pred"] != ours["spaced_pred"]  # the records tell the two divisors apart

    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
                                  tasks=["tiny_local"], num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    rows = sorted(out["samples"]["tiny_local"], key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(len(QUESTIONS)))
    harness_lls = [[float(x[0]) for x in r["filtered_resps"]] for r in rows]
    for theirs, mine in zip(harness_lls, ours["scores"]):
        assert theirs == pytest.approx(mine, abs=1e-4)
    assert [int(r["acc"]) for r in rows] == ours["acc"]
    assert [int(r["acc_norm"]) for r in rows] == ours["acc_norm"]
    results = out["results"]["tiny_local"]
    assert results["acc,none"] == pytest.approx(sum(ours["acc"]) / len(QUESTIONS))
    assert results["acc_norm,none"] == pytest.approx(sum(ours["acc_norm"]) / len(QUESTIONS))


def test_launch_eval_harness_with_the_shipped_task(model_dir, data_dir, tmp_path, capsys):
    from adamole_dist.cli import eval as eval_cli  # launch/eval.py, adamole-eval

    out = tmp_path / "res.json"
    code = eval_cli.main(["--model", str(model_dir), "--dataset", str(data_dir / "ARC-Easy"),
                          "--lm_framing", "question_answer", "--max_examples", "8", "--batch_size", "4",
                          "--json", str(out), "--harness", "arc_easy_local", "--harness_data", str(data_dir)])
    assert code == 0
    ours = json.loads(out.read_text())
    harness = json.loads((tmp_path / "res.harness.json").read_text())["results"]["arc_easy_local"]
    samples = [json.loads(line) for line in (tmp_path / "res.harness_samples.jsonl").read_text().splitlines()]
    assert len(samples) == ours["total"] == 8  # the same seeded subsample of questions
    assert harness["acc,none"] == pytest.approx(ours["accuracy"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    ran = json.loads((tmp_path / "res.harness.json").read_text())["configs"]["arc_easy_local"]
    assert str(data_dir) in json.dumps(ran)  # the task as it ran, its data folder filled in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.harness.json", "res.harness_samples.jsonl",
                                                          "res.harness_tasks", "res.json"]
    assert str(data_dir) in (tmp_path / "res.harness_tasks" / "arc_easy_local.yaml").read_text()


def test_missing_harness_data_exits_2_before_loading(tmp_path, capsys):
    from adamole_dist.cli import eval as eval_cli  # launch/eval.py, adamole-eval

    code = eval_cli.main(["--model", str(tmp_path / "no_model"), "--harness", "arc_easy_local",
                          "--harness_data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "--harness_data" in err and "ARC-Easy" in err and len(err.strip().splitlines()) == 1


def test_adamole_adapter_through_the_harness_scores_as_ours(model_dir, data_dir, tmp_path):
    """An injected adamole adapter in HFLM: no attention mask there, so right padding is routed, yet with a
    dropless method the real tokens' scores are unchanged and both scorers agree."""
    from transformers import AutoModelForCausalLM

    from adamole_dist.adapters.files import adapter_state, save_adapter
    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.config.adapter import AdapterConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = AdapterConfig(method="adamole", num_experts=4, rank=2, target_modules=["q_proj", "v_proj"])
    adapters = inject_adapters(model, cfg)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in adapters.expert_parameters():
            p.normal_(0.0, 0.5)
    meta = {"base_model": str(model_dir), "base_model_path": str(model_dir), "task_type": "causal_lm",
            "pooling": "cls", "trainable_modules": [], "step": 1}
    save_adapter(tmp_path / "run" / "adapter", adapter_state(adapters), cfg, meta)
    from adamole_dist.cli import eval as eval_cli  # launch/eval.py, adamole-eval

    out = tmp_path / "res.json"
    assert eval_cli.main(["--adapter", str(tmp_path / "run" / "adapter"), "--dataset", str(data_dir / "ARC-Easy"),
                          "--lm_framing", "question_answer", "--batch_size", "4", "--json", str(out),
                          "--harness", "arc_easy_local", "--harness_data", str(data_dir)]) == 0
    ours = json.loads(out.read_text())
    harness = json.loads((tmp_path / "res.harness.json").read_text())["results"]["arc_easy_local"]
    assert ours["total"] == len(QUESTIONS) and ours["mean_active_experts"] > 0
    assert harness["acc,none"] == pytest.approx(ours["accuracy"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_harness_alone_on_a_chat_adapter_writes_nothing_it_was_not_asked_to(model_dir, data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """Issue 40, case 11: an adapter trained on chat data has free-form data as its run's dataset, which our
    scorer cannot score ("messages records are free-form"): --harness alone needs no multiple-choice data.
    Without --json nothing is written, in the working directory least of all (./harness.harness_tasks was)."""
    from adamole_dist.cli import eval as eval_cli  # launch/eval.py, adamole-eval
    from tests.helpers.saved_adapters import write_adapter_dir

    adapter = write_adapter_dir(tmp_path / "run" / "adapter", model_dir, "lora", rank=2,
                                meta={"data_format": "messages", "prompt_format": "chat"})
    chats = tmp_path / "chats"
    chats.mkdir()
    (chats / "test.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "run" / "run_config.json").write_text(json.dumps({"dataset": str(chats), "model": str(model_dir)}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = eval_cli.main(["--adapter", str(adapter), "--harness", "arc_easy_local", "--harness_data", str(data_dir),
                          "--max_examples", "4", "--batch_size", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "free-form (messages): the harness alone scores this adapter" in out.out
    assert "harness arc_easy_local: acc " in out.out and "accuracy" not in out.out
    assert list(cwd.iterdir()) == []
