"""Task types: how examples become batches, losses and predictions.

* ``causal_lm`` (:class:`CausalLMTask`) — decoder LMs. Train on prompt + target (+ eos), the
  loss on the target tokens only (``loss_on="answer"``, default) or on every non-padding token
  (``loss_on="full"``, the public reference's behaviour). Predict a multiple-choice answer from
  the candidates' log-probabilities at the answer position: when their first tokens differ,
  compare those (one forward of the prompt); otherwise compare each candidate's summed token
  log-probability (prompt + candidate, teacher forced, all candidates in one padded forward).
* ``seq_cls`` (:class:`ChoiceScoringTask`) — encoders with a 1-logit sequence-classification
  head: each (context, choice text) pair gets a score; cross entropy over an example's choices.

Models are always called with keyword arguments, ``attention_mask=`` included: the model may be
a DeepSpeed engine, and the adapters' forward hook reads the mask to keep padding out of
routing. Every ``predict`` call is exactly one forward pass, so ranks that evaluate the same
number of batches run the same number of ZeRO-3 parameter gathers.

``collate`` / ``eval_batch`` return CPU tensors; ``loss`` / ``predict`` move them to the task's
device (the constructor's ``device``, else the device of the model's first parameter).

Every model call goes through :meth:`Task.forward`, which runs it under ``torch.autocast`` when the
task has an ``autocast`` dtype (``"bf16"``): matmuls in bf16, parameters, gradients, optimizer
states and the loss's softmax in fp32. The backward follows the forward's dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import AUTOCASTS, LM_FRAMINGS
from adamole_dist.data import Example

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16}  # config.training.AUTOCASTS
assert set(AUTOCAST_DTYPES) == set(AUTOCASTS)
IGNORE = -100  # label of positions that do not count in the loss (cross_entropy's ignore_index)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task:
    """Common interface; see the module docstring."""

    def __init__(self, tokenizer, max_length: int, device: torch.device | str | None = None,
                 autocast: str = "none") -> None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast ({autocast!r}) must be one of {', '.join(AUTOCAST_DTYPES)}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device) if device is not None else None
        self.autocast = autocast
        self.autocast_dtype = AUTOCAST_DTYPES[autocast]

    def forward(self, model, **inputs):
        """``model(**inputs)``, under autocast when the task has an autocast dtype."""
        device = next(iter(inputs.values())).device
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return model(**inputs)

    def device_for(self, model) -> torch.device:
        if self.device is not None:
            return self.device
        param = next(iter(model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    @staticmethod
    def to_device(batch: dict, device: torch.device) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def collate(self, examples: list[Example]) -> dict:
        """Training batch (CPU tensors)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Mean task loss of a ``collate`` batch."""
        raise NotImplementedError

    def eval_batch(self, examples: list[Example]) -> dict:
        """Evaluation inputs (CPU tensors and plain data)."""
        raise NotImplementedError

    def predict(self, model, batch: dict) -> torch.Tensor:
        """Predicted choice index per example: CPU LongTensor [B]."""
        raise NotImplementedError

    metrics = ("acc",)

    def prepare_step(self, micro_batches: list[dict], world_size: int) -> None:
        """Called once per optimizer step with its collated micro batches (SFT: the loss normaliser)."""

    def predictions(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Predicted choice indices by metric (``metrics``), from one forward: {"acc": [B], ...}."""
        return {"acc": self.predict(model, batch)}


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def mask_of(seqs: list[list[int]]) -> torch.Tensor:
    return pad_right([[1] * len(s) for s in seqs], 0)


def tail(ids: list[int], n: int) -> list[int]:
    """The last ``n`` ids: all of them when there are fewer, none for n <= 0 (``ids[-0:]`` would be
    all of them, and a negative start would keep only the last n - len(ids))."""
    return ids[max(len(ids) - n, 0):] if n > 0 else []


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
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.prefix = self._special_prefix()
        if max_length < len(self.prefix) + 2:
            raise ConfigError(f"max_length ({max_length}) leaves no room for a prompt token and an answer token; "
                              f"it must be at least {len(self.prefix) + 2}")

    def _special_prefix(self) -> list[int]:
        """Special ids the tokenizer puts before the text (BOS, or BERT's [CLS]); any it appends
        after the text (EOS, [SEP]) are left out, since the prompt is continued by the answer."""
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        for k in range(len(with_special) - len(plain) + 1):
            if with_special[k : k + len(plain)] == plain:
                return with_special[:k]
        return []

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
        logits = self.forward(model, input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
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


TASK_TYPES = ("causal_lm", "seq_cls")


def build_task(task_type: str, tokenizer, max_length: int, loss_on: str = "answer", device=None,
               lm_framing: str = "instruction", autocast: str = "none", free_form: bool = False) -> Task:
    """``free_form``: tokenized SFT examples (data/sft_task.py; loss_on is then the renderer's business)."""
    if free_form:
        if task_type != "causal_lm":
            raise ValueError(f"free-form (SFT) data trains causal_lm models, not {task_type}")
        from adamole_dist.data.sft_task import SFTTask  # it builds on Task: imported here, not at the top

        return SFTTask(tokenizer, max_length, device, autocast=autocast)
    loss_on = "answer" if loss_on == "auto" else loss_on  # config.training's default: the answer for choices
    if task_type == "causal_lm":
        return CausalLMTask(tokenizer, max_length, loss_on, device, framing=lm_framing, autocast=autocast)
    if task_type == "seq_cls":
        return ChoiceScoringTask(tokenizer, max_length, device, autocast=autocast)
    raise ValueError(f"task_type ({task_type!r}) must be one of {', '.join(TASK_TYPES)}")
