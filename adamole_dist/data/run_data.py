"""The data of a training run, read and checked before anything is written: both splits (free-form
records rendered and tokenized, so every bad record fails here), the training items the sampler
indexes (examples, or rows packed from them) and the sampler itself.

Multiple-choice data becomes ``Example`` s (formats.py). Free-form data (SFT_FORMATS) is rendered as
``RenderSpec`` says (sft_render.py): the training split through the on-disk token cache (token_cache.py;
rank 0 reads and tokenizes, every rank memory-maps), the evaluation split in memory with its records
kept for the sample prompts. What this needs of the other ranks comes in as ``ranks`` (data/ranks.py),
and the model (its resolved path and task type, which render_spec checks free-form data against) as
``model_of``, called only when free-form data needs it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from adamole_dist.config.chat_templates import builtin_template
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.data import token_cache
from adamole_dist.data.answer_match import SHORT_ANSWER_TOKENS
from adamole_dist.data.batching import pack_examples
from adamole_dist.data.conversations import normalise_records
from adamole_dist.data.examples import Example
from adamole_dist.data.formats import SFT_FORMATS, load_examples, load_records, resolve_format, subsample, to_examples
from adamole_dist.data.ranks import INPUT_ERRORS, Ranks
from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.data.sft_render import (
    RenderSpec,
    TokenizedSplit,
    all_dropped,
    chat_template_of,
    check_spec,
    check_template_syntax,
    question_text,
    sample_prompt,
    tokenize_split,
    tokenize_within_length,
    tokenizer_for,
)
from adamole_dist.data.sft_task import PackedRows

# () -> (the model's resolved path, its task type): base_model/'s resolution, passed in by the caller.
ModelOf = Callable[[], tuple[str, str]]


class AnswerPrompt(NamedTuple):
    """A held-out example answered by generation: the prompt's ids, the reference reply, the question asked."""

    ids: list[int]
    reference: str
    question: str


@dataclass
class SFTData:
    """Free-form data of a run: how it was rendered, the tokenized splits, the sample prompts."""

    spec: RenderSpec
    train: TokenizedSplit
    eval: TokenizedSplit
    sample_prompts: list[tuple[list[int], str]]  # (prompt ids, reference reply) of the first eval examples
    # answer_accuracy: every eval example's prompt, scored by generation; empty: off
    answer_prompts: list[AnswerPrompt] = dataclasses.field(default_factory=list)
    packed_rows: int = 0  # rows the training examples were packed into (0: not packed)

    def summary(self) -> dict:
        return {"data_format": self.spec.data_format, "prompt_format": self.spec.prompt_format,
                "loss_on": self.spec.loss_on, "train_examples": len(self.train.examples),
                "train_dropped_too_long": self.train.dropped, "eval_examples": len(self.eval.examples),
                "eval_dropped_too_long": self.eval.dropped, "max_length": self.spec.max_length,
                **({"packed_rows": self.packed_rows} if self.packed_rows else {})}


@dataclass
class RunData:
    """The examples of a run, validated, and the sampler over the training ones."""

    train_examples: list[Example] | PackedRows | list[dict]  # SFT: tokenized examples (or packed rows of them)
    eval_examples: list[Example] | list[dict]
    batches: ShardedBatches
    data_format: str  # the detected (or forced) record format
    sft: SFTData | None  # free-form data; None for multiple choice
    train_origin: str = ""  # the training split's file (or source name): what --resume's content check hashes


def load_run_data(cfg: TrainConfig, ranks: Ranks, model_of: ModelOf) -> RunData:
    """Both splits read and checked (free-form data rendered and tokenized), the sampler built.
    Collective: every rank calls it."""
    train_records, train_origin, data_format = read_train_split(cfg, ranks)
    sft = None
    if data_format in SFT_FORMATS:
        sft = load_sft_data(cfg, data_format, train_records, train_origin, ranks, model_of)
        train_examples, eval_examples = sft_training_items(cfg, sft), sft.eval.examples
    else:
        check_multiple_choice_options(cfg, data_format)
        train_examples = subsample(to_examples(train_records, data_format, train_origin),
                                   cfg.max_train_examples or None, cfg.seed)
        eval_examples = load_examples(cfg.dataset, cfg.eval_split, cfg.data_format,
                                      limit=cfg.max_eval_examples or None, seed=cfg.seed)
    del train_records
    if not eval_examples:
        raise ConfigError(f"dataset ({cfg.dataset}): the evaluation split {cfg.eval_split!r} has no examples")
    try:
        grouped = sft is not None and cfg.group_by_length and not cfg.packing
        batches = ShardedBatches(len(train_examples), cfg.micro_batch_size, rank=ranks.rank,
                                 world_size=ranks.world_size, seed=cfg.seed,
                                 lengths=sft.train.lengths if grouped else None,
                                 accumulation=cfg.gradient_accumulation_steps)
    except ValueError as e:
        raise ConfigError(f"dataset ({cfg.dataset}) split {cfg.train_split!r}: {e}; lower micro_batch_size or "
                          "use more data (max_train_examples)") from None
    return RunData(train_examples, eval_examples, batches, data_format, sft, train_origin)


def read_train_split(cfg: TrainConfig, ranks: Ranks) -> tuple[list | None, str, str]:
    """(records, origin, data_format) of the training split. Free-form data through the token cache
    is read by rank 0 alone (it tokenizes; the other ranks memory-map the cache: records None there);
    multiple-choice data, or --no-token_cache, is read by every rank. A bad file stops every rank."""
    if ranks.world_size == 1 or not cfg.token_cache:
        records, origin = load_records(cfg.dataset, cfg.train_split)
        return records, origin, resolve_format(records, cfg.data_format, origin)
    read: dict = {}

    def read_on_rank0() -> tuple[str, str]:
        read["records"], origin = load_records(cfg.dataset, cfg.train_split)
        return origin, resolve_format(read["records"], cfg.data_format, origin)

    origin, data_format = ranks.rank0_decides(read_on_rank0, expected=INPUT_ERRORS)
    records = read.get("records")
    if data_format not in SFT_FORMATS and not ranks.is_main:
        records, _ = load_records(cfg.dataset, cfg.train_split)
    return records, origin, data_format


def check_multiple_choice_options(cfg: TrainConfig, data_format: str) -> None:
    if cfg.loss_on not in ("auto", "answer", "full"):
        raise ConfigError(f"loss_on ({cfg.loss_on!r}) applies to free-form data; dataset ({cfg.dataset}) is "
                          f"multiple choice ({data_format}): use answer or full")


# -- free-form (SFT) data ---------------------------------------------------------------------------------
def sft_loss_on(cfg: TrainConfig, data_format: str) -> str:
    """config's loss_on resolved for free-form data (ConfigError when it does not fit the format)."""
    if cfg.loss_on in ("answer", "full"):
        raise ConfigError(f"loss_on ({cfg.loss_on!r}) applies to multiple-choice data; dataset ({cfg.dataset}) is "
                          f"free-form ({data_format}): use assistant (the responses) or all (every token)")
    if data_format == "text":
        if cfg.loss_on == "assistant":
            raise ConfigError(f"loss_on ('assistant'): dataset ({cfg.dataset}) is text (continued pre-training), "
                              "which has no responses; the loss is on every token (loss_on all or auto)")
        return "all"
    return "assistant" if cfg.loss_on == "auto" else cfg.loss_on


def render_spec(cfg: TrainConfig, data_format: str, model_of: ModelOf) -> RenderSpec:
    """How the run's free-form records become tokens; ConfigError for options that do not fit them."""
    if cfg.lm_framing != "instruction":
        raise ConfigError(f"lm_framing ({cfg.lm_framing!r}) applies to multiple-choice data; dataset "
                          f"({cfg.dataset}) is free-form ({data_format})")
    model_path, task_type = model_of()
    if task_type != "causal_lm":
        raise ConfigError(f"dataset ({cfg.dataset}) is free-form ({data_format}): it trains decoder models "
                          f"(task_type causal_lm); {cfg.model} is {task_type}")
    template = builtin_template(cfg.chat_template) if cfg.chat_template else None
    if cfg.chat_template and template is None:
        try:
            template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"chat_template ({cfg.chat_template}) cannot be read: {e}") from None
        check_template_syntax(template, f"chat_template ({cfg.chat_template})")
    return RenderSpec(tokenizer=model_path, data_format=data_format, max_length=cfg.max_length,
                      loss_on=sft_loss_on(cfg, data_format), chat_template=template,
                      alpaca_as_chat=cfg.alpaca_as_chat, model_name=cfg.model)


def tokenize_training_split(records: list | None, spec: RenderSpec, origin: str, cfg: TrainConfig,
                            ranks: Ranks) -> TokenizedSplit:
    """The training split (or its seeded subsample of max_train_examples): through the on-disk token cache
    (built once by rank 0, the only rank that holds ``records``; memory-mapped by every rank), or in
    memory with --no-token_cache."""
    limit = cfg.max_train_examples
    if not cfg.token_cache:
        return tokenize_split(records, spec, origin, truncation=cfg.truncation, limit=limit or None, seed=cfg.seed,
                              keep_records=False)
    check_spec(spec)
    tokenizer = tokenizer_for(spec)
    # Only rank 0's key counts (it alone looks the cache up): it alone knows whether limit cuts the split.
    cut = bool(limit) and records is not None and limit < len(records)
    key = token_cache.cache_key(
        data_fingerprint=token_cache.data_fingerprint(origin), tokenizer=tokenizer,
        chat_template=chat_template_of(spec, tokenizer) if spec.is_chat else None, max_length=spec.max_length,
        packing=False,  # the cache holds examples; packed rows are planned from their lengths at start-up
        data_format=spec.data_format, loss_on=spec.loss_on, truncation=cfg.truncation,
        alpaca_as_chat=spec.alpaca_as_chat, **({"subsample": [int(limit), int(cfg.seed)]} if cut else {}))

    def validated_records():  # rank 0, on a cache miss: every record checked, then the seeded subsample
        normalised = normalise_records(records, spec.data_format, origin, alpaca_as_chat=spec.alpaca_as_chat)
        indices = subsample(list(range(len(normalised))), limit or None, cfg.seed)
        return [normalised[i] for i in indices], indices

    try:
        examples = token_cache.tokenized_split(
            validated_records, functools.partial(tokenize_within_length, spec=spec, truncation=cfg.truncation),
            cache_key=key, ranks=ranks, num_proc=cfg.tokenize_workers, origin=origin)
    except token_cache.NoExamples as e:  # the length policy dropped them all
        raise all_dropped(origin, e.records, spec.max_length) from None
    return TokenizedSplit(examples, [], token_cache.cache_info(examples)["dropped"], origin)


def load_sft_data(cfg: TrainConfig, data_format: str, train_records: list | None, train_origin: str, ranks: Ranks,
                  model_of: ModelOf) -> SFTData:
    """Both splits validated, rendered and tokenized (every bad record raises DataError here); the
    evaluation split in memory, its records kept for the sample prompts."""
    spec = render_spec(cfg, data_format, model_of)
    train = tokenize_training_split(train_records, spec, train_origin, cfg, ranks)
    eval_records, eval_origin = load_records(cfg.dataset, cfg.eval_split)
    evaluation = tokenize_split(eval_records, spec, eval_origin, truncation=cfg.truncation,
                                limit=cfg.max_eval_examples or None, seed=cfg.seed, keep_records=True)
    # every held-out prompt rendered only where answers may be scored; off: the samples' few
    every = [sample_prompt(rec, spec) for rec in evaluation.records[: None if cfg.answer_accuracy != "off"
                                                                      else cfg.sample_prompts]]
    scored = answers_scored(cfg.answer_accuracy, [ref for _, ref in every], tokenizer_for(spec))
    answers = [AnswerPrompt(ids, ref, question_text(rec, data_format))
               for (ids, ref), rec in zip(every, evaluation.records)] if scored else []
    return SFTData(spec, train, evaluation, every[: cfg.sample_prompts], answers)


def answers_scored(answer_accuracy: str, references: list[str], tokenizer) -> bool:
    """Is the held-out split answered by generation? on / off, or auto: every reply a short answer."""
    if answer_accuracy != "auto":
        return answer_accuracy == "on"
    return bool(references) and all(len(tokenizer.encode(ref, add_special_tokens=False)) <= SHORT_ANSWER_TOKENS
                                    for ref in references)


def sft_training_items(cfg: TrainConfig, sft: SFTData):
    """What the sampler indexes: the tokenized examples, or rows packed from them."""
    if not cfg.packing:
        return sft.train.examples
    rows = pack_examples(sft.train.lengths, cfg.max_length)
    sft.packed_rows = len(rows)
    return PackedRows(sft.train.examples, rows)
