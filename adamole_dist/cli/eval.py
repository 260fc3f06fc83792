"""Evaluate a saved adapter, or a base model zero-shot: multiple-choice accuracy (and acc_norm
with --lm_framing question_answer) and per-layer routing statistics.

    python launch/eval.py --adapter runs/default/adapter [--dataset DIR] [--split test] [--json out.json]
    python launch/eval.py --model smollm2-135m --dataset ../shared/data/ARC-Easy --lm_framing question_answer
    python launch/eval.py --adapter runs/x/adapter --harness arc_easy_local --harness_data ../shared/data
The base model is the adapter's (its recorded folder while it exists, else the name training was given;
the kernel training recorded) unless --model names another; without --adapter, zero-shot. One process.

--harness TASKS (comma-separated) also runs lm-evaluation-harness (pip install -e '.[harness]') on the
same model through lm_eval's HFLM, zero-shot; its results go beside --json (NAME.harness.json, per
question NAME.harness_samples.jsonl), else are printed only. The local tasks arc_easy_local,
openbookqa_local and boolq_local read --harness_data DIR (adamole_dist/evaluation/harness.py); any other
name must be lm-eval's own. With --harness, an adapter trained on free-form data is scored by the harness
alone unless --dataset names multiple-choice data. --max_examples: the same seeded subsample for both
(the harness routes its padding: under an expert capacity limit, scores can differ). Bad input: one
line, exit 2, before the model loads; Ctrl-C or SIGTERM: one line, exit 130.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from adamole_dist.adapters.files import load_adapter, read_adapter_config
from adamole_dist.adapters.pretrained import attention_kernel, base_to_load, recorded_quantization
from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.cli.console import configure_logging, interruptible
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS, AUTOCASTS, LM_FRAMINGS, SFT_DATA_FORMATS, TrainConfig
from adamole_dist.data import DataError, load_examples
from adamole_dist.evaluation.choice_accuracy import accuracy_record, choice_accuracy
from adamole_dist.evaluation.harness import HarnessPlan, run_harness
from adamole_dist.moe.routing_stats import print_routing_table
from adamole_dist.run_files.output_dir import recorded_run
from adamole_dist.run_files.writable import check_output_file
from adamole_dist.runtime.stopping import EXIT_BAD_INPUT
from adamole_dist.train.builders import build_task_for


def check_options(args) -> None:
    for name, least in (("batch_size", 1), ("max_examples", 0), ("max_length", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise ConfigError(f"--{name} ({value}) must be >= {least}" + (" (0 = all)" if least == 0 else ""))
    if args.adapter is None and not args.model:
        raise ConfigError("--model is required without --adapter (zero-shot evaluation of a base model)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, help="adapter directory written by training (none: zero-shot)")
    ap.add_argument("--model", help="base model (default: the one recorded in the adapter config)")
    ap.add_argument("--lm_framing", choices=LM_FRAMINGS, default=None,
                    help="causal_lm framing (default: the training run's, else instruction)")
    ap.add_argument("--autocast", choices=AUTOCASTS, default=None,
                    help="forward passes under torch.autocast (default: the training run's, else none)")
    ap.add_argument("--dataset", default=None, help="dataset (default: the training run's dataset)")
    ap.add_argument("--split", default=None, help="split to evaluate (default: the run's eval split)")
    ap.add_argument("--data_format", default=None, choices=("auto", "instruction", "mc"))
    ap.add_argument("--max_examples", type=int, default=0, help="subsample to this many examples (0 = all)")
    ap.add_argument("--max_length", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                    help="attention kernel (default: as the adapter was trained, else auto)")
    ap.add_argument("--json", type=Path, help="write accuracy and routing statistics here")
    ap.add_argument("--harness", metavar="TASKS", help="also run lm-evaluation-harness on these tasks (see above)")
    ap.add_argument("--harness_data", type=Path, default=Path("../shared/data"),
                    help="folder holding ARC-Easy/, openbookqa/, boolq/ for the local harness tasks")
    return ap


def own_dataset(recorded: TrainConfig | None, doc: dict, harness: bool) -> str | None:
    """The training run's dataset, unless --harness runs and it is free-form (no choices to score)."""
    if recorded is not None and harness and doc.get("data_format") in SFT_DATA_FORMATS:
        print(f"note: the run's dataset ({recorded.dataset}) is free-form ({doc['data_format']}): the harness "
              "alone scores this adapter (--dataset names multiple-choice data to score as well)")
        return None
    return recorded.dataset if recorded is not None else None


def prepare(args):
    """Every check, then the model: (model, tokenizer, adapters, task, examples, dataset, split, framing,
    the training run's options, the harness plan or None). ConfigError / DataError on bad input."""
    check_options(args)
    doc, recorded = (read_adapter_config(args.adapter), recorded_run(args.adapter)) if args.adapter else ({}, None)
    run = recorded or TrainConfig()  # the training run's options, else a run's defaults
    dataset = args.dataset or own_dataset(recorded, doc, bool(args.harness))
    if not dataset and not args.harness:
        raise ConfigError("--dataset is required: " + ("the adapter does not record its training dataset"
                                                       if args.adapter else "no adapter names one"))
    harness = HarnessPlan(args.harness, args.harness_data, args.json) if args.harness else None
    inputs = [(o, Path(p)) for o, p in (("--dataset", dataset), ("--adapter", args.adapter)) if p and Path(p).exists()]
    for path, option in ([(args.json, "--json")] if args.json else []) + (harness.outputs if harness else []):
        check_output_file(path, option, inputs)  # writable, not an input (the dataset, the adapter), not in a run
    split = args.split or run.eval_split
    examples = load_examples(dataset, split, args.data_format or run.data_format,
                             limit=args.max_examples or None, seed=run.seed) if dataset else []
    base = base_to_load(doc, args.adapter, args.model)
    kernel = attention_kernel(args.attn_implementation or doc.get("attn_implementation") or "auto", "cpu")
    model, tokenizer, task_type, _ = load_model_and_tokenizer(base, doc.get("task_type", "auto"),
                                                              pooling=doc.get("pooling", "cls"),
                                                              attn_implementation=kernel, **recorded_quantization(doc))
    adapters = load_adapter(model, args.adapter) if args.adapter is not None else None
    framing = args.lm_framing or run.lm_framing
    if framing != "instruction" and task_type != "causal_lm":
        raise ConfigError(f"lm_framing ({framing!r}) applies to causal_lm models; this one is {task_type}")
    settings = dataclasses.replace(run, max_length=args.max_length or run.max_length, lm_framing=framing,
                                   autocast=args.autocast or run.autocast)
    task = build_task_for(settings, task_type, tokenizer, torch.device("cpu"))
    if harness is not None and task_type != "causal_lm":
        raise ConfigError(f"--harness scores causal LMs (HFLM); this model is {task_type}")
    return model, tokenizer, adapters, task, examples, dataset, split, framing, run, harness


def report_accuracy(model, task, adapters, examples, dataset, split, framing, args) -> None:
    result, routing = choice_accuracy(model, task, adapters, examples, args.batch_size)
    print(f"{dataset} [{split}]: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
          + (f" acc_norm {result['acc_norm']:.4f}" if "acc_norm" in result else "")
          + ("" if adapters else " (zero-shot, no adapter)")
          + (f" mean active experts {routing['overall']['mean_active_experts']:.2f}" if routing["layers"] else ""))
    print_routing_table(routing["layers"])
    if args.json:
        write_text_atomically(args.json, json.dumps(accuracy_record(
            result, routing, dataset=dataset, split=split, framing=framing, autocast=task.autocast,
            zero_shot=adapters is None), indent=1))


def report_harness(harness: HarnessPlan, model, tokenizer, adapters, autocast, seed: int, args) -> None:
    """lm-evaluation-harness on the loaded model, its scores printed (and written beside --json)."""
    scores = run_harness(harness, model, tokenizer, adapters, batch_size=args.batch_size, autocast=autocast,
                         limit=args.max_examples, seed=seed)
    for name, metrics in scores.items():
        print(f"harness {name}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    if harness.results_path is not None:
        print(f"harness results: {harness.results_path} (per question: {harness.samples_path})")


@interruptible
def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer, adapters, task, examples, dataset, split, framing, run, harness = prepare(args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if dataset:
        report_accuracy(model, task, adapters, examples, dataset, split, framing, args)
    if harness is not None:
        report_harness(harness, model, tokenizer, adapters, task.autocast, run.seed, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
