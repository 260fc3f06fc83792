"""Record formats, loading and the generated task (small records built here; no network)."""

import collections
import json
import re

import pytest

from adamole_dist.data import DataError, load_examples, load_records, synthetic, to_examples
from adamole_dist.data.formats import ALPACA, subsample

BOOL_LEAD = "Please answer the following question with true or false, question: "
MC_LEAD = "Please choose the correct answer to the question: "


def bool_record(question="do iran and afghanistan speak the same language?", answer="true") -> dict:
    return {"instruction": f"{BOOL_LEAD}{question}\n\nAnswer format: true/false", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def choice_record(question: str, texts: list[str], answer: int) -> dict:
    options = " ".join(f"Answer{i + 1}: {t}" for i, t in enumerate(texts))
    labels = "/".join(f"answer{i + 1}" for i in range(len(texts)))
    return {"instruction": f"{MC_LEAD}{question}\n\n{options}\n\nAnswer format: {labels}", "input": "",
            "output": f"the correct answer is answer{answer}", "answer": f"answer{answer}"}


THREE = ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase"]
FIVE = THREE + ["plants sprouting, blooming and wilting", "rocks, eroding slowly"]


# -- instruction format ---------------------------------------------------------------------------
def test_boolq_like_record():
    (ex,) = to_examples([bool_record(answer="false")])
    assert ex.label == 1
    assert ex.candidates == [" true", " false"]
    assert ex.target == " false"
    assert ex.choice_texts == ["true", "false"]
    assert ex.context == "do iran and afghanistan speak the same language?"
    instruction = bool_record(answer="false")["instruction"]
    assert ex.prompt == ALPACA.format(instruction=instruction) + "the correct answer is"
    assert ex.prompt.endswith("### Response:\nthe correct answer is")


@pytest.mark.parametrize("texts, answer", [(THREE, 2), (FIVE, 5)])
def test_openbookqa_like_record(texts, answer):
    (ex,) = to_examples([choice_record("The sun is responsible for", texts, answer)])
    n = len(texts)
    assert ex.label == answer - 1
    assert ex.candidates == [f" answer{i}" for i in range(1, n + 1)]
    assert ex.target == f" answer{answer}"
    assert ex.choice_texts == texts
    assert ex.context == "The sun is responsible for"
    assert ex.prompt.startswith("Below is an instruction that describes a task.")
    assert ex.prompt.endswith(f"Answer format: {'/'.join(f'answer{i}' for i in range(1, n + 1))}"
                              "\n\n### Response:\nthe correct answer is")


def test_input_block_and_case_insensitive_answer():
    rec = dict(bool_record(answer="True"), input="Some passage.")
    rec["output"] = "the correct answer is True"
    (ex,) = to_examples([rec])
    assert ex.label == 0 and ex.candidates == [" true", " false"]
    assert "\n\n### Input:\nSome passage.\n\n### Response:\nthe correct answer is" in ex.prompt
    assert "paired with an input" in ex.prompt


def test_output_without_lead_in_keeps_prompt_ending_in_newline():
    rec = dict(choice_record("Pick one", ["x", "y"], 2), output="Answer: see above")
    (ex,) = to_examples([rec])
    assert ex.prompt.endswith("### Response:\n")
    assert ex.candidates == ["answer1", "answer2"]  # no space after a newline
    assert ex.target == "answer2"


def test_missing_choice_texts_fall_back_to_labels():
    rec = {"instruction": f"{MC_LEAD}Which?\n\nAnswer format: yes/no/maybe", "input": "",
           "output": "the correct answer is maybe", "answer": "maybe"}
    (ex,) = to_examples([rec])
    assert ex.choice_texts == ["yes", "no", "maybe"] and ex.label == 2 and ex.context == "Which?"


# -- mc format ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "choices, key_field, key",
    [
        ({"label": ["A", "B", "C"], "text": ["red", "green", "blue"]}, "answerKey", "B"),
        ({"label": ["1", "2", "3"], "text": ["red", "green", "blue"]}, "answerKey", "2"),
        (["red", "green", "blue"], "answer", "B"),
        (["red", "green", "blue"], "answer", 1),
    ],
)
def test_mc_layouts_and_answers(choices, key_field, key):
    (ex,) = to_examples([{"question": "Which is the colour of grass?", "choices": choices, key_field: key}],
                        fmt="auto")
    labels = choices["label"] if isinstance(choices, dict) else ["A", "B", "C"]
    assert ex.label == 1
    assert ex.context == "Which is the colour of grass?"
    assert ex.choice_texts == ["red", "green", "blue"]
    assert ex.candidates == [f" {lb}" for lb in labels]
    assert ex.target == f" {labels[1]}"
    assert ex.prompt == ("Question: Which is the colour of grass?\nChoices:\n"
                         f"{labels[0]}. red\n{labels[1]}. green\n{labels[2]}. blue\nAnswer:")


def test_mc_bad_answer_names_record_and_field():
    recs = [{"question": "q", "choices": ["a", "b"], "answerKey": "A"},
            {"question": "q", "choices": ["a", "b"], "answerKey": "E"}]
    with pytest.raises(DataError, match=r"mc\.json record 1: field 'answerKey' \('E'\)"):
        to_examples(recs, origin="mc.json")
    with pytest.raises(DataError, match="record 0: field 'answer' index 7 is out of range"):
        to_examples([{"question": "q", "choices": ["a", "b"], "answer": 7}], fmt="mc")


# -- validation errors ---------------------------------------------------------------------------------------
def test_missing_field_names_file_index_and_field():
    records = [bool_record() for _ in range(5)]
    del records[3]["answer"]
    with pytest.raises(DataError) as err:
        to_examples(records, origin="data/train.json")
    assert str(err.value) == ("data/train.json record 3: missing field 'answer' "
                              "(instruction format needs instruction, output, answer)")


def test_null_field_counts_as_missing_and_is_found_before_any_conversion():
    # record 1 is unparseable (bad answer); record 2 lacks a field: validation runs first
    records = [bool_record(), bool_record(answer="maybe"), dict(bool_record(), output=None)]
    with pytest.raises(DataError, match=r"x\.json record 2: missing field 'output'"):
        to_examples(records, origin="x.json")


def test_mc_missing_answer_field():
    records = [{"question": "q", "choices": ["a", "b"], "answerKey": "A"}, {"question": "q", "choices": ["a", "b"]}]
    with pytest.raises(DataError, match=r"m\.json record 1: missing field 'answerKey'.*mc format needs"):
        to_examples(records, origin="m.json")


def test_answer_not_among_candidates():
    with pytest.raises(DataError, match=r"t\.json record 0: field 'answer' \('answer5'\) is not one of the choices"):
        to_examples([choice_record("q", ["a", "b", "c", "d"], 5)], origin="t.json")


def test_empty_and_unknown_format():
    with pytest.raises(DataError, match="e.json: the dataset is empty"):
        to_examples([], origin="e.json")
    with pytest.raises(DataError, match=r"u\.json record 0: fields \['prompt', 'reply'\] match no known format"):
        to_examples([{"prompt": "p", "reply": "r"}], origin="u.json")
    with pytest.raises(DataError, match="data_format"):
        to_examples([bool_record()], fmt="yaml")


# -- loading --------------------------------------------------------------------------------------------------
def write_split(directory, split: str, suffix: str, records: list[dict]) -> None:
    path = directory / f"{split}{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:  # csv: answers true/false must stay strings
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "answer"])
            w.writeheader()
            w.writerows(records)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_load_from_directory(tmp_path, suffix):
    records = [bool_record(f"question {i}?", "true" if i % 2 else "false") for i in range(6)]
    write_split(tmp_path, "train", suffix, records)
    got, origin = load_records(str(tmp_path), "train")
    assert origin == str(tmp_path / f"train{suffix}")
    assert [r["answer"] for r in got] == [r["answer"] for r in records]
    examples = load_examples(str(tmp_path), "train")
    assert [ex.label for ex in examples] == [0 if i % 2 else 1 for i in range(6)]
    assert examples[2].context == "question 2?"


def test_load_file_path_is_the_split(tmp_path):
    write_split(tmp_path, "anything", ".jsonl", [bool_record()])
    records, origin = load_records(str(tmp_path / "anything.jsonl"), "test")
    assert origin.endswith("anything.jsonl") and len(records) == 1


def test_load_errors_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"no validation\.json, \.jsonl, \.csv or \.parquet"):
        load_records(str(tmp_path), "validation")
    missing = str(tmp_path / "nope")
    expected = re.escape(f"dataset {missing!r}: no such local file or directory") + ".*unreachable"
    with pytest.raises(DataError, match=expected):
        load_records(missing, "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "notes.txt"), "train")


def test_missing_field_error_through_the_loader(tmp_path):
    records = [bool_record() for _ in range(5)]
    del records[3]["answer"]
    write_split(tmp_path, "train", ".json", records)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'train.json'} record 3: missing field 'answer'")):
        load_examples(str(tmp_path), "train")


def test_subsample_is_deterministic():
    items = list(range(100))
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b and len(a) == 10 and a == sorted(a)
    assert subsample(items, 10, seed=4) != a
    assert subsample(items, None) == items and subsample(items, 0) == items and subsample(items, 500) == items
    with pytest.raises(DataError, match="limit"):
        subsample(items, -1)


def test_load_examples_limit(tmp_path):
    write_split(tmp_path, "train", ".json", [bool_record(f"q{i}?") for i in range(30)])
    first = [ex.context for ex in load_examples(str(tmp_path), "train", limit=5, seed=1)]
    again = [ex.context for ex in load_examples(str(tmp_path), "train", limit=5, seed=1)]
    assert first == again and len(first) == 5


# -- the generated task ---------------------------------------------------------------------------------------------
def words_in(records: list[dict]) -> set[str]:
    return {w for ex in to_examples(records) for w in ex.choice_texts}


def test_synthetic_is_deterministic():
    gen = synthetic.generate_word_categories
    assert gen("train", 50, seed=7) == gen("train", 50, seed=7)
    assert gen("train", 50, seed=7) != gen("train", 50, seed=8)
    assert gen("validation", 50) != gen("test", 50)


def test_synthetic_train_and_test_words_are_disjoint():
    train = words_in(synthetic.generate_word_categories("train", 2000))
    for split, seed in [("test", 0), ("validation", 0), ("test", 5)]:
        held = words_in(synthetic.generate_word_categories(split, 400, seed=seed))
        assert held and not train & held
    for cat, ws in synthetic.word_split().items():
        assert not set(ws["train"]) & set(ws["heldout"]) and len(ws["heldout"]) >= 1, cat


def test_word_lists_are_unambiguous():
    categories, _ = synthetic.word_lists()
    assert len(categories) >= 12
    seen = collections.Counter(w for spec in categories.values() for w in spec["words"])
    assert [w for w, n in seen.items() if n > 1] == []
    assert all(len(spec["words"]) >= 16 and spec["phrases"] for spec in categories.values())


def test_synthetic_records_parse_with_uniform_labels():
    records = synthetic.generate_word_categories("train", 2000)
    examples = to_examples(records, fmt="instruction")
    counts = collections.Counter(ex.label for ex in examples)
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(400 <= n <= 600 for n in counts.values()), counts
    categories, _ = synthetic.word_lists()
    category_of = {w: c for c, spec in categories.items() for w in spec["words"]}
    for ex in examples[:200]:  # exactly one choice is of the asked category
        asked = [c for c, spec in categories.items() if any(p in ex.context for p in spec["phrases"])]
        hits = [i for i, w in enumerate(ex.choice_texts) if category_of[w] in asked]
        assert hits == [ex.label], ex


def test_builtin_source_and_cli(tmp_path):
    records, origin = load_records("builtin:word_categories", "test")
    assert len(records) == synthetic.DEFAULT_SIZES["test"] and origin == "builtin:word_categories[test]"
    with pytest.raises(DataError, match="unknown built-in"):
        load_records("builtin:nothing", "train")
    with pytest.raises(DataError, match="split"):
        load_records("builtin:word_categories", "dev")
    synthetic.main(["--out", str(tmp_path)])
    assert json.loads((tmp_path / "train.json").read_text()) == synthetic.generate_word_categories("train")
    assert len(load_examples(str(tmp_path), "test")) == synthetic.DEFAULT_SIZES["test"]
