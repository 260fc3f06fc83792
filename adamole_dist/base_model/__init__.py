"""The frozen base model: loading it and its tokenizer for a task type (model_loading.py), GGUF
models converted once into a local cache (gguf_cache.py), the seq_cls pooling choice (pooling.py)
and quieting transformers' load reports (hf_logging.py). Knows nothing of adapters."""
