"""Datasets: record formats, loading, and the built-in generated task."""

from .formats import DataError, Example, load_examples, load_records, to_examples

__all__ = ["DataError", "Example", "load_examples", "load_records", "to_examples"]
