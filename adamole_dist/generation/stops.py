"""The tokens that end a reply: the tokenizer's eos (what training appended to every target,
data/sft_render.py's ``eos_of``) and every eos id of the model's generation config (a chat model's may
list its end-of-turn token beside the end-of-text one). The one stop rule of every generation path."""

from __future__ import annotations

from adamole_dist.data.sft_render import eos_of


def stop_ids(model, tokenizer) -> list[int]:
    """Sorted, without repeats; empty when neither the tokenizer nor the model names an eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    return sorted(set(eos_of(tokenizer)) | {int(t) for t in configured})


def cut_at_stop(ids: list[int], stops: list[int], keep_stop: bool) -> list[int]:
    """``ids`` up to the first stop token (with it when ``keep_stop``): what follows it is padding of a
    batch's finished rows, or of ranks kept in step."""
    first = next((i for i, t in enumerate(ids) if t in stops), None)
    if first is None:
        return ids
    return ids[: first + 1] if keep_stop else ids[:first]
