"""The tokens that end a reply: the tokenizer's eos (what training appended to every target,
data/sft_render.py's ``eos_of``), every eos id of the model's generation config (a chat model's may
list its end-of-turn token beside the end-of-text one), and the end-of-turn tokens of the chat template
(``end_of_turn_ids``): a chat-trained adapter learnt to end its turn with them (loss_on assistant trains
through the template's end-of-turn tokens), and Gemma's ``<end_of_turn>`` is neither its eos nor in
every generation config. The one stop rule of every generation path."""

from __future__ import annotations

from adamole_dist.data.sft_render import encode, eos_of, render_chat

# End-of-turn markers of the known template families (Gemma, ChatML, Llama 3 and its tool-call turn end,
# Phi-3): one counts when the template's text names it and the tokenizer holds it as one token.
END_OF_TURN_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")
PROBE_REPLY = "Done."  # an assistant reply rendered to see what the template writes right after it


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as exactly one token, else None."""
    ids = encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: its named ones (bos, eos, ...) and every added token marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def rendered_end_of_turn(tokenizer, template: str) -> int | None:
    """The special token the template writes right after an assistant reply (None when the reply ends in
    plain text, or the template refuses the probe conversation): follows templates no table knows."""
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = render_chat(tokenizer, template, messages)
    except Exception:  # a template with requirements of its own (a system turn first, ...): the table decides
        return None
    at = text.rfind(PROBE_REPLY)
    tail = encode(tokenizer, text[at + len(PROBE_REPLY):]) if at >= 0 else []
    return tail[0] if tail and tail[0] in special_ids(tokenizer) else None


def end_of_turn_ids(tokenizer, template) -> set[int]:
    """The end-of-turn token ids of chat ``template`` (Jinja text; None or several named templates: none):
    the known markers it names that are single tokens here, and the special token it writes after a reply."""
    if not isinstance(template, str) or not template:
        return set()
    found = {single_token_id(tokenizer, m) for m in END_OF_TURN_MARKERS if m in template}
    found.add(rendered_end_of_turn(tokenizer, template))
    return {t for t in found if t is not None}


def stop_ids(model, tokenizer, template: str | None = None) -> list[int]:
    """Sorted, without repeats; empty when neither the tokenizer, the model nor the template names one.
    ``template``: the chat template generation renders with (default: the tokenizer's, which
    adapters/pretrained.py sets to the one the adapter was trained with)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    turn_ends = end_of_turn_ids(tokenizer, template if template is not None else tokenizer.chat_template)
    return sorted(set(eos_of(tokenizer)) | {int(t) for t in configured} | turn_ends)


def cut_at_stop(ids: list[int], stops: list[int], keep_stop: bool) -> list[int]:
    """``ids`` up to the first stop token (with it when ``keep_stop``): what follows it is padding of a
    batch's finished rows, or of ranks kept in step."""
    first = next((i for i, t in enumerate(ids) if t in stops), None)
    if first is None:
        return ids
    return ids[: first + 1] if keep_stop else ids[:first]
