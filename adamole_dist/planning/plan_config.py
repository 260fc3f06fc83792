"""The planner's inputs: a typed config whose fields are adamole-plan's flags (help text included); train --plan
builds one from the run's TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass

from adamole_dist.base_model.bf16 import resolved_autocast
from adamole_dist.config.adapter import METHODS
from adamole_dist.config.fields import ConfigError, check_choices, opt
from adamole_dist.config.training import QUANTIZE_BASE

PRECISIONS = ("fp32", "bf16", "autocast-bf16")
DEVICES = ("cuda", "cpu")
ATTENTIONS = ("sdpa", "eager")


@dataclass(kw_only=True)
class PlanConfig:
    model: str = opt("minilm-l6", "a config.json, a folder holding one, a cached hub id, or a known name "
                     "(llama-3.1-8b, llama-3.1-70b, qwen2.5-32b, smollm2-135m, gemma3-270m, minilm-l6); no weights "
                     "are read")
    world_size: int = opt(1, "ranks (GPUs) of the run: ZeRO-3 shards the frozen base and the engine's states over them")
    ep_size: int = opt(1, "expert parallelism: experts sharded over this many ranks")
    micro_batch_size: int = opt(8, "sequences per rank per forward pass")
    max_length: int = opt(64, "tokens per sequence")
    choices: int = opt(0, "sequences per example: an encoder (seq_cls) scores each (context, choice) pair as its own "
                       "sequence; 0 = auto: 4 for encoders (the built-in task's four words), 1 for decoders")
    precision: str = opt("bf16", "weights and activations: bf16 (DeepSpeed bf16, the GPU default), fp32 (CPU), or "
                         "autocast-bf16: fp32 weights with bf16 activations (a CPU run's --autocast bf16; each "
                         "frozen linear's bf16 copy of its weight is also saved for the backward)",
                         choices=PRECISIONS)
    quantize_base: str = opt("none", "the frozen base's linear layers: nf4 / fp4 (4-bit) or int8",
                             choices=QUANTIZE_BASE)
    quant_double: bool = opt(True, "nf4/fp4: 8-bit block scales (double quantization) instead of fp32 ones")
    gradient_checkpointing: bool = opt(False, "keep only each block's input; recompute one block in the backward")
    optimizer_offload: bool = opt(False, "ZeRO offload of the engine's fp32 master weights and AdamW moments to host")
    activation_offload: bool = opt(False, "saved activations kept in host memory (counted as host, not device) but "
                                   "the one block's in flight")
    chunked_loss: bool = opt(True, "causal_lm: the LM head and loss over chunks of loss_chunk_tokens tokens")
    loss_chunk_tokens: int = opt(1024, "chunked_loss: target tokens per chunk")
    target_fraction: float = opt(1.0, "chunked_loss: the share of a micro batch's tokens that carry a loss target "
                                 "(the chunked loss computes logits for those only); 1 = every token (--loss_on "
                                 "all); with the loss on the assistant's replies it is often far less. The trainer "
                                 "measures it on its data (the fullest training row)")
    attn_implementation: str = opt("sdpa", "sdpa (flash-style: no [T x T] scores kept) or eager (keeps them)",
                                   choices=ATTENTIONS)
    method: str = opt("adamole", "adapter method", choices=METHODS)
    num_experts: int = opt(8, "LoRA experts N per adapted linear")
    rank: int = opt(4, "rank r of each expert")
    target_modules: list = opt([], "adapted linear layers; empty = q/k/v/o (decoders), query/key/value/attention "
                               "output (encoders)")
    generates: bool = opt(False, "the evaluation generates (free-form data with sample_prompts, or answer accuracy): "
                          "every rank gathers the whole frozen base while it does, beside its shard")
    device: str = opt("cuda", "cuda: device memory (torch.cuda.max_memory_allocated); cpu: the process's peak RSS, "
                      "process baseline included", choices=DEVICES)

    def __post_init__(self) -> None:
        check_choices(self, "")
        if self.choices < 0:
            raise ConfigError(f"choices ({self.choices}) must be >= 0 (0 = auto)")
        for name in ("world_size", "ep_size", "micro_batch_size", "max_length", "num_experts", "rank",
                     "loss_chunk_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be positive")
        if not 0 < self.target_fraction <= 1:
            raise ConfigError(f"target_fraction ({self.target_fraction}) must be in (0, 1]")
        if self.world_size % self.ep_size:
            raise ConfigError(f"ep_size ({self.ep_size}) must divide world_size ({self.world_size})")
        if self.num_experts % self.ep_size:
            raise ConfigError(f"num_experts ({self.num_experts}) is not divisible by ep_size ({self.ep_size})")

    @property
    def experts(self) -> int:
        return 1 if self.method == "lora" else self.num_experts

    @property
    def weight_bytes(self) -> int:
        """Bytes of a stored dense weight: 2 under DeepSpeed bf16, else 4 (autocast keeps fp32 weights)."""
        return 2 if self.precision == "bf16" else 4

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


def plan_config_from_train(cfg, world_size: int, device: str, generates: bool | None = None) -> PlanConfig:
    """The PlanConfig of a TrainConfig (train --plan, the trainer's start-of-run log) on ``world_size`` ranks.
    ``generates``: whether its evaluation generates (known once the data is read); None: whenever the options
    ask for samples or answers (free-form data; multiple choice never generates)."""
    if generates is None:
        generates = cfg.sample_prompts > 0 or cfg.answer_accuracy != "off"
    attn = "eager" if cfg.attn_implementation == "eager" else "sdpa"
    autocast = resolved_autocast(cfg.autocast, device) == "bf16"
    precision = "bf16" if device == "cuda" else "autocast-bf16" if autocast else "fp32"  # DeepSpeed bf16: GPUs only
    return PlanConfig(model=cfg.model, world_size=world_size, ep_size=max(cfg.ep_size, 1),
                      micro_batch_size=cfg.micro_batch_size, max_length=cfg.max_length,
                      precision=precision, quantize_base=cfg.quantize_base,
                      quant_double=cfg.quant_double, gradient_checkpointing=cfg.gradient_checkpointing,
                      activation_offload=cfg.activation_offload, chunked_loss=cfg.chunked_loss,
                      loss_chunk_tokens=cfg.loss_chunk_tokens, attn_implementation=attn,
                      method=cfg.adapter.method, num_experts=cfg.adapter.num_experts, rank=cfg.adapter.rank,
                      target_modules=list(cfg.adapter.target_modules), generates=generates, device=device)
