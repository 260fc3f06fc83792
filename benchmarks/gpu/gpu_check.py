"""The GPU acceptance run: one command, one JSON and a table, no downloads (random-initialised models of
real shapes), meant to finish in under 8 minutes on one GPU.

    python benchmarks/gpu/gpu_check.py --json benchmarks/results/gpu_check.json      # on a GPU node
    python benchmarks/gpu/gpu_check.py --smoke --json /tmp/gpu_check.json             # the same code, tiny, on a CPU

1. layer: one adapted linear, fwd+bwd of base + adapter, d = 4096, 4096 tokens, bf16 and fp32: every
   method (dense and grouped paths where they differ) against PEFT LoRA r=32 on the same device;
2. train: a ~1.1B-parameter Llama (a config written here) through the trainer's own step under
   DeepSpeed ZeRO-3 at world 1 with the default backend choice, adamole 8 x r=4 against our lora r=32
   against PEFT LoRA r=32: tokens/s, peak device memory, host reads of tensors per step (each a
   device sync on a GPU; benchmarks/common/host_syncs.py) and model FLOPs utilisation;
3. levers: adamole's training step with each speed lever alone and together: torch.compile per block
   (train/compile.py, the trainer's --compile) and every attention kernel installed (sdpa; flash
   attention 2/3 where their package is), tokens/s against eager sdpa;
4. memory: each memory lever on the trainer's step (the chunked loss against the plain one, an nf4 and an int8
   base, gradient checkpointing, activation offload), the peak (torch.cuda.max_memory_allocated) beside the
   memory planner's prediction for the same run (benchmarks/gpu/memory_levers.py);
5. generate: greedy generation tokens/s with the adapters in the model against the bare model;
6. what one GPU cannot show, said in the output.
Every timed region synchronises the device (parallel/device_timer.py) after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from adamole_dist import AdapterConfig, inject_adapters
from adamole_dist.adapters.inject import adapt_linear
from adamole_dist.base_model.attention import available_kernels
from adamole_dist.parallel.device_timer import synchronize, wall_seconds
from adamole_dist.runtime.process_group import init_distributed, resolve_backend
from adamole_dist.train.compile import compile_blocks
from adamole_dist.train.step import train_step
from benchmarks.common.host_syncs import HostReads
from benchmarks.common.records import write_records
from benchmarks.gpu.memory_levers import bench_memory
from benchmarks.gpu.training import RandomTokensLM, random_batch, zero3_engine

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama's shape
LLAMA_SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Dense bf16 / fp32 (no sparsity) peak TFLOP/s by device name; --peak_tflops overrides.
PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5)}
CANNOT_SHOW = ("NCCL all-to-all across ranks (expert parallelism needs 2+ GPUs)",
               "NCCL all-reduce of the engine's and the experts' gradients across ranks",
               "overlap of the all-to-alls with the local experts (--ep_overlap auto is on under NCCL)",
               "ZeRO-3 partitioning of the base over several ranks (world 1 holds it whole)",
               "the placement cost model's choice between replication and expert parallelism")


class PeftHolder(nn.Module):
    """One linear in a module, so PEFT's get_peft_model can adapt it by name."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def layer_cases(d: int, device, dtype) -> list[tuple[str, str, nn.Module]]:
    """(name, compute path, module) for every method and PEFT LoRA r=32, on the same frozen base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    cases = []
    specs = [("lora", "auto", dict(method="lora", rank=32)),
             ("adamole", "dense", dict(method="adamole")), ("adamole", "grouped", dict(method="adamole")),
             ("mole_topk", "dense", dict(method="mole_topk", top_k=2)),
             ("mole_topk", "grouped", dict(method="mole_topk", top_k=2)),
             ("mole_threshold", "auto", dict(method="mole_threshold")), ("sira", "auto", dict(method="sira"))]
    for name, path, kw in specs:
        cfg = AdapterConfig(num_experts=8, rank=kw.pop("rank", 4), dropout=0.05, compute_path=path, **kw)
        layer = adapt_linear(base, cfg).train()
        bank = layer.experts if layer.router is not None else layer.lora
        nn.init.normal_(bank.lora_B, std=0.01)  # B starts at zero; realistic values for the timing
        cases.append((name, path, layer))
    peft = get_peft_model(PeftHolder(base), LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=["proj"]))
    cases.append(("peft_lora", "-", peft.to(device=device, dtype=dtype).train()))
    return cases


def bench_layers(args, device) -> list[dict]:
    d, tokens = (64, 256) if args.smoke else (4096, 4096)
    records = []
    for dtype in (torch.bfloat16, torch.float32):
        cases = layer_cases(d, device, dtype)
        x = torch.randn(tokens, d, device=device, dtype=dtype)
        grad = torch.randn(tokens, d, device=device, dtype=dtype)
        times = {i: [] for i in range(len(cases))}
        for it in range(args.warmup + args.repeats):
            for i, (_, _, layer) in enumerate(cases):  # round-robin: noise spreads over the methods
                xx = x.detach().requires_grad_(True)

                def fwd_bwd():
                    layer(xx).backward(grad)
                    ctx = getattr(layer, "context", None)
                    if ctx is not None:
                        ctx.take_aux_loss()
                        ctx.pop_stats()

                seconds = wall_seconds(fwd_bwd, device)
                if it >= args.warmup:
                    times[i].append(seconds * 1000)
        peft_ms = statistics.median(times[len(cases) - 1])
        for i, (name, path, _) in enumerate(cases):
            ms = statistics.median(times[i])
            records.append({"section": "layer", "dtype": str(dtype).removeprefix("torch."), "method": name,
                            "path": path, "d": d, "tokens": tokens, "ms_median": round(ms, 4),
                            "vs_peft_lora": round(ms / peft_ms, 3)})
    return records


def llama(args, device, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_SMOKE if args.smoke else LLAMA_1B), attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(device)


def model_flops_per_token(model, seq: int) -> float:
    """4 P (forward 2 P, backward 2 P for the input gradients; the frozen base has no weight
    gradients) + 12 L S d for attention scores (forward 4 L S d, backward twice that); P: parameters
    outside the embedding."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return 4 * params + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


def train_system(args, device, info, system: str, method: str, micro: int, seq: int, attn: str = "sdpa",
                 compiled: bool = False):
    """A fresh Llama with ``system``'s adapters in a ZeRO-3 engine: (model, adapters or None, engine,
    expert optimizer, model FLOPs per token, counted before ZeRO-3 partitions the parameters).
    ``attn``: the attention kernel; ``compiled``: every block compiled (the trainer's --compile)."""
    cuda = device.type == "cuda"
    model = llama(args, device, attn)
    adapters = None
    if system == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        kw = dict(method="lora", rank=32) if method == "lora" else dict(method="adamole", num_experts=8, rank=4)
        adapters = inject_adapters(model, AdapterConfig(target_modules=TARGETS, **kw))
        adapters.expert_module.to(device)
        params = adapters.engine_parameters()
    if compiled:
        compile_blocks(model, device)
    flops_per_token = model_flops_per_token(model, seq)
    engine, expert_opt = zero3_engine(model, params, adapters.expert_parameters() if adapters else [], micro, info,
                                      cuda)
    return model, adapters, engine, expert_opt, flops_per_token


def time_train(args, device, info, system: str, method: str, micro: int, seq: int, attn: str = "sdpa",
               compiled: bool = False) -> dict:
    """``system``'s training step timed after --warmup steps (a compilation falls in them): one record.
    Everything it built is freed when it returns, before the next system's model."""
    cuda = device.type == "cuda"
    model, adapters, engine, expert_opt, flops_per_token = train_system(
        args, device, info, system, method, micro, seq, attn, compiled)
    batch = random_batch(model.config.vocab_size, micro, seq, device)
    coeff = adapters.cfg.aux_loss_coeff if adapters is not None else 0.0

    def step():
        train_step(engine, RandomTokensLM(), adapters, expert_opt, [batch], coeff)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with HostReads() as reads:
        step()
    seconds = [wall_seconds(step, device) for _ in range(args.repeats)]
    s = statistics.median(seconds)
    tokens_per_s = micro * seq / s
    peak_tflops = args.peak_tflops or PEAK_TFLOPS.get(device_family(device), (0.0, 0.0))[0 if cuda else 1]
    record = {"section": "train", "system": system, "method": method, "micro_batch": micro, "seq": seq,
              "params_total": sum(p.numel() for p in model.parameters()),
              "step_ms_median": round(1000 * s, 2), "tokens_per_s": round(tokens_per_s, 1),
              "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
              "host_reads_per_step": reads.by_origin(),
              "mfu": round(flops_per_token * tokens_per_s / (peak_tflops * 1e12), 4) if peak_tflops else None}
    if adapters is not None:
        adapters.context.pop_stats()
    return record


def bench_train(args, device, info) -> list[dict]:
    micro, seq = (2, 16) if args.smoke else (4, 1024)
    cuda = device.type == "cuda"
    records = []
    for system, method in (("adamole_dist", "adamole"), ("adamole_dist", "lora"), ("peft", "lora")):
        records.append(time_train(args, device, info, system, method, micro, seq))
        if cuda:
            torch.cuda.empty_cache()
    peft = next(r for r in records if r["system"] == "peft")
    for r in records:
        r["vs_peft_lora"] = round(r["tokens_per_s"] / peft["tokens_per_s"], 3)
    return records


def bench_levers(args, device, info) -> list[dict]:
    """adamole's step with each lever alone and together: torch.compile, every attention kernel installed."""
    micro, seq = (2, 16) if args.smoke else (4, 1024)
    kernels = [k for k in available_kernels(device.type) if k in ("sdpa", "flash_attention_2", "flash_attention_3")]
    records = []
    for compiled in (False, True):
        for attn in kernels:
            record = time_train(args, device, info, "adamole_dist", "adamole", micro, seq, attn, compiled)
            records.append({**record, "section": "levers", "attn_implementation": attn, "compile": compiled})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = records[0]["tokens_per_s"]  # eager sdpa
    for r in records:
        r["vs_eager_sdpa"] = round(r["tokens_per_s"] / base, 3)
    return records


def bench_generate(args, device) -> list[dict]:
    batch, prompt, new = (2, 8, 8) if args.smoke else (8, 128, 128)
    records = []
    for with_adapters in (False, True):
        model = llama(args, device).eval()
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
        if with_adapters:
            adapters = inject_adapters(model, AdapterConfig(target_modules=TARGETS, method="adamole", num_experts=8,
                                                            rank=4, dropout=0.0))
            adapters.expert_module.to(device=device, dtype=next(model.parameters()).dtype)
            adapters.train(False)
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(2))
        ids = ids.to(device)
        mask = torch.ones_like(ids)

        def generate():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0)

        generate()  # warm-up
        s = statistics.median(wall_seconds(generate, device) for _ in range(max(1, args.repeats // 2)))
        records.append({"section": "generate", "adapters": "adamole 8x4" if with_adapters else "none",
                        "batch": batch, "prompt": prompt, "new_tokens": new,
                        "tokens_per_s": round(batch * new / s, 1)})
        model = None
    base = records[0]["tokens_per_s"]
    for r in records:
        r["vs_base"] = round(r["tokens_per_s"] / base, 3)
    return records


def device_family(device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((k for k in PEAK_TFLOPS if k in name), name)


def print_table(records: list[dict]) -> None:
    for section, columns in (("layer", ("dtype", "method", "path", "ms_median", "vs_peft_lora")),
                             ("train", ("system", "method", "tokens_per_s", "vs_peft_lora", "peak_memory_mb", "mfu",
                                        "host_reads_per_step")),
                             ("levers", ("attn_implementation", "compile", "tokens_per_s", "vs_eager_sdpa",
                                         "peak_memory_mb")),
                             ("memory", ("lever", "peak_memory_mb", "planned_mb", "plan_error", "vs_plain_peak",
                                         "tokens_per_s", "skipped", "failed")),
                             ("generate", ("adapters", "tokens_per_s", "vs_base"))):
        rows = [r for r in records if r.get("section") == section]
        if not rows:
            continue
        print(f"\n[{section}]")
        print("  ".join(f"{c:>14}" for c in columns))
        for r in rows:
            print("  ".join(f"{str(r.get(c)):>14}" for c in columns))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, the same code (runs on a CPU in seconds)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 10, smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 3, smoke 1)")
    ap.add_argument("--sections", default="layer,train,levers,memory,generate")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="the device's peak for MFU (default: by name)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 10)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    return args


def run(args) -> list[dict]:
    """The device record (with the seconds it all took) and every --sections record."""
    t0 = time.perf_counter()
    info = init_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda" and not args.smoke:
        print("note: no GPU here; the full shapes on a CPU take long (use --smoke for a check of the code)")
    head = {"section": "device", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": resolve_backend("auto", device.type == "cuda"), "torch": torch.__version__,
            "smoke": args.smoke, "cannot_show_on_one_gpu": list(CANNOT_SHOW)}
    records = [head]
    sections = args.sections.split(",")
    for name, fn in (("layer", lambda: bench_layers(args, device)), ("train", lambda: bench_train(args, device, info)),
                     ("levers", lambda: bench_levers(args, device, info)),
                     ("memory", lambda: bench_memory(args, device, info, llama,
                                                     LLAMA_SMOKE if args.smoke else LLAMA_1B)),
                     ("generate", lambda: bench_generate(args, device))):
        if name in sections:
            records += fn()
            synchronize(device)
            print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    head["seconds"] = round(time.perf_counter() - t0, 1)
    return records


def report(records: list[dict], args) -> None:
    head = records[0]
    print(f"device: {head['device']} ({head['backend']}), {head['seconds']} s")
    print_table(records)
    print("\nnot shown by one GPU:\n" + "\n".join(f"  - {c}" for c in CANNOT_SHOW))
    if args.json:
        write_records(args.json, records, announce=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    report(run(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
