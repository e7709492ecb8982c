"""`steerstrength train-tiny`: train the 1-layer GPT of Table A.1 (0.009B) on the packaged Wikipedia paragraphs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from steerstrength.cli.common import check_seed, log, progress_bar
from steerstrength.config import TrainTinyConfig

TRAIN = TrainTinyConfig()  # the options' defaults: config.py is their one home


def train_tiny(
    out: Path = typer.Option(..., "--out", "-o", help="The model directory to write (loads with --model DIR)."),
    minutes: float = typer.Option(TRAIN.minutes, "--minutes", help="Wall-clock budget of the whole command."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps at most; default: as many as fit "
                                                              "in --minutes (the cosine schedule spans them)."),
    d_model: int = typer.Option(TRAIN.d_model, "--d-model",
                                help="Width; 176 gives 9.07 M parameters (8.65 M embedding)."),
    n_head: int = typer.Option(TRAIN.n_head, "--n-head"),
    seq_len: int = typer.Option(TRAIN.seq_len, "--seq-len",
                                help="Tokens per training window (= the model's n_positions)."),
    batch_size: int = typer.Option(TRAIN.batch_size, "--batch-size", help="Windows per step."),
    lr: float = typer.Option(TRAIN.lr, "--lr", help="Peak learning rate (AdamW; linear warmup, cosine decay to 0)."),
    warmup: float = typer.Option(TRAIN.warmup, "--warmup", help="Warmup, as a fraction of the steps."),
    upper_fraction: float = typer.Option(TRAIN.upper_fraction, "--upper-fraction",
                                         help="Share of training paragraphs upper-cased (so that the model knows the "
                                              "concept)."),
    eval_every: int = typer.Option(TRAIN.eval_every, "--eval-every", help="Held-out loss every N steps."),
    seed: int = typer.Option(TRAIN.seed, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Train a 1-layer GPT (~9 M parameters, SmolLM2's tokenizer) on CPU on the Wikipedia paragraphs (Fig. A.4)."""
    from steerstrength.train_tiny import train_tiny as train

    check_seed(seed)
    keep_freed_memory()
    section = TrainTinyConfig(minutes=minutes, steps=steps, d_model=d_model, n_head=n_head, seq_len=seq_len,
                              batch_size=batch_size, lr=lr, warmup=warmup, upper_fraction=upper_fraction,
                              eval_every=eval_every, seed=seed)
    summary = train(out, section, force=force, progress=progress_bar, log=log)
    log(f"{summary['parameters']:,} parameters, {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
        f"{summary['minutes_total']:.1f} min; train loss {summary['final_train_loss']:.3f}, test loss "
        f"{summary['final_test_loss']:.3f} (upper-cased {summary['final_test_loss_upper']:.3f}); "
        f"load it with --model {out}")


def keep_freed_memory() -> None:
    """glibc only: keep freed memory in the heap instead of returning it to the system. Each step allocates and frees
    ~200 MB of logits and their gradient; unmapping them costs a page fault per 4 KiB on the next step, 40 % of the
    time on 1 core (measured: 1.69 -> 1.17 s per step). Set in this command's process only, never by the library."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations below 1 GiB come from the heap
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: do not give the heap's top back
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): the default allocator, slower on CPU
