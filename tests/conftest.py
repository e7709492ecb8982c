import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct, float32 on CPU (loaded once per test session)."""
    from steerstrength import load_model

    return load_model(None, dtype="float32", device="cpu")
