"""adamole_dist: AdaMoLE (adaptive mixture of LoRA experts) fine-tuning under DeepSpeed ZeRO-3."""

from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError

__all__ = ["AdapterConfig", "ConfigError", "Adapters", "inject_adapters"]
__version__ = "0.1.0"
