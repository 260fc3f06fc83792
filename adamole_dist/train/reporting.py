"""What a run reports: the log line of every window of optimizer steps (losses averaged over ranks,
throughput, padding, routing, expert-parallel traffic), the summary line at its end, routing over all
ranks, parameter memory per rank, and durations as an operator reads them in a log file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.parallel import collectives
from adamole_dist.progress import bar

log = logging.getLogger(__name__)


def routing_over_ranks(stats_by_layer: dict[str, torch.Tensor], has_tau: bool) -> dict:
    """``summarize_routing`` of the statistics summed over every rank (collective: all ranks call
    it, with the same layer names)."""
    if not stats_by_layer:
        return summarize_routing({}, has_tau)
    names = sorted(stats_by_layer)
    flat = collectives.all_reduce_sum(torch.stack([stats_by_layer[n].double() for n in names]))
    return summarize_routing(dict(zip(names, flat)), has_tau)


def param_bytes(module: torch.nn.Module) -> dict:
    """Bytes of parameters this rank holds (ZeRO-3 shard where partitioned) and their full size."""
    out = {"frozen_local": 0, "frozen_full": 0, "trainable_local": 0, "trainable_full": 0}
    for p in module.parameters():
        es = p.element_size() if not hasattr(p, "ds_tensor") else p.ds_tensor.element_size()
        local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_local"] += local * es
        out[f"{kind}_full"] += full * es
    return out


def memory_per_rank(module: torch.nn.Module, expert_parameters: list[torch.nn.Parameter]) -> list[dict]:
    """``param_bytes`` plus the experts each rank holds, of every rank (collective)."""
    mine = param_bytes(module)
    mine["experts_local"] = sum(p.numel() * p.element_size() for p in expert_parameters)
    return collectives.all_gather_objects(mine)


def print_memory(everyone: list[dict], say=log.info) -> None:
    mb = 1 / 2**20
    for r, b in enumerate(everyone):
        say(f"  rank {r}: frozen base {b['frozen_local'] * mb:8.2f} MB of {b['frozen_full'] * mb:8.2f} MB"
            f" | trainable (engine) {b['trainable_local'] * mb:6.2f} MB | experts {b['experts_local'] * mb:6.2f} MB")


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# -- the window of steps between two log lines -------------------------------------------------------------
WINDOW_SUMS = ("task_loss", "aux_loss", "grad_norm", "expert_grad_norm")


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last log line."""

    sums: dict = field(default_factory=lambda: dict.fromkeys(WINDOW_SUMS, 0.0))
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens of every micro batch
    slots: int = 0  # token slots, padding included
    t0: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict, micro_batches: list[dict]) -> None:
        for key in WINDOW_SUMS:
            self.sums[key] += metrics[key]
        self.steps += 1
        self.tokens += sum(int(m["attention_mask"].sum()) for m in micro_batches)
        self.slots += sum(m["attention_mask"].numel() for m in micro_batches)


def window_metrics(window: LogWindow, *, world_size: int, lr: float, has_experts: bool, epoch: int) -> dict:
    """Means over the window's steps: losses averaged over ranks (collective), grad norms (global already),
    lr, real tokens per second over every rank, the padding share."""
    task, aux, tokens, slots = collectives.sum_over_ranks([window.sums["task_loss"], window.sums["aux_loss"],
                                                           window.tokens, window.slots])
    n = max(window.steps, 1)
    elapsed = time.perf_counter() - window.t0
    return {"task_loss": task / n / world_size, "aux_loss": aux / n / world_size,
            "grad_norm": window.sums["grad_norm"] / n,
            **({"expert_grad_norm": window.sums["expert_grad_norm"] / n} if has_experts else {}),
            "lr": lr, "tokens_per_s": tokens / max(elapsed, 1e-9), "padding_fraction": 1.0 - tokens / max(slots, 1),
            "epoch": epoch}


def dispatch_metrics(counters, steps: int) -> dict:
    """Expert-parallel traffic and all-to-all time per optimizer step (this rank), then reset (``counters``:
    the dispatcher's TrafficCounters; None for a dispatcher that does not communicate)."""
    if counters is None:
        return {}
    out = {"a2a_ms_per_step": 1000 * counters.a2a_seconds / steps,
           "a2a_bytes_per_step": counters.bytes_sent / steps,
           "a2a_bytes_min_per_step": counters.bytes_min / steps}
    counters.reset()
    return out


def window_line(step: int, total_steps: int, metrics: dict, timing: str) -> str:
    return (f"[step {step}/{total_steps}] task_loss {metrics['task_loss']:.4f} "
            f"aux_loss {metrics['aux_loss']:.4f} lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f}"
            f" pad {100 * metrics['padding_fraction']:.0f}%"
            f" grad_norm {metrics['grad_norm']:.3g}"
            + (f" expert_grad_norm {metrics['expert_grad_norm']:.3g}" if "expert_grad_norm" in metrics else "")
            + (f" active {metrics['mean_active_experts']:.2f}" if "mean_active_experts" in metrics else "")
            + f" | {timing}")


def loop_timing(t0: float, start_step: int, step: int, total_steps: int) -> str:
    """'elapsed 1m05s eta 3m20s' since the loop started at ``t0`` (the log line an operator reads in a file)."""
    done = step - start_step
    elapsed = time.perf_counter() - t0
    eta = elapsed / done * (total_steps - step) if done else float("nan")
    return f"elapsed {fmt_duration(elapsed)} eta {fmt_duration(eta)}"


def summary_line(step: int, train_losses: list[float], initial_eval: dict | None, final: dict, free_form: bool,
                 adapter_dir) -> str:
    """The run's last line: steps, first and last logged task loss, held-out metric before -> after."""
    key, name = ("eval_loss", "held-out loss") if free_form else ("accuracy", "held-out accuracy")
    if "accuracy" in final and (initial_eval is None or "accuracy" in initial_eval):  # free-form answers scored
        key, name = "accuracy", "held-out accuracy"
    held_out = f"{initial_eval[key]:.4f} -> {final[key]:.4f}" if initial_eval else f"{final[key]:.4f}"
    loss = f"{train_losses[0]:.4f} (first log) -> {train_losses[-1]:.4f} (last log)" if train_losses else "n/a"
    return (f"done: {step} steps | task loss {loss} | {name} {held_out} on {final['total']} examples | "
            f"adapter: {adapter_dir}")


def progress_bar(total_steps: int, step: int):
    """Rank 0's tqdm bar of the training steps on a terminal (progress.py decides); None elsewhere (log lines)."""
    return bar(total=total_steps, initial=step, desc="train")
