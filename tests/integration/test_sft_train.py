"""Free-form (SFT) data through the trainer: the step's per-token loss normalisation, a one-process
run of Alpaca data with packing through launch/train.py, and (slow) the deepspeed launcher on a chat
dataset with a tiny Llama, plus W ranks against one process on the same global batch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from adamole_dist.data.examples import IGNORE
from tests.helpers.launch_utils import check, deepspeed_cmd, python_cmd, records, run, train_losses
from tests.helpers.tiny_models import write_tiny_llama

# Plain words around the MiniLM tokenizer's [SEP] as the end of a turn.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
THINGS = [("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow", "white"), ("coal", "black"),
          ("blood", "red")]


def conversation(rng: random.Random) -> dict:
    """One or two question/answer turns: examples of different lengths and target counts."""
    a, b = rng.choice(THINGS), rng.choice(THINGS)
    turns = [{"role": "user", "content": f"what color is the {a[0]}"},
             {"role": "assistant", "content": f"the {a[0]} is {a[1]}"}]
    if rng.random() < 0.5:
        turns += [{"role": "user", "content": f"and the {b[0]}"},
                  {"role": "assistant", "content": f"the {b[0]} is {b[1]} as always"}]
    return {"messages": turns}


def alpaca(rng: random.Random) -> dict:
    a = rng.choice(THINGS)
    return {"instruction": f"name the color of the {a[0]}", "input": rng.choice(["", "in one word"]),
            "output": a[1]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    write_tiny_llama(root / "model")
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    rng = random.Random(0)
    write_jsonl(root / "chat" / "train.jsonl", [conversation(rng) for _ in range(96)])
    write_jsonl(root / "chat" / "test.jsonl", [conversation(rng) for _ in range(12)])
    write_jsonl(root / "alpaca" / "train.jsonl", [alpaca(rng) for _ in range(64)])
    write_jsonl(root / "alpaca" / "test.jsonl", [alpaca(rng) for _ in range(8)])
    return root


# -- loss normalisation (one process) -----------------------------------------------------------------------
def test_step_loss_is_the_per_token_mean_of_the_whole_step(minilm_tokenizer):
    """The micro losses' mean is the step's summed token loss over its target tokens -- not the mean of
    per-batch means, which weighs the 2-token example like the 7-token one."""
    from adamole_dist.data.sft_task import SFTTask
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    task = SFTTask(minilm_tokenizer, max_length=32)
    g = torch.Generator().manual_seed(0)

    def example(n: int, targets: int) -> dict:
        ids = torch.randint(5, 128, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [IGNORE] * (n - targets) + ids[n - targets:]}

    examples = [example(9, 7), example(4, 2), example(6, 3)]
    micro = [task.collate(examples[:2]), task.collate(examples[2:])]
    task.prepare_step(micro, world_size=1)
    step_loss = sum(task.loss(model, b) for b in micro) / len(micro)

    total, tokens = 0.0, 0
    for ex in examples:  # each example on its own: no padding anywhere
        logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(ex["labels"][1:])
        total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        tokens += int((labels != IGNORE).sum())
    assert tokens == 12 and micro[0]["target_tokens"] == 9
    torch.testing.assert_close(step_loss.item(), total / tokens, rtol=1e-5, atol=1e-6)
    mean_of_means = sum(task.loss(model, task.collate(b)) for b in (examples[:2], examples[2:])) / 2
    assert abs(mean_of_means.item() - total / tokens) > 1e-3  # the normalisation is what makes it agree


# -- one process through the real entry point -------------------------------------------------------------------
def test_alpaca_with_packing_trains_and_records_its_prompt_format(work, tmp_path):
    out = tmp_path / "run"
    proc = check(run(python_cmd(
        "--model", str(work / "model"), "--dataset", str(work / "alpaca"), "--output_dir", str(out),
        "--packing", "--max_length", "128", "--micro_batch_size", "2", "--max_steps", "4", "--log_interval", "1",
        "--eval_interval", "0", "--save_interval", "0", "--lr", "1e-2", "--sample_prompts", "1",
        "--max_new_tokens_eval", "4", "--eval_batch_size", "8", "--answer_accuracy", "off"), timeout=600))
    data = records(out, "data")[0]
    assert data["data_format"] == "alpaca" and data["prompt_format"] == "alpaca" and data["loss_on"] == "assistant"
    assert 0 < data["packed_rows"] < data["train_examples"] == 64  # several examples per row
    train = records(out, "train")
    assert len(train) == 4 and all(r["task_loss"] > 0 and 0 <= r["padding_fraction"] < 1 for r in train)
    evals = records(out, "eval")
    assert len(evals) == 2 and all(r["eval_tokens"] > 0 and r["total"] == 8 for r in evals)
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-6)
    samples = records(out, "samples")[-1]["samples"]
    # the Alpaca prompt (as MiniLM decodes it)
    assert len(samples) == 1 and samples[0]["prompt"].endswith("# # # response :")
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (meta["prompt_format"], meta["data_format"], meta["chat_template"]) == ("alpaca", "alpaca", None)
    final = json.loads((out / "final_metrics.json").read_text())
    assert "eval_loss" in final and "accuracy" not in final
    assert "held-out loss" in proc.stdout
    card = (out / "adapter" / "README.md").read_text()  # the model card, with the Hub's front matter
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "adamole_dist" and front["base_model"] == str(work / "model")
    assert set(front["metrics"]) == {"loss", "perplexity"}
    values = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert values["loss"] == pytest.approx(final["eval_loss"])


def test_short_answers_are_scored_by_generation_before_and_after(work, tmp_path):
    """Alpaca replies of one word: answer_accuracy auto answers every held-out prompt by generation at the first
    and the last evaluation; the run ends with the questions' answers before -> after."""
    out = tmp_path / "run"
    proc = check(run(python_cmd(
        "--model", str(work / "model"), "--dataset", str(work / "alpaca"), "--output_dir", str(out),
        "--packing", "--max_length", "128", "--micro_batch_size", "2", "--max_steps", "3", "--log_interval", "1",
        "--eval_interval", "0", "--save_interval", "0", "--lr", "1e-2", "--sample_prompts", "2",
        "--max_new_tokens_eval", "4", "--eval_batch_size", "8"), timeout=600))
    first, last = records(out, "eval")
    for ev in (first, last):
        assert ev["answered"] == 8 and 0 <= ev["correct"] <= 8 and ev["accuracy"] == ev["correct"] / 8
        assert "answers" not in ev and ev["eval_tokens"] > 0  # the loss is still there
    samples = records(out, "samples")[-1]["samples"]
    assert len(samples) == 2 and all(set(s) >= {"question", "completion", "reference", "correct"} for s in samples)
    assert samples[0]["question"].startswith("name the color of the")
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["accuracy"] == last["accuracy"] and final["zero_shot_accuracy"] == first["accuracy"]
    assert final["train_seconds"] > 0 and "answers" not in final
    assert f"held-out accuracy {first['accuracy']:.4f} -> {last['accuracy']:.4f}" in proc.stdout  # the summary
    closing = proc.stdout[proc.stdout.index("held-out questions, base -> adapted (3 of 8):"):]
    assert closing.count("     base:    ") == 3 and closing.count("     adapted: ") == 3
    assert "held-out accuracy (exact match of the generated answer): " in closing
    assert "training took " in closing and str(out / "adapter") in closing


# -- the deepspeed launcher, 2 gloo ranks (slow) -------------------------------------------------------------------
@pytest.mark.slow
def test_chat_data_under_deepspeed_loss_falls(work, tmp_path):
    out, steps = tmp_path / "run", 20
    proc = check(run(deepspeed_cmd(
        2, "--ds_config", "ds_configs/zero3.json", "--model", str(work / "model"), "--dataset", str(work / "chat"),
        "--chat_template", str(work / "chat.jinja"), "--output_dir", str(out), "--max_length", "64",
        "--micro_batch_size", "4", "--max_steps", str(steps), "--log_interval", "1", "--eval_interval", "10",
        "--save_interval", "0", "--lr", "1e-2", "--sample_prompts", "2", "--max_new_tokens_eval", "6")))
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    first = sum(losses[s] for s in range(1, 5)) / 4
    last = sum(losses[s] for s in range(steps - 3, steps + 1)) / 4
    assert last < first - 0.05, f"loss did not fall: first {first:.4f}, last {last:.4f}"
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 10, 20] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    samples = records(out, "samples")
    assert [r["step"] for r in samples] == [0, 10, 20] and len(samples[-1]["samples"]) == 2
    assert samples[-1]["samples"][0]["prompt"].endswith("assistant :")
    assert proc.stdout.count("sample 0:") == 3  # printed by rank 0 only
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["prompt_format"] == "chat" and meta["data_format"] == "messages"
    assert meta["chat_template"] == CHAT_TEMPLATE


# -- W ranks against one process on the same global batch (slow) -----------------------------------------------------
GLOBAL_MICRO, GAS, STEPS = 8, 2, 3


def train_cases(rank, world, cases):
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.runtime.process_group import init_distributed
    from adamole_dist.train.loop import train

    info = init_distributed()
    for kwargs in cases:
        train(TrainConfig(**kwargs), info)


@pytest.mark.slow
def test_two_ranks_equal_one_process(work, tmp_path):
    """Examples of different target counts on each rank: with the per-token normalisation over the whole
    step (both ranks, both micro batches), 2 ranks give one process's losses, norms and parameters."""
    from safetensors.torch import load_file

    from tests.helpers.mp_harness import run_ranks

    def config(world: int) -> dict:
        return dict(model=str(work / "model"), dataset=str(work / "chat"), chat_template=str(work / "chat.jinja"),
                    max_length=64, micro_batch_size=GLOBAL_MICRO // world, gradient_accumulation_steps=GAS,
                    max_steps=STEPS, lr=1e-2, lr_scheduler="constant", warmup_steps=0, log_interval=1,
                    eval_interval=0, eval_at_start=False, save_interval=0, sample_prompts=0, eval_batch_size=4,
                    peer_timeout=0.0, report_to="none", ds_config="ds_configs/zero3.json",
                    output_dir=str(tmp_path / f"w{world}"), autocast="none", packing=False,
                    adapter=dict(num_experts=4, rank=2, dropout=0.0, aux_loss_scope="global"))

    run_ranks(train_cases, 1, [config(1)], timeout=600)
    run_ranks(train_cases, 2, [config(2)], timeout=600)
    ref, got = records(tmp_path / "w1", "train"), records(tmp_path / "w2", "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for key in ("task_loss", "aux_loss", "grad_norm"):
        for a, b in zip(got, ref):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, got, ref)
    final_ref, final_got = (records(tmp_path / w, "eval")[-1] for w in ("w1", "w2"))
    assert final_got["eval_loss"] == pytest.approx(final_ref["eval_loss"], rel=1e-5)
    assert final_got["eval_tokens"] == final_ref["eval_tokens"] and final_got["total"] == final_ref["total"] == 12
    a = load_file(str(tmp_path / "w1" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "w2" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)


@pytest.mark.slow
def test_chunked_loss_under_zero3_equals_the_plain_loss(work, tmp_path):
    """Two ranks under ZeRO-3, the LM head trained too (its weight partitioned, gathered for the head's
    forward and backward): the chunked loss (the default) gives the plain loss's losses, norms, held-out
    loss and parameters."""
    from safetensors.torch import load_file

    from tests.helpers.mp_harness import run_ranks

    def config(chunked: bool) -> dict:
        return dict(model=str(work / "model"), dataset=str(work / "chat"), chat_template=str(work / "chat.jinja"),
                    max_length=64, micro_batch_size=4, max_steps=STEPS, lr=1e-2, lr_scheduler="constant",
                    warmup_steps=0, log_interval=1, eval_interval=0, eval_at_start=False, save_interval=0,
                    sample_prompts=0, eval_batch_size=4, peer_timeout=0.0, report_to="none",
                    ds_config="ds_configs/zero3.json", trainable_modules=["lm_head"], chunked_loss=chunked,
                    loss_chunk_tokens=16, output_dir=str(tmp_path / ("chunked" if chunked else "plain")),
                    autocast="none", packing=False,
                    adapter=dict(num_experts=4, rank=2, dropout=0.0))

    run_ranks(train_cases, 2, [config(True), config(False)], timeout=600)
    ref, got = records(tmp_path / "plain", "train"), records(tmp_path / "chunked", "train")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for key in ("task_loss", "aux_loss", "grad_norm"):
        for a, b in zip(got, ref):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, got, ref)
    final_ref, final_got = (records(tmp_path / w, "eval")[-1] for w in ("plain", "chunked"))
    assert final_got["eval_loss"] == pytest.approx(final_ref["eval_loss"], rel=1e-5)
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "chunked" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and any("lm_head" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0, msg=k)


# -- the training split is read by rank 0 alone (slow) --------------------------------------------------------------
def read_and_tokenize(rank, world, work, cache, out, limit):
    """Through the trainer's own data path; counts the reads of the training file on this rank."""
    import os

    os.environ["ADAMOLE_DIST_CACHE"] = str(cache)
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.data import run_data
    from adamole_dist.data.examples import DataError
    from adamole_dist.parallel.rank_zero import CollectiveRanks
    from adamole_dist.train.assembly import resolved_model

    reads = []
    real = run_data.load_records
    run_data.load_records = lambda source, split: (reads.append(split), real(source, split))[1]
    cfg = TrainConfig(model=str(work / "model"), dataset=str(out / "data"), chat_template=str(work / "chat.jinja"),
                      max_length=64, max_train_examples=limit)
    ranks = CollectiveRanks(rank, world)
    try:
        records, origin, fmt = run_data.read_train_split(cfg, ranks)
        spec = run_data.render_spec(cfg, fmt, lambda: resolved_model(cfg))
        split = run_data.tokenize_training_split(records, spec, origin, cfg, ranks)
    except DataError as e:
        (out / f"rank{rank}.json").write_text(json.dumps({"error": str(e), "reads": reads}))
        return
    (out / f"rank{rank}.json").write_text(json.dumps({"reads": reads, "held_records": records is not None,
                                                      "examples": split.examples.to_list(),
                                                      "dropped": split.dropped}))


@pytest.mark.slow
def test_only_rank0_reads_the_training_split(work, tmp_path):
    """At 2 gloo ranks rank 1 never opens the training file and gets the examples one process
    tokenizes in memory (whole split and a seeded subsample); a bad record stops both ranks."""
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.data.formats import load_records
    from adamole_dist.data.run_data import render_spec
    from adamole_dist.data.sft_render import tokenize_split
    from adamole_dist.train.assembly import resolved_model
    from tests.helpers.mp_harness import run_ranks

    rng = random.Random(1)
    rows = [conversation(rng) for _ in range(30)]
    for limit in (0, 12):
        out = tmp_path / f"limit{limit}"
        write_jsonl(out / "data" / "train.jsonl", rows)
        run_ranks(read_and_tokenize, 2, work, tmp_path / "cache", out, limit, timeout=300)
        cfg = TrainConfig(model=str(work / "model"), dataset=str(out / "data"),
                          chat_template=str(work / "chat.jinja"), max_length=64)
        spec = render_spec(cfg, "messages", lambda: resolved_model(cfg))
        reference = tokenize_split(load_records(cfg.dataset, "train")[0], spec, "train",
                                   limit=limit or None, seed=cfg.seed)
        expected = [{"input_ids": ex["input_ids"], "labels": ex["labels"], "length": len(ex["input_ids"])}
                    for ex in reference.examples]
        seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert seen[0]["reads"] == ["train"] and seen[1]["reads"] == [], seen
        assert seen[0]["held_records"] and not seen[1]["held_records"]
        assert len(expected) == (limit or len(rows))
        assert seen[0]["examples"] == seen[1]["examples"] == expected
    bad = tmp_path / "bad"
    write_jsonl(bad / "data" / "train.jsonl", rows[:7] + [{"messages": [{"role": "robot", "content": "x"}]}] + rows)
    run_ranks(read_and_tokenize, 2, work, tmp_path / "cache", bad, 0, timeout=300)
    for r in (0, 1):
        error = json.loads((bad / f"rank{r}.json").read_text())["error"]
        assert "train.jsonl record 7" in error and "robot" in error, error
    assert json.loads((bad / "rank1.json").read_text())["reads"] == []
