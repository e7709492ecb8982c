"""llama.cpp (the xllamacpp wheel), given our pre-scaled control vector at scale 1, gives the next-token distribution
we give at that alpha (benchmarks/llamacpp_agreement.py holds the machinery and the measurement)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("xllamacpp", reason="the llama.cpp wheel (pip install xllamacpp) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from llamacpp_agreement import agreement  # noqa: E402

TV_MAX = 0.005


@pytest.mark.slow
def test_a_prescaled_gguf_at_scale_1_in_llama_cpp_matches_ours_at_that_alpha(default_model, tmp_path_factory):
    import steerstrength as ss

    pos, neg = ss.curated_texts("joy", "positive")[:8], ss.curated_texts("joy", "negative")[:8]
    sv = ss.difference_of_means(default_model, pos, neg, [15], concept="joy")
    out = agreement(default_model, sv, 15, 0.5, tmp_path_factory.mktemp("llamacpp"),
                    contexts=("Tell me about your day.", "The weather today is"))
    assert out["max_tv_steered"] <= TV_MAX, out["rows"]
    assert out["max_tv_unsteered"] <= TV_MAX, out["rows"]
    # Not agreement on nothing: at this alpha steering moves our distribution far more than the two engines differ.
    assert out["min_tv_ours_alpha_vs_0"] > 20 * out["max_tv_steered"]
    assert all(r["top_ours"] == r["top_llamacpp"] for r in out["rows"])
