"""`steerstrength theory verify` and `theory figures` end to end: exit codes, JSON, figure files."""

import json
import sys

import pytest
from typer.testing import CliRunner

from steerstrength import cli

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, ["theory", *args])


def test_verify_default_passes_and_writes_the_json(tmp_path):
    out = tmp_path / "verify.json"
    result = invoke("verify", "--quiet", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "0 fail" in result.output and "Lemma B.3" in result.output
    doc = json.loads(out.read_text())
    for key in ("config", "entropy", "final_loss", "alphas", "contexts", "target_concept", "P", "N", "checks"):
        assert key in doc
    assert doc["config"]["family"] == "b1" and doc["config"]["vocab_size"] == 9
    assert abs(doc["final_loss"] - doc["entropy"]) < 1e-3
    A, V, G = len(doc["alphas"]), 9, 3
    assert 0.0 in doc["alphas"]
    assert len(doc["P"]) == len(doc["N"]) == doc["config"]["q"]
    assert doc["contexts"]
    for c in doc["contexts"]:
        assert {"j", "concept", "ce_quadratic_coefficient"} <= c.keys()
        for key in ("p", "p_dataset", "M", "peaks", "peak_signs"):
            assert len(c[key]) == V, key
        for key in ("probs_trained", "probs_closed_form"):
            assert len(c[key]) == A and all(len(row) == V for row in c[key])
        assert len(c["concept_increase"]) == A and all(len(row) == G for row in c["concept_increase"])
        assert len(c["delta_ce"]) == A
        for value, sign in zip(c["peaks"], c["peak_signs"]):
            assert sign in ("+inf", "-inf", "finite")
            assert (value is None) == (sign != "finite")
        assert abs(sum(c["p"]) - 1) < 1e-12
    assert not [p for p in tmp_path.iterdir() if p.name != "verify.json"]  # no temp file left


@pytest.mark.parametrize("family, negatives", [("b1", "contrastive"), ("b3", "random"), ("b3", "contrastive")])
def test_verify_passes_for_b1_and_b3_in_both_negative_settings(family, negatives):
    result = invoke("verify", "--quiet", "--family", family, "--negatives", negatives)
    assert result.exit_code == 0, result.output
    assert " 0 fail" in result.output


def test_verify_exits_1_when_a_claim_fails():
    result = invoke("verify", "--quiet", "--steps", "20")  # far from trained: Assumption 2 fails
    assert result.exit_code == 1
    assert "FAIL" in result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--eps", "0.9"], "eps"),
        (["--groups", "1"], "groups"),
        (["--q", "100"], "q=100"),
        (["--family", "b2"], "family"),
        (["--alpha-points", "100"], "odd"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, capsys, tmp_path, args, words):
    out = tmp_path / "never.json"
    monkeypatch.setattr(sys, "argv", ["steerstrength", "theory", "verify", "--quiet", "--json", str(out), *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_figures_writes_png_and_pdf(tmp_path):
    result = invoke("figures", "--quiet", "--out", str(tmp_path), "--steps", "4000")
    assert result.exit_code == 0, result.output
    stems = ["fig2_dataset", "fig3_delta_p", "figB1_delta_p_negative", "fig4_concept_increase", "fig5_delta_ce"]
    for stem in stems:
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert len(list(tmp_path.iterdir())) == 2 * len(stems)


def test_figures_bad_context_is_an_input_error(tmp_path):
    from steerstrength.errors import InputError

    result = invoke("figures", "--quiet", "--out", str(tmp_path), "--steps", "100", "--context", "500")
    assert isinstance(result.exception, InputError)
