"""Multiple-choice accuracy of a loaded (adapted) model in one process, with the routing it took: what
``adamole-eval`` reports and writes with --json."""

from __future__ import annotations

from adamole_dist.data.evaluate import evaluate_accuracy
from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.progress import counter


def choice_accuracy(model, task, adapters, examples, batch_size: int) -> tuple[dict, dict]:
    """(data/evaluate.py's accuracy record, the routing summary of the evaluation: {"overall", "layers"};
    empty layers without an adapter)."""
    result = evaluate_accuracy(model, task, examples, batch_size, progress=counter("eval"))  # a bar on a terminal
    routing = summarize_routing(adapters.context.pop_stats() if adapters else {},
                                adapters.cfg.has_tau if adapters else False)
    return result, routing


def accuracy_record(result: dict, routing: dict, *, dataset: str, split: str, framing: str, autocast: str,
                    zero_shot: bool) -> dict:
    """The --json document: accuracy, routing overall and per layer, and what was evaluated how."""
    return {**result, **routing["overall"], "dataset": dataset, "split": split, "lm_framing": framing,
            "autocast": autocast, "zero_shot": zero_shot, "layers": routing["layers"]}
