"""Adapters on a model: the adapted linear layer, the routing context its layers share, injection
into a model and the ``Adapters`` handle over what was injected, adapter files (export/load), and
loading base models (with the seq_cls pooling choice)."""
