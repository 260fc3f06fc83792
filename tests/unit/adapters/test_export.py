"""launch/export.py: a lora adapter as a PEFT directory and as a merged HF model folder, both giving
our logits; MoE adapters refused for both; the model card; bad input exits 2 writing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from adamole_dist.adapters.files import adapter_state, save_adapter
from adamole_dist.adapters.inject import inject_adapters
from adamole_dist.config.adapter import AdapterConfig
from tests.helpers.tiny_models import write_tiny_llama

ATOL = 1e-5  # fp32; the merged weights are W + s*B*A rounded once to fp32 (the adapter adds s*B*(A x))
IDS = torch.tensor([[101, 2054, 2003, 1996, 3437, 1029, 102, 2748]])


def base_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def trained_adapter(tmp_path: Path, method: str, run_files: bool = False) -> tuple[Path, Path, torch.Tensor]:
    """(base folder, adapter dir, our logits) for an adapter with random non-zero LoRA B."""
    base = write_tiny_llama(tmp_path / "base")
    model = base_model(base)
    cfg = AdapterConfig(method=method, num_experts=4, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    adapters = inject_adapters(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(model.parameters()) + adapters.expert_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)
    model.eval()
    adapters.expert_module.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    adapter_dir = tmp_path / "run" / "adapter"
    meta = {"base_model": str(base), "base_model_path": str(base), "task_type": "causal_lm", "pooling": "cls",
            "trainable_modules": [], "step": 5}
    save_adapter(adapter_dir, adapter_state(adapters), cfg, meta)
    if run_files:
        (adapter_dir.parent / "run_config.json").write_text(json.dumps({"dataset": "ARC-Easy"}))
        (adapter_dir.parent / "final_metrics.json").write_text(json.dumps({"accuracy": 0.61, "acc_norm": 0.64,
                                                                            "step": 5}))
    return base, adapter_dir, logits


def export(*args: str) -> int:
    from adamole_dist.cli.export import main  # launch/export.py, adamole-export

    return main([str(a) for a in args])


def test_peft_export_gives_our_logits(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a dev extra")
    base, adapter_dir, ours = trained_adapter(tmp_path, "lora", run_files=True)
    assert export(adapter_dir, "--out", tmp_path / "peft", "--format", "peft") == 0
    loaded = peft.PeftModel.from_pretrained(base_model(base), str(tmp_path / "peft")).eval()
    lora_layers = [n for n, _ in loaded.named_modules() if n.endswith("lora_A")]
    assert len(lora_layers) == 4  # q_proj and v_proj of 2 layers, nothing else
    with torch.no_grad():
        theirs = loaded(input_ids=IDS).logits
    assert not torch.allclose(ours, base_model(base)(input_ids=IDS).logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])


MERGED_CHECK = textwrap.dedent("""
    import importlib.abc, sys
    class NoAdamole(importlib.abc.MetaPathFinder):  # as if adamole_dist were not installed
        def find_spec(self, name, path=None, target=None):
            if name == "adamole_dist" or name.startswith("adamole_dist."):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, NoAdamole())
    try:
        import adamole_dist
        raise SystemExit("adamole_dist is importable")
    except ModuleNotFoundError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(sys.argv[1])
    assert not [m for m in sys.modules if m.split(".")[0] == "adamole_dist"]
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor(eval(sys.argv[2]))).logits, sys.argv[3])
""")


def test_merged_folder_loads_in_plain_transformers(tmp_path):
    base, adapter_dir, ours = trained_adapter(tmp_path, "lora")
    merged = tmp_path / "merged"
    assert export(adapter_dir, "--out", merged, "--merge") == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer_config.json").is_file()
    script = tmp_path / "check.py"
    script.write_text(MERGED_CHECK)
    out = tmp_path / "logits.pt"
    done = subprocess.run([sys.executable, "-I", str(script), str(merged), str(IDS.tolist()), str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("flags", [["--merge"], ["--format", "peft"]])
def test_moe_adapter_cannot_be_merged_or_made_peft(tmp_path, capsys, flags):
    _, adapter_dir, _ = trained_adapter(tmp_path, "adamole")
    capsys.readouterr()  # the tiny model's save progress bars
    assert export(adapter_dir, "--out", tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert "adamole" in err and "per token" in err and "from_pretrained" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_adamole_format_is_self_contained_with_a_model_card(tmp_path):
    from adamole_dist.adapters.files import load_adapter

    base, adapter_dir, ours = trained_adapter(tmp_path, "adamole", run_files=True)
    out = tmp_path / "bundle"
    assert export(adapter_dir, "--out", out, "--format", "adamole") == 0
    doc = json.loads((out / "adapter_config.json").read_text())
    assert doc["base_model_path"] == str(base)
    assert (out / "tokenizer_config.json").is_file()
    model = base_model(base)
    adapters = load_adapter(model, out)
    adapters.expert_module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ours, atol=ATOL, rtol=0)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == str(base) and meta["library_name"] == "adamole_dist"
    assert "adamole" in meta["tags"] and meta["datasets"] == ["ARC-Easy"]
    assert meta["metrics"] == ["acc_norm", "accuracy"]
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"accuracy": 0.61, "acc_norm": 0.64}


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    assert export(tmp_path / "missing", "--out", tmp_path / "o1") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "not_adapter").mkdir()
    assert export(tmp_path / "not_adapter", "--out", tmp_path / "o2") == 2
    assert "not an adapter directory" in capsys.readouterr().err
    _, adapter_dir, _ = trained_adapter(tmp_path, "lora")
    capsys.readouterr()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert export(adapter_dir, "--out", busy, "--format", "peft") == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # --overwrite replaces only a folder an earlier export wrote (it lists its files), never someone's files
    assert export(adapter_dir, "--out", busy, "--format", "peft", "--overwrite") == 2
    assert "keep.txt, which no earlier export wrote" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    earlier = tmp_path / "earlier"
    assert export(adapter_dir, "--out", earlier, "--format", "peft") == 0
    assert export(adapter_dir, "--out", earlier, "--format", "adamole", "--overwrite") == 0
    assert (earlier / "tokenizer_config.json").is_file() and json.loads(
        (earlier / ".written_files.json").read_text())["written_by"] == "adamole_dist export"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def test_overwrite_never_deletes_the_training_run(tmp_path):
    """Issue 40, case 2: ``export RUN/adapter --out RUN --overwrite`` deleted the run the adapter came from
    (checkpoints, metrics.jsonl, run_config.json) and said "exported". Through the script, as a user runs it:
    exit 2, one line, every byte of the run as it was; so for a folder holding the run, and one inside it."""
    from tests.helpers.launch_utils import REPO, run

    _, adapter_dir, _ = trained_adapter(tmp_path, "lora", run_files=True)
    run_dir = adapter_dir.parent
    (run_dir / "checkpoints" / "step_0000005").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0000005" / "trainer_state.json").write_text('{"step": 5}')
    (run_dir / "checkpoints" / "latest").write_text("step_0000005")
    (run_dir / "metrics.jsonl").write_text('{"step": 5, "kind": "train", "task_loss": 1.0}\n')
    before = snapshot(tmp_path)
    for out, says in ((run_dir, "is the training run"), (tmp_path, "holds the adapter folder"),
                      (run_dir / "checkpoints", "is inside the training run")):
        proc = run([sys.executable, str(REPO / "launch" / "export.py"), str(adapter_dir), "--out", str(out),
                    "--overwrite"], timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --out ({out})") and says in lines[0], lines
        assert "exported" not in proc.stdout
        assert snapshot(tmp_path) == before


def test_the_base_model_is_found_by_one_rule(tmp_path, capsys):
    """Issue 40, case 10: an adapter whose recorded base folder is gone (base_model_path) but whose recorded
    name still loads: export, generate and from_pretrained all fall back to the name (export said "does
    not exist")."""
    import shutil

    import adamole_dist
    from adamole_dist.cli.generate import main as generate

    base, adapter_dir, ours = trained_adapter(tmp_path, "lora")
    moved = tmp_path / "moved_base"
    shutil.copytree(base, moved)
    doc = json.loads((adapter_dir / "adapter_config.json").read_text())
    doc.update(base_model=str(moved), base_model_path=str(tmp_path / "gone"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(doc))
    assert export(adapter_dir, "--out", tmp_path / "bundle") == 0
    assert export(adapter_dir, "--out", tmp_path / "peft", "--format", "peft") == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)
    assert generate(["--adapter", str(adapter_dir), "--prompt", "hi", "--max_new_tokens", "2", "--device", "cpu"]) == 0
    model, _ = adamole_dist.from_pretrained(adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, ours, atol=ATOL, rtol=0)
