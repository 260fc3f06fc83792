"""Evaluate a saved adapter, or a base model zero-shot: multiple-choice accuracy (and acc_norm
with --lm_framing question_answer) and per-layer routing statistics.

    python launch/eval.py --adapter runs/default/adapter [--dataset DIR] [--split test] [--json out.json]
    python launch/eval.py --model smollm2-135m --dataset ../shared/data/ARC-Easy --lm_framing question_answer

The base model is the one recorded in the adapter's config unless --model names another; without
--adapter the base model is evaluated as it is (zero-shot). Runs in one process (no DeepSpeed
needed): the adapter is small and the base loads whole.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from adamole_dist.adapters.files import load_adapter, read_adapter_config  # noqa: E402
from adamole_dist.adapters.model_loading import load_model_and_tokenizer  # noqa: E402
from adamole_dist.config.fields import ConfigError  # noqa: E402
from adamole_dist.config.training import AUTOCASTS, LM_FRAMINGS  # noqa: E402
from adamole_dist.data import DataError, load_examples  # noqa: E402
from adamole_dist.data.evaluate import evaluate_accuracy  # noqa: E402
from adamole_dist.data.tasks import build_task  # noqa: E402
from adamole_dist.moe.routing_stats import summarize_routing  # noqa: E402
from adamole_dist.train.reporting import print_routing_table  # noqa: E402


def main(argv=None) -> int:
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
    ap.add_argument("--json", type=Path, help="write accuracy and routing statistics here")
    args = ap.parse_args(argv)
    try:
        doc, run = {"task_type": "auto"}, {}
        if args.adapter is not None:
            doc = read_adapter_config(args.adapter)
            run_config = args.adapter.parent / "run_config.json"
            if run_config.is_file():
                run = json.loads(run_config.read_text())
        elif not args.model:
            raise ConfigError("--model is required without --adapter (zero-shot evaluation of a base model)")
        dataset = args.dataset or run.get("dataset")
        if not dataset:
            raise ConfigError("--dataset is required: " + ("the adapter does not record its training dataset"
                                                           if args.adapter else "no adapter names one"))
        split = args.split or run.get("eval_split", "test")
        examples = load_examples(dataset, split, args.data_format or run.get("data_format", "auto"),
                                 limit=args.max_examples or None, seed=run.get("seed", 0))
        model, tokenizer, task_type, _ = load_model_and_tokenizer(args.model or doc["base_model"], doc["task_type"],
                                                                  pooling=doc.get("pooling", "cls"))
        adapters = load_adapter(model, args.adapter) if args.adapter is not None else None
        framing = args.lm_framing or run.get("lm_framing", "instruction")
        if framing != "instruction" and task_type != "causal_lm":
            raise ConfigError(f"lm_framing ({framing!r}) applies to causal_lm models; this one is {task_type}")
        task = build_task(task_type, tokenizer, args.max_length or run.get("max_length", 128),
                          run.get("loss_on", "answer"), torch.device("cpu"), lm_framing=framing,
                          autocast=args.autocast or run.get("autocast", "none"))
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate_accuracy(model, task, examples, args.batch_size)
    routing = summarize_routing(adapters.context.pop_stats() if adapters else {},
                                adapters.cfg.has_tau if adapters else False)
    print(f"{dataset} [{split}]: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']})"
          + (f" acc_norm {result['acc_norm']:.4f}" if "acc_norm" in result else "")
          + ("" if adapters else " (zero-shot, no adapter)")
          + (f" mean active experts {routing['overall']['mean_active_experts']:.2f}" if routing["layers"] else ""))
    print_routing_table(routing["layers"])
    if args.json:
        args.json.write_text(json.dumps({**result, **routing["overall"], "dataset": dataset, "split": split,
                                         "lm_framing": framing, "autocast": task.autocast, "zero_shot": adapters is None,
                                         "layers": routing["layers"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
