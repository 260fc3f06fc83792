"""adamole_dist: AdaMoLE (adaptive mixture of LoRA experts) fine-tuning under DeepSpeed ZeRO-3."""

from .config import AdapterConfig, ConfigError
from .inject import Adapters, inject_adapters

__all__ = ["AdapterConfig", "ConfigError", "Adapters", "inject_adapters"]
__version__ = "0.1.0"
