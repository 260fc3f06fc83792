"""The task factory: the task type a run trains (data/task.py's interface) from its model's task type and
its data: free-form records train ``SFTTask``, multiple-choice ones ``CausalLMTask`` or
``ChoiceScoringTask``."""

from __future__ import annotations

from adamole_dist.data.choice_tasks import CausalLMTask, ChoiceScoringTask
from adamole_dist.data.sft_task import SFTTask
from adamole_dist.data.task import Task

TASK_TYPES = ("causal_lm", "seq_cls")


def build_task(task_type: str, tokenizer, max_length: int, loss_on: str = "answer", device=None,
               lm_framing: str = "instruction", autocast: str = "none", free_form: bool = False) -> Task:
    """``free_form``: tokenized SFT examples (data/sft_task.py; loss_on is then the renderer's business)."""
    if free_form:
        if task_type != "causal_lm":
            raise ValueError(f"free-form (SFT) data trains causal_lm models, not {task_type}")
        return SFTTask(tokenizer, max_length, device, autocast=autocast)
    loss_on = "answer" if loss_on == "auto" else loss_on  # config.training's default: the answer for choices
    if task_type == "causal_lm":
        return CausalLMTask(tokenizer, max_length, loss_on, device, framing=lm_framing, autocast=autocast)
    if task_type == "seq_cls":
        return ChoiceScoringTask(tokenizer, max_length, device, autocast=autocast)
    raise ValueError(f"task_type ({task_type!r}) must be one of {', '.join(TASK_TYPES)}")
