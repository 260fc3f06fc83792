"""Tensor-name suffixes, stated once for the whole project.

A tensor's name ends in its shape, one letter per axis: ``probs_TN`` is tokens x experts,
``A_NRD`` experts x rank x input features. Every letter means one thing everywhere
(tests/unit/architecture/test_layering.py fails on a suffix letter that is not listed here).
"""

LETTERS = {
    "T": "tokens on this rank (batch x sequence, flattened)",
    "D": "input features of the adapted linear (d_in)",
    "O": "output features of the adapted linear (d_out)",
    "N": "experts: a layer's routing columns, or the experts a bank computes",
    "R": "LoRA rank of one expert",
    "K": "N * R: the experts' rank columns stacked (dense path)",
    "E": "experts each token selects (top_k)",
    "P": "selected (token, expert) pairs (grouped path)",
    "I": "input width of one grouped matmul (D on the way in, R on the way out)",
    "F": "output width of one grouped matmul (R on the way in, O on the way out)",
    "M": "N + 1: N per-expert values followed by one more (the threshold logit; the token count)",
    "J": "ranks of the expert-parallel group (ep_size)",
    "L": "N / J: experts per rank of the expert-parallel group",
    "S": "rows this rank sends: one per (token, destination rank)",
    "V": "rows this rank receives",
    "Q": "candidates per expert one rank offers when capacity is decided by probability",
    "G": "J * Q: the candidates of the whole expert-parallel group",
    "U": "columns summed over the tokens in one reduction (the fused routing's loss and statistics sums)",
    "B": "sequences of a generation batch (its rows)",
    "C": "positions of a sequence in the KV cache: its prompt and generated tokens, left padding included",
    "W": "the vocabulary (next-token logits; the LM head's rows)",
    "H": "tokens of one chunk (the chunked LM-head loss)",
    "1": "a size-1 axis, for broadcasting (last position only)",
}
