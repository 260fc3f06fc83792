"""The multiple-choice task types: how examples are trained on and scored.

* ``causal_lm`` (:class:`CausalLMTask`) — decoder LMs. Train on prompt + target (+ eos), the
  loss on the target tokens only (``loss_on="answer"``, default) or on every non-padding token
  (``loss_on="full"``, the public reference's behaviour). Predict a multiple-choice answer from
  the candidates' log-probabilities at the answer position: when their first tokens differ,
  compare those (one forward of the prompt); otherwise compare each candidate's summed token
  log-probability (prompt + candidate, teacher forced, all candidates in one padded forward).
* ``seq_cls`` (:class:`ChoiceScoringTask`) — encoders with a 1-logit sequence-classification
  head: each (context, choice text) pair gets a score; cross entropy over an example's choices.

The interface and its conventions (keyword calls, one forward per ``predict``, autocast) are in
data/task.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import LM_FRAMINGS
from adamole_dist.data.examples import IGNORE, Example
from adamole_dist.data.sft_render import eos_of, special_prefix
from adamole_dist.data.task import Task, mask_of, pad_right, tail

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# -- causal LM --------------------------------------------------------------------------------------
def question_answer(ex: Example) -> Example:
    """lm-evaluation-harness's multiple-choice framing (ARC, OpenBookQA): 'Question: ...\nAnswer:'
    continued by each choice's text; the target is the correct choice's text."""
    candidates = [" " + t for t in ex.choice_texts]
    return Example(ex.context, ex.choice_texts, f"Question: {ex.context}\nAnswer:", candidates, ex.label,
                   candidates[ex.label])


class CausalLMTask(Task):
    """``framing``: "instruction" keeps the record's own prompt and answer tokens (the paper's set-up:
    candidates "answer1".. read at the answer position); "question_answer" trains and scores the
    harness's way (``question_answer``): every candidate by its summed log-likelihood ("acc") and
    by that sum over its length in characters ("acc_norm")."""

    decoder = True

    def __init__(self, tokenizer, max_length: int, loss_on: str = "answer", device=None,
                 framing: str = "instruction", autocast: str = "none") -> None:
        super().__init__(tokenizer, max_length, device, autocast)
        if loss_on not in ("answer", "full"):
            raise ValueError(f"loss_on ({loss_on!r}) must be 'answer' or 'full'")
        if framing not in LM_FRAMINGS:
            raise ValueError(f"lm_framing ({framing!r}) must be one of {', '.join(LM_FRAMINGS)}")
        self.framing = framing
        self.metrics = ("acc", "acc_norm") if framing == "question_answer" else ("acc",)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has neither a pad nor an eos token to pad causal-LM batches with")
            tokenizer.pad_token = tokenizer.eos_token  # padding never counts: labels and mask come from lengths
        self.loss_on = loss_on
        self.pad_id = tokenizer.pad_token_id
        self.eos = eos_of(tokenizer)
        self.prefix = special_prefix(tokenizer)  # BOS (or [CLS]); what the tokenizer appends is left out
        if max_length < len(self.prefix) + 2:
            raise ConfigError(f"max_length ({max_length}) leaves no room for a prompt token and an answer token; "
                              f"it must be at least {len(self.prefix) + 2}")

    def encode_prompt(self, prompt: str, room: int) -> list[int]:
        """Special prefix + prompt ids, cut from the LEFT to ``room`` ids so the end (the answer
        lead-in right before the candidate) always survives."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.prefix + tail(ids, room - len(self.prefix))

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def framed(self, ex: Example) -> Example:
        return question_answer(ex) if self.framing == "question_answer" else ex

    def encode_example(self, ex: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels) of prompt + target + eos; the target is shortened only when it
        alone would not fit next to one prompt token."""
        ex = self.framed(ex)
        target = (self.encode_continuation(ex.target) + self.eos)[: self.max_length - len(self.prefix) - 1]
        prompt = self.encode_prompt(ex.prompt, self.max_length - len(target))
        prompt_labels = list(prompt) if self.loss_on == "full" else [IGNORE] * len(prompt)
        return prompt + target, prompt_labels + target

    def collate(self, examples: list[Example]) -> dict:
        ids, labels = zip(*(self.encode_example(ex) for ex in examples))
        return {"input_ids": pad_right(list(ids), self.pad_id), "attention_mask": mask_of(list(ids)),
                "labels": pad_right(list(labels), IGNORE)}

    def loss(self, model, batch: dict) -> torch.Tensor:
        b = self.to_device(batch, self.device_for(model))
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        if self.chunked_head is not None:  # the mean over the targets, as cross_entropy's with ignore_index
            return self.chunked_loss(model, b, inputs) / (b["labels"][:, 1:] != IGNORE).sum()
        logits = self.forward(model, **inputs).logits
        # position t predicts token t+1
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)

    def eval_batch(self, examples: list[Example]) -> dict:
        """Rows to run, and per example a plan for reading its candidates' scores:
        ("first", row, answer position, first token ids) when the first tokens tell the
        candidates apart (the prompt alone is run), else ("sum", [(row, start, token ids), ...])
        with one prompt + candidate row per candidate."""
        seqs: list[list[int]] = []
        plans: list[tuple] = []
        examples = [self.framed(ex) for ex in examples]
        for i, ex in enumerate(examples):
            cands = [self.encode_continuation(c) for c in ex.candidates]
            if not all(cands):
                raise ValueError(f"example {i}: a candidate of {ex.candidates} tokenises to nothing")
            # the same prompt cut as in training (target + eos), keeping at least one prompt token
            room = max(self.max_length - max(map(len, cands)) - len(self.eos), len(self.prefix) + 1)
            prompt = self.encode_prompt(ex.prompt, room)
            firsts = [c[0] for c in cands]
            if len(set(firsts)) == len(firsts) and self.framing == "instruction":
                plans.append(("first", len(seqs), len(prompt) - 1, firsts))
                seqs.append(prompt)
            else:
                rows = []
                for c in cands:
                    rows.append((len(seqs), len(prompt), c))
                    seqs.append(prompt + c)
                plans.append(("sum", rows))
        return {"input_ids": pad_right(seqs, self.pad_id), "attention_mask": mask_of(seqs), "plans": plans,
                "candidate_chars": [self.norm_lengths(ex) for ex in examples]}

    def norm_lengths(self, ex: Example) -> list[int]:
        """acc_norm's divisor per candidate, as lm-evaluation-harness defines it: the length in characters
        of the choice as the task's doc_to_choice gives it, i.e. the choice text WITHOUT the " " that
        joins it to the prompt (lm_eval/api/task.py: ``completion_len = len(choice)``; the target
        delimiter is added only to the scored continuation)."""
        if self.framing == "question_answer":
            return [len(t) for t in ex.choice_texts]
        return [len(c) for c in ex.candidates]

    @torch.no_grad()
    def candidate_scores(self, model, batch: dict) -> list[torch.Tensor]:
        """Per example, one score per candidate (log-prob of its first token, or of all its tokens)."""
        b = self.to_device(batch, self.device_for(model))
        logits = self.forward(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out = []
        for plan in b["plans"]:  # log-softmax only at the positions read, not over [R, S, V]
            if plan[0] == "first":
                _, row, pos, firsts = plan
                out.append(logits[row, pos].float().log_softmax(-1)[firsts].cpu())
            else:
                sums = []
                for row, start, c in plan[1]:
                    logp = logits[row, start - 1 : start - 1 + len(c)].float().log_softmax(-1)
                    at = torch.arange(len(c), device=logp.device)
                    sums.append(logp[at, torch.tensor(c, device=logp.device)].sum())
                out.append(torch.stack(sums).cpu())
        return out

    def predict(self, model, batch: dict) -> torch.Tensor:
        return self.predictions(model, batch)["acc"]

    def predictions(self, model, batch: dict) -> dict[str, torch.Tensor]:
        scores = self.candidate_scores(model, batch)
        out = {"acc": torch.tensor([int(s.argmax()) for s in scores], dtype=torch.long)}
        if self.framing == "question_answer":  # the harness's acc_norm: log-likelihood per character
            out["acc_norm"] = torch.tensor([int((s / torch.tensor(n, dtype=s.dtype)).argmax())
                                            for s, n in zip(scores, batch["candidate_chars"])], dtype=torch.long)
        return out


# -- encoder choice scoring -----------------------------------------------------------------------------
class ChoiceScoringTask(Task):
    """An encoder scores each (context, choice text) pair; cross entropy over an example's choices.
    Examples with fewer choices are padded with empty pairs that ``choice_mask`` masks out.

    Cut to ``max_length`` as the causal path cuts its prompt: the context from the LEFT (its end, the
    question right before the choice, survives), the choice only when it alone would not fit beside
    one context token, the pair's special tokens always kept."""

    def __init__(self, tokenizer, max_length: int, device=None, autocast: str = "none") -> None:
        super().__init__(tokenizer, max_length, device, autocast)
        self.specials = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length < self.specials + 2:
            raise ConfigError(f"max_length ({max_length}) leaves no room for a context token and a choice token "
                              f"beside the {self.specials} special tokens of a (context, choice) pair; "
                              f"it must be at least {self.specials + 2}")

    def kept_positions(self, sequence_ids: list[int | None]) -> list[int]:
        """Positions of an encoded pair that survive the cut (``sequence_ids``: 0 context, 1 choice,
        None special)."""
        context = [j for j, s in enumerate(sequence_ids) if s == 0]
        choice = [j for j, s in enumerate(sequence_ids) if s == 1]
        room = self.max_length - self.specials
        choice = choice[: room - min(len(context), 1)]
        context = tail(context, room - len(choice))
        keep = set(context) | set(choice)
        return [j for j, s in enumerate(sequence_ids) if s is None or j in keep]

    def encode_pairs(self, contexts: list[str], choices: list[str]) -> dict:
        """Padded encoder inputs of the (context, choice) pairs, each cut as the class docstring says."""
        enc = self.tokenizer(contexts, choices)  # whole: the cut is ours (the tokenizer's keeps the context's start)
        names = [k for k in ENCODER_INPUTS if k in enc]
        rows = {k: [] for k in names}
        for i in range(len(contexts)):
            keep = self.kept_positions(enc.sequence_ids(i))
            for k in names:
                rows[k].append([enc[k][i][j] for j in keep])
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        return {k: pad_right(rows[k], pad[k]) for k in names}

    def collate(self, examples: list[Example]) -> dict:
        width = max(len(ex.choice_texts) for ex in examples)
        contexts, choices, mask = [], [], []
        for ex in examples:
            n = len(ex.choice_texts)
            contexts += [ex.context] * width
            choices += list(ex.choice_texts) + [""] * (width - n)
            mask.append([True] * n + [False] * (width - n))
        batch = self.encode_pairs(contexts, choices)
        batch["choice_mask"] = torch.tensor(mask, dtype=torch.bool)
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return batch

    def scores(self, model, batch: dict) -> torch.Tensor:
        """[B, C] pair scores, -inf at padded choices."""
        b = self.to_device(batch, self.device_for(model))
        logits = self.forward(model, **{k: b[k] for k in ENCODER_INPUTS if k in b}).logits
        scores = logits.float().view(b["choice_mask"].shape)
        return scores.masked_fill(~b["choice_mask"], float("-inf"))

    def loss(self, model, batch: dict) -> torch.Tensor:
        scores = self.scores(model, batch)
        return F.cross_entropy(scores, batch["labels"].to(scores.device))

    def eval_batch(self, examples: list[Example]) -> dict:
        return self.collate(examples)

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return self.scores(model, batch).argmax(-1).cpu()
