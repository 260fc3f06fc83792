"""A model's dimensions and parameter counts, from its config alone (config.json, a folder, a cached hub id or a
name in known_models.py): no weights are read. Counts are by formula for the decoder families the trainer adapts
(llama, mistral, qwen2, ...: GQA attention, gated MLP, RMS norms, tied or separate LM head; Gemma 3's four norms a
block and its q/k norms) and for BERT-style encoders (the seq_cls path: a 1-logit head)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adamole_dist.config.fields import ConfigError
from adamole_dist.planning.known_models import KNOWN_MODELS

ENCODER_TYPES = ("bert", "roberta")
QKV_BIAS_TYPES = ("qwen2",)  # decoders whose q/k/v projections carry a bias by design
SANDWICH_NORM_TYPES = ("gemma3_text",)  # norms before and after attention and MLP, and on q and k per head


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab: int  # V
    hidden: int  # D
    intermediate: int  # I
    layers: int  # L
    heads: int  # H
    kv_heads: int
    head_dim: int
    tied_head: bool
    qkv_bias: bool
    attention_dropout: float
    positions: int = 0  # encoders: learned position embeddings (+ token types)

    @property
    def is_encoder(self) -> bool:
        return self.model_type in ENCODER_TYPES

    @property
    def sandwich_norms(self) -> bool:
        return self.model_type in SANDWICH_NORM_TYPES

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one block, by the names targets match."""
        d, i = self.hidden, self.intermediate
        if self.is_encoder:
            return {"query": (d, d), "key": (d, d), "value": (d, d), "attention.output.dense": (d, d),
                    "intermediate.dense": (d, i), "output.dense": (i, d)}
        return {"q_proj": (d, self.q_dim), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim),
                "o_proj": (self.q_dim, d), "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def block_linear_params(self) -> int:
        """Weights (and biases) of one block's linear layers: what --quantize_base packs."""
        weights = sum(a * b for a, b in self.linears().values())
        if self.is_encoder:
            return weights + 4 * self.hidden + self.intermediate + self.hidden
        return weights + (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)

    def block_other_params(self) -> int:
        """Norms of one block: RMS norm weights (decoders; Gemma 3: four, and q's and k's over a head), layer norm
        weight and bias (encoders)."""
        if self.sandwich_norms:
            return 4 * self.hidden + 2 * self.head_dim
        return 4 * self.hidden if self.is_encoder else 2 * self.hidden

    def outside_block_params(self) -> int:
        """Embeddings, final norm, LM head (untied) or pooler and 1-logit head (encoders)."""
        d = self.hidden
        if self.is_encoder:
            return (self.vocab + self.positions + 2) * d + 2 * d + d * d + d + d + 1
        return self.vocab * d + d + (0 if self.tied_head else self.vocab * d)

    def total_params(self) -> int:
        return self.layers * (self.block_linear_params() + self.block_other_params()) + self.outside_block_params()


def shape_from_config(cfg: dict, origin: str) -> ModelShape:
    """ModelShape of a config.json's fields; ConfigError naming ``origin`` when a dimension is missing."""
    try:
        model_type = str(cfg["model_type"])
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            model_type=model_type, vocab=int(cfg["vocab_size"]), hidden=hidden,
            intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tied_head=bool(cfg.get("tie_word_embeddings", model_type not in ENCODER_TYPES)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or model_type in QKV_BIAS_TYPES,
            attention_dropout=float(cfg.get("attention_dropout", cfg.get("attention_probs_dropout_prob", 0.0))),
            positions=int(cfg.get("max_position_embeddings", 0)) if model_type in ENCODER_TYPES else 0)
    except KeyError as e:
        raise ConfigError(f"model ({origin}): its config has no {e.args[0]}; the planner needs hidden_size, "
                          "intermediate_size, num_hidden_layers, num_attention_heads and vocab_size") from None


def load_model_shape(model: str) -> ModelShape:
    """The ModelShape of ``model``: a name in known_models.py or minilm-l6, a config.json, a folder holding one,
    or a hub id already in the local cache."""
    if model.lower() in KNOWN_MODELS:
        return shape_from_config(KNOWN_MODELS[model.lower()], model)
    if model == "minilm-l6":
        from adamole_dist.base_model.model_loading import resolve_model_path

        model = resolve_model_path(model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return shape_from_config(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"model ({path}) is not a readable config.json: {e}") from None
    if Path(model).expanduser().exists() or model.count("/") != 1:
        raise ConfigError(f"model ({model}) is neither a config.json, a folder holding one, a cached hub id nor "
                          f"one of {', '.join(['minilm-l6', *KNOWN_MODELS])}")
    return shape_from_config(_cached_hub_config(model), model)


def _cached_hub_config(model_id: str) -> dict:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, local_files_only=True).to_dict()
    except (OSError, ValueError):
        raise ConfigError(f"model ({model_id}) is not in the local Hugging Face cache (the planner never downloads): "
                          "pass its config.json or a folder holding it") from None
