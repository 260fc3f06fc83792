"""Generation stops at the chat template's end of turn (generation/stops.py): Gemma's ``<end_of_turn>``,
ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>`` (none of them the tokenizer's eos here), found in the
template and the vocabulary; a template no table knows gives its end-of-turn token by rendering; a reply
that writes one ends there, in generation and in what the server stops at."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from adamole_dist.config.chat_templates import BUILTIN_TEMPLATES
from adamole_dist.generation.batched import generate_batch, sampling_options
from adamole_dist.generation.stops import end_of_turn_ids, stop_ids
from tests.helpers.chat_tokens import END_OF_TURN, with_family_tokens
from tests.helpers.tiny_models import minilm_tokenizer, write_tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's word pieces with the families' turn tokens added as special tokens; eos stays [SEP]."""
    tok = with_family_tokens(minilm_tokenizer())
    tok.eos_token = "[SEP]"
    return tok


def ids_of(tokenizer, tokens) -> set[int]:
    return {tokenizer.convert_tokens_to_ids(t) for t in tokens}


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_each_family_template_stops_at_its_end_of_turn(tokenizer, family):
    template = BUILTIN_TEMPLATES[family]
    assert end_of_turn_ids(tokenizer, template) == ids_of(tokenizer, END_OF_TURN[family])
    stops = stop_ids(None, tokenizer, template)
    assert set(stops) == ids_of(tokenizer, END_OF_TURN[family]) | {tokenizer.sep_token_id}


def test_llama3_tool_turn_end_counts_when_the_template_names_it(tokenizer):
    template = BUILTIN_TEMPLATES["llama3"].replace("'<|eot_id|>'", "('<|eom_id|>' if message.get('tool') "
                                                   "else '<|eot_id|>')")
    assert end_of_turn_ids(tokenizer, template) == ids_of(tokenizer, ["<|eot_id|>", "<|eom_id|>"])


def test_a_template_no_table_knows_gives_its_end_of_turn_by_rendering(tokenizer):
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|turn_end|>{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    assert end_of_turn_ids(tokenizer, template) == ids_of(tokenizer, ["<|turn_end|>"])
    # A marker the vocabulary lacks as one token does not count ("<|eot_id|>" in plain text would be pieces).
    plain = minilm_tokenizer()
    assert end_of_turn_ids(plain, BUILTIN_TEMPLATES["llama3"].replace("{{ bos_token }}", "")) == set()
    assert end_of_turn_ids(tokenizer, None) == set()


class Scripted(LogitsProcessor):
    """Forces the reply: ``script[i]`` at new token i, then ``filler`` for ever."""

    def __init__(self, prompt_len: int, script: list[int], filler: int) -> None:
        self.prompt_len, self.script, self.filler = prompt_len, script, filler

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[i] if i < len(self.script) else self.filler] = 0.0
        return forced


@pytest.mark.parametrize("family", ["gemma", "chatml", "llama3"])
def test_generation_ends_the_reply_at_the_end_of_turn(tmp_path, tokenizer, family):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(write_tiny_llama(tmp_path / "llama")).eval()
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    eot = tokenizer.convert_tokens_to_ids(next(iter(END_OF_TURN[family])))
    word, prompt = tokenizer.convert_tokens_to_ids("cat"), [tokenizer.cls_token_id, 1996]
    for template, expected in ((BUILTIN_TEMPLATES[family], [word, word]), (None, [word, word, eot] + [word] * 5)):
        tokenizer.chat_template = template
        script = LogitsProcessorList([Scripted(len(prompt), [word, word, eot], word)])
        (out,) = generate_batch(model, tokenizer, [prompt], {**sampling_options(8), "logits_processor": script})
        assert out["ids"] == expected  # with the template: cut before <end_of_turn>; without: runs to the limit
    tokenizer.chat_template = None


def test_the_server_stops_at_the_adapter_templates_end_of_turn(tokenizer):
    from adamole_dist.serving.models import served

    tokenizer.chat_template = BUILTIN_TEMPLATES["gemma"]
    try:
        model = torch.nn.Linear(1, 1)
        entry = served("base", model, tokenizer)
        assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in entry.stops
    finally:
        tokenizer.chat_template = None
