"""Evaluate a saved adapter, or a base model zero-shot: multiple-choice accuracy (and acc_norm
with --lm_framing question_answer) and per-layer routing statistics.

    python launch/eval.py --adapter runs/default/adapter [--dataset DIR] [--split test] [--json out.json]
    python launch/eval.py --model smollm2-135m --dataset ../shared/data/ARC-Easy --lm_framing question_answer
    python launch/eval.py --adapter runs/x/adapter --harness arc_easy_local --harness_data ../shared/data
The base model is the one recorded in the adapter's config unless --model names another (with the
attention kernel training recorded); without --adapter it is evaluated as it is (zero-shot). One
process, no DeepSpeed: the adapter is small and the base loads whole.

--harness TASKS (comma-separated) also runs lm-evaluation-harness (pip install -e '.[harness]') on the
same adapted model through lm_eval's HFLM, zero-shot; results go beside --json (NAME.harness.json,
per question NAME.harness_samples.jsonl). The local tasks arc_easy_local, openbookqa_local and
boolq_local read --harness_data DIR (default ../shared/data; adamole_dist/evaluation/harness.py); any
other name is lm-eval's own task. --max_examples picks the same seeded subsample for both scorers.
The harness passes no attention mask: its right padding passes through the routers, so under an expert
capacity limit (sira, capacity_factor > 0) it competes for capacity and harness scores can differ.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from adamole_dist.adapters.files import load_adapter, read_adapter_config
from adamole_dist.adapters.pretrained import attention_kernel, recorded_quantization
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.cli.console import configure_logging
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import ATTN_IMPLEMENTATIONS, AUTOCASTS, LM_FRAMINGS, TrainConfig
from adamole_dist.data import DataError, load_examples
from adamole_dist.evaluation.choice_accuracy import accuracy_record, choice_accuracy
from adamole_dist.evaluation.harness import HarnessPlan, run_harness
from adamole_dist.moe.routing_stats import print_routing_table
from adamole_dist.run_files.output_dir import recorded_run
from adamole_dist.run_files.writable import check_writable_file
from adamole_dist.runtime.stopping import EXIT_BAD_INPUT
from adamole_dist.train.builders import build_task_for


def check_options(args) -> None:
    """The numbers, and that --json can be written: ConfigError now, not after the evaluation ran."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size ({args.batch_size}) must be >= 1")
    if args.max_examples < 0:
        raise ConfigError(f"--max_examples ({args.max_examples}) must be >= 0 (0 = all)")
    if args.max_length is not None and args.max_length < 1:
        raise ConfigError(f"--max_length ({args.max_length}) must be >= 1")
    if args.json is not None:
        check_writable_file(args.json, "--json")


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


def prepare(args):
    """Every check, then the model: (model, tokenizer, adapters, task, examples, dataset, split, framing,
    the training run's options, the harness plan or None). ConfigError / DataError on bad input."""
    check_options(args)
    harness = HarnessPlan(args.harness, args.harness_data, args.json) if args.harness else None
    doc, recorded = {"task_type": "auto"}, None
    if args.adapter is not None:
        doc = read_adapter_config(args.adapter)
        recorded = recorded_run(args.adapter)
    elif not args.model:
        raise ConfigError("--model is required without --adapter (zero-shot evaluation of a base model)")
    run = recorded or TrainConfig()  # the training run's options, else a run's defaults
    dataset = args.dataset or (recorded.dataset if recorded else None)
    if not dataset and harness is None:
        raise ConfigError("--dataset is required: " + ("the adapter does not record its training dataset"
                                                       if args.adapter else "no adapter names one"))
    split = args.split or run.eval_split
    examples = load_examples(dataset, split, args.data_format or run.data_format,
                             limit=args.max_examples or None, seed=run.seed) if dataset else []
    base = args.model or doc.get("base_model")
    if not base:
        raise ConfigError(f"{args.adapter} records no base_model; name it with --model")
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
        args.json.write_text(json.dumps(accuracy_record(result, routing, dataset=dataset, split=split,
                                                        framing=framing, autocast=task.autocast,
                                                        zero_shot=adapters is None), indent=1))


def report_harness(harness: HarnessPlan, model, tokenizer, adapters, autocast, seed: int, args) -> None:
    """lm-evaluation-harness on the loaded model, its scores printed and written (``harness``'s paths)."""
    if adapters is not None and adapters.cfg.effective_capacity_factor > 0:
        print("note: this adapter caps expert capacity; the harness routes its padding, which competes "
              "for capacity (see --help)")
    scores = run_harness(harness, model, tokenizer, batch_size=args.batch_size, autocast=autocast,
                         limit=args.max_examples, seed=seed)
    if adapters is not None:
        adapters.context.pop_stats()  # counts the harness's padding: not reported
    for name, metrics in scores.items():
        print(f"harness {name}: " + " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    print(f"harness results: {harness.results_path} (per question: {harness.samples_path})")


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
