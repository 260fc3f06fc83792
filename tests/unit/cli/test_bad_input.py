"""Bad input stops launch/train.py before any work: exit code 2, a message naming the field,
and nothing written to the output directory."""

import json
from pathlib import Path

import pytest

from tests.helpers.forked_train import ForkedTrain
from tests.helpers.launch_utils import MINILM_JOB, python_cmd, run

BASE = [*MINILM_JOB, "--max_steps", "1", "--max_train_examples", "16", "--max_eval_examples", "8"]
TRAIN: ForkedTrain  # the module's launch/train.py runs: one import, a forked process per run


@pytest.fixture(scope="module", autouse=True)
def forked_train(tmp_path_factory):
    global TRAIN
    TRAIN = ForkedTrain(tmp_path_factory.mktemp("forked_train"))
    yield
    TRAIN.close()


def fails_cleanly(tmp_path, *args, expect: list[str], out_name="run"):
    out = tmp_path / out_name
    proc = TRAIN.run(["--output_dir", str(out), *BASE, *args])
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert "error:" in message
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    return out, message


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--method", "moe_magic"], ["method", "moe_magic", "adamole"]),
        (["--tau_max", "1.5"], ["adapter.tau_max", "1.5", "(0, 1]"]),
        (["--tau_max", "0"], ["adapter.tau_max", "(0, 1]"]),
        (["--method", "mole_topk", "--top_k", "9"], ["adapter.top_k", "9", "adapter.num_experts (8)"]),
        (["--num_experts", "0"], ["adapter.num_experts", "0"]),
        (["--rank", "-2"], ["adapter.rank", "-2"]),
        (["--num_experts", "6", "--ep_size", "4"], ["adapter.num_experts (6)", "ep_size (4)"]),
        (["--ep_size", "2"], ["ep_size (2)", "world size (1)"]),
        (["--method", "lora", "--ep_size", "2"], ["ep_size (2)", "MoE method"]),
        (["--pooling", "max"], ["--pooling", "'max'", "'cls', 'mean'"]),
        (["--attn_implementation", "flash_attention_2"],
         ["attn_implementation (flash_attention_2)", "flash-attn", "CUDA GPU", "eager, sdpa"]),
        (["--attn_implementation", "flex_attention"], ["attn_implementation (flex_attention)", "no backward",
                                                       "eager, sdpa"]),
        (["--attn_implementation", "paged"], ["--attn_implementation", "'paged'", "'sdpa'"]),
        (["--quantize_base", "nf4", "--compile"], ["quantize_base (nf4)", "compile"]),
        (["--quantize_base", "int4"], ["--quantize_base", "'int4'", "'nf4'"]),
        (["--loss_chunk_tokens", "0"], ["loss_chunk_tokens (0)", "positive"]),
        (["--activation_offload", "--gradient_checkpointing"], ["--activation_offload needs a CUDA GPU",
                                                                "trains on the cpu"]),
        (["--activation_offload"], ["activation_offload", "pass --gradient_checkpointing"]),
        (["--activation_offload", "--gradient_checkpointing", "--compile"], ["activation_offload", "compile"]),
    ],
)
def test_bad_adapter_options(tmp_path, args, expect):
    out, _ = fails_cleanly(tmp_path, *args, expect=expect)
    assert not out.exists()


def test_unknown_target_modules_lists_candidates(tmp_path):
    out, message = fails_cleanly(tmp_path, "--target_modules", "q_proj,value", expect=["q_proj", "candidates"])
    assert "query" in message and "attention.output.dense" in message
    assert not out.exists()


def test_dataset_missing_field_names_file_and_field(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    good = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                           "Answer format: true/false", "input": "", "output": "the correct answer is true",
            "answer": "true"}
    records = [dict(good) for _ in range(6)]
    del records[3]["answer"]
    (data / "train.json").write_text(json.dumps(records))
    (data / "test.json").write_text(json.dumps([good] * 4))
    out, message = fails_cleanly(tmp_path, "--dataset", str(data), expect=["train.json", "record 3", "'answer'"])
    assert not out.exists()


def test_output_dir_holding_another_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "something-else"}))
    (out / "metrics.jsonl").write_text("{}\n")
    _, message = fails_cleanly(tmp_path, expect=["output_dir", "already holds a run", "--overwrite", "--resume"])
    assert json.loads((out / "run_config.json").read_text()) == {"model": "something-else"}
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_output_dir_with_foreign_files_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_cleanly(tmp_path, expect=["output_dir", "not one of our runs"])
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("section", [{"fp16": {"enabled": True}},
                                     {"torch_autocast": {"enabled": True, "dtype": "float16"}}])
def test_fp16_is_refused_naming_bf16_and_an_existing_run_survives(tmp_path, section):
    """fp16's loss scaling never reaches the experts (they train outside the engine): refused before
    anything is touched, even with --overwrite over a previous run."""
    ds = tmp_path / "ds_fp16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, **section}))
    out = tmp_path / "run"
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "previous"}))
    _, message = fails_cleanly(tmp_path, "--ds_config", str(ds), "--overwrite", expect=["fp16", "bf16"])
    assert str(ds) in message
    assert json.loads((out / "run_config.json").read_text()) == {"model": "previous"}


# -- a table of bad inputs: exit 2, one line naming the field or file, no traceback, and the output
# -- directory byte-identical before and after (an existing run survives --overwrite) ---------------
def snapshot(root: Path) -> dict:
    """Every file's bytes and every directory under ``root`` (empty when it does not exist)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def refused_leaving_out_unchanged(out, *args, expect: list[str]) -> None:
    """train.py with ``args`` exits 2 with one error line holding every ``expect`` part, no
    traceback, and ``out`` byte-identical afterwards."""
    before = snapshot(out)
    proc = TRAIN.run(["--output_dir", str(out), *BASE, *args])
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot(out) == before, "the output directory changed"


def existing_run(out: Path, config: dict | None = None, world_size: int = 2) -> None:
    """A previous run of this trainer: record, metrics, a checkpoint (written at ``world_size``)."""
    (out / "checkpoints" / "step_0000005").mkdir(parents=True)
    (out / "run_config.json").write_text(json.dumps(config or {"model": "previous"}))
    (out / "metrics.jsonl").write_text('{"step": 5, "kind": "train", "task_loss": 1.0}\n')
    (out / "checkpoints" / "step_0000005" / "trainer_state.json").write_text(
        json.dumps({"step": 5, "epoch": 0, "batch_in_epoch": 5, "world_size": world_size}))
    (out / "checkpoints" / "latest").write_text("step_0000005")


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


MC_RECORD = {"question": "Which is a fruit?", "choices": ["apple", "hammer"], "answerKey": "A"}
MC_LINE = json.dumps(MC_RECORD) + "\n"


def dataset_with(tmp: Path, train_name: str, train_text: str, encoding: str = "utf-8") -> str:
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "data" / train_name).write_bytes(train_text.encode(encoding))
    write(tmp / "data" / "test.json", json.dumps([MC_RECORD] * 4))
    return str(tmp / "data")


def resume_on_edited_data(tmp: Path, out: Path) -> list[str]:
    """A run whose record holds the training file's content hash as it started; the file edited since."""
    from adamole_dist.config.cli import parse_train_config
    from adamole_dist.data.token_cache import data_fingerprint

    data = dataset_with(tmp, "train.jsonl", MC_LINE * 16)
    args = ["--output_dir", str(out), *BASE, "--dataset", data, "--resume", "latest"]
    record = {**parse_train_config(args).to_dict(), "train_data": {
        "file": f"{data}/train.jsonl", "fingerprint": data_fingerprint(f"{data}/train.jsonl")}}
    existing_run(out, record, world_size=1)  # resumable here but for the data
    edited = {**MC_RECORD, "question": "Which is a tool?", "answerKey": "B"}
    write(Path(data) / "train.jsonl", MC_LINE * 6 + json.dumps(edited) + "\n" + MC_LINE * 9)  # one of 16 changed
    return ["--dataset", data, "--resume", "latest"]


def resume_other_world(tmp: Path, out: Path) -> list[str]:
    from adamole_dist.config.cli import parse_train_config

    args = ["--output_dir", str(out), *BASE, "--resume", "latest"]
    existing_run(out, parse_train_config(args).to_dict())  # the same options, written at world size 2
    return ["--resume", "latest"]


def resume_written_by(world: int, **changes):
    """A set-up: a run of this test's options whose checkpoint was written at ``world`` ranks by this version
    (world-independent state), with ``changes`` (dotted names) in the options it was trained with."""

    def setup(tmp: Path, out: Path) -> list[str]:
        from adamole_dist.config.cli import parse_train_config

        config = parse_train_config(["--output_dir", str(out), *BASE, "--resume", "latest"]).to_dict()
        for path, value in changes.items():
            section, _, key = path.rpartition(".")
            (config[section] if section else config)[key] = value
        existing_run(out, config)
        state = out / "checkpoints" / "step_0000005" / "trainer_state.json"
        state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": world, "config": config,
                                     "data_order": "steps"}))
        return ["--resume", "latest"]

    return setup


# name: (set-up returning extra args, parts of the message)
CASES = {
    "ds_batch_conflict_with_overwrite": (
        lambda tmp, out: (existing_run(out), ["--overwrite", "--ds_config", write(
            tmp / "ds.json", '{"train_batch_size": 32, "zero_optimization": {"stage": 3}}')])[1],
        ["ds.json", "train_batch_size (32)", "disagrees"]),
    "ds_invalid_json_with_overwrite": (
        lambda tmp, out: (existing_run(out), ["--overwrite", "--ds_config", write(tmp / "ds.json", '{"a": 1,\n}')])[1],
        ["ds.json", "not valid JSON", "line 2"]),
    "ds_nested_typo": (
        lambda tmp, out: ["--ds_config", write(
            tmp / "ds.json", '{"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sze": 100}}')],
        ["zero_optimization.stage3_prefetch_bucket_sze", "stage3_prefetch_bucket_size"]),
    "ds_top_level_typo": (
        lambda tmp, out: ["--ds_config", write(tmp / "ds.json", '{"train_micro_batch_size_per_gpuu": 4}')],
        ["unknown key 'train_micro_batch_size_per_gpuu'", "'train_micro_batch_size_per_gpu'"]),
    "overwrite_of_a_folder_of_runs": (
        lambda tmp, out: (existing_run(out / "a"), existing_run(out / "b"), ["--overwrite"])[2],
        ["not one of our runs"]),
    "too_few_examples_for_the_micro_batch": (
        lambda tmp, out: ["--max_train_examples", "4", "--micro_batch_size", "8"],
        ["micro_batch_size", "max_train_examples"]),
    "yaml_syntax_error": (
        lambda tmp, out: ["--config", write(tmp / "recipe.yaml", "lr: 1e-3\nmethod: [adamole\n")],
        ["recipe.yaml", "line", "not valid YAML"]),
    "adapter_given_as_a_list": (
        lambda tmp, out: ["--config", write(tmp / "recipe.yaml", "adapter:\n  - method\n")],
        ["recipe.yaml", "adapter must be a mapping"]),
    "target_modules_not_a_list": (
        lambda tmp, out: ["--config", write(tmp / "recipe.yaml", "target_modules: 7\n")],
        ["adapter.target_modules (7)", "a list"]),
    "resume_from_a_folder_that_is_no_checkpoint": (
        lambda tmp, out: ["--resume", str(Path(write(tmp / "notes" / "a.txt", "x")).parent)],
        ["resume", "trainer_state.json"]),
    "resume_at_another_world_size": (resume_other_world, ["world size 2", "this run has 1"]),
    # issue 41: what a resume at another world size may not change
    "resume_global_batch_that_cannot_be_kept": (
        resume_written_by(3, micro_batch_size=3),
        ["global batch 9 (micro batch 3 x world 3 x accumulation 1)", "micro batch 8 x world 1 x accumulation 1",
         "--elastic accumulation", "not a multiple of micro_batch_size x world size = 8"]),
    "resume_with_other_num_experts": (resume_written_by(2, **{"adapter.num_experts": 4}),
                                      ["trained with adapter.num_experts 4, this run has 8"]),
    "resume_with_other_method": (resume_written_by(2, **{"adapter.method": "mole_topk"}),
                                 ["trained with adapter.method 'mole_topk', this run has 'adamole'"]),
    "resume_with_other_rank": (resume_written_by(2, **{"adapter.rank": 8}),
                               ["trained with adapter.rank 8, this run has 4"]),
    "resume_with_other_base_model": (resume_written_by(2, model="smollm2-135m"),
                                     ["trained with model 'smollm2-135m', this run has 'minilm-l6'"]),
    "malformed_jsonl": (
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.jsonl", '{"question": "q"}\n{"question": \n')],
        ["train.jsonl", "line 2"]),
    "split_without_records": (
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.json", "[]")], ["train.json", "no records"]),
    "empty_file": (
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.json", "")], ["train.json", "empty"]),
    "model_gguf_file_that_is_no_gguf": (
        lambda tmp, out: ["--model", write(tmp / "models" / "broken.gguf", "not a gguf file")],
        ["broken.gguf", "cannot be read as GGUF"]),
    "model_folder_with_two_gguf_files": (
        lambda tmp, out: (write(tmp / "m" / "a.gguf", "x"),
                          ["--model", str(Path(write(tmp / "m" / "b.gguf", "x")).parent)])[1],
        ["several GGUF files", "a.gguf, b.gguf"]),
    # issue 29
    "resume_with_overwrite": (  # the pair would delete the run it continues (a real run: test below)
        lambda tmp, out: (existing_run(out), ["--resume", "latest", "--overwrite"])[1],
        ["overwrite and resume (latest) contradict each other", "pass only one"]),
    "seed_out_of_range": (
        lambda tmp, out: (existing_run(out), ["--overwrite", "--seed", "99999999999999999999"])[1],
        ["seed (99999999999999999999)", "[0, 4294967295]"]),
    "negative_seed": (lambda tmp, out: ["--seed", "-1"], ["seed (-1)", "[0, 4294967295]"]),
    "dataset_with_train_json_and_train_jsonl": (
        lambda tmp, out: (write(tmp / "data" / "train.jsonl", "{}\n"), ["--dataset", dataset_with(
            tmp, "train.json", json.dumps([{"question": "q?", "choices": ["a", "b"], "answerKey": "A"}] * 4))])[1],
        ["split 'train' is ambiguous", "train.json and train.jsonl"]),
    "dataset_that_is_one_file": (
        lambda tmp, out: ["--dataset", write(tmp / "one.json", json.dumps(
            [{"question": "q?", "choices": ["a", "b"], "answerKey": "A"}] * 4))],
        ["dataset (", "one.json) is a single file", "held-out evaluation split"]),
    "overwrite_of_a_run_beside_foreign_files": (
        lambda tmp, out: (existing_run(out), write(out / "notes.txt", "mine"), write(out / "drafts" / "a.md", "x"),
                          ["--overwrite"])[3],
        ["--overwrite", "also holds drafts/, notes.txt", "did not write"]),
    "yaml_key_given_twice": (
        lambda tmp, out: ["--config", write(tmp / "recipe.yaml", "lr: 1e-3\nmethod: adamole\nlr: 2e-3\n")],
        ["recipe.yaml", "'lr' is given twice (lines 1 and 3)"]),
    # issue 40
    "non_utf8_byte_in_train_jsonl": (  # case 3: was pyarrow's UnicodeDecodeError traceback
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.jsonl", MC_LINE + MC_LINE[:20] + "\xff\n", "latin-1")],
        ["train.jsonl line 2, column 21", "byte 0xff at byte offset 104", "not UTF-8"]),
    "jsonl_line_that_is_an_array": (  # case 6: was "An error occurred while generating the dataset"
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.jsonl", MC_LINE * 2 + "[1, 2, 3]\n")],
        ["train.jsonl line 3", "expected a JSON object", "got array"]),
    "jsonl_line_that_is_null": (
        lambda tmp, out: ["--dataset", dataset_with(tmp, "train.jsonl", MC_LINE + "null\n" + MC_LINE)],
        ["train.jsonl line 2", "expected a JSON object", "got null"]),
    "run_lock_that_is_a_directory": (  # case 14: was IsADirectoryError from run_lock
        lambda tmp, out: ((out / ".run.lock").mkdir(parents=True), [])[1],
        [".run.lock is a directory, not the lock file this trainer writes"]),
    "output_dir_inside_another_run": (
        lambda tmp, out: (existing_run(tmp / "outer"), ["--output_dir", str(tmp / "outer" / "inner")])[1],
        ["is inside the training run", "outer"]),
    "resume_on_training_data_edited_in_place": (resume_on_edited_data,  # case 12
                                                ["--resume: the training data", "changed since this run started",
                                                 "--allow_data_change"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_changes_nothing(tmp_path, name, monkeypatch):
    monkeypatch.setenv("ADAMOLE_DIST_CACHE", str(tmp_path / "cache"))  # model conversions, if any, land here
    setup, expect = CASES[name]
    out = tmp_path / "run"
    extra = setup(tmp_path, out)
    refused_leaving_out_unchanged(out, *extra, expect=expect)


def test_resume_with_overwrite_leaves_a_real_run_resumable(tmp_path):
    """A complete run (started over a killed run's stale lock, which it takes over; its memory plan logged at the
    start, the measured peak beside it at the end, both in final_metrics.json); --resume latest
    --overwrite is refused with the directory byte-identical; the run still resumes afterwards."""
    import socket
    import subprocess
    import sys

    from tests.helpers.launch_utils import check
    from tests.helpers.tiny_models import write_tiny_bert

    model, out = write_tiny_bert(tmp_path / "tiny_bert"), tmp_path / "run"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    write(out / ".run.lock", json.dumps({"host": socket.gethostname(), "pid": dead}))
    args = ["--output_dir", str(out), "--model", str(model), "--max_train_examples", "32", "--max_eval_examples", "8",
            "--micro_batch_size", "4", "--max_length", "32", "--no-eval_at_start", "--num_experts", "2", "--rank", "2",
            "--report_to", "none", "--save_interval", "1", "--log_interval", "1"]
    proc = check(run(python_cmd(*args, "--max_steps", "3"), timeout=300))
    assert f"took over the lock of pid {dead} on host {socket.gethostname()}, which is no longer running" in proc.stdout
    assert not (out / ".run.lock").exists()  # removed at the end of the run
    assert f"memory plan (prediction) for {model}:" in proc.stdout  # the start: the plan of the run as built
    assert "memory: measured peak" in proc.stdout and "(peak RSS, one rank); plan" in proc.stdout  # the end
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["measured_peak_mb"] > 0 and final["predicted_peak_mb"] > 0
    before = snapshot(out)
    assert "checkpoints/step_0000003/trainer_state.json" in before
    proc = run(python_cmd(*args, "--max_steps", "3", "--resume", "latest", "--overwrite"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: overwrite and resume (latest) contradict each other: --overwrite deletes the run in output_dir, "
        "--resume continues it; pass only one")
    assert snapshot(out) == before
    proc = check(run(python_cmd(*args, "--max_steps", "4", "--resume", "latest"), timeout=300))
    assert f"resumed from {out / 'checkpoints' / 'step_0000003'} at step 3" in proc.stdout
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["kind"] == "train"] == [1, 2, 3, 4]


def test_an_output_dir_a_live_run_holds_is_refused_naming_it(tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    existing_run(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from adamole_dist.run_files.run_lock import RunLock; "
                               "lock = RunLock.take(sys.argv[1]); print('held', flush=True); sys.stdin.read()",
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[3])
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        proc = run(python_cmd("--output_dir", str(out), *BASE, "--resume", "latest"), timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        message = proc.stderr.strip().splitlines()[-1]
        assert f"output_dir ({out}) is in use by the run of pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(out / ".run.lock") in message
        assert snapshot(out) == before
    finally:
        holder.communicate("", timeout=60)


def test_unwritable_output_dir_is_named_before_the_model_loads(tmp_path):
    out = Path("/proc/adamole-no-such-place/run")  # not creatable, even by root
    proc = run(python_cmd("--output_dir", str(out), *BASE), timeout=300)
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run(python_cmd("--output_dir", str(tmp_path / "run"), *BASE, "--tau_max", "3", "--debug"), timeout=300)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "adapter.tau_max" in proc.stderr


def test_help_shows_defaults():
    proc = run(python_cmd("--help"), timeout=300)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "(default: 0.001)" in text and "(default: adamole)" in text and "(default: 1)" in text


def test_eval_with_an_adapter_of_another_model_names_it(tmp_path):
    """launch/eval.py on a base model of another width: exit 2, naming the model the adapter was trained on."""
    from adamole_dist import AdapterConfig
    from adamole_dist.adapters.files import adapter_state, save_adapter
    from adamole_dist.adapters.inject import inject_adapters
    from adamole_dist.base_model.model_loading import load_model_and_tokenizer
    from tests.helpers.tiny_models import write_tiny_bert

    narrow, wide = write_tiny_bert(tmp_path / "narrow", hidden=32), write_tiny_bert(tmp_path / "wide", hidden=48)
    model, *_ = load_model_and_tokenizer(str(narrow), "seq_cls")
    adapters = inject_adapters(model, AdapterConfig(num_experts=2, rank=2), trainable_modules=["classifier"])
    save_adapter(tmp_path / "adapter", adapter_state(adapters), adapters.cfg,
                 {"base_model": str(narrow), "base_model_path": str(narrow), "task_type": "seq_cls",
                  "trainable_modules": ["classifier"]})
    from tests.helpers.launch_utils import REPO

    proc = run([python_cmd()[0], str(REPO / "launch" / "eval.py"), "--adapter", str(tmp_path / "adapter"),
                "--model", str(wide), "--dataset", "builtin:word_categories", "--max_examples", "4"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert "does not fit this model" in message and str(narrow) in message and "shape" in message
    assert "Traceback" not in proc.stderr


# -- free-form (SFT) data: every bad record through the real entry point ------------------------------------------
ALTERNATING_TEMPLATE = (  # refuses two turns of one role in a row, as many real chat templates do
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
CHAT = {"messages": [{"role": "user", "content": "what color is the sky"},
                     {"role": "assistant", "content": "the sky is blue"}]}
SFT_CASES = {  # name: (bad record at index 5 of train.jsonl, extra args, parts of the message)
    "empty_conversation": ({"messages": []}, [], ["train.jsonl record 5", "'messages'", "empty conversation"]),
    "unknown_role": ({"messages": [{"role": "bot", "content": "hi"}]}, [],
                     ["train.jsonl record 5", "'messages[0].role'", "'bot'"]),
    "non_string_content": ({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},
                           [], ["train.jsonl record 5", "'messages[0].content'", "must be a string"]),
    "no_assistant_turn": ({"messages": [{"role": "user", "content": "hi"}]}, [],
                          ["train.jsonl record 5", "'messages'", "no assistant turn"]),
    "two_user_turns_the_template_forbids": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "x"}]}, ["--chat_template", "TEMPLATE"],
        ["train.jsonl record 5", "chat template cannot render", "roles must alternate"]),
    "longer_than_max_length_under_truncation_error": (
        {"messages": [{"role": "user", "content": "sky " * 80}, {"role": "assistant", "content": "blue"}]},
        ["--truncation", "error", "--max_length", "64"], ["train.jsonl record 5", "exceed max_length (64)"]),
    "chat_data_and_a_tokenizer_without_template": (
        CHAT, ["--chat_template", ""], ["tokenizer of", "has none", "--chat_template"]),
    "loss_on_answer_for_chat_data": (CHAT, ["--loss_on", "answer"], ["loss_on ('answer')", "free-form (messages)"]),
    "alpaca_output_not_a_string": ({"instruction": "name it", "output": 3}, [],
                                   ["train.jsonl record 5", "'output'", "must be a string"]),
}


@pytest.mark.parametrize("name", list(SFT_CASES))
def test_bad_sft_record_changes_nothing(tmp_path, name):
    from tests.helpers.tiny_models import write_tiny_llama

    bad, extra, expect = SFT_CASES[name]
    model = write_tiny_llama(tmp_path / "model")
    template = write(tmp_path / "chat.jinja", ALTERNATING_TEMPLATE)
    good = {"instruction": "name the color of the sky", "output": "blue"} if "instruction" in bad else CHAT
    rows = [good] * 5 + [bad] + [good] * 6  # 12 records: all within --max_train_examples 16
    data = tmp_path / "data"
    write(data / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(data / "test.jsonl", "".join(json.dumps(good) + "\n" for _ in range(4)))
    extra = [template if a == "TEMPLATE" else a for a in extra]
    if "--chat_template" not in extra and "messages" in good:
        extra += ["--chat_template", template]
    out = tmp_path / "run"
    existing_run(out)
    before = snapshot(out)
    proc = TRAIN.run(["--output_dir", str(out), *BASE, "--model", str(model), "--dataset", str(data), "--overwrite",
                      *extra])
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    assert snapshot(out) == before, "the output directory changed"


LONG_CHAT = {"messages": [{"role": "user", "content": "what color is the sky " * 8},
                          {"role": "assistant", "content": "the sky is blue"}]}
NUMBER_LIKE = {"messages": [{"role": "user", "content": "0."}, {"role": "assistant", "content": "1."}]}
LIST_CONTENT = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                                          {"type": "image_url", "image_url": {"url": "cat.png"}}]},
                             {"role": "assistant", "content": "a cat"}]}
FREE_FORM_CASES = {  # name: (train.jsonl records, extra args, parts of the message)
    # case 5: the loader fell back to pandas on the mixed column, turned record 0's "0." into 0.0 and blamed it
    "list_content_in_one_record": ([NUMBER_LIKE] + [CHAT] * 4 + [LIST_CONTENT] + [CHAT] * 6, [],
                                   ["train.jsonl record 5", "'messages[0].content' is a list of content parts",
                                    "not supported"]),
    # case 4: IndexError in token_cache.py (the cache of no examples had no data file)
    "every_record_longer_than_max_length_through_the_token_cache": (
        [LONG_CHAT] * 12, ["--max_length", "16"],
        ["train.jsonl: all 12 examples are longer than max_length (16) and were dropped", "--max_length"]),
    # case 15: reported as every record's rendering failure once tokenisation had started
    "chat_template_with_a_syntax_error": (
        [CHAT] * 12, ["--chat_template", "BROKEN_TEMPLATE"],
        ["chat_template (", "broken.jinja) line 2: not a valid Jinja template", "unexpected '}'"]),
}


@pytest.mark.parametrize("name", list(FREE_FORM_CASES))
def test_free_form_training_data_is_read_as_written(tmp_path, monkeypatch, name):
    """Over an existing run with --overwrite: refused naming the file, record or line; the run and the token
    cache as they were (no temporary folder left there)."""
    from tests.helpers.tiny_models import write_tiny_llama

    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAMOLE_DIST_CACHE", str(cache))
    rows, extra, expect = FREE_FORM_CASES[name]
    model = write_tiny_llama(tmp_path / "model")
    templates = {"TEMPLATE": write(tmp_path / "chat.jinja", ALTERNATING_TEMPLATE),
                 "BROKEN_TEMPLATE": write(tmp_path / "broken.jinja", "{% for m in messages %}\n{{ m.role }\n"
                                                                      "{% endfor %}\n")}
    extra = [templates.get(a, a) for a in extra]
    if "--chat_template" not in extra:
        extra += ["--chat_template", templates["TEMPLATE"]]
    data = tmp_path / "data"
    write(data / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(data / "test.jsonl", "".join(json.dumps(CHAT) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    existing_run(out)
    refused_leaving_out_unchanged(out, "--model", str(model), "--dataset", str(data), "--overwrite", *extra,
                                  expect=expect)
    assert [p.name for p in cache.rglob(".*")] == []  # no temporary folder of a tokenisation left behind


# launch/eval.py, launch/plot.py and --model paths
# -- the same promise for the other entry points (exit 2, one line naming the file or option, no
# -- traceback, nothing written), and for models that are no model ------------------------------------
def script_fails_cleanly(script: str, *args: str, expect: list[str]):
    """launch/<script> with ``args``: exit 2, last stderr line ``error: ...`` holding every part of ``expect``."""
    import sys

    from tests.helpers.launch_utils import REPO

    proc = run([sys.executable, str(REPO / "launch" / script), *args], timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in expect:
        assert part in message, f"{part!r} not in {message!r}"
    return proc


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A lora adapter on a tiny Llama, saved as training saves it."""
    from tests.helpers.saved_adapters import write_adapter_dir
    from tests.helpers.tiny_models import write_tiny_llama

    root = tmp_path_factory.mktemp("eval_inputs")
    return write_adapter_dir(root / "adapter", write_tiny_llama(root / "llama"), "lora", rank=2)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNWRITABLE = "/proc/adamole-no-such-place/result.json"  # not creatable, even by root
EVAL_CASES = {  # name: (damage to a copy of the adapter, extra args, parts of the message)
    "garbage_adapter_config": (lambda a: (a / "adapter_config.json").write_text("{garbage"), [],
                               ["adapter_config.json is not valid JSON"]),
    "truncated_adapter_weights": (lambda a: cut_in_half(a / "adapter_model.safetensors"), [],
                                  ["adapter_model.safetensors cannot be read", "damaged or incomplete"]),
    "batch_size_0": (None, ["--batch_size", "0"], ["--batch_size (0) must be >= 1"]),
    "json_into_an_unwritable_path": (None, ["--json", UNWRITABLE], [f"--json ({UNWRITABLE}) cannot be written"]),
    "max_length_too_small": (None, ["--max_length", "2"], ["max_length (2) leaves no room", "at least 3"]),
    # issue 40, case 11: a typo ran our whole evaluation first, then ended in lm-eval's KeyError traceback
    "harness_task_unknown": (None, ["--harness", "arc_easyy"], ["--harness: unknown task 'arc_easyy'",
                                                                "did you mean 'arc_easy'?"]),
}


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_bad_eval_input_is_named_before_the_evaluation(tmp_path, saved_adapter, name):
    import shutil

    damage, extra, expect = EVAL_CASES[name]
    if "--harness" in extra:
        pytest.importorskip("lm_eval", reason="lm-eval is an optional extra")
    adapter = tmp_path / "adapter"
    shutil.copytree(saved_adapter, adapter)
    if damage is not None:
        damage(adapter)
    before = snapshot(tmp_path)
    proc = script_fails_cleanly("eval.py", "--adapter", str(adapter), "--dataset", "builtin:word_categories",
                                "--max_examples", "4", *extra, expect=expect)
    if damage is not None:
        assert str(adapter) in proc.stderr
    assert "accuracy" not in proc.stdout  # refused before it evaluated, not after
    assert snapshot(tmp_path) == before


def metrics_file(tmp: Path, lines: list[str]) -> Path:
    run_dir = tmp / "run"
    write(run_dir / "metrics.jsonl", "".join(line + "\n" for line in lines[:-1]) + lines[-1])
    return run_dir


TRAIN_RECORDS = [json.dumps({"step": s, "kind": "train", "task_loss": 1.0 / s, "aux_loss": 0.1}) for s in (1, 2, 3)]


def test_plot_skips_a_cut_short_last_line_naming_it(tmp_path):
    """A run still writing (or killed mid-write) leaves a partial last line: plotted without it, said so."""
    import sys

    from tests.helpers.launch_utils import REPO

    run_dir = metrics_file(tmp_path, TRAIN_RECORDS + ['{"step": 4, "kind": "tr'])
    proc = run([sys.executable, str(REPO / "launch" / "plot.py"), str(run_dir)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {run_dir / 'metrics.jsonl'} line 4 is cut short" in proc.stderr
    assert (run_dir / "plots" / "loss.png").is_file()


def test_plot_refuses_a_damaged_line_before_the_last_naming_file_and_line(tmp_path):
    run_dir = metrics_file(tmp_path, [TRAIN_RECORDS[0], '{"step": 2, "kind"', *TRAIN_RECORDS[2:]])
    script_fails_cleanly("plot.py", str(run_dir), expect=[f"{run_dir / 'metrics.jsonl'} line 2 is not valid JSON",
                                                          "damaged"])
    assert not (run_dir / "plots").exists()


def tiny_llama(folder: Path) -> str:
    from tests.helpers.tiny_models import write_tiny_llama

    return str(write_tiny_llama(folder))


EXPECTED_MODEL = "expected a Hugging Face model folder (config.json with a model_type)"
MODEL_CASES = {  # name: (set-up returning extra args, parts of the message)
    "model_folder_without_model_type": (
        lambda tmp: ["--model", str(Path(write(tmp / "m" / "config.json", '{"hidden_size": 8}')).parent)],
        ["m/config.json has no model_type", EXPECTED_MODEL]),
    "model_that_is_a_text_file": (
        lambda tmp: ["--model", write(tmp / "notes.txt", "not a model\n")],
        ["model (", "notes.txt) is a file but not a GGUF file", EXPECTED_MODEL]),
    "model_gguf_named_in_upper_case": (  # read as GGUF (not as a config file): the reader names what it found
        lambda tmp: ["--model", write(tmp / "models" / "BROKEN.GGUF", "not a gguf file")],
        ["BROKEN.GGUF", "cannot be read as GGUF", "GGUF magic"]),
    "model_path_that_does_not_exist": (
        lambda tmp: ["--model", str(tmp / "no_such_model")], ["no_such_model) does not exist", EXPECTED_MODEL]),
    "max_length_without_room_on_the_encoder_path": (  # 1 was not applied at all (fewer than the pair's specials)
        lambda tmp: ["--max_length", "1"],
        ["max_length (1) leaves no room for a context token and a choice token", "it must be at least 5"]),
    "max_length_without_room_on_the_causal_path": (
        lambda tmp: ["--model", tiny_llama(tmp / "llama"), "--max_length", "2"],
        ["max_length (2) leaves no room for a prompt token and an answer token", "it must be at least 3"]),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_bad_model_input_changes_nothing(tmp_path, name, monkeypatch):
    """Each over an existing run with --overwrite: refused before anything is touched; a GGUF tried
    leaves nothing in the model cache (no half-converted folder, no lock file)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAMOLE_DIST_CACHE", str(cache))
    setup, expect = MODEL_CASES[name]
    out = tmp_path / "run"
    existing_run(out)
    extra = setup(tmp_path)
    refused_leaving_out_unchanged(out, "--overwrite", *extra, expect=expect)
    assert not [p for p in cache.rglob("*") if p.is_file()], "left in the model cache"


@pytest.mark.parametrize("target", ["experts", "gate_up_proj", "mlp"])
def test_the_fused_experts_of_a_moe_base_are_refused_naming_what_can_be_adapted(tmp_path, target):
    """Mixtral in transformers 5 keeps its routed experts as 3-D parameters: no layer to wrap (adapters/targets.py)."""
    from tests.helpers.tiny_architectures import write_tiny_model

    model = write_tiny_model(tmp_path / "mixtral", "mixtral")
    out, message = fails_cleanly(tmp_path, "--model", str(model), "--dataset", "builtin:word_categories",
                                 "--target_modules", target,
                                 expect=[f"adapter.target_modules: {target!r}", "fused 3-D parameters",
                                         "gate_up_proj [4,", "Adaptable here: attention", "q_proj"])
    assert not out.exists()
