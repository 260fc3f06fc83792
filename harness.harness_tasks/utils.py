"""lm-evaluation-harness hooks for the local task YAMLs in this folder.

``process_docs`` turns records of ../shared/data's layout (``{instruction, input, output, answer}``, or the
``{question, choices, answerKey}`` layout) into ``{question, choices, label}`` with adamole_dist's own parser
(adamole_dist/data/formats.py), so the harness scores exactly the questions and choice texts that
``launch/eval.py --lm_framing question_answer`` scores. Needs adamole_dist importable: installed
(``pip install -e .``) or run through ``launch/eval.py --harness``.
"""

from __future__ import annotations

try:
    from adamole_dist.data import to_examples
except ImportError as e:  # the harness imports this file by path, outside the project
    raise ImportError("harness_tasks/utils.py parses records with adamole_dist: pip install -e <checkout>, "
                      "or run the tasks through launch/eval.py --harness") from e


def to_doc(record: dict) -> dict:
    ex = to_examples([dict(record)], "auto", "harness record")[0]
    return {"question": ex.context, "choices": list(ex.choice_texts), "label": ex.label}


def process_docs(dataset):
    return dataset.map(to_doc, remove_columns=dataset.column_names)
