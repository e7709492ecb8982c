"""steerstrength: measure what the steering strength alpha does, and recommend one."""

from steerstrength.errors import (
    ArchitectureError,
    InputError,
    ModelLoadError,
    RunError,
    SteerStrengthError,
)
from steerstrength.models import Model
from steerstrength.loading import load_model
from steerstrength.sampling import steered_generate
from steerstrength.steering import next_token_probs, steer
from steerstrength.prompts import (concepts, curated_pairs, curated_texts, evaluation_prompts, generate_prompts,
                                   load_prompts, neutral_texts)
from steerstrength.vectors import SteeringVectors, difference_of_means, random_controls, residual_norms
from steerstrength.scan import scan_layers
from steerstrength.grid import resid_scale, to_raw
from steerstrength.metrics.depth import depth_profile
from steerstrength.metrics.limits import limit_check
from steerstrength.metrics.logodds import log_odds
from steerstrength.metrics.tokens import token_curves
from steerstrength.metrics.reduce import next_token_reduce
from steerstrength.grid import AlphaGrid
from steerstrength.vectors import SteeringVector
from steerstrength.metrics.xent import cross_entropy_curve
from steerstrength.metrics.concept import concept_probability
from steerstrength.metrics.mmlu import mmlu_accuracy
from steerstrength.recommend import recommend_alpha
from steerstrength.use import generate_completions
from steerstrength.plots import draw_all
from steerstrength.report import write_report
from steerstrength.pipeline import run_pipeline
from steerstrength.config import build_config

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "InputError",
    "Model",
    "ModelLoadError",
    "RunError",
    "SteerStrengthError",
    "load_model",
    "next_token_probs",
    "steer",
    "steered_generate",
    "generate_completions",
    "SteeringVectors",
    "difference_of_means",
    "random_controls",
    "residual_norms",
    "scan_layers",
    "resid_scale",
    "to_raw",
    "depth_profile",
    "curated_pairs",
    "curated_texts",
    "neutral_texts",
    "evaluation_prompts",
    "concepts",
    "generate_prompts",
    "load_prompts",
    "cross_entropy_curve",
    "limit_check",
    "log_odds",
    "token_curves",
    "next_token_reduce",
    "AlphaGrid",
    "SteeringVector",
    "concept_probability",
    "mmlu_accuracy",
    "recommend_alpha",
    "draw_all",
    "write_report",
    "run_pipeline",
    "build_config",
]
