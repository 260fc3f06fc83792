"""The run's memory beside its plan: at the start rank 0 logs the planner's prediction (planning/) for the run as
built (the loaded model's config, this world size, the expert placement chosen, the options), and at the end the
measured peak beside it; final_metrics.json records both (predicted_peak_mb, measured_peak_mb).

Measured per rank and reported as the largest over the ranks (one gather): on a GPU torch.cuda.max_memory_allocated,
reset when the loop starts, so the model's load is not counted (the plan is of a training step); on a CPU the
process's peak RSS over its whole life, as the CPU plan counts it (process baseline included; a process that ran
something larger before reports that peak)."""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys

import torch

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.sft_task import IGNORE, PackedRows
from adamole_dist.parallel import collectives
from adamole_dist.planning.activations import planned_target_names
from adamole_dist.planning.memory_plan import MB, plan_memory
from adamole_dist.planning.model_shape import shape_from_config
from adamole_dist.planning.plan_config import PlanConfig, plan_config_from_train
from adamole_dist.planning.render import plan_text
from adamole_dist.runtime.process_group import device_for

log = logging.getLogger(__name__)


def run_plan_config(run, device: torch.device) -> PlanConfig:
    """The PlanConfig of a built Run: its options, world size and placement, the modules actually adapted, and
    whether its DeepSpeed config offloads the optimizer."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    offload = run.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    generates = run.sft is not None and bool(run.sft.sample_prompts or run.sft.answer_prompts)
    plan = plan_config_from_train(run.cfg, run.dist_info.world_size, kind, generates=generates)
    return dataclasses.replace(plan, model=run.model_path, ep_size=run.layout.ep_size,
                               optimizer_offload=offload in ("cpu", "nvme"), target_fraction=target_fraction(run))


TARGET_ROWS_READ = 1000  # rows target_fraction reads at most (evenly spaced): a large set's labels stay on disk


def target_fraction(run) -> float:
    """Free-form data: the largest share of a training row's max_length positions that carry a loss target (the
    chunked loss computes logits for those only: with the loss on the assistant's replies, a small share), over
    at most TARGET_ROWS_READ rows spread over the set; 1.0 for multiple choice, which the plan does not look into."""
    if run.sft is None:
        return 1.0
    rows = run.train_examples
    examples_of_row = (lambda i: rows[i]) if isinstance(rows, PackedRows) else (lambda i: [rows[i]])
    step = max(1, len(rows) // TARGET_ROWS_READ)
    most = max((sum(count_targets(e["labels"]) for e in examples_of_row(i)) for i in range(0, len(rows), step)),
               default=0)
    return min(1.0, max(most, 1) / run.cfg.max_length)


def count_targets(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE)


def planned_peak(run, device: torch.device) -> tuple[str, float | None]:
    """(what rank 0 logs, the predicted peak in MB); None where the planner does not model this model."""
    config = getattr(run.engine.module, "config", None)
    if config is None:
        return "memory plan: none (the model has no config for the planner to read)", None
    try:
        shape = shape_from_config(config.to_dict(), run.model_path)
        plan = dataclasses.replace(run_plan_config(run, device),
                                   target_modules=planned_target_names(shape, run.adapters.targets))
        return plan_text(shape, plan), plan_memory(shape, plan).device_total / MB
    except (ConfigError, ValueError) as e:  # a model family (or module) the formulas do not cover
        return f"memory plan: none ({e})", None


def log_planned_peak(run) -> float | None:
    """Rank 0 logs the plan and returns its predicted peak (MB; None elsewhere or unplanned); every rank starts
    counting its device's peak here."""
    device = device_for(run.dist_info)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not run.dist_info.is_main:
        return None
    text, predicted = planned_peak(run, device)
    log.info(text)
    return predicted


def measured_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def peak_beside_plan(run, predicted_mb: float | None) -> dict:
    """The measured peak of every rank (collective); rank 0 logs the largest beside the plan. Returns the
    final_metrics.json fields."""
    device = device_for(run.dist_info)
    peaks = collectives.all_gather_objects(measured_peak_bytes(device))
    top = max(range(len(peaks)), key=peaks.__getitem__)
    measured_mb = peaks[top] / MB
    if run.dist_info.is_main:
        log.info(peak_line(measured_mb, top, len(peaks), device.type, predicted_mb))
    return {"predicted_peak_mb": None if predicted_mb is None else round(predicted_mb, 1),
            "measured_peak_mb": round(measured_mb, 1)}


def peak_line(measured_mb: float, rank: int, ranks: int, device_type: str, predicted_mb: float | None) -> str:
    what = "torch.cuda.max_memory_allocated" if device_type == "cuda" else "peak RSS"
    where = f"rank {rank}, the largest of {ranks} ranks" if ranks > 1 else "one rank"
    beside = "no plan" if predicted_mb is None else (
        f"plan {predicted_mb:,.0f} MB, measured {100 * (measured_mb / predicted_mb - 1):+.0f} %")
    return f"memory: measured peak {measured_mb:,.0f} MB per rank ({what}, {where}); {beside}"
