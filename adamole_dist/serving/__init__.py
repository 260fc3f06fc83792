"""An OpenAI-compatible server for adapted models (``adamole-serve``): several adapters on one base
(models.py), requests checked into generation jobs (requests.py), a scheduler thread that batches the
jobs of each model continuously (scheduler.py, model_batch.py, sequence.py, over generation/continuous.py),
the OpenAI response bodies (responses.py), the HTTP routes (app.py) and the server that drains on
SIGTERM (server.py). docs/serving.md tells how to run it and why it is built this way."""
