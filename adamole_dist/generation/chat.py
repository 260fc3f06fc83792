"""An interactive chat on a terminal: the history rendered through the chat template at every turn
(exactly as training rendered conversations), the reply streamed as it is generated, the routing view
after it on request. /reset clears the history, /exit (or Ctrl-D) quits; Ctrl-C stops a reply and keeps
the chat."""

from __future__ import annotations

import sys

from adamole_dist.generation.batched import generate_batch
from adamole_dist.generation.prompts import PromptRenderer
from adamole_dist.generation.routing_view import routing_lines
from adamole_dist.generation.sampling import prompt_seed


def chat_session(model, tokenizer, renderer: PromptRenderer, options: dict, adapters=None,
                 show_routing: bool = False, seed: int = 0) -> None:
    """Read a user turn, stream the reply, keep both in the history, until /exit or end of input (Ctrl-C
    at the prompt). Ctrl-C during a reply stops that reply and drops the turn: the history stays as
    it was before it, and the chat goes on. A sampled reply draws from --seed and the turn's number."""
    from transformers import TextStreamer

    history: list[dict] = []
    print("chat: an empty line does nothing; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        turn = [*history, {"role": "user", "content": line}]
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            [reply] = generate_batch(model, tokenizer, [renderer.ids({"messages": turn})], options,
                                     adapters=adapters, show_routing=show_routing, streamer=streamer,
                                     seeds=[prompt_seed(seed, len(history) // 2)])
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(reply stopped; that turn is not kept in the history)", file=sys.stderr)
            continue
        history = [*turn, {"role": "assistant", "content": reply["text"]}]
        if show_routing:
            print("\n".join(routing_lines(reply["routing"])))
