"""Run assembly: everything a training run needs, built in order, before the loop starts.

Everything is validated before anything in the output directory is touched: the DeepSpeed config
(against DeepSpeed's own model), data, output dir, resume target, model and adapter targets. Then
the output dir is prepared, the engine and expert optimizer are built, a checkpoint is loaded
when resuming, and the metrics sinks are opened. The Trainer (loop.py) gets the finished Run and
holds only loop state.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import default_targets, find_target_modules, inject_adapters, matches, weight_shape
from adamole_dist.adapters.model_loading import default_trainable_modules, load_model_and_tokenizer
from adamole_dist.config.deepspeed import build_ds_config, ds_config_source, validate_with_deepspeed, zero_stage
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data import Example, load_examples
from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.data.tasks import build_task
from adamole_dist.ops.metrics_log import MetricsLogger, truncate_metrics
from adamole_dist.ops.output_dir import check_output_dir, prepare_output_dir
from adamole_dist.ops.stopping import PREEMPTED_MARKER
from adamole_dist.parallel import collectives
from adamole_dist.parallel.calibration import calibrated_ep_size
from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher, overlap_enabled, wire_bytes, wire_dtype
from adamole_dist.parallel.layout import ParallelLayout, build_layout
from adamole_dist.parallel.local_dispatcher import LocalDispatcher
from adamole_dist.parallel.placement import adapter_workload
from adamole_dist.parallel.process_group import DistInfo, device_for
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.expert_optimizer import ExpertOptimizer
from adamole_dist.train.reporting import memory_per_rank, print_memory
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for


@dataclass
class LoopPosition:
    """Where the loop stands: optimizer steps done and the data position after them."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class Run:
    """The built pieces of one training run (see the module docstring for the order)."""

    cfg: TrainConfig
    info: DistInfo
    out: Path
    ds_config: dict
    train_examples: list[Example]
    eval_examples: list[Example]
    batches: ShardedBatches
    tokenizer: object
    task_type: str
    model_path: str
    task: object
    layout: ParallelLayout
    dispatcher: LocalDispatcher | ExpertParallelDispatcher
    adapters: Adapters
    engine: object  # deepspeed.DeepSpeedEngine
    expert_opt: ExpertOptimizer
    total_steps: int
    logger: MetricsLogger
    start: LoopPosition  # (0, 0, 0), or the resumed checkpoint's position
    resumed_from: Path | None

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def close(self) -> None:
        self.logger.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """Validate, then build (collective: every rank calls it). Raises ConfigError, on every rank
    together, for bad input, before the output directory is touched."""
    out = Path(cfg.output_dir)
    ds_config = build_ds_config(cfg, info.world_size)
    validate_with_deepspeed(ds_config, ds_config_source(cfg))
    seed_everything(cfg.seed)
    train_examples = load_examples(cfg.dataset, cfg.train_split, cfg.data_format,
                                   limit=cfg.max_train_examples or None, seed=cfg.seed)
    eval_examples = load_examples(cfg.dataset, cfg.eval_split, cfg.data_format,
                                  limit=cfg.max_eval_examples or None, seed=cfg.seed)
    if not eval_examples:
        raise ConfigError(f"dataset ({cfg.dataset}): the evaluation split {cfg.eval_split!r} has no examples")
    try:
        batches = ShardedBatches(len(train_examples), cfg.micro_batch_size, rank=info.rank,
                                 world_size=info.world_size, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"dataset ({cfg.dataset}) split {cfg.train_split!r}: {e}; lower micro_batch_size or "
                          "use more data (max_train_examples)") from None
    total_steps = count_total_steps(cfg, batches)
    config_record = cfg.to_dict()
    problem, resume_from = None, None
    if info.is_main:  # rank 0 reads the shared output dir and checkpoint for everyone
        try:
            check_output_dir(out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
            resume_from = plan_resume(cfg, out / "checkpoints", info.world_size) if cfg.resume else None
        except ConfigError as e:
            problem = str(e)
    problem, resume_from = collectives.broadcast_object((problem, resume_from), src=0)  # all stop, or none
    if problem:
        raise ConfigError(problem)
    # The model is loaded and the adapters injected (validating target modules) before anything
    # is written, so a bad option leaves the output directory untouched.
    model, tokenizer, task_type, model_path = load_model_and_tokenizer(cfg.model, cfg.task_type, pooling=cfg.pooling)
    device = device_for(info)
    if cfg.lm_framing != "instruction" and task_type != "causal_lm":
        raise ConfigError(f"lm_framing ({cfg.lm_framing!r}) applies to causal_lm models; {model_path} is {task_type}")
    ep_size = cfg.ep_size or auto_ep_size(cfg, model, info, device)
    layout = build_layout(ep_size, cfg.adapter.num_experts)
    dispatcher = (ExpertParallelDispatcher(layout, wire_dtype(cfg.dispatch_dtype),
                                           overlap=overlap_enabled(cfg.ep_overlap, device))
                  if ep_size > 1 else LocalDispatcher())
    trainable = cfg.trainable_modules or default_trainable_modules(task_type, model)
    adapters = inject_adapters(model, cfg.adapter, trainable_modules=trainable, dispatcher=dispatcher,
                               expert_slice=layout.expert_slice(cfg.adapter.num_experts))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, adapters.context)
    new = getattr(model, "newly_initialized", [])
    if new and info.is_main:
        trained = all(any(matches(n.rpartition(".")[0], t) for t in trainable) for n in new)
        print(f"newly initialized (not in {model_path}): {', '.join(new)}"
              + (" -- trained in full" if trained else " -- check --trainable_modules"))
    if cfg.adapter.aux_loss_scope == "global":
        adapters.context.dp_all_reduce = collectives.all_reduce_sum
        adapters.context.dp_world_size = info.world_size
    if info.is_main:
        prepare_output_dir(out, config_record, overwrite=cfg.overwrite)
    collectives.barrier()
    adapters.expert_module.to(device)
    task = build_task(task_type, tokenizer, cfg.max_length, cfg.loss_on, device, lm_framing=cfg.lm_framing,
                      autocast=cfg.autocast)

    schedule = lr_lambda(cfg.lr_scheduler, total_steps, warmup_steps_for(total_steps, cfg.warmup_steps,
                                                                          cfg.warmup_ratio))
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=adapters.engine_parameters(), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    expert_opt = ExpertOptimizer(
        adapters.expert_parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_lambda=schedule,
        world_size=info.world_size, edp_group=layout.edp_group, ep_group=layout.ep_group,
    )
    start = LoopPosition()
    if resume_from is not None:
        state = ckpt_io.load_checkpoint(resume_from, engine, adapters, expert_opt, rank=info.rank)
        start = LoopPosition(state["step"], state["epoch"], state["batch_in_epoch"])
        if info.is_main:
            # The run continues from this step: records of steps after it were of the discarded future.
            truncate_metrics(out / "metrics.jsonl", start.step)
            (out / PREEMPTED_MARKER).unlink(missing_ok=True)
            print(f"resumed from {resume_from} at step {start.step}")
    logger = MetricsLogger(out, cfg.report_to, enabled=info.is_main, run_config=config_record,
                           project=cfg.wandb_project)
    run = Run(cfg=cfg, info=info, out=out, ds_config=ds_config, train_examples=train_examples,
              eval_examples=eval_examples, batches=batches, tokenizer=tokenizer, task_type=task_type,
              model_path=model_path, task=task, layout=layout, dispatcher=dispatcher, adapters=adapters,
              engine=engine, expert_opt=expert_opt, total_steps=total_steps, logger=logger, start=start,
              resumed_from=resume_from)
    report_memory(run)
    return run


def count_total_steps(cfg: TrainConfig, batches: ShardedBatches) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = batches.batches_per_epoch // cfg.gradient_accumulation_steps
    if per_epoch == 0:
        raise ConfigError("gradient_accumulation_steps exceeds the micro batches in one epoch")
    return max(1, int(math.ceil(cfg.epochs * per_epoch)))


def plan_resume(cfg: TrainConfig, ckpt_root: Path, world_size: int) -> Path | None:
    """Rank 0, before anything is written: the checkpoint to resume from (None: start afresh),
    checked to be complete, readable, and from a run of this world size."""
    try:
        if cfg.resume == ckpt_io.LATEST:
            path, note = ckpt_io.resolve_latest(ckpt_root)
        else:
            path, note = Path(cfg.resume), None
    except FileNotFoundError as e:
        raise ConfigError(f"--resume latest: {e}") from None
    if path is None:
        print(f"--resume latest: no checkpoint in {ckpt_root} yet, starting from scratch")
        return None
    if note:
        print(f"--resume latest: {note}")
    others = [p for p in ckpt_io.complete_checkpoints(path.parent) if p != path]
    older = f"; the newest other complete checkpoint is {others[-1]} (--resume {others[-1]})" if others else ""
    broken = ckpt_io.check_readable(path)
    if broken:
        raise ConfigError(f"--resume: checkpoint {path} is damaged: {broken}{older}")
    state = json.loads((path / ckpt_io.STATE_FILE).read_text())
    if state["world_size"] != world_size:
        raise ConfigError(f"--resume: checkpoint {path} was written with world size {state['world_size']}, "
                          f"this run has {world_size}; resume with {state['world_size']} ranks "
                          "(the data order and ZeRO partitions depend on it)")
    return path


def auto_ep_size(cfg: TrainConfig, model: torch.nn.Module, info: DistInfo, device: torch.device) -> int:
    """--ep_size auto: calibrate the cost model here (collective) and take the cheapest placement."""
    targets = cfg.adapter.target_modules or default_targets(model)
    layers = [weight_shape(m)[::-1] for _, m in find_target_modules(model, targets)]
    act_bytes = 2 if device.type == "cuda" or cfg.autocast == "bf16" else 4
    work = adapter_workload(layers, cfg.adapter, cfg.micro_batch_size * cfg.max_length, info.world_size,
                            act_bytes=act_bytes, wire_bytes=wire_bytes(cfg.dispatch_dtype),
                            overlap=overlap_enabled(cfg.ep_overlap, device))
    ep_size, why = calibrated_ep_size(work, device, adapter=cfg.adapter,
                                      expert_memory_budget_bytes=cfg.expert_memory_budget_mb * 2**20 or None)
    if info.is_main:
        print(f"--ep_size auto: {why} (assumed {work.avg_active:g} active experts per token, "
              f"{work.tokens_per_rank} tokens per rank)")
    return int(ep_size)


def report_memory(run: Run) -> None:
    everyone = memory_per_rank(run.engine.module, run.adapters.expert_parameters())
    if run.info.is_main:
        print(f"ZeRO stage {zero_stage(run.ds_config)}, world {run.info.world_size}, model {run.model_path}, "
              f"task {run.task_type}, method {run.cfg.adapter.method}")
        print_memory(everyone)
        run.logger.log(run.start.step, "memory", {"zero_stage": zero_stage(run.ds_config),
                                                  "per_rank": {str(r): b for r, b in enumerate(everyone)}})
