"""The end of a run whose held-out answers were scored by generation (answer_accuracy): the first few
held-out questions with the base model's answers (the evaluation before the first step) and the adapted
model's, the accuracy before -> after, how long training took and where the adapter is -- what a person
who just ran the default job wants to see; and the training time it quotes, evaluations left out."""

from __future__ import annotations

import functools
import time

from adamole_dist.train.reporting import fmt_duration

SHOWN = 3


class TrainingClock:
    """Seconds since the training loop started, the evaluations inside it left out (``pausing`` wraps a
    method of an object whose ``clock`` this is)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.paused_s = 0.0

    def start(self) -> float:
        """(Re)start at zero; the start time (time.perf_counter)."""
        self.started, self.paused_s = time.perf_counter(), 0.0
        return self.started

    @property
    def seconds(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started - self.paused_s

    @staticmethod
    def pausing(method):
        @functools.wraps(method)
        def paused(owner, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(owner, *args, **kwargs)
            finally:
                owner.clock.paused_s += time.perf_counter() - t0
        return paused


def compared_with_base(initial_eval: dict | None, train_seconds: float) -> dict:
    """final_metrics' additions: the training loop's time (evaluations left out) and, when the run began
    with an evaluation that scored accuracy, that accuracy as ``zero_shot_accuracy`` (the base's)."""
    out = {"train_seconds": round(train_seconds, 1)}
    if initial_eval is not None and "accuracy" in initial_eval:
        out["zero_shot_accuracy"] = initial_eval["accuracy"]
    return out


def mark(answer: dict) -> str:
    return "right" if answer["correct"] else "wrong"


def before_after_lines(initial: dict | None, final: dict, train_seconds: float, steps: int, adapter_dir,
                       shown: int = SHOWN) -> list[str]:
    """Rank 0's closing lines; [] when the final evaluation answered nothing."""
    after = final.get("answers")
    if not after:
        return []
    before = (initial or {}).get("answers")
    lines = [f"held-out questions, {'base -> adapted' if before else 'adapted'} ({min(shown, len(after))} of "
             f"{len(after)}):"]
    for k, now in enumerate(after[:shown]):
        lines.append(f"  Q: {now['question']}")
        if before:
            lines.append(f"     base:    {before[k]['completion']!r} ({mark(before[k])})")
        lines.append(f"     adapted: {now['completion']!r} ({mark(now)}; expected {now['reference']!r})")
    was = f"{initial['accuracy']:.3f} -> " if before else ""
    lines.append(f"held-out accuracy (exact match of the generated answer): {was}{final['accuracy']:.3f} "
                 f"({final['correct']}/{final['answered']})")
    lines.append(f"training took {fmt_duration(train_seconds)} ({steps} steps); adapter: {adapter_dir}")
    return lines
