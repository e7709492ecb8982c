"""A concept the project has no data for, from the user's own files: per-concept files, checks before any stage, the
probe trained on the user's training split and measured on the held-out one, contexts derived from held-out P."""

import json
from pathlib import Path

import pytest

from steerstrength.config import build_config, to_toml
from steerstrength.errors import InputError
from steerstrength.judges import ProbeJudge, judge_accuracy
from steerstrength.pipeline import run_pipeline
from cliutil import error_lines, run_cli
from test_pipeline import SMALL, Quiet
from tiny import tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
ANGER_P, ANGER_N = str(EXAMPLES / "anger.P.jsonl"), str(EXAMPLES / "anger.N.jsonl")
ANGER = f"prompts.files.anger={ANGER_P},{ANGER_N}"


def texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def config(tiny_dir, *extra):
    return build_config("demo", None, SMALL + [f"model.spec={tiny_dir}", "mmlu.enabled=false"] + list(extra))


def run(cfg, out, **kw):
    return run_pipeline(cfg, out, progress=Quiet(), log=lambda m: None, **kw)


def write_texts(path, lines):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return str(path)


# ----------------------------------------------------------------------------- configuration


def test_concepts_take_the_list_syntax_config_show_prints():
    assert build_config("demo", None, ["concepts=[evil,joy]"]).concepts == ["evil", "joy"]
    assert build_config("demo", None, ["concepts=['evil', 'joy']"]).concepts == ["evil", "joy"]
    assert build_config("demo", None, ["concepts=evil,joy"]).concepts == ["evil", "joy"]


def test_per_concept_files_from_key_value_and_toml_and_the_real_source_is_recorded(tmp_path):
    cfg = build_config("demo", None, ["concepts=anger", ANGER])
    assert cfg.prompts.files == {"anger": [ANGER_P, ANGER_N]}
    assert cfg.prompts.source == "files"  # not "curated": the run's config.toml says where the texts came from
    toml = tmp_path / "run.toml"
    toml.write_text(to_toml(cfg))
    again = build_config("demo", str(toml))
    assert again.prompts.files == cfg.prompts.files and again.prompts.source == "files"
    mixed = build_config("demo", None, ["concepts=anger,joy", ANGER])  # joy keeps its curated pairs
    assert mixed.prompts.source == "curated" and list(mixed.prompts.files) == ["anger"]


@pytest.mark.parametrize("overrides, message", [
    (["concepts=anger", f"prompts.positive_file={ANGER_P}"], "prompts.negative_file is missing"),
    (["concepts=anger", f"prompts.negative_file={ANGER_N}"], "prompts.positive_file is missing"),
    (["concepts=anger,joy", f"prompts.positive_file={ANGER_P}", f"prompts.negative_file={ANGER_N}"],
     "the same texts"),
    (["concepts=anger", f"prompts.files.anger={ANGER_P}"], "needs the P file and the N file"),
    (["concepts=anger", f"prompts.files.anger={ANGER_P},/nowhere/N.jsonl"], "N file /nowhere/N.jsonl is not a file"),
    (["concepts=joy", ANGER], "'anger' is not one of the run's concepts"),
])
def test_bad_file_settings_are_one_line_before_anything_runs(overrides, message):
    with pytest.raises(InputError, match=message):
        build_config("demo", None, overrides)


@pytest.mark.parametrize("extra, message", [
    (["concepts=anger"], "no texts for concept 'anger'"),
    (["concepts=anger", "FEW", "concept.judge=probe"], "has 4 texts; a run needs at least 6"),
    (["concepts=formality", "FORMALITY", "concept.judge=lexicon"], "lexicon judge cannot judge 'formality'"),
    (["concepts=anger", ANGER, "prompts.source=files", "concepts=anger,joy"], "concept 'joy' has no files"),
])
def test_a_run_checks_every_concept_before_its_first_stage_and_writes_nothing(tiny_dir, tmp_path, extra, message):
    few = write_texts(tmp_path / "few.jsonl", texts(ANGER_P)[:4])
    swap = {"FEW": f"prompts.files.anger={few},{ANGER_N}",
            "FORMALITY": f"prompts.files.formality={ANGER_N},{ANGER_P}"}
    cfg = config(tiny_dir, *[swap.get(x, x) for x in extra])
    with pytest.raises(InputError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_concept_without_data_in_one_line_and_exit_2(tiny_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["run", f"model.spec={tiny_dir}", "concepts=anger", "--out", tmp_path / "run"],
                           monkeypatch, capsys, quiet=True)
    assert code == 2
    assert len(error_lines(err)) == 1 and "prompts.files.anger=P.jsonl,N.jsonl" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the probe on a user concept

# A synthetic concept (sea travel against desert travel), sentences built from one frame each.
SEA = ["the waves rocked our boat", "salt spray hit the deck", "the sailors hauled the ropes", "gulls circled the mast",
       "the tide pulled us to harbour", "we anchored in a calm bay"]
LAND = ["the dunes burned under the sun", "our camels crossed the sand", "the oasis was dry", "dust filled the tent",
        "we rationed water in the heat", "the wind moved the sand hills"]
FRAMES = ["Yesterday {}.", "I remember that {}.", "On the third morning {}, and I wrote it down.", "By noon {}.",
          "My friend told me {}.", "At last {}."]


def test_the_probe_trained_on_user_texts_separates_held_out_p_from_n():
    P = [f.format(s) for f in FRAMES for s in SEA]
    N = [f.format(s) for f in FRAMES for s in LAND]
    held = lambda xs: xs[2::3]  # noqa: E731
    train = lambda xs: [x for i, x in enumerate(xs) if i % 3 != 2]  # noqa: E731
    judge = ProbeJudge().train_apart(train(P), train(N), "seafaring")
    acc = judge_accuracy(judge, "seafaring", held(P), held(N))
    assert acc.n_positive == len(held(P)) and acc.n_negative == len(held(N))  # every held-out text, none trained on
    assert acc.n_calibration == len(train(P)) + len(train(N))
    assert acc.balanced_accuracy >= 0.9 and acc.auc >= 0.95


# ----------------------------------------------------------------------------- runs


def test_two_concepts_with_their_own_files_each_get_their_own_texts(tiny_dir, tmp_path):
    calm_p, calm_n = ANGER_N, ANGER_P  # a second concept: the same pairs read the other way
    cfg = config(tiny_dir, "concepts=[anger,calm]", ANGER, f"prompts.files.calm={calm_p},{calm_n}", "layers=1")
    run(cfg, tmp_path / "run", only=["prompts"])
    for concept, (p, n) in {"anger": (ANGER_P, ANGER_N), "calm": (calm_p, calm_n)}.items():
        for kind, path in (("positive", p), ("negative", n)):
            rows = [json.loads(x) for x in (tmp_path / "run" / "prompts" / f"{concept}.{kind}.jsonl").read_text()
                    .splitlines()]
            assert [r["text"] for r in rows] == texts(path)
            assert [r["split"] for r in rows] == ["heldout" if i % 3 == 2 else "train" for i in range(len(rows))]
            assert {r["source"] for r in rows} == {path}
    config_toml = (tmp_path / "run" / "config.toml").read_text()
    assert 'source = "files"' in config_toml and "[prompts.files]" in config_toml


@pytest.fixture(scope="module")
def anger_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("anger") / "run"
    # The floor is set above what the probe measures here, so the report must flag every concept verdict.
    run(config(tiny_dir, "concepts=anger", ANGER, "layers=auto,1", "concept.judge_floor=0.99"), out)
    return out


def test_a_user_concept_runs_every_stage_with_the_probe_trained_on_its_train_split(anger_run):
    manifest = json.loads((anger_run / "manifest.json").read_text())
    assert all(s.get("status") in ("done", "cached", "skipped") for s in manifest["stages"].values())
    summary = json.loads((anger_run / "tables" / "concept.json").read_text())
    for key, s in summary.items():
        acc = s["judge_accuracy"]["probe"]
        assert acc["n_positive"] == 16 and acc["n_negative"] == 16  # the held-out third of 48 pairs
        assert 0.0 <= acc["balanced_accuracy"] <= 1.0
        assert s["judges"]["probe"]["training"]["anger"]["n_positive"] == 32
    report = (anger_run / "report.html").read_text()
    assert "measured on 16 held-out P and 16 held-out N texts" in report
    n_verdicts = report.count("Thm 3.6")
    assert n_verdicts >= 2 and report.count("below the floor 0.99") >= 2


def test_a_user_concept_gets_contexts_from_its_held_out_p_and_the_report_says_so(anger_run):
    from steerstrength.config import CONTEXT_WORDS

    note = json.loads((anger_run / "tables" / "tokens.json").read_text())["contexts"]["anger"]
    own = [c for c in note["contexts"] if c["kind"] == "concept"]
    held_p = texts(ANGER_P)[2::3]
    assert own and own[0]["text"] == " ".join(held_p[0].split()[:CONTEXT_WORDS]).rstrip(",;:")
    assert "held-out P" in note["origin"]
    import pandas as pd

    top = pd.read_parquet(anger_run / "tables" / "tokens_top.parquet")
    assert own[0]["id"] in set(top["context_id"])  # swept, not only listed
    assert "derived from its held-out P texts" in (anger_run / "report.html").read_text()


def test_the_vectors_are_made_of_the_training_split_only(anger_run):
    from steerstrength.vectors import SteeringVectors, difference_of_means

    sv = SteeringVectors.load(anger_run / "vectors" / "anger.safetensors")
    train = lambda xs: [x for i, x in enumerate(xs) if i % 3 != 2]  # noqa: E731
    model = tiny_model("llama")
    ref = difference_of_means(model, train(texts(ANGER_P)), train(texts(ANGER_N)), [1], normalize=True)
    import torch

    assert torch.allclose(sv[1].vector.double(), ref[1].vector.double(), atol=1e-5)
