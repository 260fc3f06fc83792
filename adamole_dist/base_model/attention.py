"""The attention kernel a model loads with (``--attn_implementation``), checked before anything runs.

``auto`` leaves the choice to transformers (sdpa where the model supports it, else eager). Every other
value is passed to ``from_pretrained(attn_implementation=...)``, after checking here that it can run:
flash_attention_2/3 need their package and a CUDA GPU; flex_attention has no backward on the CPU in
torch (training there is refused; generation and evaluation, forward only, run). A refusal names the
kernel, why, and the kernels this machine has.
"""

from __future__ import annotations

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS


def available_kernels(device_type: str) -> list[str]:
    """The attention implementations that can run here (forward at least), in ATTN_IMPLEMENTATIONS order."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available

    usable = {"eager": True, "sdpa": True, "flex_attention": is_torch_flex_attn_available(),
              "flash_attention_2": device_type == "cuda" and is_flash_attn_2_available(),
              "flash_attention_3": device_type == "cuda" and is_flash_attn_3_available()}
    return [name for name in ATTN_IMPLEMENTATIONS if usable.get(name)]


def check_attn_implementation(name: str, device_type: str, training: bool) -> str | None:
    """What to pass as ``attn_implementation`` (None for auto); ConfigError when ``name`` cannot run here."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation ({name!r}) must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "auto":
        return None
    usable = available_kernels(device_type)
    if name not in usable:
        why = ("needs its package (flash-attn) and a CUDA GPU" if name.startswith("flash_attention")
               else "needs torch's flex attention")
        raise ConfigError(f"attn_implementation ({name}) {why}; this machine ({device_type}) has: "
                          f"{', '.join(usable)}")
    if name == "flex_attention" and training and device_type != "cuda":
        raise ConfigError(f"attn_implementation (flex_attention) has no backward on {device_type} in torch: "
                          f"training needs one of {', '.join(k for k in usable if k != 'flex_attention')}")
    return name
