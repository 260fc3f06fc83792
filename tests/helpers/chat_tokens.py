"""The turn tokens of the chat template families (config/chat_templates.py), to add to a test tokenizer
as special tokens, and the end-of-turn token of each built-in."""

FAMILY_TOKENS = ["<bos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|user|>", "<|assistant|>", "<|end|>",
                 "<|turn_end|>"]
END_OF_TURN = {"gemma": {"<end_of_turn>"}, "chatml": {"<|im_end|>"}, "llama3": {"<|eot_id|>"}, "phi3": {"<|end|>"}}


def with_family_tokens(tokenizer):
    """``tokenizer`` with every family's turn tokens added as special tokens (and <bos> as its bos)."""
    tokenizer.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": FAMILY_TOKENS[1:]})
    return tokenizer
