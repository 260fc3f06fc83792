"""The built-in generated chat task ``builtin:word_categories_chat``: the default job's data.

The words and their train / held-out split are synthetic.py's (``builtin:word_categories``), asked as a
conversation a language model answers by generation: a short system turn ("Answer with the word only."),
one user turn ("Which of these words is a kind of fruit? hammer, apple, truck, blue.") and one assistant
turn, the word. The system turn is the data's own, so a family's long default system prompt never
enters a row (rows stay ~40 tokens: a packed row of 256 holds six). Validation and test questions use only held-out
words, as the answer and as distractors: the accuracy a model reaches there is what it generalises from
its pretrained word knowledge to words it never saw in training, not what it memorised. A base model
knows the categories but answers in sentences; what training teaches is the task's form and the
category judgement on unseen words.

    python -m adamole_dist.data.word_chat --out DIR     # writes DIR/{train,validation,test}.json
"""

from __future__ import annotations

from adamole_dist.data.synthetic import NUM_CHOICES, split_draw, word_lists, write_splits

DEFAULT_SIZES = {"train": 4000, "validation": 60, "test": 60}
QUESTION = "Which of these words is {phrase}? {words}."
# The conversation's own short system turn: it says how to answer, and it keeps the model family's default
# system prompt out of every row (SmolLM2's adds ~20 tokens; the rows are ~40 without it).
SYSTEM = "Answer with the word only."
CHAT_SEED_OFFSET = 7  # its own question streams, not the multiple-choice task's


def make_conversation(phrase: str, words: list[str], answer: str) -> dict:
    """One messages-format record: the question and the one-word reply."""
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": QUESTION.format(phrase=phrase, words=", ".join(words))},
                         {"role": "assistant", "content": answer}]}


def generate_word_categories_chat(split: str, num_examples: int | None = None, seed: int = 0) -> list[dict]:
    """Deterministic conversations of one split (train / validation / test); size defaults per split."""
    n, words_of, cats, rng = split_draw(split, num_examples, seed, DEFAULT_SIZES, seed_offset=CHAT_SEED_OFFSET)
    categories, _ = word_lists()
    records = []
    for _ in range(n):
        cat = rng.choice(cats)
        others = rng.sample([c for c in cats if c != cat], NUM_CHOICES - 1)
        words = [rng.choice(words_of[c]) for c in others]
        answer = rng.choice(words_of[cat])
        words.insert(rng.randrange(NUM_CHOICES), answer)
        records.append(make_conversation(rng.choice(categories[cat]["phrases"]), words, answer))
    return records


def main(argv: list[str] | None = None) -> None:
    write_splits(generate_word_categories_chat, "Write the generated word-categories chat task as JSON files.", argv)


if __name__ == "__main__":
    main()
