#!/usr/bin/env python
"""Train a GPT-style language model on real text; snapshots feed `generate_lm.py`.

    python training/train_lm.py --preset demo                 # ~3 minutes on a 2-core CPU
    python training/train_lm.py --dataset wikitext --data_dir data/wikitext-2-raw
    python training/train_lm.py --preset demo --resume auto   # continue after Ctrl-C
    python training/train_lm.py --preset demo --explain       # what it would do, how long
    torchrun --nproc_per_node=8 training/train_lm.py --preset gpt2-124m --dataset wikitext103

Everything goes to the run directory (`lm_<dataset>/` unless `--out_dir`): `snapshots/`
(`snapshot_epoch_*_step_*.pt`, `latest.pt`, `best.pt`), `metrics.csv`, `loss_curve.png` and the
token cache. See `--help` for every flag; `LM_MAX_STEPS=N` caps the steps of one invocation.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.checkpoint import DeviceError, pick_device  # noqa: E402
from model.lm import LanguageModel, LMConfig  # noqa: E402
from model.tokenizer import TokenizerLoadError, load_tokenizer  # noqa: E402
from training import distributed as D  # noqa: E402
from training.batches import EpochBatches  # noqa: E402
from training.data import DataError, dataset_label, describe_split, load_split  # noqa: E402
from training.evaluation import count_windows, evaluate_tokens  # noqa: E402
from training.explain import print_explanation  # noqa: E402
from training.fused_loss import TrainingModule  # noqa: E402
from training.metrics import MetricsLog, plot_losses  # noqa: E402
from training.optim import lr_at, make_optimizer  # noqa: E402
from training.options import (  # noqa: E402
    DTYPE_NAMES,
    UsageError,
    args_to_dict,
    finalize,
    max_steps_cap,
    parse_args,
    resolve_dtype,
)
from training.preflight import check_memory, check_output_paths  # noqa: E402
from training.runlock import lock_run_dir  # noqa: E402
from training.snapshots import (  # noqa: E402
    SnapshotError,
    capture_rng_state,
    clean_state_dict,
    find_resume_snapshot,
    list_snapshots,
    load_snapshot,
    remove_stale_temporaries,
    restore_rng_state,
    save_snapshot,
    snapshot_name,
    to_cpu,
)
from training.step import autocast_context, train_step  # noqa: E402

SNAPSHOT_FORMAT = "1"
SHAPE_KEYS = ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_seq_len")
NEVER_INHERITED = {"resume", "explain", "device", "out_dir", "cache_dir"}


class DivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, snapshot, exit. A second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop right now (atomic writes stay safe)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then writing a "
              "snapshot (send it again to abort without one)", file=sys.stderr, flush=True)


def _say(info: D.DistInfo, *lines: str) -> None:
    if info.is_main:
        for line in lines:
            print(line, flush=True)


def _versions() -> dict[str, str]:
    import transformers

    versions = {"torch": torch.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "transformers": transformers.__version__,
                "snapshot_format": SNAPSHOT_FORMAT}
    return {k: str(v) for k, v in versions.items()}  # plain str: torch's is a str subclass


def _inherit_from_snapshot(args, explicit: set[str], ckpt: dict, info: D.DistInfo) -> None:
    """Resume with the snapshot's flags, except those given on this command line."""
    saved = ckpt.get("args") or {}
    changed = []
    for key, value in saved.items():
        if key in NEVER_INHERITED or not hasattr(args, key):
            continue
        if key in explicit:
            if getattr(args, key) != value and key not in SHAPE_KEYS:
                changed.append(f"{key} {value!r} -> {getattr(args, key)!r}")
            continue
        setattr(args, key, value)
    if changed:
        _say(info, "note: resuming with changed flags (the result will differ from an "
                   "uninterrupted run): " + ", ".join(changed))


def _check_model_config(cfg: LMConfig, ckpt: dict, path: Path) -> None:
    try:
        saved = LMConfig.from_dict(dict(ckpt["model_config"]))
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{path}: bad model_config ({exc})") from None
    diffs = [f"{k} {getattr(saved, k)} in the snapshot, {getattr(cfg, k)} here"
             for k in SHAPE_KEYS if getattr(saved, k) != getattr(cfg, k)]  # dropout may change
    if diffs:
        raise UsageError(f"--resume: {path} holds a different model ({'; '.join(diffs)}); drop "
                         "those flags to use the snapshot's, or use a new --out_dir")


def _load_data(args, info: D.DistInfo):
    """Train and val tokens; rank 0 builds the caches first, the others then read them."""
    def load():
        train, _ = load_split(args, "train")
        val, val_bytes = load_split(args, "val")
        return train, val, val_bytes

    result, error = None, None
    if info.is_main:
        try:
            result = load()
        except DataError as exc:
            error = str(exc)
    error = D.broadcast_object(info, error)
    if error:
        raise DataError(error)
    if not info.is_main:
        result = load()
    train, val, val_bytes = result
    if len(val) < 2:
        raise DataError(f"the validation split has {len(val)} token(s); it needs at least 2")
    return train, val, val_bytes


def _sample_text(model: LanguageModel, tok, args) -> str:
    try:
        with model:
            out = model.generate(args.sample_prompt, max_new_tokens=args.sample_tokens,
                                 temperature=0.8, top_k=200, seed=args.seed)
        return tok.decode(out[0].tolist())
    except Exception as exc:  # noqa: BLE001 - a sample is a nicety; never stop training for it
        return f"(no sample: {exc})"


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, explicit = parse_args(argv)
    cap = max_steps_cap()
    device = pick_device(args.device)
    info = D.init_distributed(device.type)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        return _train(args, explicit, argv, cap, device, info)
    finally:
        D.shutdown(info)


def _train(args, explicit: set[str], argv: list[str], cap: int | None, device: torch.device,
           info: D.DistInfo) -> int:
    finalize(args)
    snap_dir = Path(args.out_dir) / "snapshots"

    # -- resume: which snapshot, and the flags it was trained with ------------------------------
    ckpt, ckpt_path = None, None
    if args.resume == "auto":
        ckpt_path, ckpt, problems = find_resume_snapshot(snap_dir)
        for problem in problems:
            _say(info, f"warning: skipping unloadable snapshot: {problem}")
        if ckpt is None:
            _say(info, f"--resume auto: no snapshot in {snap_dir}; starting a new run")
    elif args.resume:
        ckpt_path = Path(args.resume)
        ckpt = load_snapshot(ckpt_path)
        if "out_dir" not in explicit and ckpt_path.parent.name == "snapshots":
            args.out_dir = str(ckpt_path.parent.parent)  # keep writing next to that snapshot
    if ckpt is not None:
        _inherit_from_snapshot(args, explicit, ckpt, info)
        finalize(args)
        snap_dir = Path(args.out_dir) / "snapshots"
    elif not args.explain and list_snapshots(snap_dir):
        raise UsageError(f"{snap_dir} already holds snapshots of another run; continue it with "
                         "--resume auto, or start over with a new --out_dir")

    amp = resolve_dtype(args.dtype, device)
    if amp == torch.bfloat16 and device.type == "cpu" and args.dtype == "bfloat16":
        from training.options import cpu_has_bf16

        if not cpu_has_bf16():
            _say(info, "warning: this CPU has no native bfloat16 instructions; float32 is faster")
    tok = load_tokenizer(args.tokenizer)
    vocab = args.vocab_size or len(tok)
    if vocab < len(tok):
        raise UsageError(f"--vocab_size {vocab} is smaller than the tokenizer's {len(tok):,} "
                         "tokens")
    try:
        cfg = LMConfig(vocab, args.d_model, args.num_heads, args.num_layers, args.d_ff,
                       args.max_seq_len, args.dropout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if ckpt is not None:
        _check_model_config(cfg, ckpt, ckpt_path)
    # Before anything is allocated or written: fits in memory, paths usable, nobody else here.
    check_output_paths(args)
    check_memory(cfg, args.batch_size, args.seq_len, amp, not args.no_fused_loss, device,
                 processes=info.world_size if device.type == "cpu" else 1)
    # The lock lasts while `run_lock` is referenced: until this function returns.
    run_lock = None if args.explain or not info.is_main else lock_run_dir(args.out_dir)  # noqa: F841

    train_tokens, val_tokens, val_bytes = _load_data(args, info)
    batches = EpochBatches(train_tokens, args.seq_len, args.batch_size, args.grad_accum,
                           info.world_size, info.rank, args.seed)
    spe = batches.steps_per_epoch
    max_steps = args.max_steps or max(1, round(args.epochs * spe))
    stop_at = min(max_steps, cap) if cap else max_steps
    if args.warmup_steps >= max_steps and max_steps > 1:
        _say(info, f"note: --warmup_steps {args.warmup_steps} >= {max_steps} steps; the learning "
                   "rate never reaches its peak")

    # -- model, optimizer ------------------------------------------------------------------------
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    model = LanguageModel(**cfg.to_dict()).to(device)
    model.tokenizer = tok
    module = TrainingModule(model, fused_head=not args.no_fused_loss, compile_trunk=args.compile)
    ddp = None
    if info.enabled:
        ddp = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    runner = ddp or module
    optimizer = make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2),
                               device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    autocast = autocast_context(device.type, amp)
    params = list(model.parameters())

    start_step, epoch, batch_idx, tokens_seen, train_time = 0, 0, 0, 0, 0.0
    best_val, best_name, last_val, last_train = None, None, None, None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model_state_dict"])
            optimizer.load_state_dict(ckpt["optimizer_state_dict"])
            if scaler.is_enabled() and ckpt.get("scaler_state_dict"):
                scaler.load_state_dict(ckpt["scaler_state_dict"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise SnapshotError(f"{ckpt_path} does not fit this model/optimizer "
                                f"({first})") from None
        start_step = int(ckpt["step"])
        pos = ckpt.get("data_position") or {}
        epoch, batch_idx = int(pos.get("epoch", ckpt["epoch"])), int(pos.get("batch", 0))
        same_grid = (pos.get("global_batch") == batches.global_batch
                     and pos.get("seq_len") == batches.seq_len and pos.get("seed") == args.seed
                     and pos.get("num_windows") == batches.num_windows)
        if not same_grid:
            windows = batch_idx * int(pos.get("global_batch") or batches.global_batch)
            batch_idx = min(windows // batches.global_batch, spe - 1)
            _say(info, "note: batch size, sequence length, seed or data changed since the "
                       "snapshot; continuing from the nearest position (not bit-exact)")
        if batch_idx >= spe:
            epoch, batch_idx = epoch + 1, 0
        tokens_seen = int(ckpt.get("tokens_seen", 0))
        train_time = float(ckpt.get("train_time_s", 0.0))
        best_val, best_name = ckpt.get("best_val_loss"), ckpt.get("best_snapshot")
        if ckpt.get("val_loss") is not None:
            last_val = (float(ckpt["val_loss"]), float(ckpt.get("val_ppl") or math.nan),
                        int(ckpt.get("val_step", start_step)))
        last_train = ckpt.get("train_loss")
        rng = ckpt.get("rng_state") or {}
        ranks = rng.get("ranks") or []
        if len(ranks) == info.world_size:
            restore_rng_state(ranks[info.rank])
        else:
            torch.manual_seed(args.seed + start_step + 1000003 * info.rank)
            _say(info, f"note: the snapshot was written by {len(ranks)} process(es), this run has "
                       f"{info.world_size}; dropout randomness is reseeded (not bit-exact)")
    elif info.enabled:
        torch.manual_seed(args.seed + 1000003 * info.rank)  # different dropout masks per rank

    def one_step(epoch: int, batch_idx: int, runner=runner) -> torch.Tensor:
        def micro_batches():
            for micro in range(args.grad_accum):
                x, y = batches.get(epoch, batch_idx, micro)
                if device.type == "cuda":
                    yield (x.pin_memory().to(device, non_blocking=True),
                           y.pin_memory().to(device, non_blocking=True))
                else:
                    yield x.to(device), y.to(device)

        return train_step(runner, optimizer, scaler, micro_batches(), args.grad_accum, autocast,
                          params, args.grad_clip, ddp if runner is ddp else None)

    if args.explain:
        if info.is_main:
            def measure() -> tuple[float, float]:
                """Seconds for one training step, and for one evaluation (extrapolated)."""
                for g in optimizer.param_groups:
                    g["lr"] = 0.0  # measure speed only; nothing here is saved anyway
                # Without DDP: the other ranks are not stepping (communication is not timed).
                one_step(0, 0, module)  # warm-up (and compilation with --compile)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times = []  # up to 3 steps or ~5 s; the median
                while len(times) < 3 and sum(times) < 5.0:
                    t0 = time.perf_counter()
                    one_step(0, min(len(times) + 1, spe - 1), module)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                step_time = sorted(times)[len(times) // 2]
                t1 = time.perf_counter()
                res = evaluate_tokens(model, val_tokens, seq_len=args.seq_len,
                                      batch_size=args.eval_batch_size,
                                      max_windows=args.eval_batch_size,
                                      dtype=None if amp == torch.float32 else DTYPE_NAMES[amp])
                t2 = time.perf_counter()
                windows = count_windows(len(val_tokens), args.seq_len, args.seq_len)
                if args.eval_windows:
                    windows = min(windows, args.eval_windows)
                return step_time, (t2 - t1) * windows / max(1, res.windows)

            print_explanation(
                args=args, cfg=cfg, num_params=model.num_params(non_embedding=False),
                non_embedding=model.num_params(non_embedding=False) - (
                    cfg.vocab_size + cfg.max_seq_len) * cfg.d_model,
                batches=batches, max_steps=max_steps, stop_at=stop_at, start_step=start_step,
                train_desc=describe_split(args, "train"), val_desc=describe_split(args, "val"),
                val_tokens=len(val_tokens), device=device, amp=amp, world_size=info.world_size,
                resumed_from=ckpt_path if ckpt is not None else None, measure_step=measure,
                argv=argv, existing_run=ckpt is None and bool(list_snapshots(snap_dir)))
        D.barrier(info)
        return 0

    if start_step >= stop_at:
        _say(info, f"nothing to do: the run is already at step {start_step:,} (of {max_steps:,}); "
                   f"raise --max_steps to train further")
        return 0

    # -- bookkeeping -----------------------------------------------------------------------------
    metrics = None
    if info.is_main:
        snap_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(snap_dir)
        metrics = MetricsLog(Path(args.out_dir) / "metrics.csv")
        if ckpt is not None:
            metrics.truncate_after(start_step)
    label = dataset_label(args)
    start = f"resuming from {ckpt_path} at step {start_step}" if ckpt else "new run"
    _say(info,
         f"{start}"
         f" | model {model.num_params(non_embedding=False) / 1e6:.1f}M parameters | {label}: "
         f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens | "
         f"{batches.tokens_per_step:,} tokens/step | {max_steps:,} steps "
         f"({max_steps / spe:.2f} epochs) | {DTYPE_NAMES[amp]} on {device}"
         f"{' x' + str(info.world_size) if info.enabled else ''} | snapshots in {snap_dir}")
    if cap and cap < max_steps:
        _say(info, f"LM_MAX_STEPS={cap}: stopping after step {stop_at:,}")

    bar = None
    if info.is_main:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()  # in log files, a line every 30 s rather than every update
        bar = tqdm(total=stop_at, initial=start_step, unit="step", desc="training",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5 if tty else 30.0)
    write = bar.write if bar is not None else (lambda s: None)

    def evaluate(step: int) -> bool:
        """Validate (rank 0); returns whether this is the best validation loss so far."""
        nonlocal last_val, best_val
        res = evaluate_tokens(model, val_tokens, seq_len=args.seq_len,
                              batch_size=args.eval_batch_size,
                              max_windows=args.eval_windows or None,
                              dtype=None if amp == torch.float32 else DTYPE_NAMES[amp],
                              num_bytes=val_bytes)
        if not math.isfinite(res.loss):
            raise DivergedError(f"the validation loss is {res.loss} at step {step}")
        last_val = (res.loss, res.perplexity, step)
        is_best = best_val is None or res.loss < best_val
        if is_best:
            best_val = res.loss
        metrics.log(step, "val", step / spe, tokens_seen, lr, res.loss, None, train_time)
        bpb = f" | {res.bits_per_byte:.3f} bits/byte" if res.bits_per_byte else ""
        write(f"step {step:,} | val loss {res.loss:.4f} | ppl {res.perplexity:.1f}{bpb}"
              f"{' | best' if is_best else ''}")
        if not args.no_plot:
            plot_losses(metrics.path, Path(args.out_dir) / "loss_curve.png",
                        f"{label}: {cfg.num_layers} layers x {cfg.d_model}")
        if args.sample_tokens:
            write("  sample: " + _sample_text(model, tok, args).replace("\n", "\n  | "))
        return is_best

    def snapshot(step: int, epoch_of_step: int, is_best: bool) -> Path | None:
        nonlocal best_name
        rng = D.gather_objects(info, capture_rng_state())
        if not info.is_main:
            return None
        name = snapshot_name(epoch_of_step, step)
        if is_best:
            best_name = name
        payload = {
            "model_config": cfg.to_dict(),
            "model_state_dict": clean_state_dict(model.state_dict()),
            "optimizer_state_dict": to_cpu(optimizer.state_dict()),
            "step": step, "epoch": epoch_of_step,
            "val_loss": last_val[0] if last_val else None,
            "val_ppl": last_val[1] if last_val else None,
            "val_step": last_val[2] if last_val else None,
            "best_val_loss": best_val, "best_snapshot": best_name,
            "train_loss": last_train, "tokens_seen": tokens_seen, "train_time_s": train_time,
            "args": args_to_dict(args),
            "rng_state": {"world_size": info.world_size, "ranks": [to_cpu(r) for r in rng]},
            "data_position": {"epoch": epoch, "batch": batch_idx, "seed": args.seed,
                              "seq_len": batches.seq_len, "global_batch": batches.global_batch,
                              "num_windows": batches.num_windows, "steps_per_epoch": spe},
            "tokenizer": args.tokenizer, "dataset": label,
            "versions": _versions(), "created": datetime.now().isoformat(timespec="seconds"),
        }
        if scaler.is_enabled():
            payload["scaler_state_dict"] = scaler.state_dict()
        return save_snapshot(snap_dir, payload, name=name, is_best=is_best,
                             keep_last=args.keep_last, protect=[best_name] if best_name else [])

    # -- the loop --------------------------------------------------------------------------------
    stop = _StopRequest()
    stop.install()
    step, lr = start_step, args.lr
    last_saved = None
    log_tokens, log_time = 0, 0.0
    try:
        while step < stop_at:
            lr = lr_at(step, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                       max_steps=max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            step_loss = one_step(epoch, batch_idx)
            epoch_of_step = epoch
            step += 1
            batch_idx += 1
            if batch_idx == spe:
                epoch, batch_idx = epoch + 1, 0
            tokens_seen += batches.tokens_per_step
            if info.enabled:  # mean loss over ranks, and whether any rank was asked to stop
                flags = torch.stack([step_loss, torch.tensor(float(stop.signum or 0),
                                                             device=device)])
                D.all_reduce_sum(info, flags)
                step_loss, stop_now = flags[0] / info.world_size, bool(flags[1].item() > 0)
            else:
                stop_now = stop.signum is not None
            final = step >= stop_at
            eval_now = final or step % args.eval_interval == 0
            save_now = final or stop_now or step % args.save_interval == 0
            log_now = final or step % args.log_interval == 0
            if log_now or eval_now or save_now or info.enabled or device.type == "cpu":
                value = float(step_loss.item())  # a host sync: on GPUs only when needed
                if not math.isfinite(value):
                    raise DivergedError(f"the training loss is {value} at step {step}")
                last_train = value
            elapsed = time.perf_counter() - t0
            train_time += elapsed
            log_time += elapsed
            log_tokens += batches.tokens_per_step
            if log_now and info.is_main:
                speed = log_tokens / max(log_time, 1e-9)
                metrics.log(step, "train", step / spe, tokens_seen, lr, last_train, speed,
                            train_time)
                ppl = math.exp(min(last_train, 700))
                bar.set_postfix_str(f"loss {last_train:.3f} ppl {ppl:.1f} {speed:,.0f} tok/s",
                                    refresh=False)
                log_tokens, log_time = 0, 0.0
            if bar is not None:
                bar.update(1)
            is_best = False
            if eval_now and not stop_now:
                is_best = evaluate(step) if info.is_main else False
                is_best = D.broadcast_object(info, is_best)
                save_now = save_now or is_best
            if save_now:
                snapshot(step, epoch_of_step, is_best)
                last_saved = step
            if stop_now:
                break
    except DivergedError as exc:
        if bar is not None:
            bar.close()
        kept = f"the last good snapshot is {snap_dir / 'latest.pt'}" if last_saved or ckpt else (
            "no snapshot was written")
        print(f"error: {exc}; stopped without saving ({kept}). Try a lower --lr (it is "
              f"{args.lr:g}), more --warmup_steps, or --dtype float32.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        where = f"; the last snapshot is step {last_saved}" if last_saved else ""
        print(f"aborted at step {step}{where}", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)
    finally:
        stop.restore()
    if bar is not None:
        bar.close()

    latest = snap_dir / "latest.pt"
    if stop.signum is not None:
        _say(info, f"stopped at step {step:,} by {signal.Signals(stop.signum).name}; snapshot "
                   f"written. Continue with --resume auto. ({latest})")
        return 128 + stop.signum
    val = f"val loss {last_val[0]:.4f} (ppl {last_val[1]:.1f})" if last_val else "no validation"
    best = f"; best val loss {best_val:.4f} ({snap_dir / 'best.pt'})" if best_val else ""
    _say(info, f"done: step {step:,}, {val}{best}; {train_time / 60:.1f} min of training.",
         f"generate: python generate_lm.py --checkpoint {latest} --prompt "
         f"{'ROMEO:' if label == 'shakespeare' else 'The'} --max_length 100")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the trainer; returns the exit status (0 done, 1 diverged, 2 bad input, 130/143
    stopped by SIGINT/SIGTERM after writing a snapshot)."""
    try:
        return _run(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except (UsageError, DataError, SnapshotError, TokenizerLoadError, DeviceError) as exc:
        print(f"train_lm.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk or an I/O error outside the snapshot writes
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"train_lm.py: error: {exc.strerror or exc}{where}; snapshots are written "
              "atomically, so those already written are intact", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
