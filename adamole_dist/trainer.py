"""The training run: set-up in order (validate -> data -> output dir -> model -> engine), then the loop.

One optimizer step (``Trainer.train_step``) fits on a screen: for each micro batch, task loss
+ coeff * aux loss, DeepSpeed backward and step (DeepSpeed applies the update at the
accumulation boundary), then the expert optimizer steps the banks that live outside the
engine (docs/zero3_experts.md). Every collective goes through collectives.py; after each
step one of them tells every rank whether any rank saw a non-finite value or a stop signal.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import collectives
from .adapter_io import adapter_state, save_adapter
from .balance import summarize_stats
from .config import ConfigError
from .data import load_examples
from .dispatch import LocalDispatcher
from .distributed import DistInfo, device_for, init_distributed, shutdown_distributed
from .ep_dispatch import ExpertParallelDispatcher
from .ds_config import build_ds_config, ds_config_source, validate_with_deepspeed, zero_stage
from .evaluate import evaluate_accuracy
from .expert_optim import ExpertOptimizer
from .cost_model import CommModel, Workload, choose_ep_size, measure_comm, measure_compute
from .inject import Adapters, default_targets, find_target_modules, inject_adapters, matches, weight_shape
from .metrics import MetricsLogger, read_metrics, truncate_metrics
from .modeling import default_trainable_modules, load_model_and_tokenizer
from .output_dir import check_output_dir, prepare_output_dir
from .parallel import build_layout
from .stopping import PREEMPTED_MARKER, NonFiniteLoss, Preempted, StopSignal, write_preempted_marker
from .watchdog import PeerWatchdog
from .sampler import ShardedBatches
from .schedule import lr_lambda, warmup_steps_for
from .tasks import build_task
from .train_config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.device = device_for(info)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.progress = None  # the tqdm bar while the loop runs on a terminal (rank 0)
        self.stop_signal = StopSignal().install()

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        # Everything is validated before anything in the output directory is touched: the DeepSpeed
        # config (against DeepSpeed's own model), data, output dir, resume target, model and targets.
        self.ds_config = build_ds_config(cfg, info.world_size)
        validate_with_deepspeed(self.ds_config, ds_config_source(cfg))
        seed_everything(cfg.seed)
        self.train_examples = load_examples(cfg.dataset, cfg.train_split, cfg.data_format,
                                            limit=cfg.max_train_examples or None, seed=cfg.seed)
        self.eval_examples = load_examples(cfg.dataset, cfg.eval_split, cfg.data_format,
                                           limit=cfg.max_eval_examples or None, seed=cfg.seed)
        if not self.eval_examples:
            raise ConfigError(f"dataset ({cfg.dataset}): the evaluation split {cfg.eval_split!r} has no examples")
        try:
            self.batches = ShardedBatches(len(self.train_examples), cfg.micro_batch_size,
                                          rank=info.rank, world_size=info.world_size, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(f"dataset ({cfg.dataset}) split {cfg.train_split!r}: {e}; lower micro_batch_size or "
                              "use more data (max_train_examples)") from None
        config_record = cfg.to_dict()
        problem, resume_from = None, None
        if info.is_main:  # rank 0 reads the shared output dir and checkpoint for everyone
            try:
                check_output_dir(self.out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
                resume_from = self.plan_resume() if cfg.resume else None
            except ConfigError as e:
                problem = str(e)
        # every rank stops, or none does
        problem, self.resume_from = collectives.broadcast_object((problem, resume_from), src=0)
        if problem:
            raise ConfigError(problem)
        # The model is loaded and the adapters injected (validating target modules) before
        # anything is written, so a bad option leaves the output directory untouched.
        model, self.tokenizer, self.task_type, self.model_path = load_model_and_tokenizer(
            cfg.model, cfg.task_type, pooling=cfg.pooling)
        ep_size = cfg.ep_size or self.choose_ep_size(model)
        self.layout = build_layout(ep_size, cfg.adapter.num_experts)
        self.dispatcher = ExpertParallelDispatcher(self.layout) if ep_size > 1 else LocalDispatcher()
        trainable = cfg.trainable_modules or default_trainable_modules(self.task_type, model)
        self.adapters: Adapters = inject_adapters(model, cfg.adapter, trainable_modules=trainable,
                                                  dispatcher=self.dispatcher,
                                                  expert_slice=self.layout.expert_slice(cfg.adapter.num_experts))
        new = getattr(model, "newly_initialized", [])
        if new and info.is_main:
            trained = all(any(matches(n.rpartition(".")[0], t) for t in trainable) for n in new)
            print(f"newly initialized (not in {self.model_path}): {', '.join(new)}"
                  + (" -- trained in full" if trained else " -- check --trainable_modules"))
        if cfg.adapter.aux_loss_scope == "global":
            self.adapters.context.dp_all_reduce = collectives.all_reduce_sum
            self.adapters.context.dp_world_size = info.world_size
        if info.is_main:
            prepare_output_dir(self.out, config_record, overwrite=cfg.overwrite)
        ckpt_io.barrier()
        self.adapters.expert_module.to(self.device)
        self.task = build_task(self.task_type, self.tokenizer, cfg.max_length, cfg.loss_on, self.device)

        self.total_steps = self.compute_total_steps()
        schedule = lr_lambda(cfg.lr_scheduler, self.total_steps,
                             warmup_steps_for(self.total_steps, cfg.warmup_steps, cfg.warmup_ratio))
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=self.adapters.engine_parameters(),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.expert_opt = ExpertOptimizer(
            self.adapters.expert_parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            lr_lambda=schedule, world_size=info.world_size, edp_group=self.layout.edp_group,
            ep_group=self.layout.ep_group,
        )
        if self.resume_from is not None:
            self.resume(self.resume_from)
        self.logger = MetricsLogger(self.out, cfg.report_to, enabled=info.is_main, run_config=config_record,
                                    project=cfg.wandb_project)
        self.report_memory()

    def choose_ep_size(self, model) -> int:
        """--ep_size auto: calibrate the cost model here (collective) and take the cheapest placement."""
        cfg = self.cfg
        targets = cfg.adapter.target_modules or default_targets(model)
        layers = [weight_shape(m)[::-1] for _, m in find_target_modules(model, targets)]
        a = cfg.adapter
        active = a.top_k if a.method in ("mole_topk", "sira") else a.num_experts / 2  # adamole: 3.5-4.6 of 8 in the paper
        work = Workload(layers=layers, num_experts=a.num_experts, rank=a.rank,
                        tokens_per_rank=cfg.micro_batch_size * cfg.max_length, avg_active=active,
                        world_size=self.info.world_size, act_bytes=2 if torch.cuda.is_available() else 4)
        comm = measure_comm(device=self.device) if self.info.world_size > 1 else CommModel()
        comp = measure_compute(d=layers[0][0], tokens=min(work.tokens_per_rank, 2048), num_experts=a.num_experts,
                               rank=a.rank)
        budget = cfg.expert_memory_budget_mb * 2**20 or None
        ep_size, _, why = choose_ep_size(work, comm, comp, budget)
        # Every rank measured its own compute: take rank 0's choice so the layout agrees.
        ep_size, why = collectives.broadcast_object((ep_size, why), src=0)
        if self.info.is_main:
            print(f"--ep_size auto: {why} (assumed {active:g} active experts per token, "
                  f"{work.tokens_per_rank} tokens per rank)")
        return int(ep_size)

    def compute_total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = self.batches.batches_per_epoch // self.cfg.gradient_accumulation_steps
        if per_epoch == 0:
            raise ConfigError("gradient_accumulation_steps exceeds the micro batches in one epoch")
        return max(1, int(math.ceil(self.cfg.epochs * per_epoch)))

    def report_memory(self) -> None:
        mine = param_bytes(self.engine.module)
        mine["experts_local"] = sum(p.numel() * p.element_size() for p in self.adapters.expert_parameters())
        everyone = collectives.all_gather_objects(mine)
        if self.info.is_main:
            mb = 1 / 2**20
            print(f"ZeRO stage {zero_stage(self.ds_config)}, world {self.info.world_size}, "
                  f"model {self.model_path}, task {self.task_type}, method {self.cfg.adapter.method}")
            for r, b in enumerate(everyone):
                print(f"  rank {r}: frozen base {b['frozen_local'] * mb:8.2f} MB of {b['frozen_full'] * mb:8.2f} MB"
                      f" | trainable (engine) {b['trainable_local'] * mb:6.2f} MB | experts {b['experts_local'] * mb:6.2f} MB")
            self.logger.log(self.step, "memory", {"zero_stage": zero_stage(self.ds_config),
                                          "per_rank": {str(r): b for r, b in enumerate(everyone)}})

    # -- checkpoints ---------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "world_size": self.info.world_size, "config": self.cfg.to_dict()}

    def save(self) -> None:
        self.last_checkpoint = ckpt_io.save_checkpoint(
            self.ckpt_root, self.step, self.engine, self.adapters, self.expert_opt, self.trainer_state(),
            rank=self.info.rank, expert_writer=self.layout.edp_rank == 0, expert_shard=self.layout.ep_rank,
            keep=self.cfg.keep_checkpoints,
        )
        if self.info.is_main:
            self.say(f"[step {self.step}] checkpoint saved: {self.last_checkpoint}")

    def checkpointed_this_step(self) -> bool:
        return self.last_checkpoint == self.ckpt_root / ckpt_io.tag_for(self.step)

    def plan_resume(self) -> Path | None:
        """Rank 0, before anything is written: the checkpoint to resume from (None: start afresh),
        checked to be complete, readable, and from a run of this world size."""
        try:
            if self.cfg.resume == ckpt_io.LATEST:
                path, note = ckpt_io.resolve_latest(self.ckpt_root)
            else:
                path, note = Path(self.cfg.resume), None
        except FileNotFoundError as e:
            raise ConfigError(f"--resume latest: {e}") from None
        if path is None:
            print(f"--resume latest: no checkpoint in {self.ckpt_root} yet, starting from scratch")
            return None
        if note:
            print(f"--resume latest: {note}")
        others = [p for p in ckpt_io.complete_checkpoints(path.parent) if p != path]
        older = f"; the newest other complete checkpoint is {others[-1]} (--resume {others[-1]})" if others else ""
        broken = ckpt_io.check_readable(path)
        if broken:
            raise ConfigError(f"--resume: checkpoint {path} is damaged: {broken}{older}")
        state = json.loads((path / ckpt_io.STATE_FILE).read_text())
        if state["world_size"] != self.info.world_size:
            raise ConfigError(f"--resume: checkpoint {path} was written with world size {state['world_size']}, "
                              f"this run has {self.info.world_size}; resume with {state['world_size']} ranks "
                              "(the data order and ZeRO partitions depend on it)")
        return path

    def resume(self, path: Path) -> None:
        state = ckpt_io.load_checkpoint(path, self.engine, self.adapters, self.expert_opt, rank=self.info.rank)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.last_checkpoint = path
        if self.info.is_main:
            # The run continues from this step: records of steps after it were of the discarded future.
            truncate_metrics(self.out / "metrics.jsonl", self.step)
            (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
            print(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over gradient_accumulation_steps micro batches."""
        coeff = self.cfg.adapter.aux_loss_coeff
        task_sum, aux_sum = 0.0, 0.0
        for batch in micro_batches:
            task_loss = self.task.loss(self.engine, batch)
            aux = self.adapters.aux_loss()
            loss = task_loss + coeff * aux if aux is not None else task_loss
            self.engine.backward(loss)
            self.engine.step()
            task_sum += task_loss.item()
            aux_sum += aux.item() if aux is not None else 0.0
        expert_norm = self.expert_opt.step()
        self.adapters.update_balance_bias(collectives.all_reduce_sum)
        n = len(micro_batches)
        engine_norm = self.engine.get_global_grad_norm()
        return {"task_loss": task_sum / n, "aux_loss": aux_sum / n,
                "grad_norm": float(engine_norm) if engine_norm is not None else 0.0,
                "expert_grad_norm": expert_norm if expert_norm is not None else 0.0}

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

    def stop_for_requeue(self) -> None:
        """Checkpoint (unless this step's exists), leave the marker, exit with Preempted."""
        if not self.checkpointed_this_step():
            self.save()
        if self.info.is_main:
            write_preempted_marker(Path(self.cfg.output_dir), self.step, self.last_checkpoint, self.stop_signal.received)
            print(f"[step {self.step}] stop signal received: checkpoint written, exiting for a requeue", flush=True)
        ckpt_io.barrier()  # the marker exists before any rank exits (and srun kills the rest)
        raise Preempted(self.step, self.last_checkpoint)

    def train(self) -> dict:
        cfg = self.cfg
        gas = cfg.gradient_accumulation_steps
        stream = self.batches.iterate(self.epoch, self.batch_in_epoch)
        self.adapters.train(True)
        self.progress = None
        if self.step == 0 and cfg.eval_at_start:
            self.initial_eval = self.evaluate(print_layers=False)
        self.progress = progress = self.progress_bar()
        window = new_window()  # after the initial evaluation: its time is not training time
        self.loop_t0, self.loop_start_step = time.perf_counter(), self.step
        while self.step < self.total_steps:
            micro = []
            for _ in range(gas):
                epoch, b, idx = next(stream)
                micro.append(self.task.collate([self.train_examples[i] for i in idx]))
            self.epoch, self.batch_in_epoch = (epoch, b + 1)
            metrics = self.train_step(micro)
            self.step += 1
            stop_requested = self.after_step(metrics)  # before anything could save a non-finite state
            for key in WINDOW_SUMS:
                window[key] += metrics[key]
            window["steps"] += 1
            window["tokens"] += sum(int(m["attention_mask"].sum()) for m in micro)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['task_loss']:.4f}")
            if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                self.log_window(window)
                window = new_window()
            if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < self.total_steps:
                self.evaluate()
            if cfg.save_interval and self.step % cfg.save_interval == 0 and self.step < self.total_steps:
                self.save()
            if stop_requested:
                self.stop_for_requeue()
        if progress is not None:
            progress.close()
            self.progress = None
        final = self.evaluate()
        if not self.checkpointed_this_step():  # e.g. a finished run relaunched with --resume latest
            self.save()
        self.export_adapter()
        self.print_summary(final)
        return final

    def print_summary(self, final: dict) -> None:
        if not self.info.is_main:
            return
        losses = [r["task_loss"] for r in read_metrics(self.logger.path) if r["kind"] == "train"]
        start = getattr(self, "initial_eval", None)
        acc = f"{start['accuracy']:.4f} -> {final['accuracy']:.4f}" if start else f"{final['accuracy']:.4f}"
        loss = f"{losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)" if losses else "n/a"
        print(f"done: {self.step} steps | task loss {loss} | held-out accuracy {acc} "
              f"on {final['total']} examples | adapter: {self.out / 'adapter'}")

    def progress_bar(self):
        if not (self.info.is_main and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)

    def say(self, message: str) -> None:
        """Rank 0 prints a line (above the progress bar when there is one, not through it)."""
        if not self.info.is_main:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            print(message, flush=True)

    def timing(self) -> str:
        """'elapsed 1m05s eta 3m20s' since the loop started (the log line an operator reads in a file)."""
        done = self.step - self.loop_start_step
        elapsed = time.perf_counter() - self.loop_t0
        eta = elapsed / done * (self.total_steps - self.step) if done else float("nan")
        return f"elapsed {fmt_duration(elapsed)} eta {fmt_duration(eta)}"

    def log_window(self, w: dict) -> None:
        """Window means over steps; losses averaged over ranks, grad norms are global already."""
        task, aux, tokens = collectives.sum_over_ranks([w["task_loss"], w["aux_loss"], w["tokens"]])
        n = max(w["steps"], 1)
        elapsed = time.perf_counter() - w["t0"]
        routing = self.routing_summary(self.adapters.context.pop_stats())
        metrics = {
            "task_loss": task / n / self.info.world_size,
            "aux_loss": aux / n / self.info.world_size,
            "grad_norm": w["grad_norm"] / n,
            **({"expert_grad_norm": w["expert_grad_norm"] / n} if self.adapters.expert_banks else {}),
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "epoch": self.epoch,
            **routing["overall"],
            **self.dispatch_metrics(n),
        }
        self.say(f"[step {self.step}/{self.total_steps}] task_loss {metrics['task_loss']:.4f} "
                 f"aux_loss {metrics['aux_loss']:.4f} lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f}"
                 f" grad_norm {metrics['grad_norm']:.3g}"
                 + (f" expert_grad_norm {metrics['expert_grad_norm']:.3g}" if "expert_grad_norm" in metrics else "")
                 + (f" active {metrics['mean_active_experts']:.2f}" if "mean_active_experts" in metrics else "")
                 + f" | {self.timing()}")
        self.logger.log(self.step, "train", {**metrics, "layers": routing["layers"]})

    def dispatch_metrics(self, steps: int) -> dict:
        """Expert-parallel traffic and all-to-all time per optimizer step (this rank), then reset."""
        counters = getattr(self.dispatcher, "counters", None)
        if counters is None:
            return {}
        out = {"a2a_ms_per_step": 1000 * counters.a2a_seconds / steps,
               "a2a_bytes_per_step": counters.bytes_sent / steps,
               "a2a_bytes_min_per_step": counters.bytes_min / steps}
        counters.reset()
        return out

    def routing_summary(self, stats: dict[str, torch.Tensor]) -> dict:
        """Per-layer routing statistics summed over ranks, and their token-weighted overall means."""
        if not stats:
            return {"overall": {}, "layers": {}}
        names = sorted(stats)
        flat = collectives.all_reduce_sum(torch.stack([stats[n].double() for n in names]))
        has_tau = self.cfg.adapter.method == "adamole"
        layers = {n: summarize_stats(flat[i], has_tau) for i, n in enumerate(names)}
        tokens = sum(v["tokens"] for v in layers.values()) or 1
        overall = {
            "mean_active_experts": sum(v["mean_active_experts"] * v["tokens"] for v in layers.values()) / tokens,
            "no_active_fraction": sum(v["no_active_fraction"] * v["tokens"] for v in layers.values()) / tokens,
            "dropped_pairs": sum(v["dropped_pairs"] for v in layers.values()),
        }
        if has_tau:
            overall["mean_tau"] = sum(v["mean_tau"] * v["tokens"] for v in layers.values()) / tokens
        return {"overall": overall, "layers": layers}

    def evaluate(self, print_layers: bool = True) -> dict:
        self.adapters.context.pop_stats()  # drop partial training statistics
        result = evaluate_accuracy(self.engine, self.task, self.eval_examples, self.cfg.eval_batch_size,
                                   rank=self.info.rank, world_size=self.info.world_size,
                                   all_reduce=collectives.all_reduce_sum, progress=self.eval_progress())
        routing = self.routing_summary(self.adapters.context.pop_stats())
        self.adapters.train(True)
        metrics = {**result, **routing["overall"]}
        self.say(f"[step {self.step}] eval accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
                 + (f" mean active experts {routing['overall']['mean_active_experts']:.2f}" if routing["layers"] else ""))
        if print_layers and self.info.is_main:
            print_routing_table(routing["layers"], self.say)
        self.logger.log(self.step, "eval", {**metrics, "layers": routing["layers"]})
        return {**metrics, "layers": routing["layers"]}

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

    def export_adapter(self) -> None:
        # Collective: ZeRO-3 gathers routers/head, the EP group gathers the experts.
        tensors = adapter_state(self.adapters, ep_group=self.layout.ep_group, ep_size=self.layout.ep_size)
        if self.info.is_main:
            meta = {"base_model": self.cfg.model, "base_model_path": self.model_path, "task_type": self.task_type,
                    "pooling": self.cfg.pooling, "trainable_modules": self.adapters.trainable_modules, "step": self.step}
            save_adapter(self.out / "adapter", tensors, self.cfg.adapter, meta)
            self.say(f"adapter saved: {self.out / 'adapter'}")
        ckpt_io.barrier()


WINDOW_SUMS = ("task_loss", "aux_loss", "grad_norm", "expert_grad_norm")


def new_window() -> dict:
    """Sums over the optimizer steps since the last log line."""
    return {**{k: 0.0 for k in WINDOW_SUMS}, "steps": 0, "tokens": 0, "t0": time.perf_counter()}


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def print_routing_table(layers: dict, say=print) -> None:
    if not layers:
        return
    say(f"  {'layer':<52}{'active':>8}{'tau':>8}{'none%':>7}{'drop%':>7}  load min/max")
    for name, s in layers.items():
        tau = f"{s['mean_tau']:.4f}" if s["mean_tau"] is not None else "-"
        load = s["expert_load"]
        say(f"  {name[-52:]:<52}{s['mean_active_experts']:>8.2f}{tau:>8}{100 * s['no_active_fraction']:>7.1f}"
            f"{100 * s['dropped_fraction']:>7.1f}  {min(load):.3f}/{max(load):.3f}")


def run_training(cfg: TrainConfig) -> dict:
    info = init_distributed(timeout_s=cfg.comm_timeout, backend=cfg.dist_backend)
    watchdog = PeerWatchdog(info.rank, info.world_size, timeout_s=cfg.peer_timeout)
    if cfg.peer_timeout > 0:
        watchdog.start()
    trainer = Trainer(cfg, info)
    try:
        trainer.setup()
        result = trainer.train()
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
    finally:
        if hasattr(trainer, "logger"):
            trainer.logger.close()
    if info.is_main:
        final = {k: v for k, v in result.items() if k != "layers"}
        (Path(cfg.output_dir) / "final_metrics.json").write_text(json.dumps(final, indent=1))
    ckpt_io.barrier()  # everyone is done before the watchdogs (and rank 0's store) go away
    watchdog.stop()
    shutdown_distributed()
    return result
