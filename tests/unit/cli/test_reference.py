"""docs/reference.md is what the commands' parsers say now: every option of every command, with its values,
default and help; a new or changed option without `make reference` fails here."""

from __future__ import annotations

from adamole_dist.cli.reference import PAGE, reference_markdown
from adamole_dist.config.cli import build_parser


def test_the_committed_reference_page_is_current():
    assert PAGE.read_text() == reference_markdown(), "docs/reference.md is stale: run `make reference`"


def test_every_training_option_is_on_the_page_with_its_default():
    page = reference_markdown()
    _, train_names, adapter_names = build_parser()
    missing = [n for n in train_names + adapter_names if f"`--{n}`" not in page]
    assert missing == []
    assert "| `--progress` | `auto` \\| `bar` \\| `log` | `auto` |" in page
    assert "| `--port` | int | `8000` |" in page  # a plain argparse option (adamole-serve) with its default
