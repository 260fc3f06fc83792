"""Evaluate a saved adapter, or a base model zero-shot: multiple-choice accuracy (and acc_norm
with --lm_framing question_answer) and per-layer routing statistics.

    python launch/eval.py --adapter runs/default/adapter [--dataset DIR] [--split test] [--json out.json]
    python launch/eval.py --model smollm2-135m --dataset ../shared/data/ARC-Easy --lm_framing question_answer
    python launch/eval.py --adapter runs/x/adapter --harness arc_easy_local --harness_data ../shared/data --json r.json

The base model is the one recorded in the adapter's config unless --model names another; without
--adapter the base model is evaluated as it is (zero-shot). Runs in one process (no DeepSpeed
needed): the adapter is small and the base loads whole.

--harness TASKS (comma-separated) also runs lm-evaluation-harness (pip install -e '.[harness]') on the
same adapted model and tokenizer through lm_eval's HFLM, zero-shot; its results go beside --json
(NAME.harness.json, per-question NAME.harness_samples.jsonl). Names of eval_tasks/*.yaml
(arc_easy_local, openbookqa_local, boolq_local) are local tasks over a folder of ../shared/data's
layout: --harness_data DIR (default ../shared/data) is written into a copy of each YAML
(NAME.harness_tasks/), which `lm_eval --include_path` also accepts; any other name is lm-eval's own
task (needs the hub or its cache). --max_examples picks the same seeded subsample of questions for
both scorers.
The harness calls the model without an attention mask. Its batches are right-padded, so under causal
attention no real token sees the padding and the scores are the unmasked model's, but the padding
positions pass through the routers: routing statistics of a harness run count them (they are dropped,
not reported), and with an expert capacity limit (sira, capacity_factor > 0) padding competes for
capacity, so harness scores can differ from ours there.
"""

import argparse
import dataclasses
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from adamole_dist.adapters.files import load_adapter, read_adapter_config
from adamole_dist.base_model.model_loading import load_model_and_tokenizer
from adamole_dist.cli.console import configure_logging
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import AUTOCASTS, LM_FRAMINGS, TrainConfig
from adamole_dist.data import DataError, load_examples, load_records
from adamole_dist.data.evaluate import evaluate_accuracy
from adamole_dist.data.formats import subsample
from adamole_dist.moe.routing_stats import summarize_routing
from adamole_dist.ops.output_dir import RUN_CONFIG
from adamole_dist.runtime.stopping import EXIT_BAD_INPUT
from adamole_dist.train.builders import build_task_for
from adamole_dist.train.reporting import print_routing_table

EVAL_TASKS = Path(__file__).resolve().parents[2] / "eval_tasks"  # the checkout's local task YAMLs
_DATA_DIR_LINE = re.compile(r"^(\s*data_dir:).*$", re.MULTILINE)
_TEST_FILE_LINE = re.compile(r"^\s*test:\s*(\S+)\s*$", re.MULTILINE)


class HarnessPlan:
    """The harness run, checked before any model loads: task names, the generated local task folder,
    the per-task test files (for the subsample) and where results go."""

    def __init__(self, tasks: str, data_dir: Path, json_path: Path | None) -> None:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--harness needs lm-evaluation-harness, which is not installed: "
                              "pip install -e '.[harness]' (or pip install lm-eval)")
        self.tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not self.tasks:
            raise ConfigError("--harness needs at least one task name (e.g. arc_easy_local)")
        stem = json_path.with_suffix("") if json_path else Path("harness")
        self.results_path = Path(f"{stem}.harness.json")
        self.samples_path = Path(f"{stem}.harness_samples.jsonl")
        self.task_dir = Path(f"{stem}.harness_tasks")
        self.data_dir = data_dir.expanduser().resolve()
        self.local: dict[str, tuple[str, Path]] = {}  # task -> (YAML text with data_dir filled, test file)
        for task in self.tasks:
            yaml_path = EVAL_TASKS / f"{task}.yaml"
            if not yaml_path.is_file():
                continue  # one of lm-eval's own tasks
            text = yaml_path.read_text()
            test_file = self.data_dir / _TEST_FILE_LINE.search(text).group(1)
            if not test_file.is_file():
                raise ConfigError(f"--harness_data {data_dir}: task {task} needs {test_file}, which does not exist")
            self.local[task] = (_DATA_DIR_LINE.sub(lambda m: f"{m.group(1)} {json.dumps(str(self.data_dir))}", text),
                                test_file)

    def write_tasks(self) -> Path:
        if self.task_dir.exists():
            shutil.rmtree(self.task_dir)
        self.task_dir.mkdir(parents=True)
        shutil.copy2(EVAL_TASKS / "utils.py", self.task_dir / "utils.py")
        for task, (text, _) in self.local.items():
            (self.task_dir / f"{task}.yaml").write_text(text)
        return self.task_dir

    def samples(self, limit: int, seed: int) -> dict[str, list[int]] | None:
        """The question indices of ``load_examples``'s seeded subsample, per local task (None: all)."""
        if not limit:
            return None
        return {task: subsample(list(range(len(load_records(str(f), "test")[0]))), limit, seed)
                for task, (_, f) in self.local.items()}


def run_harness(plan: HarnessPlan, model, tokenizer, *, batch_size: int, autocast: str, limit: int,
                seed: int) -> dict:
    """lm_eval.simple_evaluate on the adapted model (HFLM over the instance), zero-shot; writes the
    results and per-question samples; returns {task: {metric: value}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              mixed_precision_dtype=torch.bfloat16 if autocast == "bf16" else None)
    samples = plan.samples(limit, seed)
    unlimited = [t for t in plan.tasks if t not in plan.local]
    out = lm_eval.simple_evaluate(
        model=lm, tasks=plan.tasks, num_fewshot=0, task_manager=TaskManager(include_path=str(plan.write_tasks())),
        samples=samples if samples and not unlimited else None, limit=limit or None if unlimited else None,
        log_samples=True)
    per_question = out.pop("samples", {})
    plan.results_path.write_text(json.dumps(out, indent=1, default=handle_non_serializable))
    with plan.samples_path.open("w") as f:
        for task, rows in per_question.items():
            for row in rows:
                f.write(json.dumps({"task": task, "doc_id": row["doc_id"], "target": row["target"],
                                    "acc": row.get("acc"), "acc_norm": row.get("acc_norm"),
                                    "loglikelihoods": [float(r[0]) for r in row["filtered_resps"]]}) + "\n")
    return {task: {k.split(",")[0]: v for k, v in res.items() if k.split(",")[0] in ("acc", "acc_norm")}
            for task, res in out["results"].items()}


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


def check_writable_file(path: Path, option: str) -> None:
    """``path`` can be created or replaced: probed by opening it for appending, which changes nothing
    in an existing file; a file the probe created is removed again."""
    if path.is_dir():
        raise ConfigError(f"{option} ({path}) is a directory; it names the file to write")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{option} ({path}) cannot be written: {e.strerror}") from None
    if not existed:
        path.unlink()


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
    ap.add_argument("--json", type=Path, help="write accuracy and routing statistics here")
    ap.add_argument("--harness", metavar="TASKS", help="also run lm-evaluation-harness on these tasks (see above)")
    ap.add_argument("--harness_data", type=Path, default=Path("../shared/data"),
                    help="folder holding ARC-Easy/, openbookqa/, boolq/ for the local harness tasks")
    return ap


def main(argv=None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
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
        model, tokenizer, task_type, _ = load_model_and_tokenizer(base, doc.get("task_type", "auto"),
                                                                  pooling=doc.get("pooling", "cls"))
        adapters = load_adapter(model, args.adapter) if args.adapter is not None else None
        framing = args.lm_framing or run.lm_framing
        if framing != "instruction" and task_type != "causal_lm":
            raise ConfigError(f"lm_framing ({framing!r}) applies to causal_lm models; this one is {task_type}")
        settings = dataclasses.replace(run, max_length=args.max_length or run.max_length, lm_framing=framing,
                                       autocast=args.autocast or run.autocast)
        task = build_task_for(settings, task_type, tokenizer, torch.device("cpu"))
        if harness is not None and task_type != "causal_lm":
            raise ConfigError(f"--harness scores causal LMs (HFLM); this model is {task_type}")
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if dataset:
        our_evaluation(model, task, adapters, examples, dataset, split, framing, args)
    if harness is not None:
        harness_evaluation(harness, model, tokenizer, adapters, task.autocast, run.seed, args)
    return 0


def harness_evaluation(harness: HarnessPlan, model, tokenizer, adapters, autocast, seed: int, args) -> None:
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


def recorded_run(adapter: Path) -> TrainConfig | None:
    """The options of the run that trained ``adapter`` (its run_config.json beside it) as a TrainConfig:
    what the record lacks takes TrainConfig's defaults, keys this version does not know are ignored;
    None without a record."""
    run_config = adapter.parent / RUN_CONFIG
    if not run_config.is_file():
        return None
    try:
        record = json.loads(run_config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{run_config} is not valid JSON ({e})") from None
    return TrainConfig.from_record(record, origin=str(run_config))


def our_evaluation(model, task, adapters, examples, dataset, split, framing, args) -> None:
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
                                         "lm_framing": framing, "autocast": task.autocast,
                                         "zero_shot": adapters is None, "layers": routing["layers"]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
