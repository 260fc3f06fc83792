"""Configuration: typed option fields and the one coercion path (fields.py), the adapter config
(adapter.py), the training config (training.py), the command line and YAML recipes (cli.py), and
the DeepSpeed config (deepspeed.py). Imports nothing else from the project."""
