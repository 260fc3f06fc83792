"""Continuous batching (generation/continuous.py) against each sequence generated alone by ``generate``:
sequences that join a running batch at different steps, with prompts of different lengths, and leave it at
different steps get, at every generated token, the logits (and so the greedy token) they get alone; the
adapters route each real token once and never padding; dropping rows trims the columns nobody uses.
Per-row sampling and log-probabilities (sampling.py) and the incremental text (incremental_text.py) too."""

from __future__ import annotations

import pytest
import torch

import adamole_dist
from adamole_dist.generation.continuous import RunningBatch, prefill
from adamole_dist.generation.incremental_text import IncrementalText
from adamole_dist.generation.logprobs import prompt_logprobs, token_logprob
from adamole_dist.generation.sampling import Sampling, choose
from adamole_dist.moe.routing_stats import STAT_TOKENS
from tests.helpers.saved_adapters import write_adapter_dir
from tests.helpers.tiny_models import write_tiny_llama

ATOL, RTOL = 1e-5, 1e-4  # fp32: attention over a padded, merged cache sums in another order
# prompt ids, the step it joins at, how many tokens it generates
PLAN = [([101, 1996, 4937, 2938, 2006, 1996, 13523], 0, 9), ([101, 7592, 2088], 0, 3),
        ([101, 2023, 2003, 1037, 3231], 2, 6), ([101, 2307, 2154, 2000, 2017, 2651, 2003, 2204, 2000], 4, 4)]


@pytest.fixture(scope="module", params=["adamole", "lora"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    base = write_tiny_llama(root / "base")
    net, _ = adamole_dist.from_pretrained(write_adapter_dir(root / request.param, base, request.param, seed=1))
    return net


def alone(model, prompt: list[int], new_tokens: int) -> torch.Tensor:
    """The logits [new_tokens, V] of greedy generation of ``prompt`` alone (``generate``, no eos stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return torch.cat(out.logits)


def run_plan(model) -> dict[int, list[torch.Tensor]]:
    """PLAN through one RunningBatch, the greedy token fed back (the eos too: no stop here); per sequence the
    logits of each token it generated."""
    batch, rows, logits_of = RunningBatch(), [], {i: [] for i in range(len(PLAN))}
    last: dict[int, int] = {}
    step = 0
    with torch.no_grad():
        while step == 0 or rows:
            joiners = [i for i, (_, at, _) in enumerate(PLAN) if at == step]
            if joiners:
                cache, mask, logits = prefill(model, [PLAN[i][0] for i in joiners], pad_id=0)
                batch.add(cache, mask)
                rows += joiners
                for i, row in zip(joiners, logits):
                    logits_of[i].append(row)
                    last[i] = int(row.argmax())
            staying = [k for k, i in enumerate(rows) if len(logits_of[i]) < PLAN[i][2]]
            batch.keep(staying)
            rows = [rows[k] for k in staying]
            if rows:
                for i, row in zip(rows, batch.step(model, [last[i] for i in rows])):
                    logits_of[i].append(row)
                    last[i] = int(row.argmax())
                staying = [k for k, i in enumerate(rows) if len(logits_of[i]) < PLAN[i][2]]
                batch.keep(staying)
                rows = [rows[k] for k in staying]
            step += 1
    return logits_of


def test_joining_and_leaving_sequences_compute_what_they_compute_alone(model):
    adapters = model.adamole_adapters
    adapters.context.pop_stats()
    batched = run_plan(model)
    stats = adapters.context.pop_stats()
    for i, (prompt, _, new_tokens) in enumerate(PLAN):
        mine = torch.stack(batched[i])
        reference = alone(model, prompt, new_tokens)
        torch.testing.assert_close(mine, reference, atol=ATOL, rtol=RTOL)
        assert mine.argmax(-1).tolist() == reference.argmax(-1).tolist()  # the same greedy tokens
    if adapters.cfg.is_moe:  # every real token routed once, padding never: prompts + each fed-back token
        real = sum(len(p) + n - 1 for p, _, n in PLAN)
        assert {int(s[STAT_TOKENS]) for s in stats.values()} == {real}


def test_keep_drops_rows_and_the_columns_only_they_used(model):
    long, short = [101] + [2000] * 11, [101, 2001]
    batch = RunningBatch()
    with torch.no_grad():
        for prompt in (short, long):
            cache, mask, _ = prefill(model, [prompt], pad_id=0)
            batch.add(cache, mask)
        assert batch.width == len(long) and batch.mask_BC[0].tolist() == [0] * 10 + [1, 1]
        batch.step(model, [2002, 2003])
        batch.keep([0])  # the long one leaves: the short one's padding goes with it
    assert batch.size == 1 and batch.width == 3 and batch.mask_BC.tolist() == [[1, 1, 1]]
    assert all(layer.keys.shape[:3] == (1, layer.keys.shape[1], 3) for layer in batch.cache.layers)
    batch.keep([])
    assert batch.size == 0 and batch.cache is None


def test_prompt_logprobs_are_a_full_forward_s_log_softmax(model):
    prompt = PLAN[0][0]
    with torch.no_grad():
        _, _, logits = prefill(model, [prompt], pad_id=0, all_logits=True)
        full = model(input_ids=torch.tensor([prompt])).logits[0]
    entries = prompt_logprobs(logits[0], prompt, k=3)
    expected = torch.log_softmax(full, -1)
    assert entries[0] == (None, [])
    for pos, (lp, top) in enumerate(entries[1:]):
        assert lp == pytest.approx(float(expected[pos, prompt[pos + 1]]), abs=1e-5)
        assert [t for t, _ in top] == expected[pos].topk(3).indices.tolist()


def test_choose_greedy_nucleus_and_seeded_draws():
    logits = torch.tensor([1.0, 3.0, 2.0, float("-inf")])
    assert choose(logits, Sampling()) == 1
    assert {choose(logits, Sampling(temperature=1.0, top_p=0.1)) for _ in range(20)} == {1}  # the nucleus is one
    draws = [choose(logits, Sampling(temperature=1.5, seed=7), Sampling(temperature=1.5, seed=7).generator("cpu"))
             for _ in range(5)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    gen = Sampling(temperature=1.5, seed=7).generator("cpu")
    assert 3 not in {choose(logits, Sampling(temperature=1.5), gen) for _ in range(200)}  # -inf never drawn
    lp, top = token_logprob(logits, 2, k=2)
    assert lp == pytest.approx(float(torch.log_softmax(logits, -1)[2])) and [t for t, _ in top] == [1, 2]


class PieceTokenizer:
    """A pure stand-in for a tokenizer's decode: ids index text pieces; piece "<e1>" is the first byte of
    "é", shown as U+FFFD unless "<e2>" (its second byte) follows."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("<e1><e2>", "é").replace("<e1>", "\ufffd").replace("<e2>", "")


def test_incremental_text_holds_back_stop_prefixes_and_incomplete_characters():
    tok = PieceTokenizer(["caf", "<e1>", "<e2>", " and", " th", "en", " END", "!"])
    text = IncrementalText(tok, stops=[" then", "STOP"])
    assert [text.push(t) for t in (0, 1, 2, 3)] == ["caf", "", "é", " and"]
    assert text.push(4) == ""  # " th" may begin " then"
    assert text.push(5) == "" and text.stopped and text.text == "café and"  # it did: the text ends before it
    other = IncrementalText(tok, stops=[" then"])
    pieces = [other.push(t) for t in (0, 3, 4, 6)]
    assert pieces == ["caf", " and", "", " th END"] and not other.stopped  # " th" was not " then" after all
    assert other.push(7) == "!" and other.flush() == ""
