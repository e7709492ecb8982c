"""The run directory under hostile names, corrupted files and kills: it stays inside itself, recomputes what is
damaged instead of reusing or crashing on it, and gives bit-identical tables for the same config and seed."""

import contextlib
import json
from pathlib import Path

import pandas as pd
import pytest
from cliutil import run_cli
import torch

from steerstrength.vectors import SteeringVector
from steerstrength.errors import InputError
from steerstrength.pipeline import STAGES
from test_pipeline import config, run, tables, tiny_dir  # noqa: F401  (tiny_dir: the module's fixture)
from tiny import FLOAT32

FAST = ["prompts", "vectors", "tokens"]
RECOMMEND = ["concept.judge=lexicon", "recommend.enabled=true", "recommend.n_prompts=2", "recommend.completions=1",
             "recommend.max_new_tokens=3", "recommend.n_alphas=3"]


def write_contexts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_same_tables(a: Path, b: Path) -> None:
    ref, new = tables(a), tables(b)
    assert set(ref) == set(new)
    for name, frame in ref.items():
        if isinstance(frame, str):
            assert frame == new[name], name
        else:
            pd.testing.assert_frame_equal(frame, new[name], check_exact=True, obj=name)


# ----------------------------------------------------------------------------- names become file names


@pytest.mark.parametrize("name", ["../../ESCAPED", "/abs/path", "a/b", "..", ".hidden", "a\\b", "x\x00y"])
def test_a_concept_name_that_is_no_plain_file_name_is_refused_before_anything_is_written(tiny_dir, tmp_path, name):
    out = tmp_path / "deep" / "run"
    with pytest.raises(InputError, match="concept"):
        run(config(tiny_dir, f"concepts={name}"), out)
    assert not (tmp_path / "deep").exists()
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_concept_names_keep_their_everyday_forms():
    from steerstrength.prompts import check_concept

    for name in ("joy", "Joy", "love of nature", "self-doubt", "don't care", "café", "evil_2"):
        assert check_concept(name) == name


def test_the_cli_gives_one_line_and_exit_code_2_for_an_escaping_concept(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["run", "--out", tmp_path / "run", f"model.spec={tiny_dir}", "concepts=../../ESCAPED"],
                           monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and "concept" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not list(tmp_path.parent.rglob("ESCAPED*"))


@pytest.mark.parametrize("bad", ["../../../X", "/tmp/X", "a/b", ".x", ""])
def test_a_context_id_that_is_no_plain_file_name_is_refused(tiny_dir, tmp_path, bad):
    from steerstrength.metrics.contexts import as_contexts, read_contexts

    path = write_contexts(tmp_path / "contexts.jsonl", [{"id": "fine", "text": "the cat"},
                                                        {"id": bad, "text": "the dog"}])
    with pytest.raises(InputError, match="context id"):
        read_contexts(path)
    with pytest.raises(InputError, match="context id"):
        as_contexts(_tiny(), [{"id": bad, "text": "the dog"}])
    out = tmp_path / "run"
    with pytest.raises(InputError, match="context id"):
        run(config(tiny_dir, f"tokens.contexts_file={path}"), out)
    assert not out.exists()


def _tiny():
    from tiny import tiny_model

    return tiny_model("llama")


# ----------------------------------------------------------------------------- duplicates


def test_repeated_context_ids_are_an_error_up_front_not_a_silent_reuse(tiny_dir, tmp_path):
    from steerstrength.metrics.contexts import read_contexts

    path = write_contexts(tmp_path / "contexts.jsonl", [{"id": "same", "text": "the cat"},
                                                        {"id": "same", "text": "the dog"}])
    with pytest.raises(InputError, match="same"):
        read_contexts(path)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="same"):
        run(config(tiny_dir, f"tokens.contexts_file={path}"), out)
    assert not out.exists()  # refused before the model's first forward pass and before any file


def test_repeated_concepts_are_an_error_up_front(tiny_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="joy"):
        run(config(tiny_dir, "concepts=joy,Joy"), out)  # one file name on a case-insensitive disk
    assert not out.exists()


def test_distinct_user_contexts_each_get_their_own_curves(tiny_dir, tmp_path):
    path = write_contexts(tmp_path / "contexts.jsonl", [{"id": "one", "text": "the cat saw a dog"},
                                                        {"id": "two", "text": "my friend is very"}])
    run(config(tiny_dir, f"tokens.contexts_file={path}"), tmp_path / "run", only=FAST)
    curves = pd.read_parquet(tmp_path / "run" / "tables" / "tokens.parquet")
    assert sorted(set(curves["context_id"])) == ["one", "two"]


# ----------------------------------------------------------------------------- damaged outputs


def test_the_manifest_records_size_and_sha256_of_every_output(tiny_dir, tmp_path):
    import hashlib

    run(config(tiny_dir), tmp_path / "run", only=FAST)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for stage in FAST:
        files = manifest["stages"][stage]["files"]
        assert set(files) == set(manifest["stages"][stage]["outputs"])
        for rel, rec in files.items():
            data = (tmp_path / "run" / rel).read_bytes()
            assert rec == dict(size=len(data), sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("victim, stage", [("tables/tokens.parquet", "tokens"), ("vectors/joy.safetensors", "vectors"),
                                           ("prompts/joy.positive.jsonl", "prompts")])
def test_a_truncated_output_is_recomputed_not_reported_cached(tiny_dir, tmp_path, victim, stage):
    cfg = config(tiny_dir)
    run(cfg, tmp_path / "reference", only=FAST)
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    path = out / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = run(cfg, out, only=FAST)
    assert again[stage][0] == "done"
    assert (out / victim).read_bytes() == (tmp_path / "reference" / victim).read_bytes()
    assert_same_tables(tmp_path / "reference", out)


def test_an_output_changed_in_place_at_the_same_size_is_recomputed(tiny_dir, tmp_path):
    cfg = config(tiny_dir)
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    path = out / "tables" / "tokens.json"
    original = path.read_bytes()
    path.write_bytes(original.replace(b"1", b"2"))
    assert run(cfg, out, only=FAST)["tokens"][0] == "done"
    assert path.read_bytes() == original


def _damage_every_chunk(root: Path) -> int:
    """Truncate every chunk Parquet and xent chunk, and make every `.done` marker garbage; returns how many."""
    n = 0
    for path in sorted((root / ".chunks").rglob("*")):
        if path.suffix in (".parquet", ".safetensors"):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
            n += 1
        elif path.suffix == ".done":
            path.write_bytes(b"\x00garbage{")
            n += 1
    return n


def test_damaged_chunks_are_discarded_and_recomputed_instead_of_crashing(tiny_dir, tmp_path):
    cfg = config(tiny_dir)
    stages = FAST + ["xent"]
    run(cfg, tmp_path / "reference", only=stages)
    out = tmp_path / "run"
    run(cfg, out, only=stages)
    assert _damage_every_chunk(out) > 4
    for name in ("tokens.parquet", "xent.parquet"):
        (out / "tables" / name).unlink()  # the stages run again and meet the damaged chunks
    again = run(cfg, out, only=stages)
    assert again["tokens"][0] == again["xent"][0] == "done"
    assert_same_tables(tmp_path / "reference", out)


def test_one_garbage_marker_recomputes_that_chunk_only(tiny_dir, tmp_path, monkeypatch):
    from steerstrength.metrics import tokens

    cfg = config(tiny_dir)
    out = tmp_path / "run"
    run(cfg, out, only=FAST)
    markers = sorted((out / ".chunks" / "tokens").rglob("*.done"))
    assert len(markers) == 2 * (1 + cfg.controls.n_random)  # 2 contexts, for v and each random direction
    markers[0].write_text("{not json")
    (out / "tables" / "tokens.parquet").unlink()
    real, calls = tokens.token_curves, []
    monkeypatch.setattr(tokens, "token_curves", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run(cfg, out, only=FAST)["tokens"][0] == "done"
    assert len(calls) == 1


def test_a_xent_checkpoint_from_other_inputs_is_not_reused(tmp_path):
    """A checkpoint directory of `xent_sweep` (its pieces through runs.read_or_compute) is safe to point at again with
    another grid or another vector."""
    from steerstrength.metrics.xent import xent_sweep
    from steerstrength.runs import read_or_compute

    model = _tiny()
    texts = ["the cat saw a dog and the dog saw a cat . " * 4] * 3
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    kw = dict(seq_len=8, curvature=False, chunk=lambda name, compute: read_or_compute(tmp_path / "ck", name, compute),
              chunk_windows=2)
    xent_sweep(model, SteeringVector(v, 1), texts, [-1.0, 0.0, 1.0], **kw)
    other = xent_sweep(model, SteeringVector(v, 1), texts, [-2.0, 0.0, 2.0], **kw)
    fresh = xent_sweep(model, SteeringVector(v, 1), texts, [-2.0, 0.0, 2.0], seq_len=8, curvature=False)
    # Pieces of 2 windows against one batch of all: other matmul shapes, so float32 rounding, not the same bits.
    # A reused piece of the [-1, 0, 1] grid or of +v would be off by far more than that.
    torch.testing.assert_close(other.ce, fresh.ce, **FLOAT32)
    flipped = xent_sweep(model, SteeringVector(-v, 1), texts, [-2.0, 0.0, 2.0], **kw)
    torch.testing.assert_close(flipped.ce, xent_sweep(model, SteeringVector(-v, 1), texts, [-2.0, 0.0, 2.0], seq_len=8,
                                                      curvature=False).ce, **FLOAT32)
    assert (flipped.ce - other.ce).abs().max() > 1e-3  # the tolerance is far below what a wrong reuse changes


def test_a_truncated_manifest_keeps_the_finished_chunks(tiny_dir, tmp_path, monkeypatch):
    from steerstrength.metrics import tokens, xent

    cfg = config(tiny_dir)
    stages = FAST + ["xent"]
    out = tmp_path / "run"
    run(cfg, out, only=stages)
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])
    calls = []
    real_sums, real_curves = xent.cross_entropy_sums, tokens.token_curves
    monkeypatch.setattr(xent, "cross_entropy_sums", lambda *a, **k: calls.append("xent") or real_sums(*a, **k))
    monkeypatch.setattr(tokens, "token_curves", lambda *a, **k: calls.append("tokens") or real_curves(*a, **k))
    messages = []
    from steerstrength.pipeline import run_pipeline
    from test_pipeline import Quiet

    again = run_pipeline(cfg, out, progress=Quiet(), log=messages.append, only=stages)
    assert all(again[s][0] == "done" for s in stages)
    assert calls == []  # every sweep chunk was read back
    assert any("manifest" in m for m in messages)
    assert json.loads(manifest.read_text())["stages"]["xent"]["status"] == "done"


def test_temporary_files_left_by_a_kill_are_swept_at_start(tiny_dir, tmp_path):
    cfg = config(tiny_dir)
    out = tmp_path / "run"
    run(cfg, out, only=["prompts"])
    left = [out / ".manifest.json.k3j2.tmp", out / "tables" / ".tokens.parquet.a8f1.tmp",
            out / ".chunks" / "tokens" / "0123" / ".joy.1.c.curves.parquet.zz.tmp"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    mine = out / "tables" / "notes.tmp"  # not one of ours: kept
    mine.write_text("keep")
    run(cfg, out, only=["prompts"])
    assert not any(p.exists() for p in left) and mine.read_text() == "keep"


# ----------------------------------------------------------------------------- determinism


def test_two_identical_runs_give_bit_identical_tables(tiny_dir, tmp_path):
    cfg = config(tiny_dir, *RECOMMEND)
    first, second = tmp_path / "first", tmp_path / "second"
    computed = [s for s in STAGES if s not in ("figures", "report")]  # figures and report hold no tables
    run(cfg, first, only=computed)
    run(cfg, second, only=computed)
    names = sorted(p.name for p in (first / "tables").iterdir() if p.suffix in (".parquet", ".jsonl"))
    assert "recommend.parquet" in names and "xent.parquet" in names
    for name in names:
        assert (first / "tables" / name).read_bytes() == (second / "tables" / name).read_bytes(), name
    assert "seconds" not in pd.read_parquet(first / "tables" / "recommend.parquet").columns
    fits = [json.loads((d / "tables" / "xent.json").read_text())["per_vector"] for d in (first, second)]
    assert fits[0] == fits[1]


# ----------------------------------------------------------------------------- the progress bar


def test_the_delta_ce_progress_bar_ends_at_its_total(tiny_dir, tmp_path):
    bars = {}

    @contextlib.contextmanager
    def progress(description, total):
        bars[description] = [total, 0]

        def advance(n=1):
            bars[description][1] += n

        yield advance

    from steerstrength.pipeline import run_pipeline

    run_pipeline(config(tiny_dir), tmp_path / "run", progress=progress, log=lambda m: None,
                 only=["prompts", "vectors", "xent"])
    delta = {d: b for d, b in bars.items() if "Delta CE" in d}
    assert delta
    for description, (total, done) in delta.items():
        assert done == total, (description, done, total)
    assert max(total for total, _ in delta.values()) > 1
