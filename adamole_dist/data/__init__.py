"""Datasets: record formats and loading (formats.py), and the built-in generated task
``builtin:word_categories`` (synthetic.py; imported lazily so ``python -m`` can run it cleanly)."""

from .formats import DataError, Example, load_examples, load_records, to_examples

__all__ = ["DataError", "Example", "load_examples", "load_records", "to_examples"]
