"""Pieces of the training loop that need no process group: data order, lr schedule, the expert
optimizer's gradient scaling, metrics sink, checkpoint helpers."""

import json

import pytest
import torch

from adamole_dist.data.sampler import ShardedBatches
from adamole_dist.run_files.metrics_log import MetricsLogger, read_metrics, truncate_metrics
from adamole_dist.train.checkpoint import list_checkpoints, resolve_latest, tag_for, write_latest
from adamole_dist.train.expert_optimizer import ExpertOptimizer
from adamole_dist.train.schedule import lr_lambda, warmup_steps_for


def test_ranks_get_disjoint_equal_shards_of_one_permutation():
    shards = [ShardedBatches(103, 4, rank=r, world_size=3, seed=5).epoch_indices(0) for r in range(3)]
    assert all(len(s) == 8 for s in shards)  # 103 // 3 = 34 per rank -> 8 batches of 4
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat)) == 96
    again = ShardedBatches(103, 4, rank=1, world_size=3, seed=5).epoch_indices(0)
    assert again == shards[1]
    assert ShardedBatches(103, 4, rank=1, world_size=3, seed=5).epoch_indices(1) != shards[1]


@pytest.mark.parametrize("world", [2, 4])
def test_a_step_sees_the_same_examples_whatever_the_world_size(world):
    """W ranks with m examples each see, rank-major, what one process with W * m sees."""
    one = ShardedBatches(103, 8, rank=0, world_size=1, seed=3).epoch_indices(0)
    split = [ShardedBatches(103, 8 // world, rank=r, world_size=world, seed=3).epoch_indices(0) for r in range(world)]
    assert all(len(s) == len(one) for s in split)
    for b, batch in enumerate(one):
        assert [i for r in range(world) for i in split[r][b]] == batch


def test_iterate_resumes_exactly():
    sb = ShardedBatches(40, 4, rank=0, world_size=1, seed=1)
    full = sb.iterate(0, 0)
    first = [next(full) for _ in range(25)]  # crosses an epoch boundary (10 batches per epoch)
    resumed = sb.iterate(1, 3)
    assert [next(resumed) for _ in range(12)] == first[13:25]


def test_too_few_examples_is_an_error():
    with pytest.raises(ValueError, match="fewer than micro_batch_size"):
        ShardedBatches(5, 4, rank=0, world_size=2, seed=0)


def test_lr_schedules():
    lin = lr_lambda("linear", 100, 10)
    assert lin(0) == pytest.approx(1 / 11) and lin(9) == pytest.approx(10 / 11)
    assert lin(10) == 1.0 and lin(55) == pytest.approx(0.5) and lin(100) == 0.0
    cos = lr_lambda("cosine", 100, 0)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert lr_lambda("constant", 100, 5)(90) == 1.0
    assert warmup_steps_for(200, -1, 0.06) == 12 and warmup_steps_for(200, 7, 0.06) == 7


def test_expert_optimizer_divides_by_world_and_follows_the_schedule():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ExpertOptimizer([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=0.0,
                          lr_lambda=lambda s: 0.5 if s >= 1 else 1.0, world_size=4)
    p.grad = torch.full((3,), 8.0)
    opt.reduce_gradients()  # no process group: the sum over one rank, divided by the world size
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0))
    opt.step()
    assert opt.lr == pytest.approx(0.05)
    opt.set_step(0)
    assert opt.lr == pytest.approx(0.1)


def test_expert_clipping_uses_the_norm_of_all_experts():
    """Without a process group the expert optimizer clips like torch's clip_grad_norm_ over all banks."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2, 5))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = [torch.randn_like(p) * 3 for p in ours]
    opt = ExpertOptimizer(ours, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=0.5,
                          lr_lambda=lambda s: 1.0, world_size=1)
    for p, g in zip(ours, grads):
        p.grad = g.clone()
    applied = []  # the gradients AdamW is given (Adam itself hardly sees a constant rescaling)
    opt.optimizer.register_step_pre_hook(lambda *_: applied.extend(p.grad.clone() for p in ours))
    norm = opt.step()
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(ref, 0.5))
    assert norm == pytest.approx(expected, rel=1e-6) and expected > 0.5  # clipping was active
    for g, r in zip(applied, ref):
        torch.testing.assert_close(g, r.grad)


def test_non_finite_expert_gradient_skips_the_update():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ExpertOptimizer([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=1.0,
                          lr_lambda=lambda s: 1.0, world_size=1)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    norm = opt.step()
    assert norm != norm  # NaN, reported to the trainer (which stops the run)
    torch.testing.assert_close(p.detach(), torch.ones(3))  # untouched
    assert p.grad is None and not opt.optimizer.state


def test_metrics_logger_writes_jsonl(tmp_path):
    log = MetricsLogger(tmp_path, "jsonl", enabled=True, run_config={}, project="x")
    log.log(3, "train", {"task_loss": 0.5, "layers": {"a": {"mean_active_experts": 2.0}}})
    log.log(3, "eval", {"accuracy": 0.75})
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in recs] == ["train", "eval"]
    assert recs[0]["layers"]["a"]["mean_active_experts"] == 2.0 and recs[1]["accuracy"] == 0.75
    MetricsLogger(tmp_path / "other", "jsonl", enabled=False, run_config={}, project="x").log(1, "train", {})
    assert not (tmp_path / "other").exists()


def test_a_cut_short_last_metrics_line_is_skipped_and_damage_named(tmp_path, capsys):
    """A run killed mid-write leaves a partial last line: reading and the resume's truncation skip it
    (saying so); a bad line before the last is damage, named by file and line."""
    from adamole_dist.cli.console import configure_logging

    configure_logging()  # the commands' console lines: warnings on stderr
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"step": s, "kind": "train", "task_loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(whole) + '\n{"step": 4, "ki')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert f"{path} line 4 is cut short" in capsys.readouterr().err
    truncate_metrics(path, 2)
    assert path.read_text() == "\n".join(whole[:2]) + "\n"
    path.write_text(whole[0] + '\n{"step": 2\n' + whole[2] + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 2 is not valid JSON"):
        read_metrics(path)


def test_a_repeated_stop_signal_is_a_note_not_an_interrupt(capfd):
    """Ctrl-C twice (or torchrun forwarding the terminal's one to a rank that got it already): the stop
    under way is kept, rank 0 says so once; after the stop, signals are ignored until the exit."""
    import signal

    from adamole_dist.runtime.stopping import StopSignal

    stop = StopSignal(announce=True)
    for _ in range(3):
        stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.received == signal.SIGINT
    assert capfd.readouterr().err.count("SIGINT: a stop is already under way (checkpoint, then exit 75)") == 1
    quiet = StopSignal(announce=False)
    quiet._handle(signal.SIGINT, None)
    quiet._handle(signal.SIGINT, None)
    assert capfd.readouterr().err == ""
    before = {sig: signal.getsignal(sig) for sig in StopSignal.SIGNALS}
    try:
        stop.settle()
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in StopSignal.SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_stop_during_set_up_raises_at_once_once():
    """Issue 40, case 7: during set-up (StopSignal.raising_during) the first stop raises where the main thread
    stands -- inside a template renderer's loop too; a second one during the unwinding cleanup does not;
    outside the block a stop is a flag again, and one already received raises on entering a block."""
    import signal

    from adamole_dist.runtime.stopping import StoppedBeforeTraining, StopSignal

    stop = StopSignal(announce=False)
    with pytest.raises(StoppedBeforeTraining, match=r"signal \(SIGTERM\) while tokenizing the data") as e:
        with stop.raising_during("tokenizing the data"):
            try:
                stop._handle(signal.SIGTERM, None)
            except Exception:  # what a renderer's "except Exception" would do with an ordinary error
                pytest.fail("StoppedBeforeTraining must not be an Exception")
    assert not isinstance(e.value, Exception) and stop.phase is None
    stop._handle(signal.SIGINT, None)  # later signals: noted, nothing raised
    with pytest.raises(StoppedBeforeTraining, match="while loading the model"):
        with stop.raising_during("loading the model"):
            pass
    flag = StopSignal(announce=False)
    flag._handle(signal.SIGUSR1, None)  # outside any block: the step loop's flag
    assert flag.requested and flag.received == signal.SIGUSR1


def test_checkpoint_pointer_helpers(tmp_path):
    assert resolve_latest(tmp_path) == (None, None)
    for step in (5, 10):
        (tmp_path / tag_for(step)).mkdir()
        (tmp_path / tag_for(step) / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp_step_0000015").mkdir()  # an interrupted save is never listed
    write_latest(tmp_path, tag_for(10))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000010"]
    assert resolve_latest(tmp_path) == (tmp_path / "step_0000010", None)
    assert not list(tmp_path.glob(".latest*"))


def test_plan_resume_takes_latest_or_a_named_checkpoint_of_this_world_size(tmp_path, capsys):
    from adamole_dist.config.fields import ConfigError
    from adamole_dist.config.training import TrainConfig
    from adamole_dist.train.resume_target import plan_resume

    assert plan_resume(TrainConfig(resume="latest"), tmp_path, 1) is None  # nothing yet: from scratch
    assert "starting from scratch" in capsys.readouterr().out
    for step in (5, 10):
        (tmp_path / tag_for(step)).mkdir()
        (tmp_path / tag_for(step) / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
    write_latest(tmp_path, tag_for(10))
    assert plan_resume(TrainConfig(resume="latest"), tmp_path, 2) == tmp_path / tag_for(10)
    named = tmp_path / tag_for(5)
    assert plan_resume(TrainConfig(resume=str(named)), tmp_path, 2) == named
    with pytest.raises(ConfigError, match="world size 2, this run has 1"):
        plan_resume(TrainConfig(resume=str(named)), tmp_path, 1)


class CrashingEngine:
    """Stands in for the DeepSpeed engine: writes part of a checkpoint, then dies."""

    def __init__(self, crash: bool) -> None:
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, **kw):
        from pathlib import Path

        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        if self.crash:
            raise OSError("disk full")


def test_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.runtime.stopping import CheckpointWriteError
    from adamole_dist.train.checkpoint import save_checkpoint
    from tests.conftest import make_tiny_llama

    adapters = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=4, rank=2))
    opt = ExpertOptimizer(adapters.expert_parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=1)
    kw = dict(rank=0, expert_writer=True, expert_shard=0, keep=2)
    first = save_checkpoint(tmp_path, 5, CrashingEngine(False), adapters, opt, {"step": 5}, **kw)
    assert (first / "experts_ep0.safetensors").is_file() and (first / "trainer_state.json").is_file()
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 10 could not be written .*disk full") as e:
        save_checkpoint(tmp_path, 10, CrashingEngine(True), adapters, opt, {"step": 10}, **kw)
    assert f"the previous checkpoint, {first}, and 'latest' are intact" in str(e.value)
    assert resolve_latest(tmp_path)[0] == first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005"]
    assert not (tmp_path / "step_0000010").exists()
    assert not (tmp_path / ".tmp_step_0000010").exists()  # the failed save's partial folder is removed at once
    third = save_checkpoint(tmp_path, 15, CrashingEngine(False), adapters, opt, {"step": 15}, **kw)
    assert resolve_latest(tmp_path)[0] == third


def test_a_crash_while_re_saving_a_tag_leaves_latest_loadable(tmp_path, monkeypatch):
    """Re-saving step 5 (a finished run relaunched): the crash is injected between moving the old
    copy aside and renaming the new one in, where 'latest' names a directory that is briefly absent.
    The previous complete copy is found (and said so), and the next save puts it back in place."""
    import os

    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.train.checkpoint import save_checkpoint
    from tests.conftest import make_tiny_llama

    adapters = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=4, rank=2))
    opt = ExpertOptimizer(adapters.expert_parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=1)
    kw = dict(rank=0, expert_writer=True, expert_shard=0, keep=2)
    first = save_checkpoint(tmp_path, 5, CrashingEngine(False), adapters, opt, {"step": 5}, **kw)
    real_replace, calls = os.replace, []

    def crash_on_the_rename_in(src, dst):
        calls.append((str(src), str(dst)))
        if str(src).endswith(".tmp_step_0000005"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_rename_in)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 5, CrashingEngine(False), adapters, opt, {"step": 5}, **kw)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[0][1].endswith(".replaced_step_0000005")  # the old copy was moved aside, not deleted
    assert not first.exists()
    chosen, note = resolve_latest(tmp_path)
    assert chosen == tmp_path / ".replaced_step_0000005" and (chosen / "experts_ep0.safetensors").is_file()
    assert "missing or incomplete" in note
    again = save_checkpoint(tmp_path, 10, CrashingEngine(False), adapters, opt, {"step": 10}, **kw)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000010"]  # restored
    assert resolve_latest(tmp_path) == (again, None)
    assert not list(tmp_path.glob(".replaced_*")) and not list(tmp_path.glob(".tmp_*"))


def test_latest_naming_a_missing_checkpoint_falls_back_to_the_newest_complete(tmp_path):
    for step in (5, 10):
        (tmp_path / tag_for(step)).mkdir()
        (tmp_path / tag_for(step) / "trainer_state.json").write_text("{}")
    (tmp_path / tag_for(15)).mkdir()  # incomplete: no trainer state
    write_latest(tmp_path, tag_for(15))
    chosen, note = resolve_latest(tmp_path)
    assert chosen == tmp_path / tag_for(10) and "step_0000015" in note
    write_latest(tmp_path, tag_for(10))
    assert resolve_latest(tmp_path) == (tmp_path / tag_for(10), None)


def test_checkpoints_and_adapter_files_store_experts_under_one_key_and_orientation():
    """moe/experts.py's expert_key builds both; lora_B is (O x R) in both (the bank keeps R x O rows)."""
    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.adapters.files import adapter_state
    from adamole_dist.train.checkpoint import expert_state, load_expert_state
    from tests.conftest import make_tiny_llama

    adapters = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=4, rank=2))
    for bank in adapters.expert_banks.values():
        torch.nn.init.normal_(bank.lora_B)
    opt = ExpertOptimizer(adapters.expert_parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=1)
    saved, exported = expert_state(adapters, opt), adapter_state(adapters)
    expert_keys = [k for k in exported if ".experts." in k]
    assert expert_keys and set(expert_keys) <= set(saved)
    for k in expert_keys:
        assert torch.equal(saved[k], exported[k]), k
    name, bank = next(iter(adapters.expert_banks.items()))
    O = bank.lora_B.shape[-1]
    assert saved[f"{name}.experts.3.lora_B"].shape == (O, 2)
    assert torch.equal(saved[f"{name}.experts.3.lora_B"], bank.lora_B[3].t())
    before = bank.lora_B.detach().clone()
    with torch.no_grad():
        bank.lora_B.zero_()
    load_expert_state(adapters, opt, saved)
    assert torch.equal(bank.lora_B, before)


def test_expert_shards_of_either_orientation_read_in_file_orientation(tmp_path):
    """Shards from before lora_B was stored O x R (no metadata, bank rows R x O) still resume."""
    from safetensors.torch import save_file

    from adamole_dist.train.checkpoint import EXPERT_SHARD_METADATA, read_expert_shards

    B_RO = torch.arange(6.0).reshape(2, 3)  # rank 2, 3 output features
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    save_file({"m.experts.0.lora_B": B_RO, "m.experts.0.lora_B.exp_avg": B_RO + 1,
               "m.experts.0.lora_B.step": torch.ones(1, dtype=torch.float64), "m.experts.0.lora_A": B_RO.clone()},
              str(old / "experts_ep0.safetensors"))
    save_file({"m.experts.0.lora_B": B_RO.t().contiguous(), "m.experts.0.lora_A": B_RO.clone()},
              str(new / "experts_ep0.safetensors"), metadata=EXPERT_SHARD_METADATA)
    got_old, got_new = read_expert_shards(old), read_expert_shards(new)
    assert torch.equal(got_old["m.experts.0.lora_B"], B_RO.t()) and torch.equal(got_new["m.experts.0.lora_B"], B_RO.t())
    assert torch.equal(got_old["m.experts.0.lora_B.exp_avg"], (B_RO + 1).t())
    assert torch.equal(got_old["m.experts.0.lora_A"], B_RO) and got_old["m.experts.0.lora_B.step"].shape == (1,)


def test_check_complete_names_a_missing_file_or_expert(tmp_path):
    """Every file the manifest names, every expert of every layer; a checkpoint from before manifests
    is checked against the layers and experts its shards hold."""
    from safetensors.torch import load_file, save_file

    from adamole_dist import AdapterConfig, inject_adapters
    from adamole_dist.train.checkpoint import MANIFEST, check_complete, save_checkpoint
    from tests.conftest import make_tiny_llama

    adapters = inject_adapters(make_tiny_llama(), AdapterConfig(num_experts=4, rank=2))
    opt = ExpertOptimizer(adapters.expert_parameters(), lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          max_grad_norm=0.0, lr_lambda=lambda s: 1.0, world_size=1)
    state = {"step": 5, "config": {"adapter": {"num_experts": 4}}}
    ckpt = save_checkpoint(tmp_path, 5, CrashingEngine(False), adapters, opt, state, rank=0, expert_writer=True,
                           expert_shard=0, keep=2)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert "experts_ep0.safetensors" in manifest["files"] and "mp_rank_00_model_states.pt" in manifest["files"]
    assert manifest["expert_layers"] == sorted(adapters.expert_banks) and manifest["num_experts"] == 4
    assert check_complete(ckpt) is None
    shard = ckpt / "experts_ep0.safetensors"
    tensors = load_file(str(shard))
    layer = sorted(adapters.expert_banks)[-1]
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"{layer}.experts.3.")}, str(shard))
    assert check_complete(ckpt) == f"expert 3 of {layer} (lora_A) is in none of its experts_ep*.safetensors"
    (ckpt / MANIFEST).unlink()  # as before manifests: the other layers still say there are 4 experts
    assert check_complete(ckpt) == f"expert 3 of {layer} (lora_A) is in none of its experts_ep*.safetensors"
    save_file(tensors, str(shard))
    assert check_complete(ckpt) is None
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    (ckpt / "rng_rank0.pt").unlink()
    assert check_complete(ckpt) == f"{ckpt / 'rng_rank0.pt'} is missing (named in its {MANIFEST})"
