"""The routing view: per generated token, how many experts fired in each adapted layer to produce it
(the forward whose last position predicted the token), shown as the mean over layers and a strip of
one character per layer in model order (0-9, then a-z for 10-35)."""

from __future__ import annotations

import torch

STRIP_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def experts_fired(active_log: list[dict[str, torch.Tensor]], layer_names: list[str]) -> torch.Tensor:
    """[rows, generated tokens, layers] experts fired, from the adapters' active-expert log of one
    ``generate`` call (one {layer: [rows, positions]} per forward): forward j predicted generated token j
    from its last position (the prefill: the prompt's last)."""
    return torch.stack([torch.stack([step[n][:, -1] for n in layer_names], dim=-1) for step in active_log],
                       dim=1).cpu()


def token_routing(tokenizer, ids: list[int], fired: torch.Tensor) -> list[dict]:
    """Per generated token of one row (``fired``: its [generated tokens, layers]): {"token", "mean_active",
    "per_layer"}."""
    return [{"token": tokenizer.decode([t]), "mean_active": float(c.float().mean()), "per_layer": c.tolist()}
            for t, c in zip(ids, fired)]


def routing_lines(routing: list[dict]) -> list[str]:
    """One line per generated token: the token, the mean over layers, the strip."""
    return [f"{item['token']!r:>14}  mean {item['mean_active']:5.2f}  "
            f"{''.join(STRIP_CHARS[min(c, len(STRIP_CHARS) - 1)] for c in item['per_layer'])}"
            for item in routing]
