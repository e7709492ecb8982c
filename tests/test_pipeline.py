"""`steerstrength run`: stages, resume after an interruption, identical tables, stage invalidation."""

import json
from pathlib import Path

import pandas as pd
import pytest

from steerstrength import RunError
from steerstrength.errors import InputError, ModelLoadError
from steerstrength.config import build_config
from steerstrength.pipeline import run_pipeline, stage_keys
from tiny import tiny_model

SMALL = [
    "prompts.n=4", "prompts.max_new_tokens=12", "prompts.batch_size=4", "vectors.resamples=2",
    "tokens.n_alphas=16", "tokens.n_contexts=2", "tokens.top_k=5",
    "xent.n_tokens=96", "xent.seq_len=8", "xent.n_alphas=6", "xent.chunk_windows=3",
    "concept.n_alphas=3", "concept.completions=1", "concept.n_prompts=1", "concept.max_new_tokens=4",
    "mmlu.max_questions=2", "mmlu.n_alphas=3", "mmlu.k_shot=1", "recommend.enabled=false",
    "layers=1", "model.device=cpu",
]


class Quiet:
    def __call__(self, *args, **kwargs):
        import contextlib

        @contextlib.contextmanager
        def bar():
            yield lambda n=1: None

        return bar()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def config(tiny_dir, *extra):
    return build_config("demo", None, SMALL + [f"model.spec={tiny_dir}"] + list(extra))


def tables(run_dir: Path) -> dict:
    out = {}
    for path in sorted((run_dir / "tables").iterdir()):
        if path.suffix == ".parquet":
            out[path.name] = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            out[path.name] = path.read_text()
    return out


def run(cfg, out, **kw):
    return run_pipeline(cfg, out, progress=Quiet(), log=lambda m: None, **kw)


def test_interrupted_cross_entropy_sweep_resumes_to_identical_tables(tiny_dir, tmp_path, monkeypatch):
    cfg = config(tiny_dir)
    reference = run(cfg, tmp_path / "reference")
    statuses = {stage: status for stage, (status, _, _) in reference.items()}
    assert statuses.pop("recommend") == "skipped"  # disabled in SMALL
    assert set(statuses.values()) == {"done"}, statuses

    from steerstrength.metrics import xent

    real = xent.cross_entropy_sums
    calls = {"n": 0}

    def dies_after_two_chunks(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed in the middle of the sweep
        return real(*args, **kwargs)

    monkeypatch.setattr(xent, "cross_entropy_sums", dies_after_two_chunks)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["xent"]["status"] == "running"
    chunk_files = list((out / ".chunks" / "xent").rglob("*windows_*.done"))
    assert len(chunk_files) == 2  # two chunks finished before the kill

    recomputed = {"n": 0}

    def counting(*args, **kwargs):
        recomputed["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(xent, "cross_entropy_sums", counting)
    second = run(cfg, out)
    assert {s: second[s][0] for s in ("prompts", "vectors", "tokens", "logodds", "limit")} == dict.fromkeys(
        ("prompts", "vectors", "tokens", "logodds", "limit"), "cached")
    assert second["xent"][0] == "done"
    n_windows = 96 // 8
    directions = 1 + cfg.controls.n_xent  # v and its random directions, each swept in chunks of 3 windows
    assert recomputed["n"] == directions * -(-n_windows // 3) - 2  # only the unfinished chunks ran
    ref_tables, new_tables = tables(tmp_path / "reference"), tables(out)
    assert set(ref_tables) == set(new_tables)
    for name, frame in ref_tables.items():
        if isinstance(frame, str):
            assert frame == new_tables[name], name
        else:
            pd.testing.assert_frame_equal(frame, new_tables[name], check_exact=True, obj=name)


def test_a_finished_run_is_reused_from_a_relative_path_and_after_a_move(tiny_dir, tmp_path, monkeypatch):
    cfg = config(tiny_dir)
    monkeypatch.chdir(tmp_path)
    run(cfg, Path("runs") / "demo")  # what `make demo` does: a path relative to the working directory
    manifest = json.loads((tmp_path / "runs" / "demo" / "manifest.json").read_text())
    outputs = [o for rec in manifest["stages"].values() for o in rec.get("outputs", [])]
    assert outputs and all(not Path(o).is_absolute() and (tmp_path / "runs" / "demo" / o).is_file() for o in outputs)
    computed = ("prompts", "vectors", "tokens", "logodds", "limit", "xent", "concept", "mmlu")
    again = run(cfg, Path("runs") / "demo")
    assert {s: again[s][0] for s in computed} == dict.fromkeys(computed, "cached")
    (tmp_path / "runs" / "demo").rename(tmp_path / "moved")
    monkeypatch.chdir(tiny_dir)
    moved = run(cfg, tmp_path / "moved")
    assert {s: moved[s][0] for s in computed} == dict.fromkeys(computed, "cached")


@pytest.mark.parametrize("override, message", [("layers=[99]", "layer 99"), ("model.spec=/nowhere/model", "/nowhere")])
def test_a_bad_layer_or_model_writes_nothing(tiny_dir, tmp_path, override, message):
    with pytest.raises((InputError, ModelLoadError), match=message):  # both: one line and exit code 2 in the CLI
        run(config(tiny_dir, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_change_recomputes_exactly_the_stages_it_invalidates(tiny_dir):
    a = stage_keys(config(tiny_dir))
    b = stage_keys(config(tiny_dir, "xent.n_alphas=8"))
    changed = {s for s in a if a[s] != b[s]}
    assert changed == {"xent", "recommend", "figures", "report"}
    c = stage_keys(config(tiny_dir, "vectors.skip_first_token=false"))
    changed = {s for s in a if a[s] != c[s]}
    assert "prompts" not in changed and {"vectors", "tokens", "xent", "concept", "mmlu"} <= changed


def test_second_concurrent_run_is_refused(tiny_dir, tmp_path):
    from steerstrength.runs import RunDir

    with RunDir(tmp_path).lock():
        with pytest.raises(RunError, match="another steerstrength run"):
            run(config(tiny_dir), tmp_path)


def test_layers_auto_steers_the_scanned_layer_with_both_alpha_columns(tiny_dir, tmp_path):
    from steerstrength.vectors import SteeringVectors

    cfg = config(tiny_dir, "layers=auto,1", "tokens.alpha_max=1.5")
    run(cfg, tmp_path / "run", only=["prompts", "vectors", "tokens"])
    scan = pd.read_parquet(tmp_path / "run" / "tables" / "layer_scan.parquet")
    chosen = int(scan[scan["chosen"]]["layer"].iloc[0])
    sv = SteeringVectors.load(tmp_path / "run" / "vectors" / "joy.safetensors")
    assert sv.layers == sorted({1, chosen}) and sv.meta["auto_layer"] == chosen
    top = pd.read_parquet(tmp_path / "run" / "tables" / "tokens_top.parquet")
    assert set(top["layer"]) == set(sv.layers)
    for layer in sv.layers:
        at_max = top[(top["layer"] == layer) & (top["side"] == "alpha_max")]
        assert at_max["alpha_resid"].iloc[0] == pytest.approx(1.5)  # the grid is in residual units
        assert at_max["alpha"].iloc[0] == pytest.approx(1.5 / sv.resid_scale(layer))
    # The curated training pairs are the prompt sets.
    from steerstrength.prompts import curated_texts

    rows = [json.loads(x) for x in (tmp_path / "run" / "prompts" / "joy.positive.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == curated_texts("joy", "positive", "train")


def test_vectors_computed_apart_give_the_tables_of_a_plain_run(tiny_dir, tmp_path, monkeypatch):
    """run_vector fills one (concept, layer)'s chunks of tokens, xent, concept and MMLU; the run then only assembles them."""
    from steerstrength.pipeline import run_vector, run_vectors

    cfg = config(tiny_dir, "concepts=joy,evil", "layers=1,2")
    run(cfg, tmp_path / "plain")
    apart = tmp_path / "apart"
    run(cfg, apart, only=["prompts", "vectors"])
    shares = run_vectors(cfg, apart)
    assert shares == [("joy", 1), ("joy", 2), ("evil", 1), ("evil", 2)]
    for concept, layer in reversed(shares):  # any order
        assert run_vector(cfg, apart, concept, layer, progress=Quiet(), log=lambda m: None) == [
            "tokens", "xent", "concept", "mmlu"]
    assert not (apart / "tables" / "tokens.parquet").exists()  # vectors' shares write chunks, never tables
    import steerstrength.runs as runs

    real, computed = runs.read_or_compute, []

    def watching(directory, name, compute, log=None):
        if Path(directory).parts[-2] in ("tokens", "xent", "concept", "mmlu") and not (Path(directory) / f"{name}.done").is_file():
            computed.append((Path(directory).parts[-2], name))
        return real(directory, name, compute, log=log)

    monkeypatch.setattr(runs, "read_or_compute", watching)
    run(cfg, apart)
    assert not computed, computed  # the run found every vector's chunks
    a, b = tables(tmp_path / "plain"), tables(apart)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], str):
            assert a[name] == b[name], name
        else:
            pd.testing.assert_frame_equal(a[name], b[name], obj=name)
