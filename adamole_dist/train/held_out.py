"""The trainer's held-out evaluation: accuracy (multiple choice) or loss and perplexity (free-form data)
over every rank's shard with the routing it took, logged; then, for free-form data, greedy samples of
the fixed evaluation prompts.

Collective: every rank calls each function with the same arguments. ``stop`` is asked after every
batch and sample (the trainer's agreed stop flag); a yes raises data/evaluate.py's EvaluationStopped on
every rank at the same point, for the trainer to checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch

from adamole_dist.data.answer_match import exact_match
from adamole_dist.data.evaluate import check_stop, evaluate_accuracy, evaluate_loss
from adamole_dist.generation.batched import greedy_completion, greedy_replies
from adamole_dist.moe.routing_stats import print_routing_table
from adamole_dist.parallel import collectives
from adamole_dist.progress import counter
from adamole_dist.train.before_after import mark
from adamole_dist.train.generation_gather import generation_gather
from adamole_dist.train.reporting import fmt_duration, routing_over_ranks

Say = Callable[[str], None]


def evaluate_held_out(run, step: int, say: Say, stop: Callable[[], bool], print_layers: bool = True) -> dict:
    """The held-out metrics with the routing overall and per layer ("layers"), logged as "eval"."""
    run.adapters.context.pop_stats()  # drop partial training statistics
    score = evaluate_loss if run.sft is not None else evaluate_accuracy
    result = score(run.engine, run.task, run.eval_examples, run.cfg.eval_batch_size, rank=run.dist_info.rank,
                   world_size=run.dist_info.world_size, all_reduce=collectives.all_reduce_sum,
                   progress=progress_lines(run.dist_info.is_main, step, say), stop=stop)
    routing = routing_over_ranks(run.adapters.context.pop_stats(), run.cfg.adapter.has_tau)
    active = f" mean active experts {routing['overall']['mean_active_experts']:.2f}" if routing["layers"] else ""
    if run.sft is not None and run.sft.answer_prompts:
        result.update(answer_accuracy(run, step, say, stop))
    if run.sft is not None:
        answered = (f" | answer accuracy {result['accuracy']:.4f} ({result['correct']}/{result['answered']} exact)"
                    if "accuracy" in result else "")
        say(f"[step {step}] eval loss {result['eval_loss']:.4f} perplexity {result['perplexity']:.2f} "
            f"({result['eval_tokens']} target tokens, {result['total']} examples){answered}{active}")
    else:
        say(f"[step {step}] eval accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
            + (f" acc_norm {result['acc_norm']:.4f}" if "acc_norm" in result else "") + active)
    if print_layers and run.dist_info.is_main:
        print_routing_table(routing["layers"], say)
    logged = {k: v for k, v in result.items() if k != "answers"}  # the answers go to the "samples" record
    run.logger.log(step, "eval", {**logged, **routing["overall"], "layers": routing["layers"]})
    return {**result, **routing["overall"], "layers": routing["layers"]}


def answer_accuracy(run, step: int, say: Say, stop: Callable[[], bool]) -> dict:
    """Every held-out prompt answered by greedy generation, scored by exact match (data/answer_match.py):
    {"accuracy", "correct", "answered", "answers": [{"prompt", "completion", "reference", "correct"}]}.
    Every rank generates every prompt, eval_batch_size at a time (under ZeRO-3 the gathers, and with expert
    parallelism the all-to-alls, are collective; 60 short answers cost seconds); routing statistics are not
    evaluation's."""
    prompts, batch_size = run.sft.answer_prompts, run.cfg.eval_batch_size
    tokenizer = run.task.tokenizer
    answers = []
    bar = counter(f"answers (step {step})") if run.dist_info.is_main else None
    try:
        with generating(run.engine, run.task, say):
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                replies = greedy_replies(run.engine, run.task, [p.ids for p in batch], run.cfg.max_new_tokens_eval,
                                         synced=run.dist_info.world_size > 1)
                for p, reply in zip(batch, replies):
                    text = tokenizer.decode(reply, skip_special_tokens=True).strip()
                    answers.append({"prompt": tokenizer.decode(p.ids), "question": p.question, "completion": text,
                                    "reference": p.reference, "correct": exact_match(text, p.reference)})
                if bar is not None:
                    bar(len(answers), len(prompts))
                check_stop(stop, len(answers), len(prompts))
    finally:
        run.adapters.context.pop_stats()
    correct = sum(a["correct"] for a in answers)
    return {"accuracy": correct / len(answers), "correct": correct, "answered": len(answers), "answers": answers}


def progress_lines(is_main: bool, step: int, say: Say, every_s: float = 30.0):
    """Rank 0: a bar of the evaluation's batches on a terminal (progress.py), else a line every ``every_s``
    seconds through a long evaluation (batches are equal on all ranks)."""
    if not is_main:
        return None
    batches = counter(f"eval (step {step})")
    if batches is not None:
        return batches
    t0 = last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_s and done < total:
            last = now
            say(f"[step {step}] evaluating: batch {done}/{total} ({fmt_duration(now - t0)})")
    return report


@torch.no_grad()
def greedy_samples(model, task, prompts: list[tuple[list[int], str]], max_new_tokens: int, *,
                   world_size: int = 1, stop: Callable[[], bool] | None = None, say: Say | None = None) -> list[dict]:
    """{"prompt", "completion", "reference"} texts of each (prompt ids, reference) greedy continuation.
    Collective under ZeRO-3: every rank calls it with the same prompts. ``stop`` is asked after each."""
    out = []
    with generating(model, task, say):
        for ids, reference in prompts:
            new = greedy_completion(model, task, ids, max_new_tokens, synced=world_size > 1)
            out.append({"prompt": task.tokenizer.decode(ids), "completion": task.tokenizer.decode(new,
                        skip_special_tokens=False), "reference": reference})
            check_stop(stop, len(out), len(prompts))
    return out


@contextlib.contextmanager
def generating(model, task, say: Say | None):
    """The model in eval mode, with the whole of it gathered once where it fits (generation_gather.py);
    its training mode restored after. Collective."""
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    try:
        with generation_gather(net, task.device_for(net), say):
            yield
    finally:
        net.train(was_training)


def log_samples(run, step: int, say: Say, stop: Callable[[], bool], answers: list[dict] | None = None) -> None:
    """Greedy completions of the fixed evaluation prompts, printed and logged by rank 0 (every rank
    generates: ZeRO-3 gathers are collective); their routing is not evaluation's. ``answers``: the
    evaluation's own (answer_accuracy), whose first ones are these prompts' completions already."""
    if answers is not None:
        samples = answers[: len(run.sft.sample_prompts)]
    else:
        samples = greedy_samples(run.engine, run.task, run.sft.sample_prompts, run.cfg.max_new_tokens_eval,
                                 world_size=run.dist_info.world_size, stop=stop, say=say)
        run.adapters.context.pop_stats()
    for k, s in enumerate(samples):
        if "correct" in s:  # an answer: the question asked, not the rendered prompt
            say(f"[step {step}] sample {k}: {s['question'][-200:]!r} -> {s['completion']!r} ({mark(s)})")
        else:
            say(f"[step {step}] sample {k}: {s['prompt'][-200:]!r} -> {s['completion']!r}")
    run.logger.log(step, "samples", {"samples": samples})
