"""adamole_dist: AdaMoLE (adaptive mixture of LoRA experts) fine-tuning under DeepSpeed ZeRO-3."""

from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError

__all__ = ["AdapterConfig", "ConfigError", "Adapters", "from_pretrained", "inject_adapters"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the loader pulls in transformers and safetensors; `import adamole_dist` stays light.
    if name == "from_pretrained":
        from adamole_dist.adapters.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'adamole_dist' has no attribute {name!r}")
