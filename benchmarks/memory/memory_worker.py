"""One process of benchmarks/memory/memory.py: one loss variant, its peak memory and step times.

    python benchmarks/memory/memory_worker.py --loss chunked --batch 8 --max_length 512 --json r.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from adamole_dist.adapters.inject import inject_adapters  # noqa: E402
from adamole_dist.base_model.chunked_loss import install  # noqa: E402
from adamole_dist.base_model.model_loading import load_model_and_tokenizer  # noqa: E402
from adamole_dist.base_model.quantize import QuantSpec, weight_bytes  # noqa: E402
from adamole_dist.config.adapter import AdapterConfig  # noqa: E402
from adamole_dist.data.sft_task import SFTTask  # noqa: E402
from adamole_dist.train.step import train_step  # noqa: E402
from benchmarks.common.local_engine import LocalEngine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
N, R = 8, 4


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def reset_peak_rss() -> None:
    """Start the peak (VmHWM, ru_maxrss) again from the RSS now (Linux >= 4.0), so loading the model and
    the warm-up steps do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def batches(task: SFTTask, vocab: int, args) -> list[dict]:
    """Random sequences, every token a target (the first is never predicted)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.max_length), generator=g).tolist()
        out.append(task.collate([{"input_ids": row, "labels": row} for row in ids]))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=("plain", "chunked"), required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--quantize_base", choices=("none", "nf4", "fp4", "int8"), default="none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, _, _ = load_model_and_tokenizer(args.model, "causal_lm",
                                                      quantization=QuantSpec(args.quantize_base))
    head = model.get_output_embeddings()
    base_mb = (weight_bytes(model) - head.weight.numel() * head.weight.element_size()) / 2**20  # the LM head stays
    cfg = AdapterConfig(method="adamole", num_experts=N, rank=R, target_modules=TARGETS)
    adapters = inject_adapters(model, cfg)
    adapters.train(True)
    task = SFTTask(tokenizer, args.max_length, device="cpu")
    if args.loss == "chunked":
        task.chunked_head = install(model, args.chunk)
        assert task.chunked_head is not None
    engine = LocalEngine(model, adapters.engine_parameters() + adapters.expert_parameters(), lr=1e-4,
                         weight_decay=0.0, max_grad_norm=1.0, lr_lambda=lambda step: 1.0)
    data = batches(task, model.config.vocab_size, args)
    for batch in data[:args.warmup]:  # pages in the memory-mapped weights, allocates the AdamW moments
        train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)
    load_peak = peak_rss_mb()
    before = rss_mb()
    reset_peak_rss()
    seconds = []
    for batch in data[args.warmup:]:
        started = time.perf_counter()
        train_step(engine, task, adapters, None, [batch], cfg.aux_loss_coeff)
        seconds.append(time.perf_counter() - started)
    tokens = args.batch * args.max_length
    record = {"loss": args.loss, "quantize_base": args.quantize_base, "base_linear_weights_mb": base_mb,
              "chunk_tokens": args.chunk if args.loss == "chunked" else None,
              "tokens_per_s": tokens / statistics.median(seconds), "peak_rss_mb": peak_rss_mb(),
              "step_peak_mb": peak_rss_mb() - before, "rss_before_steps_mb": before, "warmup_peak_rss_mb": load_peak}
    args.json.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
