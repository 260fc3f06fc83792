"""Metrics sinks (rank 0 only): metrics.jsonl always, plus wandb or tensorboard on request."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from adamole_dist.atomic_files import write_text_atomically

log = logging.getLogger(__name__)


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value


class MetricsLogger:
    def __init__(self, output_dir: Path, report_to: str, *, enabled: bool, run_config: dict, project: str) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to == "wandb":
            import wandb

            self._wandb = wandb.init(project=project, dir=str(output_dir), config=run_config,
                                     name=Path(output_dir).name, reinit="finish_previous")
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, kind: str, metrics: dict) -> None:
        """Append one record {step, kind, time, **metrics} (nested dicts kept in the JSONL)."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        flat: dict = {}
        _flatten(kind, metrics, flat)
        flat = {k: v for k, v in flat.items() if math.isfinite(v)}
        if self._wandb is not None:
            self._wandb.log({**flat, **self._wandb_tables(kind, metrics)}, step=step)
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)
            for i, sample in enumerate(metrics.get("samples", [])):
                self._tb.add_text(f"{kind}/{i}", f"{sample['prompt']}\n\n---\n\n{sample['completion']}", step)

    def _wandb_tables(self, kind: str, metrics: dict) -> dict:
        """Text records (greedy samples) as a wandb table: one row per prompt, so a person sees the model learn."""
        samples = metrics.get("samples")
        if not samples:
            return {}
        import wandb

        columns = ["prompt", "completion", "reference"]
        return {kind: wandb.Table(columns=columns, data=[[s.get(c, "") for c in columns] for s in samples])}

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def metric_lines(path: str | Path) -> list[tuple[str, dict]]:
    """(line, record) for each record of a metrics.jsonl. A last line that does not parse is skipped
    with a warning: a run still writing, or killed in the middle of a write, leaves one, and every
    record before it is whole. A bad line anywhere else is damage: ValueError naming file and line."""
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                log.warning(f"warning: {path} line {n} is cut short (a run still writing, or killed mid-write, leaves "
                            "one): skipped")
                break
            raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}, column {e.colno}); "
                             "the file is damaged") from None
        if not (isinstance(record, dict) and "step" in record and "kind" in record):
            raise ValueError(f"{path} line {n} is not a metrics record (an object with step and kind)")
        out.append((line, record))
    return out


def read_metrics(path: str | Path) -> list[dict]:
    return [record for _, record in metric_lines(path)]


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep the records up to ``last_step`` (a resume discards the steps after its checkpoint), atomically."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line, record in metric_lines(path) if record["step"] <= last_step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))
