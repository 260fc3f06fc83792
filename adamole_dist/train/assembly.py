"""Run assembly: everything a training run needs, built in order, before the loop starts.

Everything is validated before anything in the output directory is touched: the DeepSpeed config
(against DeepSpeed's own model), data (data/run_data.py: free-form data is also rendered and tokenized
there, so every bad record fails first), output dir, resume target, model and adapter targets.
Rank 0 reads the shared output dir for everyone, and a problem stops every rank together
(parallel/rank_zero.py). Then
rank 0 locks the output dir (run_files/run_lock.py; held until Run.close), checks it again under the
lock and prepares it, the engine and expert optimizer are built, a checkpoint is loaded
when resuming, and the metrics sinks are opened. The Trainer (loop.py) gets the finished Run and
holds only loop state.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.adapters.peft_init import init_experts_from_peft, init_from_peft
from adamole_dist.adapters.targets import default_targets, find_target_modules, matches, weight_shape
from adamole_dist.base_model.attention import check_attn_implementation
from adamole_dist.base_model.bf16 import resolved_autocast
from adamole_dist.base_model.model_loading import (
    default_trainable_modules,
    load_model_and_tokenizer,
    resolve_model_path,
    resolve_task_type,
)
from adamole_dist.base_model.quantize import QuantSpec, bitsandbytes_or_error
from adamole_dist.config.deepspeed import build_ds_config, ds_config_source, validate_with_deepspeed, zero_stage
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.costmodel.calibration import calibrated_ep_size
from adamole_dist.costmodel.placement import adapter_workload
from adamole_dist.data.batching import check_packing_attention
from adamole_dist.data.examples import Example
from adamole_dist.data.run_data import SFTData, load_run_data
from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.data.sft_task import PackedRows
from adamole_dist.data.token_cache import data_fingerprint
from adamole_dist.parallel import collectives
from adamole_dist.parallel.ep_dispatcher import overlap_enabled, wire_bytes
from adamole_dist.parallel.layout import ParallelLayout, build_layout
from adamole_dist.parallel.local_dispatcher import Dispatcher
from adamole_dist.parallel.rank_zero import CollectiveRanks, rank0_decides
from adamole_dist.run_files.metrics_log import MetricsLogger, truncate_metrics
from adamole_dist.run_files.output_dir import TRAIN_DATA, check_output_dir, prepare_output_dir
from adamole_dist.run_files.run_lock import RunLock
from adamole_dist.runtime.process_group import DistInfo, device_for
from adamole_dist.runtime.stopping import PREEMPTED_MARKER, StopSignal
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.activation_offload import ActivationOffload, check_activation_offload
from adamole_dist.train.builders import (
    attach_chunked_loss,
    build_dispatcher,
    build_engine,
    build_expert_optimizer,
    build_task_for,
)
from adamole_dist.train.compile import CompileReport, check_compile, compile_blocks
from adamole_dist.train.elastic import batch_in_epoch
from adamole_dist.train.expert_optimizer import ExpertOptimizer
from adamole_dist.train.reporting import memory_per_rank, print_memory
from adamole_dist.train.resume_target import check_run_target, resume_options
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for

log = logging.getLogger(__name__)


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
    dist_info: DistInfo
    out: Path
    ds_config: dict
    train_examples: list[Example] | list[dict] | PackedRows  # SFT: tokenized examples (or packed rows of them)
    eval_examples: list[Example] | list[dict]
    batches: ShardedBatches
    tokenizer: object
    task_type: str
    model_path: str
    task: object
    layout: ParallelLayout
    dispatcher: Dispatcher
    adapters: Adapters
    engine: object  # deepspeed.DeepSpeedEngine
    expert_opt: ExpertOptimizer
    total_steps: int
    logger: MetricsLogger
    start: LoopPosition  # (0, 0, 0), or the resumed checkpoint's position
    resumed_from: Path | None
    data_format: str = "auto"  # the detected (or forced) record format
    sft: SFTData | None = None  # free-form data; None for multiple choice
    lock: RunLock | None = None  # rank 0: the output dir's lock, held until close
    compiled: CompileReport | None = None  # --compile: what torch.compile did (logged with the training windows)
    activation_offload: ActivationOffload | None = None  # --activation_offload: the forward's saved-tensor hooks

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def close(self) -> None:
        self.logger.close()
        if self.lock is not None:
            self.lock.release()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(cfg: TrainConfig, dist_info: DistInfo, stop: StopSignal | None = None) -> Run:
    """Validate, then build (collective: every rank calls it). Raises ConfigError, on every rank
    together, for bad input, before the output directory is touched. ``stop``: a stop signal while the
    data is read and tokenized or the model loads raises StoppedBeforeTraining at once (runtime/stopping.py)."""
    out = Path(cfg.output_dir)
    cfg, plan = resume_options(cfg, out, dist_info)
    ds_config = build_ds_config(cfg, dist_info.world_size)
    validate_with_deepspeed(ds_config, ds_config_source(cfg))
    check_quantize_base(cfg)
    seed_everything(cfg.seed)
    with raising_during(stop, "reading and tokenizing the data"):
        data = load_run_data(cfg, CollectiveRanks(dist_info.rank, dist_info.world_size), lambda: resolved_model(cfg))
    if plan is not None and plan.legacy_order:
        data.batches = data.batches.regrouped(1)  # the order the checkpoint was written in
    total_steps = count_total_steps(cfg, data.batches)
    config_record = run_record(cfg, data.train_origin, dist_info)
    resume_from = check_run_target(cfg, dist_info, out, config_record)
    device, attn_implementation = checked_device(cfg, dist_info)
    # The model is loaded and the adapters injected (validating target modules) before anything
    # is written, so a bad option leaves the output directory untouched.
    with raising_during(stop, "loading the model"):
        model, tokenizer, task_type, model_path = load_model_and_tokenizer(
            cfg.model, cfg.task_type, pooling=cfg.pooling, attn_implementation=attn_implementation,
            quantization=quant_spec(cfg), keep=cfg.trainable_modules)
        check_model_options(cfg, model, task_type, model_path, free_form=data.sft is not None)
        if data.sft is not None and data.sft.spec.chat_template:  # held-out samples stop at its end of turn
            tokenizer.chat_template = data.sft.spec.chat_template
        task = build_task_for(cfg, task_type, tokenizer, device, free_form=data.sft is not None)  # checks max_length
        layout, dispatcher, adapters = adapt_model(cfg, dist_info, model, task_type, model_path, device)
        attach_chunked_loss(cfg, task, model, task_type)
        compiled = CompileReport(compile_blocks(model, device, cfg.gradient_checkpointing)) if cfg.compile else None
    lock = lock_output_dir(cfg, out, config_record)
    adapters.expert_module.to(device)
    schedule = lr_lambda(cfg.lr_scheduler, total_steps, warmup_steps_for(total_steps, cfg.warmup_steps,
                                                                          cfg.warmup_ratio))
    engine = build_engine(model, adapters.engine_parameters(), ds_config, schedule)
    expert_opt = build_expert_optimizer(adapters.expert_parameters(), dist_info.world_size, cfg, layout,
                                        lr_lambda=schedule)
    start = LoopPosition() if resume_from is None else resume(resume_from, engine, adapters, expert_opt, dist_info, out)
    logger = MetricsLogger(out, cfg.report_to, enabled=dist_info.is_main, run_config=config_record,
                           project=cfg.wandb_project)
    run = Run(cfg=cfg, dist_info=dist_info, out=out, ds_config=ds_config, train_examples=data.train_examples,
              eval_examples=data.eval_examples, batches=data.batches, tokenizer=tokenizer, task_type=task_type,
              model_path=model_path, task=task, layout=layout, dispatcher=dispatcher, adapters=adapters,
              engine=engine, expert_opt=expert_opt, total_steps=total_steps, logger=logger, start=start,
              resumed_from=resume_from, data_format=data.data_format, sft=data.sft, lock=lock, compiled=compiled,
              activation_offload=ActivationOffload(device) if cfg.activation_offload else None)
    report_memory(run)
    report_sft_data(run)
    return run


def checked_device(cfg: TrainConfig, dist_info: DistInfo) -> tuple[torch.device, str]:
    """This rank's device and the attention kernel to load, checked with --compile and --activation_offload against
    it (ConfigError naming what this machine lacks)."""
    device = device_for(dist_info)
    attn_implementation = check_attn_implementation(cfg.attn_implementation, device.type, training=True)
    check_activation_offload(cfg.activation_offload, device)
    if cfg.compile:
        check_compile(device)
    return device, attn_implementation


def check_model_options(cfg: TrainConfig, model, task_type: str, model_path, free_form: bool) -> None:
    """The options that depend on the loaded model: ConfigError naming the one that does not fit it
    (packing only where there is free-form data to pack)."""
    if cfg.lm_framing != "instruction" and task_type != "causal_lm":
        raise ConfigError(f"lm_framing ({cfg.lm_framing!r}) applies to causal_lm models; {model_path} is {task_type}")
    if cfg.packing and free_form:
        check_packing_attention(model)


def raising_during(stop: StopSignal | None, phase: str):
    return stop.raising_during(phase) if stop is not None else contextlib.nullcontext()


def run_record(cfg: TrainConfig, train_origin: str, dist_info: DistInfo) -> dict:
    """What run_config.json records: the options and, on rank 0 (the one that reads the training file
    and the record), the training split's content hash, which --resume checks (output_dir.changed_training_data)."""
    record = cfg.to_dict()
    if dist_info.is_main:
        record[TRAIN_DATA] = {"file": train_origin, "fingerprint": data_fingerprint(train_origin)}
    return record


def quant_spec(cfg: TrainConfig) -> QuantSpec:
    return QuantSpec(cfg.quantize_base, cfg.quant_double, cfg.quant_compute_dtype)


def check_quantize_base(cfg: TrainConfig) -> None:
    """--quantize_base: bitsandbytes importable before anything is written. ZeRO-3 partitions the packed
    quantized weights like any frozen parameter and gathers them back whole, their quantization state
    beside them (tests/integration/test_quantized_base.py)."""
    if quant_spec(cfg).enabled:
        bitsandbytes_or_error()


def resolved_model(cfg: TrainConfig) -> tuple[str, str]:
    """(the model's local path, its task type): a GGUF converted into the cache, a hub id fetched."""
    model_path = resolve_model_path(cfg.model)
    return model_path, resolve_task_type(cfg.task_type, model_path)


def adapt_model(cfg: TrainConfig, dist_info: DistInfo, model: torch.nn.Module, task_type: str, model_path: str,
                device: torch.device) -> tuple[ParallelLayout, Dispatcher, Adapters]:
    """The expert placement (--ep_size, auto: calibrated here, collective) and the adapters injected."""
    ep_size = cfg.ep_size or auto_ep_size(cfg, model, dist_info, device)
    layout = build_layout(ep_size, cfg.adapter.num_experts)
    dispatcher = build_dispatcher(layout, cfg.dispatch_dtype, cfg.ep_overlap, device)
    trainable = cfg.trainable_modules or default_trainable_modules(task_type, model)
    adapters = inject_adapters(model, cfg.adapter, trainable_modules=trainable, dispatcher=dispatcher,
                               expert_slice=layout.expert_slice(cfg.adapter.num_experts))
    if dist_info.is_main:  # the targets as chosen (a default or a shorthand): also recorded in the adapter's config
        log.info(f"adapting {len(adapters.layers)} modules ({', '.join(cfg.adapter.target_modules) or 'default'}): "
                 f"{', '.join(adapters.targets)}")
    if cfg.init_from_peft:  # a resumed run's checkpoint overwrites this start later
        init_from_peft(adapters, Path(cfg.init_from_peft))
    if cfg.init_experts_from_peft:
        init_experts_from_peft(adapters, Path(cfg.init_experts_from_peft))
    if cfg.gradient_checkpointing and not cfg.compile:  # with --compile the compiler recomputes (train/compile.py)
        enable_gradient_checkpointing(model, adapters.context)
    new = getattr(model, "newly_initialized", [])
    if new and dist_info.is_main:
        trained = all(any(matches(n.rpartition(".")[0], t) for t in trainable) for n in new)
        log.info(f"newly initialized (not in {model_path}): {', '.join(new)}"
                 + (" -- trained in full" if trained else " -- check --trainable_modules"))
    if cfg.adapter.aux_loss_scope == "global":
        # the all-reduce stays outside compiled code (--compile): a graph break there
        adapters.context.balance_over_data_parallel(torch.compiler.disable(collectives.all_reduce_sum),
                                                    dist_info.world_size)
    return layout, dispatcher, adapters


def lock_output_dir(cfg: TrainConfig, out: Path, config_record: dict) -> RunLock | None:
    """Rank 0 locks the output dir, checks it again under the lock (another run may have started or
    finished since) and prepares it (collective: a problem stops every rank). Returns rank 0's lock."""
    taken: dict[str, RunLock] = {}

    def lock_check_prepare() -> None:
        taken["lock"] = RunLock.take(out)
        try:
            check_output_dir(out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
        except ConfigError:
            taken.pop("lock").release()
            raise
        prepare_output_dir(out, config_record, overwrite=cfg.overwrite)

    rank0_decides(lock_check_prepare, expected=(ConfigError,))
    return taken.get("lock")


def resume(resume_from: Path, engine, adapters: Adapters, expert_opt: ExpertOptimizer, dist_info: DistInfo,
           out: Path) -> LoopPosition:
    """Load the checkpoint (collective); rank 0 cuts the metrics back to its step."""
    state = ckpt_io.load_checkpoint(resume_from, engine, adapters, expert_opt, rank=dist_info.rank,
                                    world_size=dist_info.world_size)
    start = LoopPosition(state["step"], state["epoch"], batch_in_epoch(state, engine.gradient_accumulation_steps()))
    if dist_info.is_main:
        # The run continues from this step: records of steps after it were of the discarded future.
        truncate_metrics(out / "metrics.jsonl", start.step)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)
        log.info(f"resumed from {resume_from} at step {start.step}")
    return start


def report_sft_data(run: Run) -> None:
    if run.sft is None:  # multiple choice: nothing rendered
        return
    summary = run.sft.summary()
    if run.dist_info.is_main:
        dropped = summary["train_dropped_too_long"] + summary["eval_dropped_too_long"]
        log.info(f"data: {summary['data_format']} records rendered as {summary['prompt_format']}, loss on "
                 f"{summary['loss_on']}; {summary['train_examples']} training / {summary['eval_examples']} evaluation "
                 f"examples" + (f" in {summary['packed_rows']} packed rows" if run.sft.packed_rows else "")
                 + (f"; dropped {summary['train_dropped_too_long']} training and {summary['eval_dropped_too_long']} "
                    f"evaluation examples longer than max_length ({summary['max_length']})" if dropped else ""))
        run.logger.log(run.start.step, "data", summary)


def count_total_steps(cfg: TrainConfig, batches: ShardedBatches) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = batches.batches_per_epoch // cfg.gradient_accumulation_steps
    if per_epoch == 0:
        raise ConfigError("gradient_accumulation_steps exceeds the micro batches in one epoch")
    return max(1, int(math.ceil(cfg.epochs * per_epoch)))


def auto_ep_size(cfg: TrainConfig, model: torch.nn.Module, dist_info: DistInfo, device: torch.device) -> int:
    """--ep_size auto: calibrate the cost model here (collective) and take the cheapest placement."""
    targets = cfg.adapter.target_modules or default_targets(model)
    layers = [weight_shape(m)[::-1] for _, m in find_target_modules(model, targets)]
    act_bytes = 2 if device.type == "cuda" or resolved_autocast(cfg.autocast, device) == "bf16" else 4
    work = adapter_workload(layers, cfg.adapter, cfg.micro_batch_size * cfg.max_length, dist_info.world_size,
                            act_bytes=act_bytes, wire_bytes=wire_bytes(cfg.dispatch_dtype),
                            overlap=overlap_enabled(cfg.ep_overlap, device))
    ep_size, why = calibrated_ep_size(work, device, adapter=cfg.adapter,
                                      expert_memory_budget_bytes=cfg.expert_memory_budget_mb * 2**20 or None)
    if dist_info.is_main:
        log.info(f"--ep_size auto: {why} (assumed {work.avg_active:g} active experts per token, "
                 f"{work.tokens_per_rank} tokens per rank)")
    return int(ep_size)


def report_memory(run: Run) -> None:
    everyone = memory_per_rank(run.engine.module, run.adapters.expert_parameters())
    if run.dist_info.is_main:
        log.info(f"ZeRO stage {zero_stage(run.ds_config)}, world {run.dist_info.world_size}, model {run.model_path}, "
                 f"task {run.task_type}, method {run.cfg.adapter.method}, autocast {run.task.autocast}"
                 + (" (auto: base_model/bf16.py)" if run.cfg.autocast == "auto" else ""))
        print_memory(everyone)
        run.logger.log(run.start.step, "memory", {"zero_stage": zero_stage(run.ds_config),
                                                  "per_rank": {str(r): b for r, b in enumerate(everyone)}})
