"""docs/reference.md: every option of every command, generated from the commands' own parsers (the
training options from the typed config fields, config/cli.py), so the page cannot drift from the code.

    python -m adamole_dist.cli.reference --write     # make reference
    python -m adamole_dist.cli.reference             # print it

tests/unit/cli/test_reference.py fails when the committed page differs from what this writes.
"""

from __future__ import annotations

import argparse
import html
import importlib
import re
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
# (console script, launch/ script, module whose build_parser() makes its parser)
COMMANDS = (("adamole-train", "launch/train.py", "adamole_dist.config.cli"),
            ("adamole-generate", "launch/generate.py", "adamole_dist.cli.generate"),
            ("adamole-eval", "launch/eval.py", "adamole_dist.cli.eval"),
            ("adamole-export", "launch/export.py", "adamole_dist.cli.export"),
            ("adamole-serve", "launch/serve.py", "adamole_dist.cli.serve"),
            ("adamole-plot", "launch/plot.py", "adamole_dist.cli.plot"),
            ("adamole-plan", "launch/plan.py", "adamole_dist.cli.plan"))
HEADER = """# Reference: every option of every command

Generated from the commands' parsers by `make reference` (`python -m adamole_dist.cli.reference --write`);
a test fails when this page is stale. Training options are also YAML keys of a `--config` recipe
([Getting started](getting-started.md)); `--help` on any command prints the same text.
"""
DEFAULT_IN_HELP = re.compile(r"\s*\(default: (?P<value>[^()]*(\([^()]*\)[^()]*)*)\)$")


def parser_of(module: str) -> argparse.ArgumentParser:
    built = importlib.import_module(module).build_parser()
    return built[0] if isinstance(built, tuple) else built  # config/cli.py also returns the field names


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (no pipe ends the cell, no angle bracket opens a tag)."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def values_of(action: argparse.Action) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "flag (`--no-` form turns it off)"
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return " \\| ".join(f"`{c}`" for c in action.choices)
    if action.metavar is not None:
        return cell(action.metavar)
    return cell(getattr(action.type, "__name__", "text")) if action.type is not None else "text"


def default_and_help(action: argparse.Action) -> tuple[str, str]:
    """The default (from the help's '(default: ...)' where the parser leaves it unset for recipes) and the help."""
    help_text = (action.help or "").replace("%%", "%")
    found = DEFAULT_IN_HELP.search(help_text)
    if found:
        value = found["value"]  # a value in code type; words ("the training run's") as they are
        return (value if " " in value else f"`{value}`"), help_text[:found.start()]
    if action.required:
        return "required", help_text
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return "", help_text
    return f"`{action.default}`", help_text


def command_section(name: str, script: str, parser: argparse.ArgumentParser) -> list[str]:
    summary = (parser.description or "").strip().split("\n\n")[0]  # its first paragraph
    lines = [f"## {name}", "", f"{cell(summary)} Also `python {script}`.", "",
             "| option | values | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}` (positional)"
        default, help_text = default_and_help(action)
        lines.append(f"| {flag} | {values_of(action)} | {cell(default)} | {cell(help_text)} |")
    return [*lines, ""]


def reference_markdown() -> str:
    lines = [HEADER]
    for name, script, module in COMMANDS:
        lines += command_section(name, script, parser_of(module))
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {PAGE} instead of printing it")
    args = ap.parse_args(argv)
    text = reference_markdown()
    if args.write:
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
