"""The typed run configuration (`training/config.py`): resolved once, frozen, saved as the flat
dict of flags that snapshots always held."""

from __future__ import annotations

import dataclasses

import pytest
from train_helpers import tiny_flags

from training.config import RunConfig, resolve_config
from training.errors import UsageError
from training.options import build_parser, parse_args


def _resolve(tmp_path, *extra: str) -> RunConfig:
    args, explicit = parse_args(tiny_flags(tmp_path, *extra))
    return resolve_config(args, explicit, world_size=1, say=print).config


def test_config_is_frozen_and_round_trips_through_its_dict(tmp_path):
    # (the demo's own 2,048-token vocabulary needs more text than the tiny one here)
    config = _resolve(tmp_path, "--max_steps", "5", "--preset", "demo", "--train_tokenizer", "0")
    flags = config.to_dict()
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    # every flag, as the snapshot's "args" always held them; flags added since (--eval_tasks')
    # only when set, so a run without them saves what the old format saved
    later = {"eval_tasks", "eval_tasks_limit", "eval_tasks_path", "train_tokenizer",
             "split_tokens"}
    assert set(flags) == dests - later
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flags.values())
    assert RunConfig.from_dict(flags).to_dict() == flags
    with_tasks = _resolve(tmp_path, "--max_steps", "5", "--eval_tasks", "hellaswag",
                          "--eval_tasks_limit", "50").to_dict()
    assert set(with_tasks) == dests - {"eval_tasks_path", "train_tokenizer", "split_tokens"}
    assert RunConfig.from_dict(with_tasks).eval.eval_tasks_limit == 50
    assert config.batch.seq_len == 32 and config.optim.schedule.min_lr == 0.0  # demo's
    assert config.log.save_interval == config.eval.eval_interval == 300  # demo's
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.schedule.lr = 1.0


@pytest.mark.parametrize("flags,message", [
    (("--seq_len", "64"), "--seq_len 64 exceeds --max_seq_len 32"),
    (("--min_lr", "1"), "--min_lr 1.0 is larger than --lr 0.003"),
    (("--ema", "1", "--cooldown", "0"), "--ema must be in [0, 1)"),  # the first check wins
    (("--eval_windows", "-1"), "--eval_windows must be >= 0"),
])
def test_resolving_checks_the_flags_in_their_order(tmp_path, flags, message):
    with pytest.raises(UsageError) as err:
        _resolve(tmp_path, *flags)
    assert str(err.value).startswith(message)


def test_slices_check_themselves(tmp_path):
    config = _resolve(tmp_path)
    with pytest.raises(UsageError, match="--cooldown must be in"):
        dataclasses.replace(config.optim, schedule=dataclasses.replace(
            config.optim.schedule, cooldown=0.0))
    with pytest.raises(UsageError, match="exceeds --max_seq_len"):
        dataclasses.replace(config, batch=dataclasses.replace(config.batch, seq_len=64))
