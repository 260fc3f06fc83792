"""Run assembly: everything a training run needs, built in order, before the loop starts.

Everything is validated before anything in the output directory is touched: the DeepSpeed config
(against DeepSpeed's own model), data (free-form data is also rendered and tokenized here, so
every bad record fails first), output dir, resume target, model and adapter targets. Then
rank 0 locks the output dir (ops/run_lock.py; held until Run.close), checks it again under the
lock and prepares it, the engine and expert optimizer are built, a checkpoint is loaded
when resuming, and the metrics sinks are opened. The Trainer (loop.py) gets the finished Run and
holds only loop state.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import default_targets, find_target_modules, inject_adapters, matches, weight_shape
from adamole_dist.base_model.model_loading import (
    default_trainable_modules,
    load_model_and_tokenizer,
    resolve_model_path,
    resolve_task_type,
)
from adamole_dist.config.deepspeed import build_ds_config, ds_config_source, validate_with_deepspeed, zero_stage
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.costmodel.calibration import calibrated_ep_size
from adamole_dist.costmodel.placement import adapter_workload
from adamole_dist.data import DataError, Example, load_examples, token_cache
from adamole_dist.data.batching import check_packing_attention, pack_examples
from adamole_dist.data.conversations import normalise_records
from adamole_dist.data.formats import SFT_FORMATS, load_records, resolve_format, subsample, to_examples
from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.data.sft_render import (
    RenderSpec,
    TokenizedSplit,
    all_dropped,
    chat_template_of,
    check_spec,
    sample_prompt,
    tokenize_split,
    tokenize_within_length,
    tokenizer_for,
)
from adamole_dist.data.sft_task import PackedRows
from adamole_dist.ops.metrics_log import MetricsLogger, truncate_metrics
from adamole_dist.ops.output_dir import check_output_dir, prepare_output_dir
from adamole_dist.ops.run_lock import RunLock
from adamole_dist.parallel import collectives
from adamole_dist.parallel.ep_dispatcher import overlap_enabled, wire_bytes
from adamole_dist.parallel.layout import ParallelLayout, build_layout
from adamole_dist.parallel.local_dispatcher import Dispatcher
from adamole_dist.runtime.process_group import DistInfo, device_for
from adamole_dist.runtime.stopping import PREEMPTED_MARKER
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.builders import build_dispatcher, build_engine, build_expert_optimizer, build_task_for
from adamole_dist.train.expert_optimizer import ExpertOptimizer
from adamole_dist.train.reporting import memory_per_rank, print_memory
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for

log = logging.getLogger(__name__)


@dataclass
class LoopPosition:
    """Where the loop stands: optimizer steps done and the data position after them."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class SFTData:
    """Free-form data of a run: how it was rendered, the tokenized splits, the sample prompts."""

    spec: RenderSpec
    train: TokenizedSplit
    eval: TokenizedSplit
    sample_prompts: list[tuple[list[int], str]]  # (prompt ids, reference reply) of the first eval examples
    packed_rows: int = 0  # rows the training examples were packed into (0: not packed)

    def summary(self) -> dict:
        return {"data_format": self.spec.data_format, "prompt_format": self.spec.prompt_format,
                "loss_on": self.spec.loss_on, "train_examples": len(self.train.examples),
                "train_dropped_too_long": self.train.dropped, "eval_examples": len(self.eval.examples),
                "eval_dropped_too_long": self.eval.dropped, "max_length": self.spec.max_length,
                **({"packed_rows": self.packed_rows} if self.packed_rows else {})}


@dataclass
class Run:
    """The built pieces of one training run (see the module docstring for the order)."""

    cfg: TrainConfig
    info: DistInfo
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


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    """Validate, then build (collective: every rank calls it). Raises ConfigError, on every rank
    together, for bad input, before the output directory is touched."""
    out = Path(cfg.output_dir)
    ds_config = build_ds_config(cfg, info.world_size)
    validate_with_deepspeed(ds_config, ds_config_source(cfg))
    seed_everything(cfg.seed)
    data = load_run_data(cfg, info)
    total_steps = count_total_steps(cfg, data.batches)
    config_record = cfg.to_dict()
    resume_from = check_run_target(cfg, info, out, config_record)
    # The model is loaded and the adapters injected (validating target modules) before anything
    # is written, so a bad option leaves the output directory untouched.
    model, tokenizer, task_type, model_path = load_model_and_tokenizer(cfg.model, cfg.task_type, pooling=cfg.pooling)
    device = device_for(info)
    if cfg.lm_framing != "instruction" and task_type != "causal_lm":
        raise ConfigError(f"lm_framing ({cfg.lm_framing!r}) applies to causal_lm models; {model_path} is {task_type}")
    if cfg.packing:
        check_packing_attention(model)
    task = build_task_for(cfg, task_type, tokenizer, device, free_form=data.sft is not None)  # checks max_length
    layout, dispatcher, adapters = adapt_model(cfg, info, model, task_type, model_path, device)
    lock = lock_output_dir(cfg, info, out, config_record)
    adapters.expert_module.to(device)
    schedule = lr_lambda(cfg.lr_scheduler, total_steps, warmup_steps_for(total_steps, cfg.warmup_steps,
                                                                          cfg.warmup_ratio))
    engine = build_engine(model, adapters.engine_parameters(), ds_config, schedule)
    expert_opt = build_expert_optimizer(adapters.expert_parameters(), info.world_size, cfg, layout, lr_lambda=schedule)
    start = LoopPosition() if resume_from is None else resume(resume_from, engine, adapters, expert_opt, info, out)
    logger = MetricsLogger(out, cfg.report_to, enabled=info.is_main, run_config=config_record,
                           project=cfg.wandb_project)
    run = Run(cfg=cfg, info=info, out=out, ds_config=ds_config, train_examples=data.train_examples,
              eval_examples=data.eval_examples, batches=data.batches, tokenizer=tokenizer, task_type=task_type,
              model_path=model_path, task=task, layout=layout, dispatcher=dispatcher, adapters=adapters,
              engine=engine, expert_opt=expert_opt, total_steps=total_steps, logger=logger, start=start,
              resumed_from=resume_from, data_format=data.data_format, sft=data.sft, lock=lock)
    report_memory(run)
    if data.sft is not None:
        report_sft_data(run)
    return run


@dataclass
class RunData:
    """The examples of a run, validated, and the sampler over the training ones."""

    train_examples: list[Example] | PackedRows
    eval_examples: list[Example] | list[dict]
    batches: ShardedBatches
    data_format: str
    sft: SFTData | None


def load_run_data(cfg: TrainConfig, info: DistInfo) -> RunData:
    """Both splits read and checked (free-form data rendered and tokenized), the sampler built."""
    train_records, train_origin, data_format = read_train_split(cfg, info)
    sft = None
    if data_format in SFT_FORMATS:
        sft = load_sft_data(cfg, data_format, train_records, train_origin, info)
        train_examples, eval_examples = sft_training_items(cfg, sft), sft.eval.examples
    else:
        check_multiple_choice_options(cfg, data_format)
        train_examples = subsample(to_examples(train_records, data_format, train_origin),
                                   cfg.max_train_examples or None, cfg.seed)
        eval_examples = load_examples(cfg.dataset, cfg.eval_split, cfg.data_format,
                                      limit=cfg.max_eval_examples or None, seed=cfg.seed)
    del train_records
    if not eval_examples:
        raise ConfigError(f"dataset ({cfg.dataset}): the evaluation split {cfg.eval_split!r} has no examples")
    try:
        grouped = sft is not None and cfg.group_by_length and not cfg.packing
        batches = ShardedBatches(len(train_examples), cfg.micro_batch_size, rank=info.rank,
                                 world_size=info.world_size, seed=cfg.seed,
                                 lengths=sft.train.lengths if grouped else None)
    except ValueError as e:
        raise ConfigError(f"dataset ({cfg.dataset}) split {cfg.train_split!r}: {e}; lower micro_batch_size or "
                          "use more data (max_train_examples)") from None
    return RunData(train_examples, eval_examples, batches, data_format, sft)


def stop_together(problem: str | None) -> None:
    """Rank 0's verdict to every rank (collective): all raise ConfigError(problem), or none does."""
    problem = collectives.broadcast_object(problem, src=0)
    if problem:
        raise ConfigError(problem)


def check_run_target(cfg: TrainConfig, info: DistInfo, out: Path, config_record: dict) -> Path | None:
    """Rank 0 reads the shared output dir and checkpoint for everyone (collective): the checkpoint to
    resume from (None: start afresh); a problem stops every rank."""
    problem, resume_from = None, None
    if info.is_main:
        try:
            check_output_dir(out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
            resume_from = plan_resume(cfg, out / "checkpoints", info.world_size) if cfg.resume else None
        except ConfigError as e:
            problem = str(e)
    problem, resume_from = collectives.broadcast_object((problem, resume_from), src=0)  # all stop, or none
    if problem:
        raise ConfigError(problem)
    return resume_from


def adapt_model(cfg: TrainConfig, info: DistInfo, model: torch.nn.Module, task_type: str, model_path: str,
                device: torch.device) -> tuple[ParallelLayout, Dispatcher, Adapters]:
    """The expert placement (--ep_size, auto: calibrated here, collective) and the adapters injected."""
    ep_size = cfg.ep_size or auto_ep_size(cfg, model, info, device)
    layout = build_layout(ep_size, cfg.adapter.num_experts)
    dispatcher = build_dispatcher(layout, cfg.dispatch_dtype, cfg.ep_overlap, device)
    trainable = cfg.trainable_modules or default_trainable_modules(task_type, model)
    adapters = inject_adapters(model, cfg.adapter, trainable_modules=trainable, dispatcher=dispatcher,
                               expert_slice=layout.expert_slice(cfg.adapter.num_experts))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, adapters.context)
    new = getattr(model, "newly_initialized", [])
    if new and info.is_main:
        trained = all(any(matches(n.rpartition(".")[0], t) for t in trainable) for n in new)
        log.info(f"newly initialized (not in {model_path}): {', '.join(new)}"
                 + (" -- trained in full" if trained else " -- check --trainable_modules"))
    if cfg.adapter.aux_loss_scope == "global":
        adapters.context.balance_over_data_parallel(collectives.all_reduce_sum, info.world_size)
    return layout, dispatcher, adapters


def lock_output_dir(cfg: TrainConfig, info: DistInfo, out: Path, config_record: dict) -> RunLock | None:
    """Rank 0 locks the output dir, checks it again under the lock (another run may have started or
    finished since) and prepares it (collective: a problem stops every rank). Returns rank 0's lock."""
    lock, problem = None, None
    if info.is_main:
        try:
            lock = RunLock.take(out)
            check_output_dir(out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
        except ConfigError as e:
            if lock is not None:
                lock.release()
            problem = str(e)
        else:
            prepare_output_dir(out, config_record, overwrite=cfg.overwrite)
    stop_together(problem)
    return lock


def resume(resume_from: Path, engine, adapters: Adapters, expert_opt: ExpertOptimizer, info: DistInfo,
           out: Path) -> LoopPosition:
    """Load the checkpoint (collective); rank 0 cuts the metrics back to its step."""
    state = ckpt_io.load_checkpoint(resume_from, engine, adapters, expert_opt, rank=info.rank)
    start = LoopPosition(state["step"], state["epoch"], state["batch_in_epoch"])
    if info.is_main:
        # The run continues from this step: records of steps after it were of the discarded future.
        truncate_metrics(out / "metrics.jsonl", start.step)
        (out / PREEMPTED_MARKER).unlink(missing_ok=True)
        log.info(f"resumed from {resume_from} at step {start.step}")
    return start


# -- free-form (SFT) data ---------------------------------------------------------------------------------
def check_multiple_choice_options(cfg: TrainConfig, data_format: str) -> None:
    if cfg.loss_on not in ("auto", "answer", "full"):
        raise ConfigError(f"loss_on ({cfg.loss_on!r}) applies to free-form data; dataset ({cfg.dataset}) is "
                          f"multiple choice ({data_format}): use answer or full")
    if cfg.packing:
        raise ConfigError(f"packing applies to free-form data; dataset ({cfg.dataset}) is multiple choice "
                          f"({data_format})")


def sft_loss_on(cfg: TrainConfig, data_format: str) -> str:
    """config's loss_on resolved for free-form data (ConfigError when it does not fit the format)."""
    if cfg.loss_on in ("answer", "full"):
        raise ConfigError(f"loss_on ({cfg.loss_on!r}) applies to multiple-choice data; dataset ({cfg.dataset}) is "
                          f"free-form ({data_format}): use assistant (the responses) or all (every token)")
    if data_format == "text":
        if cfg.loss_on == "assistant":
            raise ConfigError(f"loss_on ('assistant'): dataset ({cfg.dataset}) is text (continued pre-training), "
                              "which has no responses; the loss is on every token (loss_on all or auto)")
        return "all"
    return "assistant" if cfg.loss_on == "auto" else cfg.loss_on


def render_spec(cfg: TrainConfig, data_format: str) -> RenderSpec:
    if cfg.lm_framing != "instruction":
        raise ConfigError(f"lm_framing ({cfg.lm_framing!r}) applies to multiple-choice data; dataset "
                          f"({cfg.dataset}) is free-form ({data_format})")
    model_path = resolve_model_path(cfg.model)
    task_type = resolve_task_type(cfg.task_type, model_path)
    if task_type != "causal_lm":
        raise ConfigError(f"dataset ({cfg.dataset}) is free-form ({data_format}): it trains decoder models "
                          f"(task_type causal_lm); {cfg.model} is {task_type}")
    template = None
    if cfg.chat_template:
        try:
            template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"chat_template ({cfg.chat_template}) cannot be read: {e}") from None
    return RenderSpec(tokenizer=model_path, data_format=data_format, max_length=cfg.max_length,
                      loss_on=sft_loss_on(cfg, data_format), chat_template=template,
                      alpaca_as_chat=cfg.alpaca_as_chat)


def read_train_split(cfg: TrainConfig, info: DistInfo) -> tuple[list | None, str, str]:
    """(records, origin, data_format) of the training split. Free-form data through the token cache
    is read by rank 0 alone (it tokenizes; the other ranks memory-map the cache: records None there);
    multiple-choice data, or --no-token_cache, is read by every rank. A bad file stops every rank."""
    if info.world_size == 1 or not cfg.token_cache:
        records, origin = load_records(cfg.dataset, cfg.train_split)
        return records, origin, resolve_format(records, cfg.data_format, origin)
    records, state = None, None
    if info.is_main:
        try:
            records, origin = load_records(cfg.dataset, cfg.train_split)
            state = ("ok", origin, resolve_format(records, cfg.data_format, origin))
        except (DataError, ConfigError) as e:
            state = (type(e).__name__, str(e), None)
    kind, origin, data_format = collectives.broadcast_object(state, src=0)
    if kind != "ok":
        raise (DataError if kind == "DataError" else ConfigError)(origin)
    if data_format not in SFT_FORMATS and not info.is_main:
        records, _ = load_records(cfg.dataset, cfg.train_split)
    return records, origin, data_format


def tokenized(records: list | None, spec: RenderSpec, origin: str, cfg: TrainConfig, limit: int,
              keep_records: bool = False, info: DistInfo | None = None) -> TokenizedSplit:
    """The one place a split is tokenized: the training split (or its seeded subsample) through the
    on-disk token cache (built once by rank 0, the only rank that holds ``records``; memory-mapped
    by every rank), the kept evaluation records in memory."""
    if not (cfg.token_cache and not keep_records and info is not None):
        return tokenize_split(records, spec, origin, truncation=cfg.truncation, limit=limit or None, seed=cfg.seed,
                              keep_records=keep_records)
    check_spec(spec)
    tokenizer = tokenizer_for(spec)
    # Only rank 0's key counts (it alone looks the cache up): it alone knows whether limit cuts the split.
    cut = bool(limit) and records is not None and limit < len(records)
    key = token_cache.cache_key(
        data_fingerprint=token_cache.data_fingerprint(origin), tokenizer=tokenizer,
        chat_template=chat_template_of(spec, tokenizer) if spec.is_chat else None, max_length=spec.max_length,
        packing=False,  # the cache holds examples; packed rows are planned from their lengths at start-up
        data_format=spec.data_format, loss_on=spec.loss_on, truncation=cfg.truncation,
        alpaca_as_chat=spec.alpaca_as_chat, **({"subsample": [int(limit), int(cfg.seed)]} if cut else {}))

    def validated_records():  # rank 0, on a cache miss: every record checked, then the seeded subsample
        normalised = normalise_records(records, spec.data_format, origin, alpaca_as_chat=spec.alpaca_as_chat)
        indices = subsample(list(range(len(normalised))), limit or None, cfg.seed)
        return [normalised[i] for i in indices], indices

    examples = token_cache.tokenized_split(
        validated_records, functools.partial(tokenize_within_length, spec=spec, truncation=cfg.truncation),
        cache_key=key, rank=info.rank, world_size=info.world_size, num_proc=cfg.tokenize_workers, origin=origin)
    info_record = token_cache.cache_info(examples)
    if len(examples) == 0:
        raise all_dropped(origin, info_record["records"], spec.max_length)
    return TokenizedSplit(examples, [], info_record["dropped"], origin)


def load_sft_data(cfg: TrainConfig, data_format: str, train_records: list, train_origin: str,
                  info: DistInfo | None = None) -> SFTData:
    """Both splits validated, rendered and tokenized (every bad record raises DataError here)."""
    spec = render_spec(cfg, data_format)
    train = tokenized(train_records, spec, train_origin, cfg, cfg.max_train_examples, info=info)
    eval_records, eval_origin = load_records(cfg.dataset, cfg.eval_split)
    evaluation = tokenized(eval_records, spec, eval_origin, cfg, cfg.max_eval_examples, keep_records=True)
    prompts = [sample_prompt(rec, spec) for rec in evaluation.records[: cfg.sample_prompts]]
    return SFTData(spec, train, evaluation, prompts)


def sft_training_items(cfg: TrainConfig, sft: SFTData):
    """What the sampler indexes: the tokenized examples, or rows packed from them."""
    if not cfg.packing:
        return sft.train.examples
    rows = pack_examples(sft.train.lengths, cfg.max_length)
    sft.packed_rows = len(rows)
    return PackedRows(sft.train.examples, rows)


def report_sft_data(run: Run) -> None:
    summary = run.sft.summary()
    if run.info.is_main:
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
        log.info(f"--resume latest: no checkpoint in {ckpt_root} yet, starting from scratch")
        return None
    if note:
        log.info(f"--resume latest: {note}")
    others = [p for p in ckpt_io.complete_checkpoints(path.parent) if p != path and ckpt_io.check_complete(p) is None]
    older = f"; the newest other complete checkpoint is {others[-1]} (--resume {others[-1]})" if others else ""
    broken = ckpt_io.check_readable(path)
    if broken:
        raise ConfigError(f"--resume: checkpoint {path} is damaged: {broken}{older}")
    missing = ckpt_io.check_complete(path)
    if missing:
        raise ConfigError(f"--resume: checkpoint {path} is incomplete: {missing}{older}")
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
        log.info(f"--ep_size auto: {why} (assumed {work.avg_active:g} active experts per token, "
                 f"{work.tokens_per_rank} tokens per rank)")
    return int(ep_size)


def report_memory(run: Run) -> None:
    everyone = memory_per_rank(run.engine.module, run.adapters.expert_parameters())
    if run.info.is_main:
        log.info(f"ZeRO stage {zero_stage(run.ds_config)}, world {run.info.world_size}, model {run.model_path}, "
                 f"task {run.task_type}, method {run.cfg.adapter.method}")
        print_memory(everyone)
        run.logger.log(run.start.step, "memory", {"zero_stage": zero_stage(run.ds_config),
                                                  "per_rank": {str(r): b for r, b in enumerate(everyone)}})
