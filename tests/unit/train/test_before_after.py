"""The closing lines of a run whose answers were scored, and the training clock they quote."""

from adamole_dist.train import before_after
from adamole_dist.train.before_after import TrainingClock, before_after_lines, compared_with_base


def answers(*replies: str) -> list[dict]:
    refs = ["apple", "red", "piano", "hammer"]
    return [{"question": f"q{k}?", "completion": r, "reference": refs[k], "correct": r == refs[k]}
            for k, r in enumerate(replies)]


def test_three_questions_base_then_adapted_then_the_accuracy_and_the_adapter():
    initial = {"accuracy": 0.0, "answers": answers("The answer is apple.", "blue", "drum", "saw")}
    final = {"accuracy": 0.75, "correct": 3, "answered": 4, "answers": answers("apple", "red", "piano", "saw")}
    lines = before_after_lines(initial, final, 267.3, 60, "runs/default/adapter")
    assert lines[0] == "held-out questions, base -> adapted (3 of 4):"
    assert lines[1:4] == ["  Q: q0?", "     base:    'The answer is apple.' (wrong)",
                          "     adapted: 'apple' (right; expected 'apple')"]
    assert sum(line.startswith("  Q: ") for line in lines) == 3
    assert lines[-2] == "held-out accuracy (exact match of the generated answer): 0.000 -> 0.750 (3/4)"
    assert lines[-1] == "training took 4m27s (60 steps); adapter: runs/default/adapter"


def test_without_a_first_evaluation_only_the_adapted_answers_and_without_answers_nothing():
    final = {"accuracy": 0.5, "correct": 1, "answered": 2, "answers": answers("apple", "blue")}
    lines = before_after_lines(None, final, 5.0, 2, "a")
    assert lines[0] == "held-out questions, adapted (2 of 2):" and not any("base:" in line for line in lines)
    assert "0.500 (1/2)" in lines[-2] and "->" not in lines[-2]
    assert before_after_lines(None, {"eval_loss": 1.0}, 5.0, 2, "a") == []


def test_zero_shot_accuracy_only_when_the_first_evaluation_scored_one():
    assert compared_with_base({"accuracy": 0.25}, 12.34) == {"train_seconds": 12.3, "zero_shot_accuracy": 0.25}
    assert compared_with_base({"eval_loss": 2.0}, 1.0) == {"train_seconds": 1.0}
    assert compared_with_base(None, 1.0) == {"train_seconds": 1.0}


def test_the_clock_leaves_out_what_a_pausing_method_spends(monkeypatch):
    now = [100.0]  # a fake perf_counter: the test moves time, it never waits
    monkeypatch.setattr(before_after.time, "perf_counter", lambda: now[0])

    class Loop:
        def __init__(self):
            self.clock = TrainingClock()

        @TrainingClock.pausing
        def evaluate(self, seconds: float):
            now[0] += seconds
            return "done"

    loop = Loop()
    assert loop.clock.seconds == 0.0  # not started
    loop.evaluate(30.0)  # before the start (the first evaluation): the start resets it
    assert loop.clock.start() == 130.0
    now[0] += 5.0  # training
    assert loop.evaluate(20.0) == "done"
    now[0] += 2.0  # training
    assert loop.clock.seconds == 7.0
