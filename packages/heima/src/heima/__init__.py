"""Heima: efficient reasoning with hidden thinking tokens (progressive distillation, recovering stage)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Functions named like their module (generate) are not re-exported: they would shadow the submodule.

_EXPORTS: dict[str, str] = {
    "HeimaConfig": "config",
    "STAGES": "config",
    "thinking_token": "config",
    "thinking_tokens": "config",
    "load_prepared": "data",
    "prepare": "data",
    "samples_for_stage": "data",
    "add_thinking_tokens": "model",
    "prepare_model": "model",
    "train_stage": "trainer",
    "export": "generate",
    "load_for_inference": "generate",
    "load_hidden_states": "generate",
    "save_hidden_states": "generate",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
