"""steerstrength: measure what the steering strength alpha does, and recommend one."""

from steerstrength.errors import (
    ArchitectureError,
    InputError,
    ModelLoadError,
    RunError,
    SteerStrengthError,
)
from steerstrength.models import Model, load_model

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "InputError",
    "Model",
    "ModelLoadError",
    "RunError",
    "SteerStrengthError",
    "load_model",
]
