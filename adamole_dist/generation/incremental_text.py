"""A reply's text as its tokens arrive one at a time, for streaming: each new token hands out only the text
that can no longer change, and stop strings end the reply before them.

The whole reply is decoded again at every token (a tokenizer joins pieces differently at word starts and
builds one character out of several byte tokens), and the text handed out is what is new. Held back: a
trailing incomplete character (decoded as U+FFFD until its last byte arrives) and a tail that could be the
start of a stop string (handed out once the next tokens show it is not)."""

from __future__ import annotations

INCOMPLETE = "\ufffd"


def _held_tail(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of some stop string (not all of it)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class IncrementalText:
    """Text of the tokens ``push`` ed so far. ``stopped`` once a stop string appeared: the text ends before
    it and later tokens are not to be pushed."""

    def __init__(self, tokenizer, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops or [] if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that is now safe to hand out (often "")."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self.flush()
        self.text = text
        safe = len(text.rstrip(INCOMPLETE)) if text.endswith(INCOMPLETE) else len(text)
        safe -= _held_tail(text[:safe], self.stops)
        return self._hand_out(safe)

    def flush(self) -> str:
        """Everything not yet handed out (the reply ended)."""
        return self._hand_out(len(self.text))

    def _hand_out(self, upto: int) -> str:
        delta = self.text[self.sent: upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta
