"""lm-evaluation-harness on an adapted model: the tasks checked before any model loads (``HarnessPlan``),
then ``lm_eval.simple_evaluate`` through HFLM over the loaded instance, zero-shot (``run_harness``).

The local tasks (``local_task_names``: arc_easy_local, openbookqa_local, boolq_local) are package data,
``harness_tasks/*.yaml`` read with importlib.resources, so an installed wheel finds them as a checkout
does. They read a folder of ../shared/data's layout: the plan writes a copy of each YAML with its
``data_dir`` filled in (and the ``utils.py`` their ``process_docs`` names) into a task folder that
``lm_eval --include_path`` also accepts. Any other task name is lm-eval's own (needs the hub or its cache).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

import torch

from adamole_dist.config.fields import ConfigError
from adamole_dist.data.formats import load_records, subsample

HARNESS_TASKS = files("adamole_dist.evaluation") / "harness_tasks"  # package data: the local task YAMLs
_DATA_DIR_LINE = re.compile(r"^(\s*data_dir:).*$", re.MULTILINE)
_TEST_FILE_LINE = re.compile(r"^\s*test:\s*(\S+)\s*$", re.MULTILINE)


def local_task_names() -> list[str]:
    """The local tasks shipped with the package (harness_tasks/*.yaml), sorted."""
    return sorted(entry.name[: -len(".yaml")] for entry in HARNESS_TASKS.iterdir() if entry.name.endswith(".yaml"))


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
            yaml_path = HARNESS_TASKS / f"{task}.yaml"
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
        (self.task_dir / "utils.py").write_bytes((HARNESS_TASKS / "utils.py").read_bytes())
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
