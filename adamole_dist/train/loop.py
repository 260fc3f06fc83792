"""The training loop: a Trainer holds loop state over a built Run (assembly.py).

Each optimizer step is ``step.train_step`` (the same step the benchmarks time); after it, one
collective tells every rank whether any rank saw a non-finite value or a stop signal. What is logged
is reporting.py's; the held-out evaluation and samples are held_out.py's. Logging,
evaluation and checkpoints happen on their intervals; the run ends with a final evaluation, a
checkpoint and the exported adapter. Evaluation asks the same stop question after every batch: a
stop signal during it checkpoints and exits at once, and the checkpoint records that its step's
evaluation is still owed, which the resumed run then does first.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from adamole_dist.adapters.files import adapter_state, save_adapter
from adamole_dist.adapters.model_card import write_model_card
from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.base_model.fingerprint import fingerprint_of
from adamole_dist.base_model.model_loading import recorded_model_name
from adamole_dist.base_model.quantize import QuantSpec
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.conversations import prompt_format
from adamole_dist.data.evaluate import EvaluationStopped
from adamole_dist.parallel import collectives
from adamole_dist.progress import configure as configure_progress
from adamole_dist.run_files.metrics_log import read_metrics
from adamole_dist.runtime.host_memory import keep_freed_host_memory
from adamole_dist.runtime.process_group import DistInfo, init_distributed, shutdown_distributed
from adamole_dist.runtime.stopping import (
    CheckpointWriteError,
    NonFiniteLoss,
    Preempted,
    StoppedBeforeTraining,
    StopSignal,
    write_preempted_marker,
)
from adamole_dist.runtime.watchdog import PeerWatchdog
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.assembly import Run, build_run
from adamole_dist.train.before_after import TrainingClock, before_after_lines, compared_with_base
from adamole_dist.train.elastic import STEP_ORDER
from adamole_dist.train.held_out import evaluate_held_out, log_samples
from adamole_dist.train.memory_report import log_planned_peak, peak_beside_plan
from adamole_dist.train.reporting import (
    LogWindow,
    dispatch_metrics,
    loop_timing,
    progress_bar,
    routing_over_ranks,
    summary_line,
    window_line,
    window_metrics,
)
from adamole_dist.train.step import train_step

log = logging.getLogger(__name__)


class Trainer:
    """Loop state (step, data position, last checkpoint, progress display) over a built Run."""

    def __init__(self, run: Run, stop_signal: StopSignal | None = None) -> None:
        self.run = run
        self.cfg = run.cfg
        self.dist_info = run.dist_info
        self.step = run.start.step
        self.epoch = run.start.epoch
        self.batch_in_epoch = run.start.batch_in_epoch
        self.last_checkpoint: Path | None = run.resumed_from
        self.initial_eval: dict | None = None
        self.progress = None  # the tqdm bar while the loop runs on a terminal (rank 0)
        self.loop_t0, self.loop_start_step = time.perf_counter(), self.step
        self.stop_signal = stop_signal or StopSignal().install()
        self.evaluation_owed = False  # a stop interrupted this step's evaluation (recorded in the checkpoint)
        self.clock = TrainingClock()  # the loop's seconds, evaluations left out

    def raise_if_non_finite_else_stop_flag(self, metrics: dict) -> bool:
        """One collective for two questions: did any rank see a non-finite loss or expert gradient
        (raise NonFiniteLoss at once, naming the last good checkpoint), and did any rank get a stop
        signal (returned: the loop finishes the step's logging, then calls ``stop_for_requeue``)?
        Every rank gets the same answers, so all leave together."""
        finite = all(math.isfinite(metrics[k]) for k in ("task_loss", "aux_loss", "expert_grad_norm"))
        non_finite, stop = collectives.sum_over_ranks([0.0 if finite else 1.0,
                                                       1.0 if self.stop_signal.requested else 0.0])
        if non_finite > 0:
            last = self.last_checkpoint or "none (no checkpoint was written yet)"
            raise NonFiniteLoss(f"non-finite loss or gradient at step {self.step} (task {metrics['task_loss']}, "
                                f"aux {metrics['aux_loss']}, expert grad norm {metrics['expert_grad_norm']}); "
                                f"last good checkpoint: {last}")
        return stop > 0

    def stop_agreed(self) -> bool:
        """Did any rank get a stop signal? One collective: every rank asks at the same point."""
        return collectives.sum_over_ranks([1.0 if self.stop_signal.requested else 0.0])[0] > 0

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, run = self.cfg, self.run
        stream = run.batches.iterate(self.epoch, self.batch_in_epoch)
        run.adapters.train(True)
        if self.step == 0 and cfg.eval_at_start:
            self.initial_eval = self.evaluate(print_layers=False)
        elif ckpt_io.owes_evaluation(run.resumed_from) and self.step < run.total_steps:  # else the final one
            self.evaluate()
        self.progress = progress_bar(run.total_steps, self.step)
        window = LogWindow()  # after the initial evaluation: its time is not training time
        self.loop_t0, self.loop_start_step = self.clock.start(), self.step
        while self.step < run.total_steps:
            micro = []
            for _ in range(cfg.gradient_accumulation_steps):
                epoch, b, idx = next(stream)
                micro.append(run.task.collate([run.train_examples[i] for i in idx]))
            run.task.prepare_step(micro, self.dist_info.world_size, collectives.sum_over_ranks)  # SFT: loss normaliser
            self.epoch, self.batch_in_epoch = (epoch, b + 1)
            metrics = train_step(run.engine, run.task, run.adapters, run.expert_opt, micro, cfg.adapter.aux_loss_coeff,
                                 offload=run.activation_offload)
            self.step += 1
            stop_requested = self.raise_if_non_finite_else_stop_flag(metrics)  # before a non-finite state is saved
            window.add(metrics, micro)
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{metrics['task_loss']:.4f}")
            if self.step % cfg.log_interval == 0 or self.step == run.total_steps:
                self.log_window(window)
                window = LogWindow()
            self.after_logging(stop_requested)
        return self.finish()

    def after_logging(self, stop_requested: bool) -> None:
        """A stop first (before an evaluation a preemption warning may not outlast), then the step's
        evaluation and checkpoint where their intervals fall."""
        cfg, step, total = self.cfg, self.step, self.run.total_steps
        eval_due = bool(cfg.eval_interval) and step % cfg.eval_interval == 0 and step < total
        if stop_requested:
            self.evaluation_owed = eval_due
            self.stop_for_requeue()
        if eval_due:
            self.evaluate()
        if cfg.save_interval and step % cfg.save_interval == 0 and step < total:
            self.save()

    def finish(self) -> dict:
        """The final evaluation, checkpoint (unless this step's exists) and adapter; the summary line."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        final = self.evaluate()  # the clock stays paused through it
        final.update(compared_with_base(self.initial_eval, self.clock.seconds))
        if not self.checkpointed_this_step():  # e.g. a finished run relaunched with --resume latest
            self.save()
        self.export_adapter(final)
        if self.dist_info.is_main:
            log_closing(self.run, self.step, self.step - self.loop_start_step, self.initial_eval, final)
        return final

    # -- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.dist_info.world_size, "config": self.cfg.to_dict(),
                "evaluation_owed": self.evaluation_owed,
                # the sampler's unit (data/sampler.py): whole steps, unless a legacy checkpoint's order continues
                "data_order": STEP_ORDER if self.run.batches.accumulation == self.cfg.gradient_accumulation_steps
                else "micro_batches"}

    def save(self) -> None:
        run = self.run
        self.last_checkpoint = ckpt_io.save_checkpoint(
            run.ckpt_root, self.step, run.engine, run.adapters, run.expert_opt, self.trainer_state(),
            rank=self.dist_info.rank, expert_writer=run.layout.edp_rank == 0, expert_shard=run.layout.ep_rank,
            keep=self.cfg.keep_checkpoints,
        )
        self.say(f"[step {self.step}] checkpoint saved: {self.last_checkpoint}")

    def checkpointed_this_step(self) -> bool:
        return self.last_checkpoint == self.run.ckpt_root / ckpt_io.tag_for(self.step)

    def stop_for_requeue(self) -> None:
        """Checkpoint (unless this step's exists), leave the marker, exit with Preempted."""
        if not self.checkpointed_this_step():
            self.save()
        if self.dist_info.is_main:
            write_preempted_marker(self.run.out, self.step, self.last_checkpoint, self.stop_signal.received)
            log.info(f"[step {self.step}] stop signal received: checkpoint written, exiting for a requeue")
        collectives.barrier()  # the marker exists before any rank exits (and srun kills the rest)
        self.stop_signal.settle()
        raise Preempted(self.step, self.last_checkpoint)

    def export_adapter(self, final: dict) -> None:
        """The adapter and its model card in the run's adapter/ (collective: ZeRO-3 gathers routers and
        head, the EP group gathers the experts; rank 0 writes)."""
        run = self.run
        tensors = adapter_state(run.adapters, ep_group=run.layout.ep_group, ep_size=run.layout.ep_size)
        if self.dist_info.is_main:
            save_adapter(run.out / "adapter", tensors, self.cfg.adapter, adapter_meta(run, self.step))
            numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            write_model_card(run.out / "adapter", base_model=self.cfg.model, method=self.cfg.adapter.method,
                             adapter_cfg=self.cfg.adapter.to_dict(), datasets=[self.cfg.dataset], metrics=numbers)
            self.say(f"adapter saved: {run.out / 'adapter'}")
        collectives.barrier()

    # -- evaluation and logging ----------------------------------------------------------------
    @TrainingClock.pausing
    def evaluate(self, print_layers: bool = True) -> dict:
        run = self.run
        try:
            result = evaluate_held_out(run, self.step, self.say, self.stop_agreed, print_layers)
        except EvaluationStopped as e:
            self.say(f"[step {self.step}] stop signal: evaluation stopped after batch {e.done}/{e.total}")
            self.evaluation_owed = True
            self.stop_for_requeue()
        if run.sft is not None and run.sft.sample_prompts:
            try:
                log_samples(run, self.step, self.say, self.stop_agreed, answers=result.get("answers"))
            except EvaluationStopped as e:  # the evaluation itself is logged: only this step's samples are lost
                self.say(f"[step {self.step}] stop signal: samples stopped after {e.done}/{e.total}")
                self.stop_for_requeue()
        run.adapters.train(True)
        return result

    def log_window(self, window: LogWindow) -> None:
        run = self.run
        metrics = window_metrics(window, world_size=self.dist_info.world_size, lr=run.engine.get_lr()[0],
                                 has_experts=bool(run.adapters.expert_banks), epoch=self.epoch)
        routing = routing_over_ranks(run.adapters.context.pop_stats(), self.cfg.adapter.has_tau)
        metrics.update(**routing["overall"], **dispatch_metrics(run.dispatcher.counters, max(window.steps, 1)),
                       **(run.compiled.metrics() if run.compiled is not None else {}))
        timing = loop_timing(self.loop_t0, self.loop_start_step, self.step, run.total_steps)
        self.say(window_line(self.step, run.total_steps, metrics, timing))
        run.logger.log(self.step, "train", {**metrics, "layers": routing["layers"]})

    def say(self, message: str) -> None:
        """Rank 0 logs a line (written above the progress bar when there is one, not through it)."""
        if not self.dist_info.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            log.info(message)


def log_closing(run: Run, step: int, steps_here: int, initial_eval: dict | None, final: dict) -> None:
    """Rank 0's last lines: the summary, and where answers were scored the held-out answers before -> after."""
    losses = [r["task_loss"] for r in read_metrics(run.logger.path) if r["kind"] == "train"]
    log.info(summary_line(step, losses, initial_eval, final, run.sft is not None, run.out / "adapter"))
    for line in before_after_lines(initial_eval, final, final["train_seconds"], steps_here, run.out / "adapter"):
        log.info(line)


def adapter_meta(run: Run, step: int) -> dict:
    """What the adapter records of its run: the base model as named (a relative path made absolute), as
    resolved and its content hash (base_model/fingerprint.py; loading warns when the base found differs), the
    task, the data's format and prompt rendering (generation renders prompts the same way), the chat template
    given."""
    cfg = run.cfg
    return {"base_model": recorded_model_name(cfg.model), "base_model_path": recorded_model_name(run.model_path),
            "base_model_fingerprint": fingerprint_of(run.model_path),
            "task_type": run.task_type,
            "pooling": cfg.pooling, "trainable_modules": run.adapters.trainable_modules, "step": step,
            "target_modules_resolved": run.adapters.targets,  # what a default or a shorthand (all-linear) chose
            "attn_implementation": cfg.attn_implementation,
            # the base's quantization (None: as loaded); from_pretrained, generate and eval load it the same way
            "quantization": QuantSpec(cfg.quantize_base, cfg.quant_double, cfg.quant_compute_dtype).to_record(),
            "data_format": run.data_format, "prompt_format": prompt_format(run.data_format, cfg.alpaca_as_chat),
            # the Jinja text when --chat_template gave one; None: the tokenizer's own template
            "chat_template": run.sft.spec.chat_template if run.sft is not None else None}


def train(cfg: TrainConfig, dist_info: DistInfo, stop_signal: StopSignal | None = None) -> dict:
    """Build the run, log its memory plan, train it, log the measured peak beside the plan, write
    final_metrics.json (with both), close its sinks and release its output dir (collective: every rank of
    ``dist_info``'s world)."""
    run = build_run(cfg, dist_info, stop_signal)
    try:
        predicted_mb = log_planned_peak(run)
        result = Trainer(run, stop_signal).train()
        peak = peak_beside_plan(run, predicted_mb)  # collective: every rank's peak
        if dist_info.is_main:  # inside the run's life: its output-dir lock still held
            final = {**{k: v for k, v in result.items() if k not in ("layers", "answers")}, **peak}
            write_text_atomically(run.out / "final_metrics.json", json.dumps(final, indent=1))
        return result
    finally:
        run.close()


def run_training(cfg: TrainConfig) -> dict:
    """launch/train.py's entry: start the process group and the peer watchdog, train, write
    final_metrics.json, and turn a peer's death into a named failure."""
    if cfg.host_memory == "keep":
        keep_freed_host_memory()  # before the model and the process group allocate anything large
    dist_info = init_distributed(timeout_s=cfg.comm_timeout, backend=cfg.dist_backend)
    configure_progress(cfg.progress, dist_info.is_main)  # before the set-up: tokenising and converting show it too
    watchdog = PeerWatchdog(dist_info.rank, dist_info.world_size, timeout_s=cfg.peer_timeout)
    if cfg.peer_timeout > 0:
        watchdog.start()
    stop_signal = StopSignal(announce=dist_info.is_main).install()  # before set-up: a signal during the load is kept
    try:
        result = train(cfg, dist_info, stop_signal)
    except (ConfigError, NonFiniteLoss, Preempted, CheckpointWriteError, StoppedBeforeTraining):
        watchdog.stop()  # decided by every rank together (or a stop signal each rank got): nobody needs telling
        shutdown_distributed()
        raise
    except Exception as e:
        # A peer's death surfaces here as a communication error: name the peer if it is gone.
        if "gloo" in str(e).lower() or "nccl" in str(e).lower() or "connection" in str(e).lower():
            watchdog.wait_for_verdict()
        watchdog.publish_failure(f"{type(e).__name__}: {e}")
        raise
    collectives.barrier()  # everyone is done before the watchdogs (and rank 0's store) go away
    watchdog.stop()
    shutdown_distributed()
    return result
