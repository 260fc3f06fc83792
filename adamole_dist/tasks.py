"""Task types: how examples become batches, losses and predictions.

* ``causal_lm`` — decoder LMs. Train on prompt + target (+ eos), loss on the answer tokens
  only (default) or on every token (``loss_on="full"``, the public reference's behaviour).
  Predict a multiple-choice answer from the logits of the candidates at the answer
  position: if the candidates' first tokens differ, compare those logits (one forward of the
  prompt); otherwise compare each candidate's summed token log-probability.
* ``seq_cls`` — encoders with a 1-logit sequence-classification head: each (context, choice)
  pair gets a score, softmax over an example's choices.

Models are always called with keyword arguments (``attention_mask=`` included): the adapters'
forward hook reads the mask to leave padding out of routing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Example

IGNORE = -100


class Task:
    def __init__(self, tokenizer, max_length: int, device: torch.device | str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def collate(self, examples: list[Example]) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def eval_batch(self, examples: list[Example]) -> dict:
        raise NotImplementedError

    def predict(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


class CausalLMTask(Task):
    def __init__(self, tokenizer, max_length: int, loss_on: str = "answer", device="cpu") -> None:
        super().__init__(tokenizer, max_length, device)
        if loss_on not in ("answer", "full"):
            raise ValueError(f"loss_on ({loss_on!r}) must be 'answer' or 'full'")
        self.loss_on = loss_on
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id

    def encode_prompt(self, prompt: str, room: int) -> list[int]:
        """Prompt ids (with the tokenizer's special prefix), cut from the left to ``room`` tokens."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) <= room:
            return ids
        n_special = 1 if self.tokenizer.bos_token_id is not None and ids[0] == self.tokenizer.bos_token_id else 0
        return ids[:n_special] + ids[len(ids) - (room - n_special):]

    def encode_continuation(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def collate(self, examples: list[Example]) -> dict:
        ids, labels = [], []
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for ex in examples:
            target = self.encode_continuation(ex.target) + eos
            target = target[: self.max_length - 2]
            prompt = self.encode_prompt(ex.prompt, self.max_length - len(target))
            ids.append(prompt + target)
            labels.append((prompt if self.loss_on == "full" else [IGNORE] * len(prompt)) + target)
        input_ids = pad_right(ids, self.pad_id)
        attention = pad_right([[1] * len(s) for s in ids], 0)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": pad_right(labels, IGNORE)}

    def loss(self, model, batch: dict) -> torch.Tensor:
        b = self.to_device(batch)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=IGNORE)

    def eval_batch(self, examples: list[Example]) -> dict:
        """Sequences to run: the prompt alone (distinct first tokens) or prompt + each candidate."""
        seqs, plans = [], []
        for ex in examples:
            cands = [self.encode_continuation(c) for c in ex.candidates]
            longest = max(len(c) for c in cands)
            prompt = self.encode_prompt(ex.prompt, self.max_length - longest)
            firsts = [c[0] for c in cands]
            if len(set(firsts)) == len(firsts):
                plans.append(("first", len(seqs), len(prompt) - 1, firsts))
                seqs.append(prompt)
            else:
                rows = []
                for c in cands:
                    rows.append((len(seqs), len(prompt), c))
                    seqs.append(prompt + c)
                plans.append(("full", rows))
        input_ids = pad_right(seqs, self.pad_id)
        attention = pad_right([[1] * len(s) for s in seqs], 0)
        return {"input_ids": input_ids, "attention_mask": attention, "plans": plans}

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        b = self.to_device(batch)
        logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float().log_softmax(-1)
        preds = []
        for plan in b["plans"]:
            if plan[0] == "first":
                _, row, pos, firsts = plan
                preds.append(int(logp[row, pos, firsts].argmax()))
            else:
                scores = []
                for row, start, cand in plan[1]:
                    positions = torch.arange(start - 1, start - 1 + len(cand), device=logp.device)
                    scores.append(logp[row, positions, torch.tensor(cand, device=logp.device)].sum())
                preds.append(int(torch.stack(scores).argmax()))
        return torch.tensor(preds, dtype=torch.long)


class ChoiceScoringTask(Task):
    """Encoder scores each (context, choice text) pair; cross entropy over an example's choices."""

    def collate(self, examples: list[Example]) -> dict:
        width = max(len(ex.choice_texts) for ex in examples)
        firsts, seconds, mask = [], [], []
        for ex in examples:
            n = len(ex.choice_texts)
            firsts += [ex.context] * width
            seconds += list(ex.choice_texts) + [""] * (width - n)
            mask.append([True] * n + [False] * (width - n))
        enc = self.tokenizer(firsts, seconds, padding=True, truncation="only_first", max_length=self.max_length,
                             return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["choice_mask"] = torch.tensor(mask)
        batch["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return batch

    def scores(self, model, batch: dict) -> torch.Tensor:
        b = self.to_device(batch)
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
        logits = model(**inputs).logits.float().view(b["choice_mask"].shape)
        return logits.masked_fill(~b["choice_mask"], float("-inf"))

    def loss(self, model, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.scores(model, batch), batch["labels"].to(self.device))

    def eval_batch(self, examples: list[Example]) -> dict:
        return self.collate(examples)

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return self.scores(model, batch).argmax(-1).cpu()


def build_task(task_type: str, tokenizer, max_length: int, loss_on: str = "answer", device="cpu") -> Task:
    if task_type == "causal_lm":
        return CausalLMTask(tokenizer, max_length, loss_on, device)
    if task_type == "seq_cls":
        return ChoiceScoringTask(tokenizer, max_length, device)
    raise ValueError(f"task_type ({task_type!r}) must be 'causal_lm' or 'seq_cls'")
