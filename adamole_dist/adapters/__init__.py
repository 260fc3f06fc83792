"""Adapters on a model: the adapted linear layer, the routing context its layers share, injection
into a model and the ``Adapters`` handle over what was injected, adapter files (export/load), the
model card, and the public loader (pretrained.py). Loading the base model itself is base_model/."""
