"""Configs of models the planner knows by name, written by hand from their published config.json (no hub, no
weights): the models of docs/memory_planner.md's table and the built-in SmolLM2-135M and Gemma 3 270M."""

from __future__ import annotations

_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": False, "attention_bias": False,
            "hidden_act": "silu", "attention_dropout": 0.0}

KNOWN_MODELS: dict[str, dict] = {
    "llama-3.1-8b": {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "qwen2.5-32b": {"model_type": "qwen2", "vocab_size": 152064, "tie_word_embeddings": False, "hidden_size": 5120,
                    "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "hidden_act": "silu", "attention_dropout": 0.0},
    "smollm2-135m": {"model_type": "llama", "vocab_size": 49152, "tie_word_embeddings": True, "hidden_size": 576,
                     "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64, "attention_bias": False, "hidden_act": "silu",
                     "attention_dropout": 0.0},
    "gemma3-270m": {"model_type": "gemma3_text", "vocab_size": 262144, "tie_word_embeddings": True, "hidden_size": 640,
                    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "head_dim": 256, "attention_bias": False,
                    "hidden_activation": "gelu_pytorch_tanh", "attention_dropout": 0.0},
}
