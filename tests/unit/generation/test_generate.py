"""Generation with adapters: with the KV cache, the logits of every generated token equal one full
forward over the final sequence, the router sees only the new tokens (each token routed and counted
once, padding never); launch/generate.py end to end (prompt file in, JSONL out, rendering as training
rendered, bad input exits 2 naming it)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import adamole_dist
from adamole_dist.moe.routing_stats import STAT_TOKENS
from tests.helpers.launch_utils import REPO, run
from tests.helpers.saved_adapters import CHAT_TEMPLATE, write_adapter_dir
from tests.helpers.tiny_models import write_tiny_llama

GENERATE = REPO / "launch" / "generate.py"
METHODS = ["adamole", "mole_topk", "lora"]
PROMPTS = [[101, 1996, 4937, 2938, 2006, 1996, 13523], [101, 7592, 2088], [101, 2023, 2003, 1037, 3231]]
NEW_TOKENS = 6
# fp32, KV cache against one full forward: attention over a cache sums in another order (~1e-6 here).
ATOL, RTOL = 1e-5, 1e-4


def generate_module():
    """launch/generate.py's command (adamole-generate: ``main``) and the generation library it runs on
    (adamole_dist/generation/)."""
    from types import SimpleNamespace

    from adamole_dist.cli.generate import main
    from adamole_dist.generation.batched import generate_batch
    from adamole_dist.generation.prompts import PromptRenderer, prompt_format_for

    return SimpleNamespace(main=main, PromptRenderer=PromptRenderer, resolve_format=prompt_format_for,
                           generate_batch=generate_batch)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {m: write_adapter_dir(root / m, base_dir, m, seed=1) for m in METHODS}


def left_padded(rows, pad_id=0):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def tokens_per_layer(stats: dict) -> set[int]:
    return {int(s[STAT_TOKENS].item()) for s in stats.values()}


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["one_prompt", "left_padded_batch"])
@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_matches_one_full_forward(adapter_dirs, method, rows):
    model, _ = adamole_dist.from_pretrained(adapter_dirs[method])
    adapters = model.adamole_adapters
    ids, mask = left_padded(rows)
    B, P = ids.shape
    seen_shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen_shapes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    adapters.context.pop_stats()
    with torch.no_grad(), adapters.context.recording_active_experts() as active_gen:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True,
                             pad_token_id=0)
    hook.remove()
    generated_stats = adapters.context.pop_stats()
    # The cache was used: the prompt once, then one new token per row per step.
    assert seen_shapes == [(B, P)] + [(B, 1)] * (NEW_TOKENS - 1)

    sequences = out.sequences
    full_mask = torch.cat([mask, torch.ones(B, NEW_TOKENS, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # as generate numbers them
    with torch.no_grad(), adapters.context.recording_active_experts() as active_full:
        full = model(input_ids=sequences, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    full_stats = adapters.context.pop_stats()
    cached_logits = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(cached_logits, full[:, P - 1 : P - 1 + NEW_TOKENS], atol=ATOL, rtol=RTOL)
    assert (cached_logits.argmax(-1) == sequences[:, P:]).all()

    if method == "lora":
        assert generated_stats == {} and full_stats == {}
        return
    # Each token routed once, padding never: the prompt's real tokens, then the generated ones fed
    # back (all but the last, which no forward reads). The full forward also reads the last one.
    real = int(mask.sum())
    assert tokens_per_layer(generated_stats) == {real + B * (NEW_TOKENS - 1)}
    assert tokens_per_layer(full_stats) == {real + B * NEW_TOKENS}
    # The same experts fire at every position with and without the cache.
    for name in adapters.layers:
        cached_counts = torch.cat([step[name] for step in active_gen], dim=1)  # B x (P + G - 1)
        torch.testing.assert_close(cached_counts, active_full[0][name][:, : P + NEW_TOKENS - 1])
        assert (cached_counts[:, :P][mask == 0] == 0).all()  # no expert fires on padding
    fired = torch.cat([s[0][n].flatten() for s in (active_full,) for n in adapters.layers])
    assert 0 < fired.float().mean() < adapters.cfg.num_experts  # routing is not trivial here


def test_prompts_render_as_training_rendered(base_dir, adapter_dirs, tmp_path):
    gen = generate_module()
    _, tokenizer = adamole_dist.from_pretrained(adapter_dirs["lora"])
    text = gen.PromptRenderer(tokenizer, "text").ids({"prompt": "the cat"})
    assert tokenizer.decode(text) == "[CLS] the cat"  # the special prefix, no trailing [SEP]
    alpaca = gen.PromptRenderer(tokenizer, "alpaca").ids({"prompt": "name a colour"})
    assert tokenizer.decode(alpaca).endswith("# # # instruction : name a colour # # # response :")
    with_input = gen.PromptRenderer(tokenizer, "alpaca").ids({"prompt": "name a colour", "input": "of the sky"})
    assert tokenizer.decode(with_input).endswith("name a colour # # # input : of the sky # # # response :")
    chat_dir = write_adapter_dir(tmp_path / "chat", base_dir, "lora",
                                 meta={"prompt_format": "chat", "chat_template": CHAT_TEMPLATE})
    _, chat_tok = adamole_dist.from_pretrained(chat_dir)
    renderer = gen.PromptRenderer(chat_tok, gen.resolve_format("auto", {"prompt_format": "chat"}, chat_tok))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert chat_tok.decode(renderer.ids({"messages": messages})) == \
        "user : hi [SEP] assistant : hello [SEP] user : bye [SEP] assistant :"
    assert renderer.ids({"prompt": "bye"}) == renderer.ids({"messages": messages[2:]})


def cli(*args):
    return run([sys.executable, str(GENERATE), *map(str, args)], timeout=300)


def test_generate_py_prompt_file_in_jsonl_out(adapter_dirs, tmp_path):
    """Batched (left-padded) greedy completions equal one-prompt-at-a-time generation in process."""
    prompts = ["the cat sat on the mat", "hello", "this is a much longer prompt than the others"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    proc = cli("--adapter", adapter_dirs["adamole"], "--prompts", prompt_file, "--out", out, "--batch_size", 2,
               "--max_new_tokens", NEW_TOKENS, "--show_routing", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [0, 1, 2] and [r["prompt"] for r in records] == prompts

    gen = generate_module()
    model, tokenizer = adamole_dist.from_pretrained(adapter_dirs["adamole"])
    renderer = gen.PromptRenderer(tokenizer, "text")
    n_layers = len(model.adamole_adapters.layers)
    for rec in records:
        ids = torch.tensor([renderer.ids({"prompt": rec["prompt"]})])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        stop = tokenizer.sep_token_id
        seq = seq[: seq.index(stop)] if stop in seq else seq
        assert rec["completion"] == tokenizer.decode(seq, skip_special_tokens=True)
        assert rec["new_tokens"] == len(seq) == len(rec["routing"])
        assert all(len(t["per_layer"]) == n_layers for t in rec["routing"])
        assert all(t["mean_active"] == sum(t["per_layer"]) / n_layers for t in rec["routing"])


def test_generate_py_one_prompt_prints_the_completion_and_routing_strip(adapter_dirs):
    proc = cli("--adapter", adapter_dirs["mole_topk"], "--prompt", "hello", "--max_new_tokens", 3,
               "--show_routing", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    strips = [ln.split()[-1] for ln in lines[1:]]
    assert len(strips) == 3 and all(s == "2" * 8 for s in strips)  # top-2 in each of the 8 layers


def test_generate_py_bad_input_exits_2_naming_it(adapter_dirs, tmp_path):
    """One real process (exit status, one line, no traceback); the other cases through main() in this
    process, which is what the script runs (a launch each would cost seconds of imports)."""
    missing = tmp_path / "no_adapter"
    proc = cli("--adapter", missing, "--prompt", "hi")
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    main = generate_module().main
    lora = str(adapter_dirs["lora"])

    def error_of(*argv) -> str:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main([*map(str, argv), "--device", "cpu"]) == 2
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\nthis is not json\n')
    out = tmp_path / "out.jsonl"
    assert f"{bad} line 2: not valid JSON" in error_of("--adapter", lora, "--prompts", bad, "--out", out)
    assert not out.exists()
    bad.write_text('{"text": "no prompt field"}\n')
    assert f'{bad} line 1: needs a "prompt"' in error_of("--adapter", lora, "--prompts", bad)
    bad.write_text('{"prompt": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    message = error_of("--adapter", lora, "--prompts", bad)
    assert f"{bad} line 2" in message and "chat template" in message
    message = error_of("--adapter", lora, "--chat")  # the MiniLM tokenizer has no chat template
    assert message.startswith("error: --chat:") and "no chat template" in message
    message = error_of("--adapter", lora, "--prompt", "hi", "--show_routing")
    assert "--show_routing" in message and "'lora'" in message


def test_generate_py_chat_keeps_the_history(base_dir, tmp_path):
    """Two turns on stdin: each reply is what greedy generation gives for the whole conversation so
    far, rendered with the chat template training used (the adapter's own)."""
    import subprocess

    from tests.helpers.launch_utils import launch_env

    chat_dir = write_adapter_dir(tmp_path / "chat", base_dir, "adamole",
                                 meta={"prompt_format": "chat", "chat_template": CHAT_TEMPLATE})
    proc = subprocess.run([sys.executable, str(GENERATE), "--adapter", str(chat_dir), "--chat", "--max_new_tokens",
                           "4", "--device", "cpu"], input="hi there\nwhat now\n/exit\n", env=launch_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = [part.strip() for part in proc.stdout.split("assistant> ")[1:]]
    replies = [r.split("\n")[0] for r in replies]

    gen = generate_module()
    model, tokenizer = adamole_dist.from_pretrained(chat_dir)
    renderer = gen.PromptRenderer(tokenizer, "chat")
    history, expected = [], []
    for line in ("hi there", "what now"):
        history.append({"role": "user", "content": line})
        [reply] = gen.generate_batch(model, tokenizer, [renderer.ids({"messages": history})],
                                     {"max_new_tokens": 4, "do_sample": False})
        history.append({"role": "assistant", "content": reply["text"]})
        expected.append(reply["text"])
    assert replies == expected and expected[0] != expected[1]


# -- issue 40 -----------------------------------------------------------------------------------------------
def refused_by_the_script(*args, expect: list[str]) -> str:
    """launch/generate.py as a real process: exit 2, stderr one ``error:`` line holding every part."""
    proc = cli(*args, "--device", "cpu", "--max_new_tokens", 2)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in expect:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


def test_out_that_is_the_prompt_file_is_refused_leaving_it_intact(adapter_dirs, tmp_path):
    """Case 1: the prompts were read, the model loaded, then --out opened for writing emptied them."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("one", "two", "three")))
    before = prompts.read_bytes()
    link = tmp_path / "same.jsonl"
    link.hardlink_to(prompts)  # the same file under another name is the same file
    for out in (prompts, link):
        refused_by_the_script("--adapter", adapter_dirs["lora"], "--prompts", prompts, "--out", out,
                              expect=["--out (", "is the --prompts file", "would destroy what the command reads"])
    assert prompts.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "same.jsonl"]


ENCODER = "encoder"  # a row's adapter: the seq_cls adapter made in the test
GENERATE_CASES = {  # case 8, through the script: name -> (prompt file text or None, args, parts of the message)
    "out_a_directory": (None, ["--out", "DIR"], ["--out (", "is a directory"]),
    "out_unwritable": (None, ["--out", "/proc/adamole-no-such-place/o.jsonl"], ["cannot be written"]),
    "alpaca_input_not_a_string": ('{"prompt": "name a colour", "input": 5}\n', ["--format", "alpaca"],
                                  ["p.jsonl line 1: field 'input' must be a string, not int"]),
    "empty_prompt_as_text": ('{"prompt": ""}\n', ["--format", "text"], ["p.jsonl line 1: field 'prompt' is empty"]),
    "unknown_role_training_refuses": ('{"messages": [{"role": "narrator", "content": "once"}]}\n', [],
                                      ["p.jsonl line 1: field 'messages[0].role' ('narrator') is not a known role"]),
    "an_encoder_adapter": ('{"prompt": "hi"}\n', ["--adapter", ENCODER],
                           ["was trained on an encoder (seq_cls", "needs a decoder (causal_lm)"]),
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_generate_py_refuses_before_generating(adapter_dirs, tmp_path, name):
    text, extra, expect = GENERATE_CASES[name]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(text or '{"prompt": "hi"}\n')
    if ENCODER in extra:
        from tests.helpers.saved_adapters import seq_cls_adapter

        extra = [str(seq_cls_adapter(tmp_path / "encoder")) if a == ENCODER else a for a in extra]
    extra = [str(tmp_path / "a_dir") if a == "DIR" else a for a in extra]
    (tmp_path / "a_dir").mkdir()
    args = ["--adapter", adapter_dirs["lora"], "--prompts", prompts, *extra]
    if "--adapter" in extra:
        args = args[2:]
    refused_by_the_script(*args, expect=expect)
    assert not list((tmp_path / "a_dir").iterdir())


def test_chat_mode_renders_alpaca_input_as_training_did(base_dir, tmp_path):
    """Case 9: --alpaca_as_chat trains on the user turn "instruction, blank line, input"; a prompt record
    with an "input" is rendered into exactly that turn (it kept only "prompt")."""
    from adamole_dist.data.conversations import normalise_record
    from adamole_dist.data.sft_render import RenderSpec, sample_prompt

    chat_dir = write_adapter_dir(tmp_path / "chat", base_dir, "lora", meta={
        "prompt_format": "chat", "chat_template": CHAT_TEMPLATE, "data_format": "alpaca"})
    _, tokenizer = adamole_dist.from_pretrained(chat_dir)
    gen = generate_module()
    renderer = gen.PromptRenderer(tokenizer, gen.resolve_format("auto", {"prompt_format": "chat"}, tokenizer))
    record = {"instruction": "name the colour", "input": "of the sky at noon", "output": "blue"}
    spec = RenderSpec(tokenizer=str(tmp_path / "chat"), data_format="alpaca", max_length=64,
                      chat_template=CHAT_TEMPLATE, alpaca_as_chat=True)
    tokenizer.save_pretrained(tmp_path / "chat")  # the spec loads its tokenizer by path, as training does
    trained, _ = sample_prompt(normalise_record(record, "alpaca", "train.jsonl record 0", alpaca_as_chat=True), spec)
    assert renderer.ids({"prompt": record["instruction"], "input": record["input"]}) == trained
    assert "of the sky at noon" in tokenizer.decode(trained)
    assert renderer.ids({"prompt": record["instruction"]}) != trained  # the input matters


def test_a_seed_gives_each_prompt_its_sample_at_any_batch_size(adapter_dirs, tmp_path):
    """Case 15: sampling drew every row from one generator, so --seed reproduced samples only at the same
    --batch_size; now each prompt draws from its own (--seed, its index)."""
    main = generate_module().main
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ("the cat sat", "hello", "this is a much longer prompt than the others", "a")))

    def sampled(batch_size: int, seed: int) -> list[str]:
        out = tmp_path / f"out_{batch_size}_{seed}.jsonl"
        assert main(["--adapter", str(adapter_dirs["adamole"]), "--prompts", str(prompts), "--out", str(out),
                     "--temperature", "1.5", "--top_p", "0.95", "--seed", str(seed), "--batch_size", str(batch_size),
                     "--max_new_tokens", "8", "--device", "cpu"]) == 0
        return [json.loads(line)["completion"] for line in out.read_text().splitlines()]

    one, all_four, odd = sampled(1, 7), sampled(4, 7), sampled(3, 7)
    assert one == all_four == odd
    assert sampled(4, 8) != one  # another seed, other samples
    assert len(set(one)) > 1


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    from adamole_dist.generation.sampling import nucleus

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02]])
    kept = nucleus(probs, 0.8)
    torch.testing.assert_close(kept, torch.tensor([[0.625, 0.375, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    assert nucleus(probs, 1.0) is probs
