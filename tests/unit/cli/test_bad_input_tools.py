"""Bad input to launch/generate.py, launch/export.py and launch/eval.py, option by option: exit 2, one
``error:`` line naming the option, file, line or record, no traceback, nothing written.

Each row runs the command's ``main`` in this process -- what the launch script runs (``sys.exit(main())``):
an exception escaping it fails the row, as a traceback would end the script. A launch per row would cost
seconds of imports each; the issue's own cases, where the process's exit and its files are the point,
run the real scripts (test_bad_input.py, tests/unit/generation/test_generate.py,
tests/unit/adapters/test_export.py, tests/integration/test_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers.saved_adapters import CHAT_TEMPLATE, seq_cls_adapter, write_adapter_dir
from tests.helpers.tiny_models import write_tiny_llama

UNWRITABLE = "/proc/adamole-no-such-place/out.jsonl"  # not creatable, even by root
MC = {"question": "Which is a fruit?", "choices": ["apple", "hammer"], "answerKey": "A"}
CHAT = {"messages": [{"role": "user", "content": "sky?"}, {"role": "assistant", "content": "blue"}]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Everything the rows read, made once: models, adapters, a training run, data and prompt files."""
    root = tmp_path_factory.mktemp("inputs")
    llama = write_tiny_llama(root / "llama")
    run = root / "run"  # a training run: its record, metrics, a checkpoint, its adapter
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"dataset": str(root / "mc"), "model": str(llama)}))
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "task_loss": 1.0}\n')
    write_adapter_dir(run / "adapter", llama, "lora", rank=2)
    for name, rows in (("mc", [MC] * 4), ("chat", [CHAT] * 4)):
        (root / name).mkdir()
        for split in ("train", "test"):
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "the sky is"}\n')
    return SimpleNamespace(root=root, llama=llama, run=run, lora=run / "adapter", prompts=prompts,
                           adamole=write_adapter_dir(root / "adamole", llama, "adamole", num_experts=2, rank=2),
                           chat=write_adapter_dir(root / "chat_adapter", llama, "lora", rank=2, meta={
                               "prompt_format": "chat", "chat_template": CHAT_TEMPLATE}),
                           bert=seq_cls_adapter(root))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def refused(capsys, main, argv: list, expect: list[str]) -> str:
    """``main(argv)``: exit 2 and one ``error:`` line (argparse's after its usage) holding every part."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "error: " in lines[-1], err[-3000:]
    if lines[-1].startswith("error: "):  # ours: stderr is that one line
        assert len(lines) == 1, lines
    else:  # argparse's: its usage, then "PROG: error: ..."
        assert lines[0].startswith("usage:") and ": error: " in lines[-1], lines
    for part in expect:
        assert part in lines[-1], f"{part!r} not in {lines[-1]!r}"
    return lines[-1]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# -- launch/generate.py: every option -----------------------------------------------------------------------
GENERATE = {  # name: (args after a plain --prompts run, built from (made, tmp); parts of the message)
    "neither_adapter_nor_model": (lambda m, t: ["--prompt", "hi"], ["--adapter or --model is required"]),
    "adapter_missing": (lambda m, t: ["--adapter", t / "nope", "--prompt", "hi"], ["nope does not exist"]),
    "adapter_of_an_encoder": (lambda m, t: ["--adapter", m.bert, "--prompt", "hi"],
                              ["--adapter", "encoder (seq_cls", "decoder"]),
    "model_missing": (lambda m, t: ["--model", t / "no_model", "--prompt", "hi"], ["no_model) does not exist"]),
    "no_prompt_source": (lambda m, t: ["--adapter", m.lora], ["one of the arguments --prompt --prompts --chat"]),
    "prompt_empty": (lambda m, t: ["--adapter", m.lora, "--prompt", " "], ["--prompt", "'prompt' is empty"]),
    "prompts_missing": (lambda m, t: ["--adapter", m.lora, "--prompts", t / "no.jsonl"], ["no.jsonl not found"]),
    "prompts_a_directory": (lambda m, t: ["--adapter", m.lora, "--prompts", t], ["is a directory"]),
    "prompts_not_json": (lambda m, t: ["--adapter", m.lora, "--prompts", write(t / "p.jsonl", '{"prompt": "a"}\n{x\n')],
                         ["p.jsonl line 2: not valid JSON"]),
    "prompts_not_utf8": (lambda m, t: ["--adapter", m.lora, "--prompts", write(t / "p.jsonl", b'{"prompt": "\xff"}\n')],
                         ["p.jsonl line 1, column 13", "byte 0xff at byte offset 12", "not UTF-8"]),
    "prompts_line_an_array": (lambda m, t: ["--adapter", m.lora, "--prompts", write(t / "p.jsonl", "[1, 2, 3]\n")],
                              ["p.jsonl line 1", "expected a JSON object", "got array"]),
    "prompts_empty_file": (lambda m, t: ["--adapter", m.lora, "--prompts", write(t / "p.jsonl", "\n")],
                           ["holds no prompts"]),
    "prompts_unknown_role": (lambda m, t: ["--adapter", m.chat, "--prompts", write(
        t / "p.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n')],
        ["p.jsonl line 1", "'messages[0].role' ('bot') is not a known role"]),
    "prompts_list_content": (lambda m, t: ["--adapter", m.chat, "--prompts", write(
        t / "p.jsonl", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}\n')],
        ["p.jsonl line 1", "'messages[0].content' is a list of content parts"]),
    "prompts_input_not_a_string": (lambda m, t: ["--adapter", m.lora, "--format", "alpaca", "--prompts", write(
        t / "p.jsonl", '{"prompt": "name it", "input": 5}\n')], ["p.jsonl line 1", "'input' must be a string"]),
    "chat_with_out": (lambda m, t: ["--adapter", m.chat, "--chat", "--out", t / "o.jsonl"],
                      ["--out applies to --prompt and --prompts"]),
    "chat_without_a_template": (lambda m, t: ["--adapter", m.lora, "--chat"], ["--chat:", "no chat template"]),
    "out_a_directory": (lambda m, t: ["--adapter", m.lora, "--prompts", m.prompts, "--out", t],
                        ["--out", "is a directory"]),
    "out_unwritable": (lambda m, t: ["--adapter", m.lora, "--prompts", m.prompts, "--out", UNWRITABLE],
                       [f"--out ({UNWRITABLE}) cannot be written"]),
    "out_the_prompt_file": (lambda m, t: ["--adapter", m.lora, "--prompts", m.prompts, "--out", m.prompts],
                            ["--out", "is the --prompts file"]),
    "out_inside_a_training_run": (lambda m, t: ["--adapter", m.lora, "--prompts", m.prompts, "--out",
                                                m.run / "completions.jsonl"], ["is inside the training run"]),
    "out_an_adapter_file": (lambda m, t: ["--adapter", m.adamole, "--prompts", m.prompts, "--out",
                                          m.adamole / "adapter_config.json"], ["a file of the --adapter folder"]),
    "format_unknown": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--format", "yaml"],
                       ["argument --format: invalid choice"]),
    "format_chat_without_a_template": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--format", "chat"],
                                       ["--prompt", "need a chat template"]),
    "max_new_tokens_0": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--max_new_tokens", 0],
                         ["--max_new_tokens (0) must be >= 1"]),
    "temperature_negative": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--temperature", -1],
                             ["--temperature (-1.0) must be >= 0"]),
    "top_p_above_1": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--top_p", 1.5],
                      ["--top_p (1.5) must be in (0, 1]"]),
    "seed_negative": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--seed", -3], ["--seed (-3) must be in"]),
    "seed_not_a_number": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--seed", "x"],
                          ["argument --seed: invalid int value"]),
    "batch_size_0": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--batch_size", 0],
                     ["--batch_size (0) must be >= 1"]),
    "show_routing_of_a_lora": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--show_routing"],
                               ["--show_routing", "'lora'"]),
    "device_unknown": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--device", "gpu7"],
                       ["--device ('gpu7') is not a device torch knows"]),
    "device_cuda_on_a_cpu_machine": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--device", "cuda:7"],
                                     ["--device (cuda:7)"]),
    "dtype_unknown": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--dtype", "int4"],
                      ["argument --dtype: invalid choice"]),
    "attn_implementation_unknown": (lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--attn_implementation",
                                                  "fast"], ["argument --attn_implementation: invalid choice"]),
    "attn_implementation_without_its_package": (
        lambda m, t: ["--adapter", m.lora, "--prompt", "hi", "--attn_implementation", "flash_attention_2"],
        ["attn_implementation (flash_attention_2)"]),
}


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_refuses(made, tmp_path, capsys, name):
    from adamole_dist.cli.generate import main

    if name == "device_cuda_on_a_cpu_machine":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    args, expect = GENERATE[name]
    argv = args(made, tmp_path)
    before, work = snapshot(made.root), snapshot(tmp_path)
    refused(capsys, main, [*argv, "--max_new_tokens", "2"] if "--max_new_tokens" not in argv else argv, expect)
    assert snapshot(made.root) == before and snapshot(tmp_path) == work


# -- launch/export.py: every option ---------------------------------------------------------------------------
def earlier_export_beside(m, t, name: str) -> Path:
    from adamole_dist.cli.export import main

    assert main([str(m.lora), "--out", str(t / "exported"), "--format", "peft"]) == 0
    write(t / "exported" / name, "mine")
    return t / "exported"


EXPORT = {
    "adapter_missing": (lambda m, t: [t / "nope", "--out", t / "o"], ["adapter directory", "nope does not exist"]),
    "adapter_dir_no_adapter": (lambda m, t: [m.root / "mc", "--out", t / "o"], ["is not an adapter directory"]),
    "out_missing": (lambda m, t: [m.lora], ["the following arguments are required: --out"]),
    "out_a_file": (lambda m, t: [m.lora, "--out", m.prompts], ["--out", "exists and is not a directory"]),
    "out_the_adapter_itself": (lambda m, t: [m.adamole, "--out", m.adamole], ["--out", "is the adapter folder"]),
    "out_holding_the_adapter": (lambda m, t: [m.adamole, "--out", m.root, "--overwrite"],
                                ["--out", "holds the adapter folder"]),
    "out_the_training_run": (lambda m, t: [m.lora, "--out", m.run, "--overwrite"], ["is the training run"]),
    "out_inside_the_training_run": (lambda m, t: [m.lora, "--out", m.run / "exported"],
                                    ["is inside the training run"]),
    "out_not_empty": (lambda m, t: [m.lora, "--out", write(t / "o" / "keep.txt", "mine").parent],
                      ["exists and is not empty", "--overwrite"]),
    "overwrite_of_a_folder_no_export_wrote": (
        lambda m, t: [m.lora, "--out", write(t / "o" / "keep.txt", "mine").parent, "--overwrite"],
        ["--overwrite", "holds keep.txt, which no earlier export wrote"]),
    "overwrite_of_an_export_beside_other_files": (
        lambda m, t: [m.lora, "--out", earlier_export_beside(m, t, "notes.txt"), "--overwrite"],
        ["also holds notes.txt, which the earlier export did not write"]),
    "format_unknown": (lambda m, t: [m.lora, "--out", t / "o", "--format", "gguf"],
                       ["argument --format: invalid choice"]),
    "format_peft_of_a_mixture": (lambda m, t: [m.adamole, "--out", t / "o", "--format", "peft"],
                                 ["--format peft needs method lora", "per token"]),
    "merge_of_a_mixture": (lambda m, t: [m.adamole, "--out", t / "o", "--merge"], ["--merge needs method lora"]),
}


@pytest.mark.parametrize("name", list(EXPORT))
def test_export_refuses(made, tmp_path, capsys, name):
    from adamole_dist.cli.export import main

    argv = EXPORT[name][0](made, tmp_path)
    before, work = snapshot(made.root), snapshot(tmp_path)
    refused(capsys, main, argv, EXPORT[name][1])
    assert snapshot(made.root) == before and snapshot(tmp_path) == work


# -- launch/eval.py: every option -------------------------------------------------------------------------------
def eval_args(m, *extra) -> list:
    return ["--adapter", m.lora, "--dataset", m.root / "mc", "--max_examples", 2, *extra]


EVAL = {
    "neither_adapter_nor_model": (lambda m, t: ["--dataset", m.root / "mc"], ["--model is required without"]),
    "adapter_missing": (lambda m, t: ["--adapter", t / "nope", "--dataset", m.root / "mc"], ["nope does not exist"]),
    "model_missing": (lambda m, t: ["--model", t / "no_model", "--dataset", m.root / "mc"],
                      ["no_model) does not exist"]),
    "lm_framing_unknown": (lambda m, t: eval_args(m, "--lm_framing", "cloze"), ["argument --lm_framing"]),
    "lm_framing_for_an_encoder": (lambda m, t: ["--adapter", m.bert, "--dataset", m.root / "mc", "--lm_framing",
                                                "question_answer"], ["lm_framing ('question_answer') applies to"]),
    "autocast_unknown": (lambda m, t: eval_args(m, "--autocast", "fp8"), ["argument --autocast: invalid choice"]),
    "dataset_missing": (lambda m, t: ["--adapter", m.lora, "--dataset", t / "no_data"], ["no_data", "no such local"]),
    "dataset_free_form": (lambda m, t: ["--adapter", m.lora, "--dataset", m.root / "chat"],
                          ["messages records are free-form (no choices to score)"]),
    "split_missing": (lambda m, t: eval_args(m, "--split", "validation"), ["no validation.json"]),
    "data_format_unknown": (lambda m, t: eval_args(m, "--data_format", "csv"), ["argument --data_format"]),
    "data_format_that_does_not_fit": (lambda m, t: eval_args(m, "--data_format", "instruction"),
                                      ["record 0: missing field 'instruction'"]),
    "max_examples_negative": (lambda m, t: eval_args(m, "--max_examples", -1), ["--max_examples (-1) must be >= 0"]),
    "max_length_0": (lambda m, t: eval_args(m, "--max_length", 0), ["--max_length (0) must be >= 1"]),
    "batch_size_0": (lambda m, t: eval_args(m, "--batch_size", 0), ["--batch_size (0) must be >= 1"]),
    "attn_implementation_without_its_package": (lambda m, t: eval_args(m, "--attn_implementation",
                                                                       "flash_attention_2"),
                                                ["attn_implementation (flash_attention_2)"]),
    "json_a_directory": (lambda m, t: eval_args(m, "--json", t), ["--json", "is a directory"]),
    "json_unwritable": (lambda m, t: eval_args(m, "--json", UNWRITABLE), [f"--json ({UNWRITABLE}) cannot be written"]),
    "json_the_dataset_file": (lambda m, t: eval_args(m, "--json", m.root / "mc" / "test.jsonl"),
                              ["--json", "a file of the --dataset folder"]),
    "json_inside_the_training_run": (lambda m, t: eval_args(m, "--json", m.run / "eval.json"),
                                     ["--json", "is inside the training run"]),
    "harness_without_tasks": (lambda m, t: eval_args(m, "--harness", ","), ["--harness needs at least one task"]),
    "harness_data_missing": (lambda m, t: eval_args(m, "--harness", "arc_easy_local", "--harness_data", t / "none"),
                             ["--harness_data", "ARC-Easy"]),
}


@pytest.mark.parametrize("name", list(EVAL))
def test_eval_refuses(made, tmp_path, capsys, name):
    from adamole_dist.cli.eval import main

    if name.startswith("harness"):
        pytest.importorskip("lm_eval", reason="lm-eval is an optional extra")
    argv = EVAL[name][0](made, tmp_path)
    before, work = snapshot(made.root), snapshot(tmp_path)
    refused(capsys, main, argv, EVAL[name][1])
    assert snapshot(made.root) == before and snapshot(tmp_path) == work


def options_of(main) -> set[str]:
    """The --options a command's --help lists."""
    import contextlib
    import io
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return set(re.findall(r"(?<![\w-])--(\w+)", out.getvalue())) - {"help"}


def test_every_option_has_a_row():
    """Each command's options appear in the names of its rows: a new option needs its row here."""
    from adamole_dist.cli.eval import main as eval_main
    from adamole_dist.cli.export import main as export_main
    from adamole_dist.cli.generate import main as generate_main

    for main, rows in ((generate_main, GENERATE), (export_main, EXPORT), (eval_main, EVAL)):
        options = options_of(main)
        assert options and {o for o in options if not any(o in name for name in rows)} == set(), main.__module__
