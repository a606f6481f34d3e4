"""Fixtures shared by the heima tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from latent_core.testing import save_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny mllama (untied lm_head, as LLaVA-CoT) saved like a real checkpoint."""
    return save_tiny_model("mllama", tmp_path_factory.mktemp("tiny-mllama"))
