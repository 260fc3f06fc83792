"""Command line and YAML recipe -> TrainConfig. Flags override the recipe; both are validated
by the dataclasses before any work starts.

Every TrainConfig field is a flag (``--lr``), and so is every AdapterConfig field
(``--method``, ``--num_experts`` ...). A recipe is YAML with the same names, adapter fields
either at the top level or under ``adapter:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import yaml

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig

LAUNCHER_FLAGS = ("--local_rank", "--local-rank")  # added by the deepspeed launcher / old torchrun


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"{key!r} is given twice (lines {first.line + 1} and {again.line + 1})")
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base constructor names it
                    continue
                if first is not key_node.start_mark:
                    raise DuplicateKey(key, first, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def metavar(hint) -> str | None:
    """INT, FLOAT, FLOAT|none ... for --help (text fields keep argparse's default)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and type(None) in typing.get_args(hint):
        inner = metavar(args[0])
        return f"{inner}|none" if inner else None
    return {int: "INT", float: "FLOAT"}.get(hint)


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as --help shows it (flags default to 'unset' so that recipes can fill them)."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None or value == "" else str(value)


def _add_fields(parser: argparse.ArgumentParser, cls, skip: set[str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names.append(f.name)
        hint = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {shown_default(f)})".replace("%", "%%")
        kw: dict = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        # Values stay text here: the dataclasses convert them (fields.coerce_types), the same path
        # as YAML recipes and adapter_config.json take, with the same error messages.
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif "aliases" in f.metadata:
            kw["metavar"] = f"{{{hint.__name__},{','.join(f.metadata['aliases'])}}}"
        elif hint is list or typing.get_origin(hint) is list:
            kw["metavar"] = "A,B,..."
        elif "choices" not in f.metadata and metavar(hint):
            kw["metavar"] = metavar(hint)
        parser.add_argument(f"--{f.name}", **kw)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    parser = argparse.ArgumentParser(
        description="Fine-tune a Hugging Face model with AdaMoLE / LoRA-MoE adapters under DeepSpeed.",
    )
    parser.add_argument("--config", type=Path, help="YAML recipe; flags override its values")
    for flag in LAUNCHER_FLAGS:
        parser.add_argument(flag, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS, dest="local_rank")
    parser.add_argument("--deepspeed_config", dest="ds_config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    train_group = parser.add_argument_group("training")
    train_names = _add_fields(train_group, TrainConfig, skip={"adapter"})
    adapter_group = parser.add_argument_group("adapter")
    adapter_names = _add_fields(adapter_group, AdapterConfig, skip=set())
    return parser, train_names, adapter_names


def load_recipe(path: Path, train_names: list[str], adapter_names: list[str]) -> tuple[dict, dict]:
    if not path.is_file():
        raise ConfigError(f"config ({path}) is not a file")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except DuplicateKey as e:
        raise ConfigError(f"config ({path}): {e}; keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config ({path}):{where}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config ({path}) cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config ({path}) must be a YAML mapping of option names to values")
    adapter = data.pop("adapter", None) or {}
    if not isinstance(adapter, dict):
        raise ConfigError(f"config ({path}): adapter must be a mapping of adapter options (method: adamole, ...), "
                          f"not a {type(adapter).__name__}")
    train_kw, adapter_kw = {}, dict(adapter)
    for key, value in data.items():
        if key in train_names:
            train_kw[key] = value
        elif key in adapter_names:
            if key in adapter:
                raise ConfigError(f"config ({path}): {key!r} is given twice (at the top level and under "
                                  "adapter:); keep one")
            adapter_kw[key] = value
        else:
            raise ConfigError(f"config ({path}): unknown option {key!r}")
    unknown = sorted(set(adapter_kw) - set(adapter_names))
    if unknown:
        raise ConfigError(f"config ({path}): unknown adapter option(s) {', '.join(unknown)}")
    return train_kw, adapter_kw


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and the recipe they name) into a validated TrainConfig; raises ConfigError."""
    parser, train_names, adapter_names = build_parser()
    ns = vars(parser.parse_args(argv))
    ns.pop("local_rank", None)
    recipe = ns.pop("config", None)
    train_kw, adapter_kw = load_recipe(recipe, train_names, adapter_names) if recipe else ({}, {})
    for key, value in ns.items():
        (adapter_kw if key in adapter_names else train_kw)[key] = value
    try:
        adapter = AdapterConfig(**adapter_kw)
    except TypeError as e:  # a recipe value of the wrong shape
        raise ConfigError(f"adapter options: {e}") from None
    try:
        return TrainConfig(**train_kw, adapter=adapter)
    except TypeError as e:
        raise ConfigError(f"training options: {e}") from None
