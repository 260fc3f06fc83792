"""Data, a floor of its own that imports only the ground floor: what every module agrees on
(examples.py), record formats and loading (formats.py, conversations.py), the built-in generated task
``builtin:word_categories`` (synthetic.py; imported lazily so ``python -m`` can run it cleanly),
rendering and tokenizing free-form records (sft_render.py, token_cache.py), batches (batching.py), the
task types -- how a model is trained and scored on examples -- (task.py, choice_tasks.py, sft_task.py,
task_factory.py), the run's data assembled and checked (run_data.py), evaluation over ranks
(evaluate.py) and the rank-sharded sampler (sampler.py). What data/ needs of the other ranks comes in
as a ``Ranks`` (ranks.py); collectives themselves live in parallel/."""

from adamole_dist.data.examples import DataError, Example
from adamole_dist.data.formats import load_examples, load_records, to_examples

__all__ = ["DataError", "Example", "load_examples", "load_records", "to_examples"]
