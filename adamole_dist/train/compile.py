"""``--compile``: torch.compile applied per transformer block (regional compilation, as torchtitan and
torchtune do), the adapters inside each block included.

Why per block: one compiled block's code serves every block of the model (they are the same class;
parameters, buffers and each layer's routing-statistics tensor are graph inputs, not constants), so a
32-layer model compiles about as fast as a one-layer one, and what is not a block (embeddings, the
loss) stays eager.

How: each block's ``forward`` is replaced by one that runs compiled when autograd records (training)
and eagerly otherwise (evaluation, generation: a KV cache would specialise the compiled code at every
decoding step), so what wraps the forward stays eager around it, the block's own hooks among them.
Under ZeRO-3, DeepSpeed's hooks on each linear layer inside a block are ``torch.compiler.disable``
(graph breaks around its parameter gathering; measured correct, see tests/integration/test_compile.py);
the expert-parallel dispatcher is marked so too (parallel/ep_dispatcher.py): its all-to-alls stay
outside compiled code.

Gradient checkpointing with --compile is the compiler's: the partitioner that splits each compiled block
into its forward and backward graphs keeps as little as it can and recomputes the rest inside the
backward graph (``activation_memory_budget`` 0), instead of torch.utils.checkpoint replaying the block
(a Python-level replay, with the routing's record-once marking, does not run inside compiled code);
the routing records once either way.

Shapes: ``dynamic=True`` marks every dimension dynamic from the first compile, so a batch of another
sequence length (packing, length grouping, the last batch of an epoch) reuses the graphs instead of
recompiling. What specialises a graph, once each: the first block's input needs no gradient (the frozen
embeddings') and the others' do; a packed row holding one example gets no attention mask from
transformers (plain causal attention) where the others get one. Nothing specialises a graph per layer: the
task runs a decoder without a KV cache (data/task.py), and compiled blocks sum their aux losses instead of
appending to a list (adapters/context.py). Each of those had compiled every block again, and past
torch._dynamo's recompile limit (8) the later blocks of a SmolLM2 ran eagerly. CompileReport counts
recompilations of the blocks' forward, and those for a size (none expected), every log window.
"""

from __future__ import annotations

import logging
import re
import shutil

import torch
import torch.nn as nn

from adamole_dist.config.fields import ConfigError

log = logging.getLogger(__name__)
# how torch._dynamo words a failed guard on a size (a dimension specialised to one length)
SIZE_GUARD = re.compile(r"size|stride|shape", re.IGNORECASE)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: transformers' GradientCheckpointingLayer instances (every decoder or
    encoder layer of the model families it ships), else the modules of its longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    blocks = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def check_compile(device: torch.device) -> None:
    """ConfigError where torch.compile cannot run: inductor on the CPU compiles C++ with the system compiler."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ConfigError("compile on the CPU needs a C++ compiler (g++ or clang++) for torch's inductor; "
                          "install one or leave --compile off")


def compile_blocks(model: nn.Module, device: torch.device, recompute: bool = False) -> list[nn.Module]:
    """Replace every transformer block's forward by one that runs compiled (dynamic shapes) when autograd
    records (training) and eagerly otherwise (evaluation and generation, whose KV caches would specialise
    the compiled code per decoding step); the count of blocks. ``device``: where the blocks train."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"compile: found no transformer blocks in {type(model).__name__} to compile")
    import deepspeed.utils.nvtx

    deepspeed.utils.nvtx.enable_nvtx = False  # its range markers break graphs (as DeepSpeed's own compile sets)
    if recompute:
        import torch._functorch.config

        torch._functorch.config.activation_memory_budget = 0.0  # keep the least, recompute the rest
    random_numbers_for(device)
    for block in blocks:
        block.forward = compiled_when_training(block.forward)
    return blocks


def random_numbers_for(device: torch.device) -> None:
    """On a CPU, compiled code draws dropout's masks from ATen's generator, as eager does: inductor's own C++
    random numbers made a compiled LoRA layer 1.3 x slower than eager at dropout 0.05 (benchmarks/README.md,
    speed levers). On a GPU inductor generates its Philox numbers inside the fused kernels: kept there."""
    if device.type == "cpu":
        import torch._inductor.config

        torch._inductor.config.fallback_random = True


def compiled_when_training(forward):
    compiled = torch.compile(forward, dynamic=True)

    def forward_compiled_when_training(*args, **kwargs):
        return compiled(*args, **kwargs) if torch.is_grad_enabled() else forward(*args, **kwargs)

    forward_compiled_when_training.compiled_code = forward.__code__  # the frame torch._dynamo compiles
    return forward_compiled_when_training


class CompileReport:
    """What torch.compile did, from torch._dynamo's counters: the graphs so far and the recompilations of
    the blocks' forward, those for a size among them (none: dynamic shapes), every log window; once, the
    blocks and the time spent compiling (logged). Expected recompilations, each once: the first block's
    input needs no gradient and the others' do; a row that packs one example only gets no attention mask
    from transformers (plain causal attention) where the others get one."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = len(blocks)
        self.codes = {block.forward.compiled_code for block in blocks}
        self.logged = False
        self.warned = False

    def metrics(self) -> dict:
        from torch._dynamo.utils import compilation_time_metrics, counters, guard_failures

        failures = [reason for code in self.codes for reason in guard_failures.get(code, [])]
        out = {"compiled_graphs": int(counters["stats"]["unique_graphs"]),
               "graph_breaks": int(sum(counters["graph_break"].values())), "block_recompiles": len(failures),
               "block_size_recompiles": sum(1 for reason in failures if SIZE_GUARD.search(reason))}
        if not self.logged:
            self.logged = True
            seconds = sum(compilation_time_metrics.get("_compile.compile_inner", []))  # every frame, both passes
            out.update(compiled_blocks=self.blocks, compile_s=round(seconds, 2))
            log.info(f"torch.compile: {self.blocks} blocks, {out['compiled_graphs']} graphs, "
                     f"{out['graph_breaks']} graph breaks, {seconds:.1f} s compiling")
        limit = torch._dynamo.config.recompile_limit
        if len(failures) >= limit and not self.warned:
            self.warned = True
            log.warning(f"torch.compile: the blocks recompiled {len(failures)} times, torch._dynamo's limit "
                        f"(recompile_limit {limit}): blocks that need another graph now run eagerly. The latest "
                        f"reason: {failures[-1].splitlines()[0]}")
        return out
