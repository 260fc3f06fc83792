"""Built-in chat templates (config/chat_templates.py, ``--chat_template NAME``): ChatML renders exactly as
SmolLM2's own template (the family template that ships with a tokenizer here); every built-in trains on the
reply through its end-of-turn token; a model without a template is named as the user named it, with its
family's built-in."""

from __future__ import annotations

import json

import pytest

from adamole_dist.config.chat_templates import BUILTIN_TEMPLATES
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.sft_render import RenderSpec, tokenize_split
from tests.helpers.chat_tokens import END_OF_TURN, with_family_tokens

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Red."}]


def test_chatml_renders_as_smollm2s_own_template():
    from transformers import AutoTokenizer

    from adamole_dist.base_model.model_loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    assert "<|im_end|>" in tok.chat_template
    for k in range(1, len(CONVERSATION) + 1):  # with a system turn: SmolLM2's default system prompt stays out
        for prompt in (False, True):
            ours = tok.apply_chat_template(CONVERSATION[:k], chat_template=BUILTIN_TEMPLATES["chatml"],
                                           tokenize=False, add_generation_prompt=prompt)
            assert ours == tok.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=prompt)


@pytest.fixture(scope="module")
def family_tok_dir(tmp_path_factory):
    """MiniLM's tokenizer with the families' turn tokens, no chat template, beside a Gemma 3 config."""
    from tests.helpers.tiny_models import minilm_tokenizer

    folder = tmp_path_factory.mktemp("gemma_like")
    tok = with_family_tokens(minilm_tokenizer())
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    return folder, tok


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_each_builtin_trains_on_the_reply_through_its_end_of_turn(family_tok_dir, name):
    folder, tok = family_tok_dir
    spec = RenderSpec(tokenizer=str(folder), data_format="messages", max_length=256,
                      chat_template=BUILTIN_TEMPLATES[name])
    example = tokenize_split([{"messages": CONVERSATION}], spec, "d.json").examples[0]
    targets = [t for t, lb in zip(example["input_ids"], example["labels"]) if lb != IGNORE]
    eot = tok.convert_tokens_to_ids(next(iter(END_OF_TURN[name])))
    assert targets.count(eot) == 2  # each assistant turn ends with the template's end-of-turn token
    assert "blue" in tok.decode(targets) and "red" in tok.decode(targets) and "colour" not in tok.decode(targets)


def test_a_model_without_template_is_named_as_given_with_its_familys_builtin(family_tok_dir):
    folder, _ = family_tok_dir
    spec = RenderSpec(tokenizer=str(folder), data_format="messages", max_length=64, model_name="gemma-3-270m.gguf")
    with pytest.raises(ConfigError, match=r"tokenizer of gemma-3-270m\.gguf has none: pass --chat_template FILE .* "
                                          r"its family \(gemma3_text\) uses --chat_template gemma") as e:
        tokenize_split([{"messages": CONVERSATION}], spec, "d.json")
    assert str(folder) not in str(e.value)


def test_chat_template_option_takes_a_builtin_name_or_a_file(tmp_path):
    assert TrainConfig(chat_template="gemma").chat_template == "gemma"
    with pytest.raises(ConfigError, match=r"chat_template \(gemmma\) is not a file .* nor a built-in \(chatml, gemma"):
        TrainConfig(chat_template="gemmma")
    assert TrainConfig.from_record({"chat_template": "llama3"}).chat_template == "llama3"
