"""Generation with a trained adapter (or a base model alone), below the commands that use it
(``adamole-generate``, the trainer's evaluation samples, a server): the model loaded for inference
(loading.py), prompts rendered exactly as training rendered them (prompts.py), left-padded batches
through the KV cache (batched.py), the tokens that stop a reply (stops.py) and the routing view, how
many experts fired per generated token and layer (routing_view.py)."""
