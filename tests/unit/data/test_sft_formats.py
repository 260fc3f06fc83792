"""Free-form (SFT) formats: detection, rendering and loss masks against hand-written token ids on a
word-level tokenizer with a chat template, and every bad-record case naming record index and field."""

from __future__ import annotations

import pytest

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.formats import DataError, detect_format, resolve_format
from adamole_dist.data.sft_render import IGNORE, RenderSpec, sample_prompt, tokenize_record, tokenize_split

# <|role|> content <|end|> per turn; a user turn after a user turn is refused, like many real templates.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Renders the last turn differently from the same turn followed by more: breaks the prefix property.
LAST_TURN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
                      "{% if loop.last %}<|end|> {% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ("Below is an instruction that describes a task , paired with input provides further context . Write "
         "response appropriately completes the request ### Instruction : Input Response be kind hi hello how are "
         "you fine thanks bye see ya add two and three five once upon time long story").split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("wordtok")
    tok.save_pretrained(folder)
    return str(folder), vocab


def ids(vocab, text: str) -> list[int]:
    return [vocab[w] for w in text.split()]


def spec(tok_dir, fmt, **kw) -> RenderSpec:
    return RenderSpec(tokenizer=tok_dir[0], data_format=fmt, max_length=kw.pop("max_length", 128), **kw)


def render(tok_dir, fmt, record, **kw):
    """(ids, labels) of one raw record through validation and rendering."""
    split = tokenize_split([record], spec(tok_dir, fmt, **kw), "d.json")
    ex = split.examples[0]
    assert len(ex["input_ids"]) == len(ex["labels"])
    return ex["input_ids"], ex["labels"]


def masked(vocab, text: str, targets: str) -> tuple[list[int], list[int]]:
    """Hand-written expectation: ``text`` word by word, labels where ``targets`` has a 1 (one digit a word)."""
    words = text.split()
    assert len(targets) == len(words)
    ids_ = [vocab[w] for w in words]
    return ids_, [i if t == "1" else IGNORE for i, t in zip(ids_, targets)]


# -- detection ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record, fmt", [
    ({"messages": []}, "messages"),
    ({"conversations": []}, "sharegpt"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"text": "t"}, "text"),
    ({"instruction": "i\n\nAnswer format: true/false", "input": "", "output": "true", "answer": "true"},
     "instruction"),  # LLM-Adapters records with an answer stay multiple choice
    ({"question": "q", "choices": ["a", "b"], "answerKey": "A"}, "mc"),
])
def test_detection_from_the_first_record(record, fmt):
    assert detect_format(record, "d.json") == fmt


def test_unknown_fields_list_every_format_and_forcing_is_checked():
    with pytest.raises(DataError, match=r"d\.json record 0: fields \['reply'\] match no known format.*messages.*"
                                         r"prompt_completion.*--data_format"):
        detect_format({"reply": "r"}, "d.json")
    with pytest.raises(DataError, match="data_format"):
        resolve_format([{"text": "t"}], "chatml", "d.json")
    assert resolve_format([{"text": "t"}], "text", "d.json") == "text"


# -- each format against hand-written ids and loss masks ------------------------------------------------------
def test_messages_single_turn(tok_dir):
    vocab = tok_dir[1]
    got = render(tok_dir, "messages", {"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]})
    # the generation prompt <|assistant|> is no target; the reply and its end-of-turn token are
    assert got == masked(vocab, "<|user|> hi <|end|> <|assistant|> hello <|end|>", "000011")


def test_multi_turn_every_assistant_turn_is_a_target(tok_dir):
    vocab = tok_dir[1]
    record = {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello how are you"},
                           {"role": "user", "content": "fine thanks"}, {"role": "assistant", "content": "bye"}]}
    got = render(tok_dir, "messages", record)
    assert got == masked(vocab, "<|system|> be kind <|end|> <|user|> hi <|end|> <|assistant|> hello how are you "
                                "<|end|> <|user|> fine thanks <|end|> <|assistant|> bye <|end|>",
                         "0000" + "000" + "0" + "11111" + "0000" + "0" + "11")


def test_loss_on_all_targets_every_token_but_the_first(tok_dir):
    vocab = tok_dir[1]
    got = render(tok_dir, "messages", {"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}]}, loss_on="all")
    assert got == masked(vocab, "<|user|> hi <|end|> <|assistant|> hello <|end|>", "011111")


def test_sharegpt_renders_as_messages(tok_dir):
    vocab = tok_dir[1]
    got = render(tok_dir, "sharegpt", {"conversations": [{"from": "system", "value": "be kind"},
                                                         {"from": "human", "value": "hi"},
                                                         {"from": "gpt", "value": "see ya"}]})
    assert got == masked(vocab, "<|system|> be kind <|end|> <|user|> hi <|end|> <|assistant|> see ya <|end|>",
                         "0000" + "000" + "0111")


def test_alpaca_without_and_with_input(tok_dir):
    vocab = tok_dir[1]
    head = "<s> Below is an instruction that describes a task"
    tail = ". Write a response that appropriately completes the request . ### Instruction : add two and three"
    got = render(tok_dir, "alpaca", {"instruction": "add two and three", "input": "", "output": "five"})
    prompt = f"{head} {tail} ### Response :"
    assert got == masked(vocab, f"{prompt} five </s>", "0" * len(prompt.split()) + "11")
    got = render(tok_dir, "alpaca", {"instruction": "add two and three", "input": "once", "output": "five"})
    prompt = (f"{head} , paired with an input that provides further context {tail} ### Input : once "
              "### Response :")
    assert got == masked(vocab, f"{prompt} five </s>", "0" * len(prompt.split()) + "11")


def test_alpaca_as_chat_uses_the_template(tok_dir):
    vocab = tok_dir[1]
    got = render(tok_dir, "alpaca", {"instruction": "add two and three", "input": "once", "output": "five"},
                 alpaca_as_chat=True)
    assert got == masked(vocab, "<|user|> add two and three once <|end|> <|assistant|> five <|end|>",
                         "0000000" + "011")


def test_prompt_completion_and_its_loss_on_all(tok_dir):
    vocab = tok_dir[1]
    record = {"prompt": "once upon a time", "completion": "a long story"}
    assert render(tok_dir, "prompt_completion", record) == masked(
        vocab, "<s> once upon a time a long story </s>", "00000" + "1111")
    assert render(tok_dir, "prompt_completion", record, loss_on="all") == masked(
        vocab, "<s> once upon a time a long story </s>", "0" + "11111111")


def test_text_is_a_target_everywhere(tok_dir):
    vocab = tok_dir[1]
    assert render(tok_dir, "text", {"text": "once upon a time"}) == masked(
        vocab, "<s> once upon a time </s>", "011111")


def test_generation_prompt_is_the_training_prefix(tok_dir):
    """What a sample (and later generate) is fed is exactly the tokens before the first target."""
    s = spec(tok_dir, "messages")
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ex = tokenize_record(record, s)
    prompt, reference = sample_prompt(record, s)
    first_target = next(i for i, lb in enumerate(ex["labels"]) if lb != IGNORE)
    assert prompt == ex["input_ids"][:first_target] and reference == "hello"


# -- the length policy ------------------------------------------------------------------------------------------
def test_too_long_is_dropped_and_counted_or_an_error(tok_dir):
    records = [{"text": "once upon a time"}, {"text": "once upon a time a long long long story"}, {"text": "bye"}]
    split = tokenize_split(records, spec(tok_dir, "text", max_length=8), "d.json", truncation="drop")
    assert split.dropped == 1 and len(split.examples) == 2 and split.records[1] == {"text": "bye"}
    with pytest.raises(DataError, match=r"d\.json record 1: 11 tokens exceed max_length \(8\)"):
        tokenize_split(records, spec(tok_dir, "text", max_length=8), "d.json", truncation="error")
    with pytest.raises(DataError, match=r"all 3 examples are longer than max_length \(2\)"):
        tokenize_split(records, spec(tok_dir, "text", max_length=2), "d.json")


# -- bad records: DataError naming the file, the record index and the field -------------------------------------------
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD = [
    ("messages", {"messages": []}, ["record 1", "'messages'", "empty conversation"]),
    ("messages", {"messages": "hi"}, ["record 1", "'messages'", "list of turns"]),
    ("messages", {"messages": [{"role": "bot", "content": "hi"}]}, ["record 1", "'messages[0].role'", "'bot'",
                                                                     "system, user, assistant"]),
    ("messages", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
     ["record 1", "'messages[0].content'", "must be a string, not int"]),
    ("messages", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     ["record 1", "'messages[0].content' is missing"]),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, ["record 1", "'messages'", "no assistant turn"]),
    ("messages", {"messages": ["hi"]}, ["record 1", "'messages[0]'", "must be an object"]),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "x"}]},
     ["record 1", "chat template cannot render", "roles user/user", "Conversation roles must alternate"]),
    ("sharegpt", {"conversations": [{"from": "bing", "value": "hi"}]},
     ["record 1", "'conversations[0].from'", "'bing'", "human"]),
    ("sharegpt", {"conversations": [{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "x"}]},
     ["record 1", "'conversations[0].value'", "is a list of content parts", "not supported"]),
    ("alpaca", {"instruction": "add", "output": 5}, ["record 1", "'output'", "must be a string, not int"]),
    ("alpaca", {"instruction": "add", "output": "  "}, ["record 1", "'output'", "is empty"]),
    ("alpaca", {"instruction": "add", "input": 3, "output": "five"}, ["record 1", "'input'", "not int"]),
    ("prompt_completion", {"prompt": "p"}, ["record 1", "missing field 'completion'"]),
    ("text", {"text": None}, ["record 1", "missing field 'text'"]),
    ("text", ["once"], ["record 1", "expected an object"]),
]
GOOD = {"messages": GOOD_CHAT, "sharegpt": {"conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "x"}]},
        "alpaca": {"instruction": "add", "output": "five"}, "prompt_completion": {"prompt": "p", "completion": "c"},
        "text": {"text": "once"}}


@pytest.mark.parametrize("fmt, bad, parts", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_bad_record_names_file_record_and_field(tok_dir, fmt, bad, parts):
    with pytest.raises(DataError) as e:
        tokenize_split([GOOD[fmt], bad, GOOD[fmt]], spec(tok_dir, fmt), "data/train.json")
    message = str(e.value)
    assert message.startswith("data/train.json record 1: ")
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_a_template_that_breaks_the_prefix_property_is_refused(tok_dir):
    record = {"messages": GOOD_CHAT["messages"] + [{"role": "user", "content": "bye"},
                                                   {"role": "assistant", "content": "see ya"}]}
    with pytest.raises(DataError, match=r"d\.json record 0: the chat template breaks the prefix property at turn 1"):
        tokenize_split([record], spec(tok_dir, "messages", chat_template=LAST_TURN_TEMPLATE), "d.json")


def test_chat_data_needs_a_template_and_names_the_tokenizer(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir[0])
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    plain = RenderSpec(tokenizer=str(tmp_path), data_format="messages", max_length=64)
    with pytest.raises(ConfigError, match=rf"tokenizer of {tmp_path} has none: pass --chat_template"):
        tokenize_split([GOOD_CHAT], plain, "d.json")
    given = RenderSpec(tokenizer=str(tmp_path), data_format="messages", max_length=64, chat_template=TEMPLATE)
    assert tokenize_split([GOOD_CHAT], given, "d.json").examples[0]["input_ids"] == ids(
        tok_dir[1], "<|user|> hi <|end|> <|assistant|> hello <|end|>")
    # alpaca renders with its own template: no chat template needed
    assert tokenize_split([GOOD["alpaca"]], RenderSpec(tokenizer=str(tmp_path), data_format="alpaca",
                                                       max_length=64), "d.json").examples
