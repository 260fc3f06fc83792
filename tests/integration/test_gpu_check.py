"""benchmarks/gpu/gpu_check.py --smoke: the GPU acceptance script's own code, run on the CPU with tiny shapes
so it never rots between the GPUs that run it for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "benchmarks" / "gpu" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    sections = {r["section"] for r in records}
    assert sections == {"device", "layer", "train", "levers", "memory", "generate"}
    layer = [r for r in records if r["section"] == "layer"]
    assert {r["method"] for r in layer} >= {"lora", "adamole", "mole_topk", "sira", "mole_threshold", "peft_lora"}
    assert {r["dtype"] for r in layer} == {"bfloat16", "float32"}
    train = {(r["system"], r["method"]): r for r in records if r["section"] == "train"}
    assert set(train) == {("adamole_dist", "adamole"), ("adamole_dist", "lora"), ("peft", "lora")}
    for r in train.values():
        assert r["tokens_per_s"] > 0 and r["host_reads_per_step"]["adamole_dist"] <= 2
    levers = {(r["attn_implementation"], r["compile"]): r for r in records if r["section"] == "levers"}
    assert set(levers) == {("sdpa", False), ("sdpa", True)}  # no flash attention on a CPU
    assert all(r["tokens_per_s"] > 0 for r in levers.values()) and levers[("sdpa", False)]["vs_eager_sdpa"] == 1.0
    memory = {r["lever"]: r for r in records if r["section"] == "memory"}
    assert len(memory) == 6 and not any("failed" in r for r in memory.values())
    assert all(r["planned_mb"] > 0 for r in memory.values())
    ran = [r for r in memory.values() if "skipped" not in r]  # a CPU: every lever but the activation offload
    assert [r["lever"] for r in memory.values() if "skipped" in r] == ["chunked, checkpointing, activation offload"]
    assert len(ran) == 5 and all(r["tokens_per_s"] > 0 for r in ran)
    assert "NCCL all-to-all" in proc.stdout and "[train]" in proc.stdout and "[memory]" in proc.stdout
