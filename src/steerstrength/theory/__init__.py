"""The UFM world of Sections 2-3 and Appendix B: concept datasets, a trained Unconstrained
Features Model, difference-of-means steering, the closed-form laws of alpha, and their checks.

No LLM is involved; everything runs on CPU in seconds.
"""

from steerstrength.theory.dataset import (
    ConceptDataset,
    concept_dataset,
    dataset_entropy,
    empirical_dataset,
    sample_pairs,
)
from steerstrength.theory.ufm import UFM, ufm_difference_of_means, steered_logits, steering_sets, train_ufm
from steerstrength.theory.verify import TheoryConfig, Verification, World, build_world, verify

__all__ = [
    "UFM",
    "ConceptDataset",
    "TheoryConfig",
    "Verification",
    "World",
    "build_world",
    "concept_dataset",
    "dataset_entropy",
    "ufm_difference_of_means",
    "empirical_dataset",
    "sample_pairs",
    "steered_logits",
    "steering_sets",
    "train_ufm",
    "verify",
]
