"""The trainer's checks before it allocates or writes, its run-directory lock, and a snapshot
write that fails (disk full): one line, a non-zero exit, nothing half-written or replaced."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, tiny_flags

from training import metrics, preflight, snapshots, train_lm
from training.runlock import LOCK_NAME, lock_run_dir
from training.snapshots import LATEST, SnapshotWriteError, save_snapshot

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(argv, capsys):
    code = train_lm.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err, needle):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err, err


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- output paths ------------------------------------------------------------------------------


def test_out_dir_that_cannot_be_a_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("precious")
    for out_dir, needle in ((blocker, "the path itself is a file"),
                            (blocker / "run", "on the way, is a file")):
        flags = [*tiny_flags(tmp_path), "--out_dir", str(out_dir)]
        code, _, err = _run(flags, capsys)
        _one_error_line(code, err, needle)
    assert blocker.read_text() == "precious"
    (tmp_path / "run2" / "metrics.csv").mkdir(parents=True)
    code, _, err = _run([*tiny_flags(tmp_path), "--out_dir", str(tmp_path / "run2")], capsys)
    _one_error_line(code, err, "metrics.csv is a directory")
    cache = tmp_path / "cache_file"
    cache.write_text("")
    code, _, err = _run([*tiny_flags(tmp_path), "--cache_dir", str(cache)], capsys)
    _one_error_line(code, err, "--cache_dir")
    assert not (tmp_path / "run").exists()


def test_unwritable_out_dir_read_only_filesystem(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
    code, _, err = _run(tiny_flags(tmp_path), capsys)
    _one_error_line(code, err, "cannot write in")
    assert "Read-only file system" in err and not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write anywhere")
def test_unwritable_out_dir_permissions(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = _run([*tiny_flags(tmp_path), "--out_dir", str(locked / "run")], capsys)
    _one_error_line(code, err, "Permission denied")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_out_of_range(tmp_path, capsys, seed):
    code, _, err = _run([*tiny_flags(tmp_path), "--seed", seed], capsys)  # before: a traceback
    _one_error_line(code, err, "--seed: expected an integer in [0, 2**63)")


# -- memory ------------------------------------------------------------------------------------


def test_a_model_that_cannot_fit_is_refused_before_allocating(tmp_path, capsys):
    # d_model 2**20: over 100 TiB of weights (before: an allocator traceback after tokenizing).
    flags = [*tiny_flags(tmp_path), "--d_model", str(2**20), "--num_heads", "2"]
    code, _, err = _run(flags, capsys)
    _one_error_line(code, err, "TiB of memory")
    assert "--batch_size" in err and not (tmp_path / "run").exists()


def test_memory_message_says_estimate_and_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "memory_limit", lambda device: (10 * 2**20, "(test limit)"))
    code, _, err = _run(tiny_flags(tmp_path), capsys)
    _one_error_line(code, err, "there is 10.0 MiB (test limit)")
    assert "weights, gradients and AdamW state" in err and "MiB of activations" in err


# -- one trainer per run directory -------------------------------------------------------------

_HOLDER = """
import sys
from training.runlock import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test says otherwise (or kills us)
"""


def test_second_trainer_on_the_same_run_refuses_and_a_dead_one_leaves_no_lock(tmp_path, capsys):
    flags = tiny_flags(tmp_path, "--max_steps", "1")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # the event: it holds the lock now
        code, _, err = _run(flags, capsys)
        _one_error_line(code, err, f"another trainer (pid {holder.pid}) is already writing")
        assert not (tmp_path / "run" / "snapshots").exists()
    finally:
        holder.kill()  # like a crash: no clean-up runs
        holder.wait(timeout=60)
    assert (tmp_path / "run" / LOCK_NAME).exists()  # the file stays; the lock went with it
    code, _, err = _run(flags, capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "snapshots" / LATEST).is_file()
    lock = lock_run_dir(tmp_path / "run")  # released when that run ended
    assert lock is not None
    lock.close()


# -- a snapshot write that fails ----------------------------------------------------------------


def test_failed_snapshot_write_leaves_latest_and_best(tmp_path, monkeypatch):
    snap_dir = tmp_path / "snapshots"
    payload = {"epoch": 0, "step": 1, "w": torch.ones(3)}
    save_snapshot(snap_dir, payload, is_best=True)
    before = {name: _digest(snap_dir / name) for name in (LATEST, "best.pt")}

    def disk_full(obj, f):
        f.write(b"x" * 1000)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(snapshots.torch, "save", disk_full)
    with pytest.raises(SnapshotWriteError) as info:
        save_snapshot(snap_dir, {**payload, "step": 2}, is_best=True)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg
    assert "latest.pt and best.pt are unchanged" in msg and "--resume auto" in msg
    assert {name: _digest(snap_dir / name) for name in (LATEST, "best.pt")} == before
    assert sorted(p.name for p in snap_dir.iterdir() if p.name.startswith(".")) == []
    assert len(list(snap_dir.glob("snapshot_*"))) == 1


def test_disk_full_while_logging_metrics(tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(metrics.MetricsLog, "log", full)
    code, _, err = _run(tiny_flags(tmp_path, "--max_steps", "2", "--log_interval", "1"), capsys)
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 1 and "Traceback" not in err, err  # before: an OSError traceback
    assert len(errors) == 1 and "No space left on device" in errors[0] and "metrics.csv" in err


def _limit_file_size():
    # Files may not grow past 1 MB in the child: a snapshot (~20 MB) cannot be written, the
    # metrics can. (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing.)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_trainer_out_of_space_exits_with_one_line(tmp_path, capsys):
    flags = tiny_flags(tmp_path, "--max_steps", "2", "--eval_interval", "100")
    assert train_lm.main(flags) == 0
    capsys.readouterr()
    snap_dir = tmp_path / "run" / "snapshots"
    before = _digest(snap_dir / LATEST)
    proc = subprocess.run(
        [sys.executable, str(REPO / "training" / "train_lm.py"), *flags, "--max_steps", "4",
         "--resume", "auto"],
        capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=_limit_file_size)
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "could not write the step 4 snapshot" in errors[0], proc.stderr
    assert "latest.pt and best.pt are unchanged" in errors[0]
    assert _digest(snap_dir / LATEST) == before
    assert not [p for p in snap_dir.iterdir() if p.name.startswith(".")]
