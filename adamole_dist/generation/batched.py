"""Batched generation through the KV cache: prompts left-padded (padding is masked, so it is never
attended to, and the adapters' forward hook keeps it out of routing), a reply cut at its first stop
token (stops.py), and with ``show_routing`` the experts fired per generated token (routing_view.py).

``greedy_replies`` is the trainer's evaluation (its samples, and answer accuracy): greedy, every rank in step (under
ZeRO-3 a forward gathers parameters collectively, so ranks that finished keep stepping until all have:
transformers' ``synced_gpus``)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from adamole_dist.data.sft_task import SFTTask
from adamole_dist.generation.routing_view import experts_fired, token_routing
from adamole_dist.generation.sampling import PerPromptSampler, prompt_seed
from adamole_dist.generation.stops import cut_at_stop, stop_ids


def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of prompts of different lengths, padded on the left: every row's next
    token comes from its last position."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def sampling_options(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """``generate_batch`` options: greedy at temperature 0 (the model's own sampling defaults off), else
    "sample": sampling at ``temperature`` with nucleus ``top_p``, one random stream per prompt (sampling.py)."""
    greedy = {"max_new_tokens": max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
              "top_k": None}
    return {**greedy, "sample": {"temperature": temperature, "top_p": top_p}} if temperature > 0 else greedy


def generate_batch(model, tokenizer, rows: list[list[int]], options: dict, *, adapters=None,
                   show_routing: bool = False, streamer=None, seeds: list[int] | None = None) -> list[dict]:
    """Generate for a batch of prompt ids (left-padded); per row {"ids", "text"} (without the stop token),
    "stop" (the stop token that ended it, None at the token limit) and, with show_routing, "routing": per
    generated token {"token", "mean_active", "per_layer"}.
    ``seeds``: when ``options`` sample, each row's generator seed (sampling.prompt_seed; default 0, 1, ...)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_padded(rows, pad, next(model.parameters()).device)
    stops = stop_ids(model, tokenizer)
    options = dict(options)
    sample = options.pop("sample", None)
    if sample is not None:
        options["logits_processor"] = LogitsProcessorList([PerPromptSampler(
            seeds if seeds is not None else list(range(len(rows))), sample["temperature"], sample["top_p"])])
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad, streamer=streamer,
                  **({"eos_token_id": stops} if stops else {}), **options)
    with torch.no_grad():
        if show_routing:
            with adapters.context.recording_active_experts() as active_log:
                sequences = model.generate(**kwargs)
            fired = experts_fired(active_log, list(adapters.layers))
        else:
            sequences = model.generate(**kwargs)
    out = []
    for b, row in enumerate(sequences[:, input_ids.shape[1]:].cpu().tolist()):
        kept = cut_at_stop(row, stops, keep_stop=False)
        item = {"ids": kept, "text": tokenizer.decode(kept, skip_special_tokens=True),
                "stop": tokenizer.convert_ids_to_tokens(row[len(kept)]) if len(kept) < len(row) else None}
        if show_routing:
            item["routing"] = token_routing(tokenizer, kept, fired[b, :len(kept)])
        out.append(item)
    return out


def completions(model, tokenizer, rows: list[list[int]], options: dict, *, batch_size: int, adapters=None,
                show_routing: bool = False, seed: int = 0, streamer=None):
    """``generate_batch``'s result for every row, in order, ``batch_size`` rows at a time. A sampled row
    draws from its own generator, seeded from ``seed`` and the row's index: the same completion at any
    batch size (sampling.py). ``streamer``: a function of no arguments making one per batch, or None."""
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        yield from generate_batch(model, tokenizer, batch, options, adapters=adapters, show_routing=show_routing,
                                  streamer=streamer() if streamer else None,
                                  seeds=[prompt_seed(seed, start + i) for i in range(len(batch))])


@torch.no_grad()
def greedy_replies(model, task: SFTTask, prompts: list[list[int]], max_new_tokens: int,
                   synced: bool) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (left-padded, KV cache, the task's autocast), without the
    prompts, each cut after its first stop token (kept). ``model`` may be a DeepSpeed engine (its module
    generates); ``synced``: every rank runs it (see the module docstring)."""
    net = getattr(model, "module", model)
    device = task.device_for(net)
    input_ids, attention_mask = left_padded([p[-task.max_length:] for p in prompts], task.pad_id, device)
    stops = stop_ids(net, task.tokenizer)
    with torch.autocast(device.type, dtype=task.autocast_dtype or torch.float32,
                        enabled=task.autocast_dtype is not None):
        out = net.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                           pad_token_id=task.pad_id, synced_gpus=synced, **({"eos_token_id": stops} if stops else {}))
    return [cut_at_stop(row, stops, keep_stop=True) for row in out[:, input_ids.shape[1]:].tolist()]


def greedy_completion(model, task: SFTTask, prompt_ids: list[int], max_new_tokens: int, synced: bool) -> list[int]:
    """``greedy_replies`` of one prompt: the trainer's evaluation sample."""
    return greedy_replies(model, task, [prompt_ids], max_new_tokens, synced)[0]
