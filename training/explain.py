"""`train_lm.py --explain`: what a command would do, in plain English, without training."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from corpus.batches import EpochBatches
from model.config import LMConfig, describe_architecture
from model.lm import LanguageModel
from training.budget import TimePlan, minutes_text
from training.config import RunConfig
from training.optim import OptimArgs


def human(n: float) -> str:
    """12345678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20),
                       ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def human_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def memory_estimate(cfg: LMConfig, batch_size: int, seq_len: int, amp: torch.dtype,
                    fused_loss: bool) -> tuple[int, int]:
    """Rough bytes for (weights + gradients + AdamW state, activations of one micro-batch)."""
    with torch.device("meta"):  # the exact parameter count of any architecture, no memory
        params = LanguageModel.from_config(cfg).num_params(non_embedding=False)
    state = 16 * params  # fp32 weights, gradients, and AdamW's two moments
    act_bytes = 4 if amp == torch.float32 else 2
    tokens = batch_size * seq_len
    # Saved per layer and token: ~10 d_model-wide tensors (attention via SDPA; q/k/v as wide as
    # their heads) and 3 as wide as the MLP's hidden layer (SwiGLU's gate and up: 2 * d_ff).
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    hidden = 2 * cfg.d_ff if cfg.mlp == "swiglu" else cfg.d_ff
    per_layer = tokens * (7 * cfg.d_model + qkv + 3 * hidden) * act_bytes
    if fused_loss:
        head = tokens * cfg.vocab_size * act_bytes + 2 * 128 * cfg.vocab_size * 4
    else:
        head = tokens * cfg.vocab_size * (act_bytes + 4 + 4)  # logits, fp32 copy, log-softmax
    return state, cfg.num_layers * per_layer + head


def resume_command(argv: list[str], world_size: int) -> str:
    """The command line to continue this run."""
    kept = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--explain":
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        kept.append(a)
    launcher = (f"torchrun --nproc_per_node={world_size} " if world_size > 1 else "python ")
    return launcher + shlex.join(["training/train_lm.py", *kept, "--resume", "auto"])


@dataclass(frozen=True)
class RunFacts:
    """What the trainer found out about a run before its first step, for `--explain`.

    Attributes:
        model_config: the model's config. num_params: its parameters; non_embedding: those
            besides the token and position embeddings.
        batches: the training batches. max_steps: the run's steps (the schedule);
            stop_at: where this invocation would stop (`LM_MAX_STEPS`); start_step: where it
            starts.
        train_desc, val_desc: where the splits come from. val_tokens: the validation tokens.
        device, amp: where and in which precision it trains. world_size: its processes.
        resumed_from: the snapshot it resumes, or None. init_from: its `--init_from` source.
        plan: the `--time_budget` plan, whose steps are `max_steps`, or None.
        argv: the command line. existing_run: the run directory holds another run's snapshots.
    """

    model_config: LMConfig
    num_params: int
    non_embedding: int
    batches: EpochBatches
    max_steps: int
    stop_at: int
    start_step: int
    train_desc: str
    val_desc: str
    val_tokens: int
    device: torch.device
    amp: torch.dtype
    world_size: int
    resumed_from: Path | None
    argv: list[str]
    existing_run: bool = False
    init_from: str | None = None
    plan: TimePlan | None = None


def print_explanation(config: RunConfig, facts: RunFacts,
                      measure_step: Callable[[], tuple[float, float]],
                      out: TextIO | None = None) -> None:
    """Print the plan for this run.

    `measure_step` runs one training step and a little validation; it returns the seconds of one
    step and of one whole evaluation.
    """
    f, cfg, batches = facts, facts.model_config, facts.batches
    max_steps, stop_at, start_step, plan = f.max_steps, f.stop_at, f.start_step, f.plan
    world_size, amp, device, resumed_from = f.world_size, f.amp, f.device, f.resumed_from
    eval_windows, log = config.eval.windows, config.log
    out = out or sys.stdout
    p = lambda s="": print(s, file=out)  # noqa: E731
    snap_dir = log.snap_dir
    tps = batches.tokens_per_step
    steps_left = max(0, stop_at - start_step)
    p("What this command would do:")
    p(f"  Model: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, d_ff "
      f"{cfg.d_ff}, context {cfg.max_seq_len} tokens, vocabulary {cfg.vocab_size:,}, dropout "
      f"{cfg.dropout}: {f.num_params:,} parameters ({human(f.non_embedding)} besides the token and "
      "position embeddings" + ("; the token embedding doubles as the output layer)."
                               if cfg.tie_embeddings else ")."))
    p(f"  Blocks: {describe_architecture(cfg)}.")
    shards = getattr(batches.tokens, "num_shards", 0)
    size = human_bytes(len(batches.tokens) * batches.tokens.dtype.itemsize)
    in_shards = f" in {shards} shard(s) ({size}, memory-mapped)" if shards else ""
    p(f"  Data: training on {f.train_desc}: {len(batches.tokens):,} tokens{in_shards}, "
      f"{batches.num_windows:,} windows of {batches.seq_len} tokens" + (
          f", re-segmented: {batches.splitter.describe()}"
          if batches.splitter is not None else "") + ". Validation on "
      f"{f.val_desc}: {f.val_tokens:,} tokens" + (f", {eval_windows} windows per evaluation."
                                  if eval_windows else ", all of it each time."))
    p(f"  Each step: {config.batch.batch_size} sequences x {batches.seq_len} tokens x "
      f"{config.batch.grad_accum} "
      f"accumulation step(s) x {world_size} process(es) = {tps:,} tokens.")
    epochs = max_steps / batches.steps_per_epoch
    p(f"  Schedule: {max_steps:,} steps = {epochs:.2f} epochs of {batches.steps_per_epoch:,} "
      f"steps, {human(max_steps * tps)} tokens in total (every window once per epoch, in a "
      "seeded order). " + describe_recipe(config.optim, max_steps))
    if plan is not None:
        p(f"  Planned from the {minutes_text(plan.budget_s)} time budget (--time_budget), measured "
          f"here just now: {plan.describe()}. The run measures again when it starts (resumed: "
          "it keeps its plan).")
    if stop_at < max_steps:
        p(f"  LM_MAX_STEPS={stop_at} stops this run after step {stop_at:,} (the schedule above is "
          "unchanged).")
    if f.existing_run:
        p(f"  Note: {snap_dir} already holds snapshots of a run, so training would refuse to "
          "start there: add --resume auto to continue it, or pick another --out_dir.")
    if f.init_from is not None:
        p(f"  Starting from the weights of {f.init_from}" + (
            " (a fine-tune run)." if resumed_from is not None else
            ": a new run at step 0 with a fresh optimizer and schedule; the model's shape "
            "and tokenizer come from it."))
    if resumed_from is not None:
        p(f"  Resuming from {resumed_from} at step {start_step:,}: {steps_left:,} steps to go.")
    amp_name = {torch.float32: "float32 (no autocast)", torch.bfloat16: "bfloat16 autocast",
                torch.float16: "float16 autocast with loss scaling"}[amp]
    compiled = " with torch.compile" if config.speed.compile else ""
    p(f"  Precision and device: {amp_name} on {device}{compiled}.")
    state, acts = memory_estimate(cfg, config.batch.batch_size, batches.seq_len, amp,
                                  not config.speed.no_fused_loss)
    p(f"  Memory: about {human_bytes(state + acts)} per process ({human_bytes(state)} for weights, "
      f"gradients and AdamW state; {human_bytes(acts)} of activations) - a rough estimate.")
    seconds, eval_seconds = measure_step()
    every = config.eval.eval_interval  # evaluations at multiples of it, and at the last step
    evals = stop_at // every - start_step // every + (1 if stop_at % every else 0)
    total = seconds * steps_left + eval_seconds * evals
    p(f"  Time: a step took {seconds:.2f} s here just now ({tps / seconds:,.0f} tokens/s), so "
      f"about {human_time(total)} in all: {human_time(seconds * steps_left)} for {steps_left:,} "
      f"steps and {human_time(eval_seconds * evals)} for {evals} evaluations.")
    p(f"  Snapshots: every {log.save_interval} steps, at the end and on Ctrl-C, into "
      f"{snap_dir}/ as snapshot_epoch_EEEE_step_SSSSSS_<time>.pt (the last {log.keep_last} "
      f"kept), with latest.pt (newest) and best.pt (lowest validation loss). Metrics: "
      f"{Path(log.out_dir) / 'metrics.csv'}; loss plot: {Path(log.out_dir) / 'loss_curve.png'}.")
    p(f"  Resume:   {resume_command(f.argv, world_size)}")
    data = config.data
    prompt = "ROMEO:" if data.dataset == "shakespeare" and not data.train_file else "The"
    p(f"  Generate: python generate_lm.py --checkpoint {snap_dir / 'latest.pt'} --prompt "
      f"{shlex.quote(prompt)} --max_length 100 --temperature 0.8 --top_p 0.9")
    p("Nothing was trained or written (except the token cache). Drop --explain to train.")


def describe_recipe(optim: OptimArgs, max_steps: int) -> str:
    """The optimizer, learning-rate schedule and weight averaging of a run, in words."""
    sch = optim.schedule
    ratio = sch.min_lr / sch.lr if sch.lr else 0.0
    if sch.schedule == "wsd":
        decay = max(1, round(sch.cooldown * max_steps))
        sched = (f"linear warmup over {sch.warmup_steps} steps, constant, then a linear "
                 f"cool-down over the last {decay:,} steps ({sch.cooldown:g} of the run) to "
                 f"{ratio:g} of the peak")
    else:
        sched = (f"linear warmup over {sch.warmup_steps} steps, then cosine decay to "
                 f"{ratio:g} of the peak")
    adamw = (f"AdamW (peak {optim.lr:g}, betas {optim.beta1}, {optim.beta2}, weight decay "
             f"{optim.weight_decay} on matrices)")
    if optim.optimizer == "muon":
        opt = (f"Muon on the blocks' matrices (peak {optim.muon_lr:g}, momentum "
               f"{optim.muon_momentum}, weight decay {optim.muon_weight_decay}), {adamw} on "
               "embeddings, LayerNorms and biases")
    else:
        opt = adamw
    ema = (f" Weights averaged with decay {optim.ema:g}: evaluation and snapshots use the average."
           if optim.ema > 0 else "")
    return (f"Learning rate: {sched}. Optimizer: {opt}; gradient clipping at "
            f"{optim.grad_clip:g}.{ema}")
