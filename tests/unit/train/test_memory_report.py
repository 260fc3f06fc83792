"""The trainer's memory lines: the plan of the run as built (the loaded model's config, the modules adapted) and
the measured peak beside it. The end of a real run (the log lines and final_metrics.json) is checked in
tests/unit/cli/test_bad_input.py's complete run."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from adamole_dist.config.training import TrainConfig
from adamole_dist.data.sft_task import IGNORE, PackedRows
from adamole_dist.planning.activations import planned_target_names
from adamole_dist.planning.model_shape import shape_from_config
from adamole_dist.runtime.process_group import DistInfo
from adamole_dist.train.memory_report import measured_peak_bytes, peak_line, planned_peak, run_plan_config

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


def built_run(config: dict, targets: list[str], **options) -> SimpleNamespace:
    """What planned_peak reads of a Run: its options, world, placement, DeepSpeed config, model and adapted names."""
    from transformers import AutoConfig

    return SimpleNamespace(cfg=TrainConfig(output_dir="unused", **options), dist_info=DistInfo(0, 1, 0),
                           ds_config={"zero_optimization": {"stage": 3}}, layout=SimpleNamespace(ep_size=1),
                           engine=SimpleNamespace(module=SimpleNamespace(config=AutoConfig.for_model(**config))),
                           model_path="/models/tiny", adapters=SimpleNamespace(targets=targets),
                           sft=SimpleNamespace(sample_prompts=[([1, 2], "a")], answer_prompts=[]),
                           train_examples=[{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, IGNORE, 3, 4]}])


def test_the_plan_is_of_the_loaded_model_and_the_modules_adapted():
    run = built_run(TINY, ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], micro_batch_size=2,
                    max_length=32)
    text, mb = planned_peak(run, torch.device("cpu"))
    assert text.startswith("memory plan (prediction) for /models/tiny:") and "micro batch 2 x 32 tokens" in text
    assert "GB card" not in text and "no card fit" in text  # a CPU plan, its process baseline in it
    assert mb is not None and mb > 400  # the process baseline is in a CPU plan
    more, _ = planned_peak(built_run(TINY, ["self_attn.q_proj"], micro_batch_size=2, max_length=32),
                           torch.device("cpu"))
    assert more != text  # the adapted modules count
    assert "evaluation by generation: the base gathered" in text  # its free-form data's samples generate
    run.sft = None  # multiple-choice data: no generation
    assert "evaluation by generation" not in planned_peak(run, torch.device("cpu"))[0]


def test_the_plan_counts_the_logits_of_the_fullest_rows_targets():
    """The chunked loss computes logits for target positions only: the trainer plans the fullest training row's."""
    def example(targets: int) -> dict:
        return {"input_ids": list(range(10)), "labels": [IGNORE] * (10 - targets) + list(range(targets))}

    run = built_run(TINY, ["self_attn.q_proj"], micro_batch_size=2, max_length=32)
    run.train_examples = PackedRows([example(2), example(5), example(3)], [[0, 1], [2]])  # rows of 7 and 3 targets
    assert run_plan_config(run, torch.device("cpu")).target_fraction == 7 / 32
    run.train_examples = [example(3), example(1)]  # unpacked: one example a row
    assert run_plan_config(run, torch.device("cpu")).target_fraction == 3 / 32
    run.sft = None  # multiple choice: not looked into
    assert run_plan_config(run, torch.device("cpu")).target_fraction == 1.0


def test_a_model_the_planner_does_not_model_gives_no_plan():
    text, mb = planned_peak(built_run({"model_type": "gpt2", "n_layer": 2}, ["attn.c_attn"]), torch.device("cpu"))
    assert text.startswith("memory plan: none (") and mb is None


def test_resolved_names_map_to_the_planners():
    shape = shape_from_config({**TINY}, "tiny")
    assert planned_target_names(shape, ["self_attn.q_proj", "mlp.up_proj"]) == ["q_proj", "up_proj"]
    bert = shape_from_config({"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 2}, "bert")
    assert planned_target_names(bert, ["attention.self.query", "attention.output.dense", "output.dense"]) == [
        "query", "attention.output.dense", "output.dense"]


def test_the_peak_line_sets_the_measure_beside_the_plan():
    assert measured_peak_bytes(torch.device("cpu")) > 2**20  # this process's peak RSS
    line = peak_line(1100.0, 1, 2, "cpu", 1000.0)
    assert line == "memory: measured peak 1,100 MB per rank (peak RSS, rank 1, the largest of 2 ranks); " \
                   "plan 1,000 MB, measured +10 %"
    assert peak_line(50.0, 0, 1, "cuda", None).endswith("(torch.cuda.max_memory_allocated, one rank); no plan")
