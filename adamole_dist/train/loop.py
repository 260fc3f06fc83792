"""The training loop: a Trainer holds loop state over a built Run (assembly.py).

Each optimizer step is ``step.train_step`` (the same step the benchmarks time); after it, one
collective tells every rank whether any rank saw a non-finite value or a stop signal. Logging,
evaluation and checkpoints happen on their intervals; the run ends with a final evaluation, a
checkpoint and the exported adapter. Evaluation asks the same stop question after every batch: a
stop signal during it checkpoints and exits at once, and the checkpoint records that its step's
evaluation is still owed, which the resumed run then does first.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from adamole_dist.adapters.files import adapter_state, save_adapter
from adamole_dist.adapters.model_card import write_model_card
from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.conversations import prompt_format
from adamole_dist.data.evaluate import EvaluationStopped, evaluate_accuracy, evaluate_loss, greedy_samples
from adamole_dist.ops.host_memory import keep_freed_host_memory
from adamole_dist.ops.metrics_log import read_metrics
from adamole_dist.parallel import collectives
from adamole_dist.runtime.process_group import DistInfo, init_distributed, shutdown_distributed
from adamole_dist.runtime.stopping import NonFiniteLoss, Preempted, StopSignal, write_preempted_marker
from adamole_dist.runtime.watchdog import PeerWatchdog
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.assembly import Run, build_run
from adamole_dist.train.reporting import fmt_duration, print_routing_table, routing_over_ranks
from adamole_dist.train.step import train_step

log = logging.getLogger(__name__)

WINDOW_SUMS = ("task_loss", "aux_loss", "grad_norm", "expert_grad_norm")


def new_window() -> dict:
    """Sums over the optimizer steps since the last log line."""
    return {**{k: 0.0 for k in WINDOW_SUMS}, "steps": 0, "tokens": 0, "slots": 0, "t0": time.perf_counter()}


class Trainer:
    """Loop state (step, data position, last checkpoint, progress display) over a built Run."""

    def __init__(self, run: Run, stop_signal: StopSignal | None = None) -> None:
        self.run = run
        self.cfg = run.cfg
        self.info = run.info
        self.step = run.start.step
        self.epoch = run.start.epoch
        self.batch_in_epoch = run.start.batch_in_epoch
        self.last_checkpoint: Path | None = run.resumed_from
        self.initial_eval: dict | None = None
        self.progress = None  # the tqdm bar while the loop runs on a terminal (rank 0)
        self.loop_t0, self.loop_start_step = time.perf_counter(), self.step
        self.stop_signal = stop_signal or StopSignal().install()
        self.evaluation_owed = False  # a stop interrupted this step's evaluation (recorded in the checkpoint)

    # -- one step ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over gradient_accumulation_steps micro batches."""
        run = self.run
        return train_step(run.engine, run.task, run.adapters, run.expert_opt, micro_batches,
                          self.cfg.adapter.aux_loss_coeff)

    def after_step(self, metrics: dict) -> bool:
        """One collective for two questions: did any rank see a non-finite loss or expert gradient
        (raise at once, naming the last good checkpoint), and did any rank get a stop signal (the
        answer: the loop finishes the step's logging, then calls ``stop_for_requeue``)? Every rank
        gets the same answers, so all leave together."""
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
        gas = cfg.gradient_accumulation_steps
        stream = run.batches.iterate(self.epoch, self.batch_in_epoch)
        run.adapters.train(True)
        if self.step == 0 and cfg.eval_at_start:
            self.initial_eval = self.evaluate(print_layers=False)
        elif self.resumed_owing_evaluation() and self.step < run.total_steps:  # at the end, the final one does
            self.evaluate()
        self.progress = progress = self.progress_bar()
        window = new_window()  # after the initial evaluation: its time is not training time
        self.loop_t0, self.loop_start_step = time.perf_counter(), self.step
        while self.step < run.total_steps:
            micro = []
            for _ in range(gas):
                epoch, b, idx = next(stream)
                micro.append(run.task.collate([run.train_examples[i] for i in idx]))
            run.task.prepare_step(micro, self.info.world_size)  # SFT: the step's loss normaliser (collective)
            self.epoch, self.batch_in_epoch = (epoch, b + 1)
            metrics = self.train_step(micro)
            self.step += 1
            stop_requested = self.after_step(metrics)  # before anything could save a non-finite state
            for key in WINDOW_SUMS:
                window[key] += metrics[key]
            window["steps"] += 1
            window["tokens"] += sum(int(m["attention_mask"].sum()) for m in micro)  # real tokens only
            window["slots"] += sum(m["attention_mask"].numel() for m in micro)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['task_loss']:.4f}")
            if self.step % cfg.log_interval == 0 or self.step == run.total_steps:
                self.log_window(window)
                window = new_window()
            eval_due = bool(cfg.eval_interval) and self.step % cfg.eval_interval == 0 and self.step < run.total_steps
            if stop_requested:  # now, not after an evaluation a preemption warning may not outlast
                self.evaluation_owed = eval_due
                self.stop_for_requeue()
            if eval_due:
                self.evaluate()
            if cfg.save_interval and self.step % cfg.save_interval == 0 and self.step < run.total_steps:
                self.save()
        if progress is not None:
            progress.close()
            self.progress = None
        final = self.evaluate()
        if not self.checkpointed_this_step():  # e.g. a finished run relaunched with --resume latest
            self.save()
        self.export_adapter(final)
        self.print_summary(final)
        return final

    # -- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.info.world_size, "config": self.cfg.to_dict(),
                "evaluation_owed": self.evaluation_owed}

    def resumed_owing_evaluation(self) -> bool:
        """The checkpoint this run resumed from was written by a stop during its step's evaluation."""
        if self.run.resumed_from is None:
            return False
        state = json.loads((self.run.resumed_from / ckpt_io.STATE_FILE).read_text())
        return bool(state.get("evaluation_owed"))

    def save(self) -> None:
        run = self.run
        self.last_checkpoint = ckpt_io.save_checkpoint(
            run.ckpt_root, self.step, run.engine, run.adapters, run.expert_opt, self.trainer_state(),
            rank=self.info.rank, expert_writer=run.layout.edp_rank == 0, expert_shard=run.layout.ep_rank,
            keep=self.cfg.keep_checkpoints,
        )
        self.say(f"[step {self.step}] checkpoint saved: {self.last_checkpoint}")

    def checkpointed_this_step(self) -> bool:
        return self.last_checkpoint == self.run.ckpt_root / ckpt_io.tag_for(self.step)

    def stop_for_requeue(self) -> None:
        """Checkpoint (unless this step's exists), leave the marker, exit with Preempted."""
        if not self.checkpointed_this_step():
            self.save()
        if self.info.is_main:
            write_preempted_marker(self.run.out, self.step, self.last_checkpoint, self.stop_signal.received)
            log.info(f"[step {self.step}] stop signal received: checkpoint written, exiting for a requeue")
        collectives.barrier()  # the marker exists before any rank exits (and srun kills the rest)
        self.stop_signal.settle()
        raise Preempted(self.step, self.last_checkpoint)

    def export_adapter(self, final: dict | None = None) -> None:
        # Collective: ZeRO-3 gathers routers/head, the EP group gathers the experts.
        run = self.run
        tensors = adapter_state(run.adapters, ep_group=run.layout.ep_group, ep_size=run.layout.ep_size)
        if self.info.is_main:
            meta = {"base_model": self.cfg.model, "base_model_path": run.model_path, "task_type": run.task_type,
                    "pooling": self.cfg.pooling, "trainable_modules": run.adapters.trainable_modules,
                    "step": self.step, "data_format": run.data_format,
                    "prompt_format": prompt_format(run.data_format, self.cfg.alpaca_as_chat),
                    # the Jinja text when --chat_template gave one; None: the tokenizer's own template
                    "chat_template": run.sft.spec.chat_template if run.sft is not None else None}
            save_adapter(run.out / "adapter", tensors, self.cfg.adapter, meta)
            numbers = {k: v for k, v in (final or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            write_model_card(run.out / "adapter", base_model=self.cfg.model, method=self.cfg.adapter.method,
                             adapter_cfg=self.cfg.adapter.to_dict(), datasets=[self.cfg.dataset], metrics=numbers)
            self.say(f"adapter saved: {run.out / 'adapter'}")
        collectives.barrier()

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, print_layers: bool = True) -> dict:
        run = self.run
        run.adapters.context.pop_stats()  # drop partial training statistics
        score = evaluate_loss if run.sft is not None else evaluate_accuracy
        try:
            result = score(run.engine, run.task, run.eval_examples, self.cfg.eval_batch_size,
                           rank=self.info.rank, world_size=self.info.world_size,
                           all_reduce=collectives.all_reduce_sum, progress=self.eval_progress(),
                           stop=self.stop_agreed)
        except EvaluationStopped as e:
            self.say(f"[step {self.step}] stop signal: evaluation stopped after batch {e.done}/{e.total}")
            self.evaluation_owed = True
            self.stop_for_requeue()
        routing = routing_over_ranks(run.adapters.context.pop_stats(), self.cfg.adapter.has_tau)
        metrics = {**result, **routing["overall"]}
        active = f" mean active experts {routing['overall']['mean_active_experts']:.2f}" if routing["layers"] else ""
        if run.sft is not None:
            self.say(f"[step {self.step}] eval loss {result['eval_loss']:.4f} perplexity {result['perplexity']:.2f} "
                     f"({result['eval_tokens']} target tokens, {result['total']} examples){active}")
        else:
            self.say(f"[step {self.step}] eval accuracy {result['accuracy']:.4f} "
                     f"({result['correct']}/{result['total']})"
                     + (f" acc_norm {result['acc_norm']:.4f}" if "acc_norm" in result else "") + active)
        if print_layers and self.info.is_main:
            print_routing_table(routing["layers"], self.say)
        run.logger.log(self.step, "eval", {**metrics, "layers": routing["layers"]})
        if run.sft is not None and run.sft.sample_prompts:
            self.log_samples()
        run.adapters.train(True)
        return {**metrics, "layers": routing["layers"]}

    def log_samples(self) -> None:
        """Greedy completions of the fixed evaluation prompts (every rank generates: ZeRO-3 gathers
        are collective), printed and logged by rank 0; their routing is not evaluation's."""
        run = self.run
        try:
            samples = greedy_samples(run.engine, run.task, run.sft.sample_prompts, self.cfg.max_new_tokens_eval,
                                     world_size=self.info.world_size, stop=self.stop_agreed)
        except EvaluationStopped as e:  # the evaluation itself is logged: only this step's samples are lost
            self.say(f"[step {self.step}] stop signal: samples stopped after {e.done}/{e.total}")
            self.stop_for_requeue()
        run.adapters.context.pop_stats()
        for k, s in enumerate(samples):
            self.say(f"[step {self.step}] sample {k}: {s['prompt'][-200:]!r} -> {s['completion']!r}")
        run.logger.log(self.step, "samples", {"samples": samples})

    def eval_progress(self, every_s: float = 30.0):
        """Rank 0: a line every ``every_s`` seconds through a long evaluation (batches are equal on all ranks)."""
        if not self.info.is_main:
            return None
        t0 = last = time.perf_counter()

        def report(done: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= every_s and done < total:
                last = now
                self.say(f"[step {self.step}] evaluating: batch {done}/{total} ({fmt_duration(now - t0)})")
        return report

    # -- logging -------------------------------------------------------------------------------
    def log_window(self, w: dict) -> None:
        """Window means over steps; losses averaged over ranks, grad norms are global already."""
        run = self.run
        task, aux, tokens, slots = collectives.sum_over_ranks([w["task_loss"], w["aux_loss"], w["tokens"], w["slots"]])
        n = max(w["steps"], 1)
        elapsed = time.perf_counter() - w["t0"]
        routing = routing_over_ranks(run.adapters.context.pop_stats(), self.cfg.adapter.has_tau)
        metrics = {
            "task_loss": task / n / self.info.world_size,
            "aux_loss": aux / n / self.info.world_size,
            "grad_norm": w["grad_norm"] / n,
            **({"expert_grad_norm": w["expert_grad_norm"] / n} if run.adapters.expert_banks else {}),
            "lr": run.engine.get_lr()[0],
            "tokens_per_s": tokens / max(elapsed, 1e-9),  # real (non-padding) tokens
            "padding_fraction": 1.0 - tokens / max(slots, 1),
            "epoch": self.epoch,
            **routing["overall"],
            **self.dispatch_metrics(n),
        }
        self.say(f"[step {self.step}/{run.total_steps}] task_loss {metrics['task_loss']:.4f} "
                 f"aux_loss {metrics['aux_loss']:.4f} lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f}"
                 f" pad {100 * metrics['padding_fraction']:.0f}%"
                 f" grad_norm {metrics['grad_norm']:.3g}"
                 + (f" expert_grad_norm {metrics['expert_grad_norm']:.3g}" if "expert_grad_norm" in metrics else "")
                 + (f" active {metrics['mean_active_experts']:.2f}" if "mean_active_experts" in metrics else "")
                 + f" | {self.timing()}")
        run.logger.log(self.step, "train", {**metrics, "layers": routing["layers"]})

    def dispatch_metrics(self, steps: int) -> dict:
        """Expert-parallel traffic and all-to-all time per optimizer step (this rank), then reset."""
        counters = self.run.dispatcher.counters
        if counters is None:
            return {}
        out = {"a2a_ms_per_step": 1000 * counters.a2a_seconds / steps,
               "a2a_bytes_per_step": counters.bytes_sent / steps,
               "a2a_bytes_min_per_step": counters.bytes_min / steps}
        counters.reset()
        return out

    def print_summary(self, final: dict) -> None:
        if not self.info.is_main:
            return
        losses = [r["task_loss"] for r in read_metrics(self.run.logger.path) if r["kind"] == "train"]
        start = self.initial_eval
        key, name = ("eval_loss", "held-out loss") if self.run.sft is not None else ("accuracy", "held-out accuracy")
        held_out = f"{start[key]:.4f} -> {final[key]:.4f}" if start else f"{final[key]:.4f}"
        loss = f"{losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)" if losses else "n/a"
        log.info(f"done: {self.step} steps | task loss {loss} | {name} {held_out} "
                 f"on {final['total']} examples | adapter: {self.run.out / 'adapter'}")

    def progress_bar(self):
        if not (self.info.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.run.total_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def say(self, message: str) -> None:
        """Rank 0 logs a line (written above the progress bar when there is one, not through it)."""
        if not self.info.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            log.info(message)

    def timing(self) -> str:
        """'elapsed 1m05s eta 3m20s' since the loop started (the log line an operator reads in a file)."""
        done = self.step - self.loop_start_step
        elapsed = time.perf_counter() - self.loop_t0
        eta = elapsed / done * (self.run.total_steps - self.step) if done else float("nan")
        return f"elapsed {fmt_duration(elapsed)} eta {fmt_duration(eta)}"


def train(cfg: TrainConfig, info: DistInfo, stop_signal: StopSignal | None = None) -> dict:
    """Build the run, train it, write final_metrics.json, close its sinks and release its output dir
    (collective: every rank of ``info``'s world)."""
    run = build_run(cfg, info)
    try:
        result = Trainer(run, stop_signal).train()
        if info.is_main:  # inside the run's life: its output-dir lock still held
            final = {k: v for k, v in result.items() if k != "layers"}
            write_text_atomically(run.out / "final_metrics.json", json.dumps(final, indent=1))
        return result
    finally:
        run.close()


def run_training(cfg: TrainConfig) -> dict:
    """launch/train.py's entry: start the process group and the peer watchdog, train, write
    final_metrics.json, and turn a peer's death into a named failure."""
    if cfg.host_memory == "keep":
        keep_freed_host_memory()  # before the model and the process group allocate anything large
    info = init_distributed(timeout_s=cfg.comm_timeout, backend=cfg.dist_backend)
    watchdog = PeerWatchdog(info.rank, info.world_size, timeout_s=cfg.peer_timeout)
    if cfg.peer_timeout > 0:
        watchdog.start()
    stop_signal = StopSignal(announce=info.is_main).install()  # before set-up: a signal during the load is kept
    try:
        result = train(cfg, info, stop_signal)
    except (ConfigError, NonFiniteLoss, Preempted):
        watchdog.stop()  # decided by every rank together: nobody needs telling
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
