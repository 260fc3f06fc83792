"""lm-evaluation-harness on an adapted model: the tasks checked before any model loads (``HarnessPlan``),
then ``lm_eval.simple_evaluate`` through HFLM over the loaded instance, zero-shot (``run_harness``).

The local tasks (``local_task_names``: arc_easy_local, openbookqa_local, boolq_local) are package data,
``harness_tasks/*.yaml`` read with importlib.resources, so an installed wheel finds them as a checkout
does. They read a folder of ../shared/data's layout: the plan writes a copy of each YAML with its
``data_dir`` filled in (and the ``utils.py`` their ``process_docs`` names) into a temporary task folder
of the kind ``lm_eval --include_path`` accepts (the results' "configs" record each task as it ran). Any
other task name must be one of lm-eval's own (needs the hub or its cache), checked before the model loads.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import re
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from adamole_dist.atomic_files import write_dir_atomically, write_text_atomically
from adamole_dist.config.fields import ConfigError
from adamole_dist.data.formats import load_records, subsample

HARNESS_TASKS = files("adamole_dist.evaluation") / "harness_tasks"  # package data: the local task YAMLs
log = logging.getLogger(__name__)
_DATA_DIR_LINE = re.compile(r"^(\s*data_dir:).*$", re.MULTILINE)
_TEST_FILE_LINE = re.compile(r"^\s*test:\s*(\S+)\s*$", re.MULTILINE)


def local_task_names() -> list[str]:
    """The local tasks shipped with the package (harness_tasks/*.yaml), sorted."""
    return sorted(entry.name[: -len(".yaml")] for entry in HARNESS_TASKS.iterdir() if entry.name.endswith(".yaml"))


class HarnessPlan:
    """The harness run, checked before any model loads: task names (the local ones here; lm-eval's own in
    its task index, so a typo fails now, not after our evaluation ran), the per-task test files (for the
    subsample) and where results go: beside --json (NAME.harness.json, NAME.harness_samples.jsonl, and the
    task YAMLs as they ran in NAME.harness_tasks/), or nowhere without it (printed only). The local task
    YAMLs are written into a temporary folder, removed with ``close`` (at exit at the latest), never into
    the working directory."""

    def __init__(self, tasks: str, data_dir: Path, json_path: Path | None) -> None:
        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("--harness needs lm-evaluation-harness, which is not installed: "
                              "pip install -e '.[harness]' (or pip install lm-eval)")
        self.tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not self.tasks:
            raise ConfigError("--harness needs at least one task name (e.g. arc_easy_local)")
        stem = json_path.with_suffix("") if json_path else None
        self.results_path = Path(f"{stem}.harness.json") if stem else None
        self.samples_path = Path(f"{stem}.harness_samples.jsonl") if stem else None
        # the task YAMLs as they ran (data folder filled in), for `lm_eval --include_path`: how lm-eval's
        # own API models score the same tasks against adamole-serve (docs/serving.md)
        self.tasks_path = Path(f"{stem}.harness_tasks") if stem else None
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
        self._folder: tempfile.TemporaryDirectory | None = None
        self.task_manager = None
        if any(t not in self.local for t in self.tasks):
            self.check_task_names()

    @property
    def outputs(self) -> list[tuple[Path, str]]:
        """(file, the option it derives from) of every file the run writes."""
        return [(p, "--json") for p in (self.results_path, self.samples_path) if p is not None]

    def check_task_names(self) -> None:
        """Every name a local task or one of lm-eval's own (its task index takes seconds to build: kept
        for the run)."""
        from lm_eval.tasks import TaskManager

        self.task_manager = TaskManager(include_path=str(self.write_tasks()))
        unknown = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            near = {t: difflib.get_close_matches(t, self.task_manager.all_tasks, n=1) for t in unknown}
            hints = "; ".join(f"{t!r} (did you mean {m[0]!r}?)" if m else repr(t) for t, m in near.items())
            raise ConfigError(f"--harness: unknown task {hints}; the local tasks are {', '.join(local_task_names())}, "
                              "lm-eval's own are listed by `lm_eval --tasks list`")

    def write_tasks(self) -> Path:
        """The temporary task folder (written once): the local YAMLs and the utils.py they name."""
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="adamole-harness-tasks-")
            folder = Path(self._folder.name)
            (folder / "utils.py").write_bytes((HARNESS_TASKS / "utils.py").read_bytes())
            for task, (text, _) in self.local.items():
                (folder / f"{task}.yaml").write_text(text)
        return Path(self._folder.name)

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def samples(self, limit: int, seed: int) -> dict[str, list[int]] | None:
        """The question indices of ``load_examples``'s seeded subsample, per local task (None: all)."""
        if not limit:
            return None
        return {task: subsample(list(range(len(load_records(str(f), "test")[0]))), limit, seed)
                for task, (_, f) in self.local.items()}


def run_harness(plan: HarnessPlan, model, tokenizer, adapters=None, *, batch_size: int, autocast: str, limit: int,
                seed: int) -> dict:
    """lm_eval.simple_evaluate on the adapted model (HFLM over the instance), zero-shot; writes the
    results and per-question samples (when the plan has a place for them); returns {task: {metric: value}}.
    ``adapters``: the model's Adapters handle, whose routing statistics of the run are dropped (they count
    the harness's padding)."""
    if adapters is not None and adapters.cfg.effective_capacity_factor > 0:
        log.info("note: this adapter caps expert capacity; the harness routes its padding, which competes for "
                 "capacity (see launch/eval.py --help)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              mixed_precision_dtype=torch.bfloat16 if autocast == "bf16" else None)
    samples = plan.samples(limit, seed)
    unlimited = [t for t in plan.tasks if t not in plan.local]
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=plan.tasks, num_fewshot=0,
            task_manager=plan.task_manager or TaskManager(include_path=str(plan.write_tasks())),
            samples=samples if samples and not unlimited else None, limit=limit or None if unlimited else None,
            log_samples=True)
        if plan.tasks_path is not None:
            tasks = plan.write_tasks()
            write_dir_atomically(plan.tasks_path, lambda tmp: shutil.copytree(tasks, tmp, dirs_exist_ok=True))
    finally:
        plan.close()
    if adapters is not None:
        adapters.context.pop_stats()
    per_question = out.pop("samples", {})
    if plan.results_path is not None:
        write_text_atomically(plan.results_path, json.dumps(out, indent=1, default=handle_non_serializable))
        write_text_atomically(plan.samples_path, "".join(
            json.dumps({"task": task, "doc_id": row["doc_id"], "target": row["target"], "acc": row.get("acc"),
                        "acc_norm": row.get("acc_norm"),
                        "loglikelihoods": [float(r[0]) for r in row["filtered_resps"]]}) + "\n"
            for task, rows in per_question.items() for row in rows))
    return {task: {k.split(",")[0]: v for k, v in res.items() if k.split(",")[0] in ("acc", "acc_norm")}
            for task, res in out["results"].items()}
