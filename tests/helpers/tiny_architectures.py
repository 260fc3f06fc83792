"""Tiny random causal LMs of every decoder family with a default target row (adapters/targets.py), built
from transformers' config classes offline: 64 wide, 2 layers, dropout off, MoE bases with 4 small experts.

``TINY`` holds what each type needs beyond the common sizes (its own names for them, its MoE sizes);
a type the installed transformers lacks is skipped by the tests, not faked."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256  # token ids of the in-process models; folders written for the loader take the tokenizer's vocabulary
COMMON = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "head_dim": 16, "max_position_embeddings": 128, "tie_word_embeddings": False,
          "use_cache": True}
SMALL_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
TINY: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "olmo": {}, "olmo2": {}, "olmo3": {}, "granite": {}, "starcoder2": {}, "cohere": {}, "cohere2": {},
    "stablelm": {}, "exaone4": {}, "smollm3": {}, "glm4": {}, "phi3": {}, "phi": {}, "gpt_neox": {}, "falcon": {},
    "bloom": {}, "gptj": {"rotary_dim": 8}, "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}, "gpt2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**SMALL_MOE, "shared_expert_intermediate_size": 64},
    "qwen3_moe": SMALL_MOE,
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "head_dim": 8, "v_head_dim": 16,
                    "n_shared_experts": 1, "num_key_value_heads": 4},  # MLA: every head its own keys and values
}


def available(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def tiny_config(model_type: str, vocab_size: int = VOCAB, *, pad: int = 0, bos: int = 1, eos: int = 2):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    sizes = {k: v for k, v in {**COMMON, **TINY[model_type]}.items()
             if not isinstance(getattr(cls, k, None), property)}  # Falcon derives head_dim
    cfg = cls(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, **sizes)
    for field in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                  "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout_rate"):
        if isinstance(getattr(cfg, field, None), float):
            setattr(cfg, field, 0.0)
    return cfg


def tiny_model(model_type: str, seed: int = 0, vocab_size: int = VOCAB, **ids):
    """The tiny causal LM of ``model_type`` in eval mode (random weights from ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, **ids)).eval()


def write_tiny_model(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A folder ``load_model_and_tokenizer`` reads: the tiny model beside the offline MiniLM tokenizer."""
    from tests.helpers.tiny_models import minilm_tokenizer

    tok = minilm_tokenizer()
    model = tiny_model(model_type, seed, tok.vocab_size, pad=tok.pad_token_id, bos=tok.cls_token_id,
                       eos=tok.sep_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
