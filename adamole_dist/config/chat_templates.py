"""Built-in chat templates that ``--chat_template NAME`` picks, for models whose tokenizer ships none
(Gemma 3's GGUF carries no template entry at all). Written here, each to render a conversation as its
family's own template does (tests/unit/data/test_chat_templates.py checks ChatML against SmolLM2's, the
one family template that ships with a tokenizer here); a default system prompt a family adds is left out:
pass a system turn. Every one keeps the prefix property training needs (data/sft_render.py): earlier turns
render the same whatever follows, and the reply's end-of-turn token is written right after it."""

from __future__ import annotations

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Gemma 3: the system turn is folded into the first user turn; the assistant is "model".
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
         "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
         "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
         "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Phi-3: without the eos the family's template writes after the last turn (it would break the prefix property).
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

BUILTIN_TEMPLATES = {"chatml": CHATML, "gemma": GEMMA, "llama3": LLAMA3, "phi3": PHI3}

# model_type -> the built-in its family uses: named in the error when a tokenizer has no template.
# Only unambiguous families: model_type "llama" covers Llama 2 ([INST]), Llama 3 and SmolLM2 (ChatML) alike.
FAMILY_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma",
                    "qwen2": "chatml", "qwen3": "chatml", "phi3": "phi3"}


def builtin_template(name: str) -> str | None:
    """The Jinja text of built-in ``name``, None for a name that is not one (a file path)."""
    return BUILTIN_TEMPLATES.get(name)
