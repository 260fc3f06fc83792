"""One measured training run (under any launcher): the worker behind scaling.py and e2e_compare.py.

    torchrun --nproc_per_node 2 benchmarks/scaling/step_worker.py --system adamole_dist --method adamole \
        --ep_size 2 --json out.json
    srun python benchmarks/scaling/step_worker.py ...          # inside launch/slurm/scaling.sbatch

Builds MiniLM-L6 (offline) with adapters — ours (`adamole_dist`) or Hugging Face PEFT's LoRA
(`peft`, same rank and targets) — wraps it in a DeepSpeed ZeRO-3 engine and runs the same
training loop on the generated word-categories task. Per step it times forward, backward and
optimizer, our all-to-alls (dispatcher counters) and ZeRO's all-gathers / reduce-scatters
(DeepSpeed's comms logger). Rank 0 appends one record (medians over steps) to --json / --csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import warnings
from pathlib import Path

import torch

from benchmarks.common.records import read_records, write_records

# DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, once per step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+.* is deprecated", category=FutureWarning)

from adamole_dist import AdapterConfig, inject_adapters
from adamole_dist.adapters.inject import weight_shape
from adamole_dist.base_model.attention import check_attn_implementation
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.config.deepspeed import build_ds_config
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS, TrainConfig
from adamole_dist.costmodel.calibration import calibrate, calibration_record, parts_ms
from adamole_dist.costmodel.placement import adapter_workload, predict_placement, predict_replicated
from adamole_dist.data import load_examples
from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.parallel import collectives
from adamole_dist.parallel.device_timer import timed, wall_seconds
from adamole_dist.parallel.layout import build_layout
from adamole_dist.parallel.local_dispatcher import Dispatcher
from adamole_dist.runtime.host_memory import keep_freed_host_memory
from adamole_dist.runtime.process_group import init_distributed
from adamole_dist.train.builders import build_dispatcher, build_engine, build_expert_optimizer, build_task_for
from adamole_dist.train.compile import compile_blocks
from adamole_dist.train.reporting import param_bytes
from adamole_dist.train.step import PhaseClock, train_step

TARGETS = ["query", "key", "value", "attention.output.dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
N, R = 8, 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ZERO_OPS = ("all_gather", "allgather", "reduce_scatter")  # ZeRO-3 parameter gathers and gradient reduction
# The engine's own settings; batch sizes, clipping and AdamW's hyperparameters come from the TrainConfig
# (config/deepspeed.py, as in training). fp32, torch's AdamW, DeepSpeed's comms logger on.
DS_BASE = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
           "optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
           "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}


def build(args, layout):
    kernel = check_attn_implementation(args.attn_implementation, DEVICE.type, training=True)
    model, tokenizer, task_type, _ = load_model_and_tokenizer(args.model, "auto", attn_implementation=kernel)
    # the encoder scores choices with a trained head; a decoder trains its LoRA only
    targets, head = (TARGETS, ["classifier"]) if task_type == "seq_cls" else (DECODER_TARGETS, [])
    adapters = None
    if args.system == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=N * R, lora_alpha=16, lora_dropout=0.05, target_modules=targets,
                                                 modules_to_save=head or None))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        kw = {"method": "lora", "rank": N * R} if args.method == "lora" else {"method": args.method, "num_experts": N,
                                                                             "rank": R}
        cfg = AdapterConfig(target_modules=targets, **kw)
        dispatcher = build_dispatcher(layout, args.dispatch_dtype, args.overlap, DEVICE)
        adapters = inject_adapters(model, cfg, trainable_modules=head, dispatcher=dispatcher,
                                   expert_slice=layout.expert_slice(cfg.num_experts))
        params = adapters.engine_parameters()
    if args.compile:  # the trainer's --compile: every transformer block, adapters included (train/compile.py)
        compile_blocks(model, DEVICE)
    return model, tokenizer, task_type, adapters, params


def comm_ms_total(comms: dict, names: tuple[str, ...]) -> float:
    """Milliseconds spent so far in DeepSpeed collectives whose log name contains one of ``names``.

    DeepSpeed's comms logger appends each op's *cumulative* timer value (elapsed(reset=False)),
    so the largest value logged under a name is that name's total."""
    total = 0.0
    for record, sizes in comms.items():
        if any(n in record for n in names):
            total += max(max(v[1]) for v in sizes.values())
    return total


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=("adamole_dist", "peft"), default="adamole_dist")
    ap.add_argument("--method", default="adamole", help="adamole_dist: any method; peft: lora")
    ap.add_argument("--ep_size", type=int, default=1)
    ap.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                    help="expert parallelism: overlap the all-to-alls with this rank's own experts "
                         "(--ep_overlap: auto = on for CUDA, off on CPU)")
    ap.add_argument("--dispatch_dtype", default="fp32", choices=("fp32", "bf16"), help="the all-to-all wire")
    ap.add_argument("--mode", choices=("weak", "strong"), default="weak",
                    help="weak: --batch examples per rank; strong: --batch examples in total")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--model", default="minilm-l6", help="minilm-l6 (encoder, seq_cls) or a decoder such as "
                    "smollm2-135m (causal_lm on the same generated questions, q/k/v/o adapted)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=int(os.environ.get("SLURM_NNODES", "1")))
    ap.add_argument("--predict", action="store_true", help="calibrate the cost model here and predict this run")
    ap.add_argument("--host_memory", default="keep", choices=("keep", "system"),
                    help="keep: reuse freed host memory, as the trainer does (--host_memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every transformer block (the trainer's "
                    "--compile); the compilation falls in the --warmup steps")
    ap.add_argument("--attn_implementation", default="auto", choices=ATTN_IMPLEMENTATIONS,
                    help="the attention kernel (the trainer's --attn_implementation)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--csv", type=Path)
    return ap.parse_args(argv)


class Job:
    """This rank's part of the run: the model with its adapters in a DeepSpeed engine, the expert
    optimizer, the task and the examples every step draws from."""

    def __init__(self, args, info) -> None:
        self.world, self.rank = info.world_size, info.rank
        self.layout = build_layout(args.ep_size, N)
        self.per_rank = args.batch if args.mode == "weak" else max(1, args.batch // self.world)
        torch.manual_seed(0)
        model, tokenizer, task_type, adapters, params = build(args, self.layout)
        cfg = TrainConfig(micro_batch_size=self.per_rank, gradient_accumulation_steps=1, max_grad_norm=1.0, lr=1e-4,
                          max_length=args.max_length, autocast="none")  # fp32, as the PEFT baseline it is compared to
        self.adapters = adapters
        self.engine = build_engine(model, params, build_ds_config(cfg, self.world, base=DS_BASE))
        self.expert_opt = build_expert_optimizer(adapters.expert_parameters() if adapters else [], self.world, cfg,
                                                 self.layout)
        self.task = build_task_for(cfg, task_type, tokenizer, self.engine.device)
        self.examples = load_examples("builtin:word_categories", "train")
        self.dispatcher = next(iter(adapters.layers.values())).dispatcher if adapters else None
        self.counters = self.dispatcher.counters if self.dispatcher is not None else None
        self.aux_loss_coeff = adapters.cfg.aux_loss_coeff if adapters is not None else 0.0
        self.predicting = args.predict and adapters is not None and adapters.cfg.is_moe
        self.padded_length, self.rows_per_example = 0, 1  # measure() notes them

    def batch_at(self, it: int) -> dict:
        start = (it * self.world + self.rank) * self.per_rank
        return self.task.collate([self.examples[(start + i) % len(self.examples)] for i in range(self.per_rank)])


def measure(args, job: Job, comms_logger) -> tuple[dict[str, list[float]], list[float], int, float | None]:
    """--warmup untimed steps, then --steps timed ones: seconds per phase and real tokens of every
    timed step, the positions of a batch, and (predicting) the median step with the experts off in ms.
    Notes on ``job`` the longest padded row of any step and the rows per example (what the memory planner
    needs: batches are padded to their longest row, and an encoder scores each choice as a row)."""
    engine, task, adapters, counters = job.engine, job.task, job.adapters, job.counters
    base_ms = None
    clock = PhaseClock(engine.device)
    phases: dict[str, list[float]] = {k: [] for k in ("step", "forward", "backward", "optimizer", "a2a", "zero_comm")}
    tokens = []
    engine.train()
    for it in range(args.warmup + args.steps):
        if job.predicting and it == args.warmup:  # warm now: the measured steps' batches with the experts off
            base_ms = time_without_experts(engine, task, adapters, lambda i: job.batch_at(args.warmup + i),
                                           job.aux_loss_coeff, args.steps)
        batch = job.batch_at(it)
        rows, length = batch["attention_mask"].shape
        job.padded_length = max(job.padded_length, length)
        job.rows_per_example = rows // job.per_rank
        zero_before = comm_ms_total(comms_logger.comms_dict, ZERO_OPS)
        if counters is not None:
            counters.reset()
        collectives.barrier()
        clock.reset()
        with timed(engine.device) as elapsed:
            train_step(engine, task, adapters, job.expert_opt, [batch], job.aux_loss_coeff, clock)  # the trainer's step
        step_s = elapsed.seconds
        if it < args.warmup:
            continue
        for phase in ("forward", "backward", "optimizer"):
            phases[phase].append(clock.seconds[phase])
        phases["step"].append(step_s)
        phases["a2a"].append(counters.a2a_seconds if counters else 0.0)
        phases["zero_comm"].append((comm_ms_total(comms_logger.comms_dict, ZERO_OPS) - zero_before) / 1000)
        tokens.append(float(batch["attention_mask"].sum()))
        positions = batch["attention_mask"].numel()  # the experts run on every position, padding too
    return phases, tokens, positions, base_ms


def summarise(args, job: Job, phases: dict[str, list[float]], tokens: list[float], positions: int,
              base_ms: float | None) -> dict:
    """The run's record (collective: every rank computes the same one)."""
    world = job.world
    # Totals over ranks: tokens per step; per rank: the breakdown of rank 0, memory of every rank.
    tokens_per_step = collectives.sum_over_ranks([statistics.mean(tokens)])[0]
    mine = {"peak_mem_mb": peak_memory_mb(), "padded_length": job.padded_length, **param_bytes(job.engine.module)}
    everyone = collectives.all_gather_objects(mine)
    record = {
        "system": args.system, "method": args.method if args.system == "adamole_dist" else "lora",
        "world": world, "nodes": args.nodes, "ep_size": args.ep_size, "mode": args.mode,
        "examples_per_rank": job.per_rank, "rows_per_example": job.rows_per_example,
        "padded_length_max": max(e["padded_length"] for e in everyone), "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / statistics.median(phases["step"]),
        **{f"{k}_ms": 1000 * statistics.median(v) for k, v in phases.items()},
        "peak_mem_mb_max": max(e["peak_mem_mb"] for e in everyone),
        "frozen_bytes_local_max": max(e["frozen_local"] for e in everyone),
        "frozen_bytes_full": everyone[0]["frozen_full"],
        "device": DEVICE.type, "threads": torch.get_num_threads(), "host_memory": args.host_memory,
        "overlap": getattr(job.dispatcher, "overlap", None), "compile": args.compile,
        "attn_implementation": args.attn_implementation,
    }
    if job.predicting:
        record.update(predict_this_run(job.adapters, positions, tokens_per_step / world / positions, job.layout, world,
                                       base_ms))
        record["prediction_error"] = round(record["predicted_ms_step"] / record["step_ms"] - 1, 4)
    return record


def run(args, info) -> dict:
    """The measured run on this rank (collective: every rank calls it); returns the run's record."""
    from deepspeed.comm.comm import comms_logger

    job = Job(args, info)
    phases, tokens, positions, base_ms = measure(args, job, comms_logger)
    return summarise(args, job, phases, tokens, positions, base_ms)


def report(record: dict, args) -> None:
    """Rank 0: the record printed as JSON, appended to --json and --csv."""
    print(json.dumps(record))
    if args.json:
        write_records(args.json, read_records(args.json) + [record])
    if args.csv:
        new_file = not args.csv.exists()
        with args.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record))
            if new_file:
                writer.writeheader()
            writer.writerow(record)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.host_memory == "keep":
        keep_freed_host_memory()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = init_distributed()
    record = run(args, info)
    if info.is_main:
        report(record, args)
    collectives.barrier()


class ExpertsOff(Dispatcher):
    """A zero delta that still depends on the routing weights, so the router's forward and backward
    stay in the step: what is left is the part of the step no placement changes. The bank is still
    called (on no rows), so ZeRO-3 sees the modules run in the order it traced and keeps prefetching."""

    counters = None

    def capacity_keep(self, mask_TN, probs_TN, capacity_factor, policy):
        return mask_TN

    def __call__(self, x_TD, weights_TN, mask_TN, bank, path):
        L = bank.num_experts
        none = bank(x_TD[:0], weights_TN[:0, :L], mask_TN[:0, :L], "dense")
        return (weights_TN.sum(-1, keepdim=True) * 0).to(x_TD.dtype).expand(-1, none.shape[-1])


def time_without_experts(engine, task, adapters, batch_at, aux_loss_coeff: float, steps: int) -> float:
    """Median ms of ``steps`` training steps with every expert switched off:
    the cost model's measured base, beside which it predicts the experts' part."""
    dispatchers = {name: layer.dispatcher for name, layer in adapters.layers.items()}
    for layer in adapters.layers.values():
        layer.dispatcher = ExpertsOff()
    samples = []
    for it in range(steps):
        batch = batch_at(it)
        collectives.barrier()
        samples.append(wall_seconds(lambda: train_step(engine, task, adapters, None, [batch], aux_loss_coeff),
                                    engine.device))
    adapters.context.pop_stats()
    for name, layer in adapters.layers.items():
        layer.dispatcher = dispatchers[name]
    return 1000 * statistics.median(samples)


def predict_this_run(adapters, positions: int, valid_fraction: float, layout, world: int, base_ms: float) -> dict:
    """The step the cost model predicts: the measured base (experts off) plus the modelled expert
    part (experts, dispatch, expert gradients' all-reduce), calibrated here (collective)."""
    active = summarize_routing(adapters.context.pop_stats(), False)["overall"]["mean_active_experts"]
    layers = [weight_shape(layer.base_layer)[::-1] for layer in adapters.layers.values()]
    dispatcher = next(iter(adapters.layers.values())).dispatcher
    wire = dispatcher.wire_for(torch.float32).itemsize if layout.ep_size > 1 else None
    # Padding rows run through the experts too, with nothing kept: active experts per row.
    w = adapter_workload(layers, adapters.cfg, positions, world, avg_active=active * valid_fraction, act_bytes=4,
                         wire_bytes=wire, overlap=getattr(dispatcher, "overlap", False))
    comm, comp = calibrate(w, DEVICE, adapter=adapters.cfg, ep_size=layout.ep_size)
    rep = predict_replicated(w, comm, comp)
    this = predict_placement(w, layout.ep_size, comm, comp)
    out = {"avg_active": active, "base_ms": round(base_ms, 3),
           "calibration": calibration_record(comm, comp),
           "predicted_ms_step": round(base_ms + 1000 * this.total_s, 3),
           "predicted_ms_parts": parts_ms(this.detail),
           "pred_replicated_ms": round(1000 * rep.total_s, 3)}
    if layout.ep_size > 1:
        out["pred_ep_ms"] = round(1000 * this.total_s, 3)
        out["pred_a2a_ms"] = round(1000 * this.detail["a2a_s"], 3)
    return out


if __name__ == "__main__":
    main()
