"""Data: record formats and loading (formats.py), the built-in generated task
``builtin:word_categories`` (synthetic.py; imported lazily so ``python -m`` can run it cleanly),
task types -- how a model is trained and scored on examples -- (tasks.py), evaluation
(evaluate.py) and the rank-sharded sampler (sampler.py)."""

from adamole_dist.data.formats import DataError, Example, load_examples, load_records, to_examples

__all__ = ["DataError", "Example", "load_examples", "load_records", "to_examples"]
