"""Resuming a training run: only from this run's checkpoints, only with the data order it had, metrics without
repeats; config overrides merged into tables; checkpoint folders ordered by step."""

import json

import pytest
import torch

from cpm4.model.config import ConfigError, merge_fields, preset
from cpm4.train import checkpoint as ckpt
from cpm4.train.config import load_train_config


def trainer(tmp_path, name, *sets):
    from cpm4.train.data import SyntheticDataset
    from cpm4.train.trainer import Trainer

    cfg = load_train_config(None, ['model.preset="tiny"', 'data.path="synthetic"', "data.seq_len=64",
                                   "train.steps=4", "train.batch_size=2", "schedule.warmup_steps=1",
                                   "checkpoint.every=2", f'checkpoint.dir="{tmp_path / name}"', "log.every=1",
                                   "log.progress=false", "log.tensorboard=false", 'train.device="cpu"', *sets])
    return Trainer(cfg, SyntheticDataset(1024, 64, seed=0))


def steps_logged(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_merge_fields_merges_tables_key_by_key():
    base = {"a": 1, "t": {"x": 1, "y": 2}, "u": {"k": 1}}
    assert merge_fields(base, {"t": {"y": 3}, "u": 5, "v": {"n": 1}}) == {"a": 1, "t": {"x": 1, "y": 3}, "u": 5,
                                                                          "v": {"n": 1}}
    assert base == {"a": 1, "t": {"x": 1, "y": 2}, "u": {"k": 1}}  # not modified
    tiny = preset("tiny").sparse_config
    changed = preset("tiny", sparse_config={"topk": tiny.topk + 1}).sparse_config
    assert changed.topk == tiny.topk + 1  # the rest as the preset's, not the 8B defaults
    assert (changed.dense_len, changed.block_size, changed.window_size) == (tiny.dense_len, tiny.block_size,
                                                                             tiny.window_size)


def test_nested_override_of_a_run_changes_that_field_alone(tmp_path):
    from cpm4.train.trainer import build_model

    tiny = preset("tiny").sparse_config
    cfg = load_train_config(None, ['model.preset="tiny"', 'data.path="x"',
                                   f"model.overrides.sparse_config.topk={tiny.topk + 1}"])
    sc = build_model(cfg)[0].config.sparse_config
    assert sc.topk == tiny.topk + 1 and (sc.dense_len, sc.kernel_size) == (tiny.dense_len, tiny.kernel_size)
    with pytest.raises(ConfigError, match="schedule.decay_steps: must be an integer >= 0, got -3"):
        load_train_config(None, ['model.preset="tiny"', 'data.path="x"', "schedule.decay_steps=-3"])


def test_killed_run_resumes_without_repeated_metrics(tmp_path):
    full = trainer(tmp_path, "full").fit(save=False)
    run = tmp_path / "killed"
    trainer(tmp_path, "killed").fit()  # checkpoints at steps 2 and 4 (the final one)
    # As if killed after step 4 with step 2 its newest checkpoint; a killed save's partial folder beside it.
    import shutil

    shutil.rmtree(ckpt.step_dir(run, 4))
    partial = run / "checkpoints" / ".step-0000004.partial-999999"
    partial.mkdir()
    resumed = trainer(tmp_path, "killed")
    again = resumed.fit(save=False)
    assert resumed._start_step == 2 and not partial.exists()
    assert [r["loss"] for r in again] == [r["loss"] for r in full[2:]]  # bit for bit
    assert steps_logged(run) == [1, 2, 3, 4]  # steps 3 and 4 once, from the resumed run (was 1-4, 3, 4)


def test_resume_refuses_other_data_order_model_or_a_fresh_start_beside_old_checkpoints(tmp_path):
    trainer(tmp_path, "r").fit()
    for sets, needle in ((["train.seed=7", "train.batch_size=4"], "train.seed 0 -> 7, train.batch_size 2 -> 4"),
                         (["data.seq_len=32"], "data.seq_len 64 -> 32"),
                         (["train.grad_accum=2"], "train.grad_accum 1 -> 2")):
        with pytest.raises(ValueError, match="other data settings") as e:
            trainer(tmp_path, "r", *sets).fit(save=False)
        assert needle in str(e.value)
    with pytest.raises(ValueError, match=r"another model .*mtp\.0\..*absent -> \["):
        trainer(tmp_path, "r", "model.overrides.num_mtp_layers=2").fit(save=False)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .newest step-0000004"):
        trainer(tmp_path, "r", "checkpoint.resume=false").fit(save=False)
    # What may change on a resume: the steps and schedule (a decay from a stable checkpoint) and the learning rate.
    out = trainer(tmp_path, "r", "train.steps=6", "schedule.decay_steps=2", "train.lr=0.005").fit(save=False)
    assert [r["step"] for r in out] == [5, 6]


def test_checkpoints_ordered_by_step_and_the_newest_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9_999_999, 10_000_000, 3):
        (ckpt.step_dir(tmp_path, step)).mkdir(parents=True)
        torch.save({"step": step}, ckpt.step_dir(tmp_path, step) / ckpt.STATE_FILE)
    (root / "step-0000004").mkdir()  # half-written: no state file
    (root / "step-x").mkdir()
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step-0000003", "step-9999999", "step-10000000"]
    (root / "latest").write_text("step-9999999\n")  # one behind: a crash between the rename and this file
    assert ckpt.latest(tmp_path).name == "step-10000000"
    # Rotation keeps the newest by step (by name, step-10000000 sorted first and was the one deleted).
    from cpm4.model.modeling import MiniCPM4ForCausalLM

    config = preset("tiny")
    ckpt.write(tmp_path, 10_000_001, MiniCPM4ForCausalLM(config).state_dict(), config, None, {"step": 10_000_001},
               keep=2)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["step-10000000", "step-10000001"]
    assert (root / "latest").read_text() == "step-10000001\n"
