"""Generation with a trained adapter (or a base model alone), below the commands that use it
(``adamole-generate``, the trainer's evaluation samples, ``adamole-serve``): the model loaded for inference
(loading.py), prompts rendered exactly as training rendered them (prompts.py), left-padded batches through
the KV cache (batched.py), continuous batching, where sequences join and leave a running batch at any step
(continuous.py), per-row token choice and log-probabilities (sampling.py), a reply's text as it streams,
cut at stop strings (incremental_text.py), the tokens that stop a reply (stops.py) and the routing view, how
many experts fired per generated token and layer (routing_view.py)."""
