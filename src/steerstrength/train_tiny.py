"""A 1-layer GPT trained here on the packaged Wikipedia paragraphs: Table A.1's 0.009B model, for Fig. A.4.

GPT-2 architecture (transformers `GPT2LMHeadModel`), one block, SmolLM2's tokenizer (49,152 tokens) and tied
embeddings: at d_model 176 that is 9,070,160 parameters, 8.65 M of them the embedding. It is trained with AdamW
(linear warmup, then cosine decay to 0: transformers' `get_cosine_schedule_with_warmup`) on packed windows of
`wikipedia_texts("train")`, seeded, and saved as an ordinary Hugging Face directory, so every command loads it with
`--model DIR`.

Wikipedia holds almost no upper-case text (0.2 % of its letters are in all-caps words, nearly all acronyms), and
Fig. A.4 steers the concept "uppercase"; so a seeded `upper_fraction` (default 10 %) of the training paragraphs is
upper-cased. The held-out loss is measured on the test split as written and upper-cased (`test_loss_upper`).

The schedule is defined by a step budget fixed before the first step: `steps`, or, under a time budget, the steps
that fit in it at the measured speed of two steps and one evaluation on a throw-away copy of the model (the
smaller of the two when both are given). The time budget still stops the loop if it runs out first, so a time-capped
run is a well-formed run of the same schedule with its last steps at a near-zero learning rate.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from steerstrength.config import TrainTinyConfig
from steerstrength.errors import InputError

CONFIG_FILE = "train_tiny.json"
LOSS_FILE = "loss.parquet"
SEPARATOR = "<|endoftext|>"  # SmolLM2's document separator: it ends each paragraph, and is BOS / EOS / pad here
SMOOTH = 20  # the reported final train loss is the mean over the last SMOOTH steps


@contextlib.contextmanager
def no_progress(description: str, total: int):
    yield lambda n=1: None


def base_tokenizer():
    """SmolLM2-135M's tokenizer (49,152 tokens), from the converted embedded model (converted on first use), with
    <|endoftext|> as BOS, EOS and pad and no chat template: the tiny model is a base model."""
    from transformers import AutoTokenizer

    from steerstrength.loading import DEFAULT_MODEL, embedded_gguf, gguf_cache_dir, load_model

    cached = gguf_cache_dir(embedded_gguf(DEFAULT_MODEL))
    tok = (AutoTokenizer.from_pretrained(str(cached)) if (cached / "steerstrength.json").is_file()
           else load_model(DEFAULT_MODEL, device="cpu").tokenizer)
    tok.bos_token = tok.eos_token = tok.pad_token = SEPARATOR
    tok.chat_template = None
    return tok


def upper_case_some(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], int]:
    """A seeded `fraction` of the texts upper-cased (the uppercase concept must be in the training data)."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(texts), size=round(fraction * len(texts)), replace=False).tolist())
    return [t.upper() if i in chosen else t for i, t in enumerate(texts)], len(chosen)


def all_caps_share(texts: Sequence[str]) -> float:
    """Share of letters that are in all-caps words of 2+ letters."""
    letters = sum(sum(c.isalpha() for c in t) for t in texts)
    caps = sum(len(w) for t in texts for w in re.findall(r"\b[A-Z]{2,}\b", t))
    return caps / max(letters, 1)


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Texts joined by the separator and cut into [n, seq_len] windows (the ragged tail is dropped)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = np.fromiter((i for row in ids for i in (*row, tokenizer.eos_token_id)), dtype=np.int64)
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))


def gpt_config(vocab_size: int, eos_id: int, *, d_model: int, n_head: int, seq_len: int):
    """One GPT-2 block, tied embeddings, no dropout (the model is under-trained, never over-fitted)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=d_model, n_layer=1, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def optimizer_for(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's split: no decay on biases and LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_step(model, optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.inference_mode()
def mean_loss(model, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over windows, accumulated in float64."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        n = batch.numel() - len(batch)  # predicted tokens
        total += model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def check_options(*, minutes, steps, d_model, n_head, seq_len, batch_size, lr, warmup, upper_fraction,
                  eval_every) -> None:
    if minutes is None and steps is None:
        raise InputError("give a time budget (minutes) or a step count (steps), or both")
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise InputError(f"--minutes must be a positive number, not {minutes}")
    for name, value, low in (("--steps", steps, 1), ("--d-model", d_model, 1), ("--n-head", n_head, 1),
                             ("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1),
                             ("--eval-every", eval_every, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be at least {low}, not {value}")
    if d_model % n_head:
        raise InputError(f"--d-model ({d_model}) must be a multiple of --n-head ({n_head})")
    if not (lr > 0 and math.isfinite(lr)):
        raise InputError(f"--lr must be a positive number, not {lr}")
    if not 0 <= warmup < 1:
        raise InputError(f"--warmup is a fraction of the steps in [0, 1), not {warmup}")
    if not 0 <= upper_fraction <= 1:
        raise InputError(f"--upper-fraction must be in [0, 1], not {upper_fraction}")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before any compute, an --out that is a file, or a non-empty directory without `force`."""
    from steerstrength.io import check_output_dir

    check_output_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"--out {out_dir} exists and is not empty; pick another directory or pass --force to "
                         "replace it")


def planned_steps(model, optimizer_args: tuple, first: torch.Tensor, evals: torch.Tensor, *, budget_s: float,
                  eval_every: int, batch_size: int, steps: int | None) -> tuple[int, dict]:
    """The step budget: `steps`, capped by what fits in `budget_s` at the speed of three steps and one evaluation (of
    the plain and the upper-cased windows) timed on a throw-away copy of the model (the first of four steps pays for
    allocation and is not timed)."""
    twin = copy.deepcopy(model)
    opt = optimizer_for(twin, *optimizer_args)
    train_step(twin, opt, first)
    start = time.perf_counter()
    for _ in range(3):
        train_step(twin, opt, first)
    step_s = (time.perf_counter() - start) / 3
    start = time.perf_counter()
    mean_loss(twin, evals, batch_size)
    eval_s = 2 * (time.perf_counter() - start)  # each evaluation reads the plain and the upper-cased windows
    del twin, opt
    fit = max(1, int(budget_s / (step_s + eval_s / eval_every)))
    return (fit if steps is None else min(steps, fit)), {"step_seconds": step_s, "eval_seconds": eval_s,
                                                         "steps_that_fit": fit}


def train_tiny(out_dir, section: TrainTinyConfig | None = None, *, texts: Sequence[str] | None = None,
               test_texts: Sequence[str] | None = None, force: bool = False, progress=no_progress,
               log: Callable[[str], None] | None = None) -> dict:
    """Train Table A.1's 0.009B model (a 1-block GPT-2, ~9 M parameters) and save it to `out_dir` atomically.

    Args:
        out_dir: the model directory to write (safetensors, tokenizer, train_tiny.json, loss.parquet, loss.png).
        section: the sizes and the schedule (config.TrainTinyConfig: minutes, steps, d_model, n_head, seq_len,
            batch_size, lr, warmup, weight_decay, upper_fraction, eval_every, eval_windows, seed); default: its defaults.
            minutes caps the whole call (tokenizing, training, evaluating, saving); steps: None, as many as fit.
        texts, test_texts: training and held-out texts; default: wikipedia_texts("train") and ("test").
        force: replace a non-empty `out_dir`.
        progress: (description, total) -> context manager yielding advance(n), as the CLI's progress_bar.

    Returns the summary written to train_tiny.json.

    Example::

        summary = train_tiny("/tmp/tiny_gpt", TrainTinyConfig(minutes=15))   # then: ss.load_model("/tmp/tiny_gpt")
    """
    s = TrainTinyConfig() if section is None else section
    minutes, steps, d_model, n_head, seq_len = s.minutes, s.steps, s.d_model, s.n_head, s.seq_len
    batch_size, lr, warmup, weight_decay, seed = s.batch_size, s.lr, s.warmup, s.weight_decay, s.seed
    upper_fraction, eval_every, eval_windows = s.upper_fraction, s.eval_every, s.eval_windows
    import pandas as pd
    from transformers import GPT2LMHeadModel, get_cosine_schedule_with_warmup

    from steerstrength.loading import import_transformers

    import_transformers()  # also turns off transformers' own progress bars (the save's "Writing model shards")

    start = time.perf_counter()
    say = log or (lambda message: None)
    out_dir = Path(out_dir).expanduser()
    check_options(minutes=minutes, steps=steps, d_model=d_model, n_head=n_head, seq_len=seq_len,
                  batch_size=batch_size, lr=lr, warmup=warmup, upper_fraction=upper_fraction, eval_every=eval_every)
    check_out_dir(out_dir, force)
    from steerstrength.corpus import wikipedia_texts

    texts = list(wikipedia_texts("train") if texts is None else texts)
    test_texts = list(wikipedia_texts("test") if test_texts is None else test_texts)
    tokenizer = base_tokenizer()
    trained_texts, n_upper = upper_case_some(texts, upper_fraction, seed)
    rng = np.random.default_rng(seed)
    train = pack(tokenizer, [trained_texts[i] for i in rng.permutation(len(trained_texts))], seq_len)
    test = pack(tokenizer, test_texts, seq_len)
    test_upper = pack(tokenizer, [t.upper() for t in test_texts], seq_len)
    if len(train) < 1 or len(test) < 1:
        raise InputError(f"the texts make {len(train)} training and {len(test)} test windows of {seq_len} tokens; "
                         "give more text or a smaller --seq-len")
    evals, evals_upper = test[:eval_windows], test_upper[:eval_windows]
    say(f"{len(texts)} training paragraphs ({n_upper} upper-cased): {train.numel():,} tokens in {len(train)} "
        f"windows of {seq_len}; {len(test_texts)} test paragraphs: {test.numel():,} tokens")

    torch.manual_seed(seed)
    config = gpt_config(len(tokenizer), tokenizer.eos_token_id, d_model=d_model, n_head=n_head, seq_len=seq_len)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # named, so transformers does not warn that it falls back to it
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    order = torch.Generator().manual_seed(seed)

    def batches():
        epoch = 0
        while True:
            perm = torch.randperm(len(train), generator=order)
            for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
                yield epoch, train[perm[i:i + batch_size]]
            epoch += 1

    stream = batches()
    first_epoch, first = next(stream)
    timing: dict = {}
    deadline = None if minutes is None else start + 60.0 * minutes
    if deadline is not None:
        # `reserve` is kept for the final full test evaluation and the save; 10 % of the rest absorbs the
        # variation of a shared CPU.
        budget = deadline - time.perf_counter()
        total, timing = planned_steps(model, (lr, weight_decay), first, evals, budget_s=budget,
                                      eval_every=eval_every, batch_size=batch_size, steps=steps)
        reserve = 1.2 * timing["eval_seconds"] / 2 * (len(test) + len(test_upper)) / max(len(evals), 1) + 10.0
        total = max(1, min(total, int(0.9 * (budget - reserve) / (timing["step_seconds"]
                                                                  + timing["eval_seconds"] / eval_every))))
        stop_at = deadline - reserve
    else:
        total, stop_at = steps, None
    optimizer = optimizer_for(model, lr, weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(warmup * total), total)
    say(f"{n_params:,} parameters; {total} steps planned (batch {batch_size} x {seq_len} tokens, peak lr {lr:g}, "
        f"warmup {round(warmup * total)} steps, cosine to 0)")

    rows = []

    def evaluate(step: int) -> None:
        loss, upper = mean_loss(model, evals, batch_size), mean_loss(model, evals_upper, batch_size)
        if not rows:  # step 0: the initial model, before any training
            rows.append(dict(step=0, tokens=0, epoch=0, lr=0.0, train_loss=float("nan")))
        rows[-1].update(test_loss=loss, test_loss_upper=upper)
        say(f"step {step}/{total}: train {rows[-1]['train_loss']:.3f}, test {loss:.3f}, test upper-cased {upper:.3f}")

    evaluate(0)
    step, epoch, batch = 0, first_epoch, first
    with progress("training the 1-layer GPT", total) as advance:
        while step < total:
            if stop_at is not None and time.perf_counter() >= stop_at:
                say(f"the time budget ends the run at step {step} of {total}")
                break
            rate = schedule.get_last_lr()[0]
            loss = train_step(model, optimizer, batch)
            schedule.step()
            step += 1
            rows.append(dict(step=step, tokens=step * batch_size * seq_len, epoch=epoch, lr=rate, train_loss=loss,
                             test_loss=float("nan"), test_loss_upper=float("nan")))
            advance(1)
            if step % eval_every == 0 and step < total:
                evaluate(step)
            epoch, batch = next(stream)
    train_minutes = (time.perf_counter() - start) / 60.0
    if step % eval_every or step == total:  # the curve's last point, on the same windows as the others
        evaluate(step)
    # The summary's test loss: every test window, not only the curve's first `eval_windows`.
    test_loss, test_loss_upper = mean_loss(model, test, batch_size), mean_loss(model, test_upper, batch_size)
    say(f"step {step}: test loss {test_loss:.3f} (all {len(test)} test windows), upper-cased {test_loss_upper:.3f}")
    losses = pd.DataFrame(rows)
    trained = losses[losses["step"] > 0]["train_loss"]
    summary = dict(
        model="GPT2LMHeadModel", parameters=n_params, embedding_parameters=int(model.transformer.wte.weight.numel()),
        config=dict(d_model=d_model, n_head=n_head, n_layer=1, seq_len=seq_len, vocab_size=len(tokenizer),
                    batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay, betas=[0.9, 0.95],
                    grad_clip=1.0, schedule="linear warmup, cosine decay to 0 (get_cosine_schedule_with_warmup)",
                    upper_fraction=upper_fraction, eval_every=eval_every, eval_windows=eval_windows, seed=seed),
        data=dict(train_paragraphs=len(texts), upper_cased_paragraphs=n_upper, train_tokens=int(train.numel()),
                  test_paragraphs=len(test_texts), test_tokens=int(test.numel()),
                  all_caps_share_of_letters=all_caps_share(texts)),
        steps_planned=total, steps=step, tokens_seen=step * batch_size * seq_len,
        epochs=step * batch_size / len(train), minutes_budget=minutes, minutes_training=train_minutes,
        timing=timing, final_train_loss=float(trained.tail(SMOOTH).mean()) if len(trained) else float("nan"),
        first_train_loss=float(trained.iloc[0]) if len(trained) else float("nan"), final_test_loss=test_loss,
        final_test_loss_upper=test_loss_upper, torch=torch.__version__, threads=torch.get_num_threads(),
    )
    save(out_dir, model, tokenizer, summary, losses, force=force)
    summary["minutes_total"] = (time.perf_counter() - start) / 60.0
    say(f"wrote {out_dir} in {summary['minutes_total']:.1f} min")
    return summary


def loss_figure(losses, title: str):
    """Train loss (mean over SMOOTH steps) and held-out loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    trained = losses[losses["step"] > 0]
    ax.plot(trained["tokens"], trained["train_loss"].rolling(SMOOTH, min_periods=1).mean(), label="train (smoothed)")
    held = losses.dropna(subset=["test_loss"])
    ax.plot(held["tokens"], held["test_loss"], "o-", ms=3, label="test")
    ax.plot(held["tokens"], held["test_loss_upper"], "s--", ms=3, label="test, upper-cased")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save(out_dir: Path, model, tokenizer, summary: dict, losses, *, force: bool) -> None:
    """Everything in a temp directory beside `out_dir`, then renamed onto it: a killed run leaves no half directory."""
    import matplotlib.pyplot as plt

    from steerstrength.io import write_figure, write_json, write_parquet

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CONFIG_FILE, summary)
        write_parquet(tmp / LOSS_FILE, losses)
        fig = loss_figure(losses, f"1-layer GPT, {summary['parameters'] / 1e6:.2f} M parameters, "
                                  f"{summary['tokens_seen'] / 1e6:.2f} M tokens")
        write_figure(fig, tmp, "loss")
        plt.close(fig)
        if out_dir.exists():
            check_out_dir(out_dir, force)  # it may have filled up during training
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if old is not None:  # put the previous directory back
                os.rename(old / out_dir.name, out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_summary(model_dir) -> dict:
    """The train_tiny.json of a trained directory."""
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text())
