"""The pieces a run is built from, each in one place: the trainer's assembly (assembly.py), the
evaluation CLI and the benchmarks build their dispatcher, expert optimizer, DeepSpeed engine (its
config from config/deepspeed.py's build_ds_config) and task through these, so a benchmark measures
what a training run executes.

    layout = build_layout(ep_size, num_experts)
    dispatcher = build_dispatcher(layout, cfg.dispatch_dtype, cfg.ep_overlap, device)
    engine = build_engine(model, adapters.engine_parameters(), build_ds_config(cfg, world_size), schedule)
    expert_opt = build_expert_optimizer(adapters.expert_parameters(), world_size, cfg, layout, lr_lambda=schedule)
    task = build_task_for(cfg, task_type, tokenizer, device)
"""

from __future__ import annotations

import logging

import torch

from adamole_dist.base_model.bf16 import resolved_autocast
from adamole_dist.base_model.chunked_loss import install, why_not_chunked
from adamole_dist.config.training import TrainConfig
from adamole_dist.data.task import Task
from adamole_dist.data.task_factory import build_task
from adamole_dist.parallel.ep_dispatcher import ExpertParallelDispatcher, overlap_enabled, wire_dtype
from adamole_dist.parallel.layout import ParallelLayout
from adamole_dist.parallel.local_dispatcher import Dispatcher, LocalDispatcher
from adamole_dist.train.expert_optimizer import ExpertOptimizer

log = logging.getLogger(__name__)


def build_dispatcher(layout: ParallelLayout, dispatch_dtype: str = "fp32", ep_overlap: str = "auto",
                     device: torch.device | str = "cpu") -> Dispatcher:
    """Every expert on this rank (ep_size 1): the local dispatcher; else the expert-parallel one over
    ``layout``'s groups, its wire ``--dispatch_dtype`` and its overlap ``--ep_overlap`` on ``device``."""
    if layout.ep_size == 1:
        return LocalDispatcher()
    return ExpertParallelDispatcher(layout, wire_dtype(dispatch_dtype), overlap=overlap_enabled(ep_overlap, device))


def constant_lr(step: int) -> float:
    return 1.0


def build_expert_optimizer(params: list[torch.nn.Parameter], world_size: int, cfg: TrainConfig,
                           layout: ParallelLayout | None = None, lr_lambda=constant_lr) -> ExpertOptimizer:
    """The optimizer of the expert banks (outside the engine), with ``cfg``'s AdamW hyperparameters and
    clipping (the engine's AdamW gets the same ones through config/deepspeed.py): its gradients reduced
    over ``layout``'s expert-data-parallel group and clipped over its expert-parallel group (no layout:
    the experts replicated over the whole world)."""
    return ExpertOptimizer(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_lambda=lr_lambda,
                           world_size=world_size,
                           edp_group=layout.edp_group if layout is not None else None,
                           ep_group=layout.ep_group if layout is not None else None)


def build_engine(model: torch.nn.Module, parameters, ds_config: dict, lr_lambda=None):
    """deepspeed.initialize on ``parameters`` (the engine's share: routers, LoRA, task head); with
    ``lr_lambda`` the engine's lr follows it (the schedule the expert optimizer follows too)."""
    import deepspeed

    scheduler = None if lr_lambda is None else (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameters, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine


def build_task_for(cfg: TrainConfig, task_type: str, tokenizer, device=None, *, free_form: bool = False) -> Task:
    """The task (batching, loss, scoring) of ``task_type`` with the run's max_length, loss_on, lm_framing
    and autocast; ``free_form``: tokenized SFT examples. Raises ConfigError when max_length leaves no room
    for a prompt and an answer."""
    return build_task(task_type, tokenizer, cfg.max_length, cfg.loss_on, device, lm_framing=cfg.lm_framing,
                      autocast=resolved_autocast(cfg.autocast, device), free_form=free_form)


def attach_chunked_loss(cfg: TrainConfig, task: Task, model: torch.nn.Module, task_type: str) -> None:
    """--chunked_loss: the task's causal-LM loss through the model's LM head chunk by chunk
    (base_model/chunked_loss.py); after the adapters are injected (an adapted head keeps the full logits)."""
    if not cfg.chunked_loss or task_type != "causal_lm":
        return
    task.chunked_head = install(model, cfg.loss_chunk_tokens)
    if task.chunked_head is None:
        log.info(f"chunked_loss: the full logits instead, since {why_not_chunked(model)}")
