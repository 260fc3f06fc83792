"""The built-in generated datasets ``builtin:<name>`` names: made on the spot, no download."""

from __future__ import annotations

from collections.abc import Callable


def builtin_datasets() -> dict[str, Callable[[str], list[dict]]]:
    """name -> generator of one split's records (imported lazily: ``python -m`` runs each module cleanly)."""
    from adamole_dist.data.synthetic import generate_word_categories
    from adamole_dist.data.word_chat import generate_word_categories_chat

    return {"word_categories": generate_word_categories,  # multiple choice (MiniLM's recipe)
            "word_categories_chat": generate_word_categories_chat}  # chat, answered by generation (the default)
