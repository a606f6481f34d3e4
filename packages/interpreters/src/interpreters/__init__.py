"""Interpreters: decode Heima thinking-token hidden states back to text, and measure what they carry."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Functions named like their module (capture, decode and score) are not re-exported: they would shadow the submodule.

_EXPORTS: dict[str, str] = {
    "InterpreterConfig": "config",
    "InterpreterModel": "model",
    "build_interpreter": "model",
    "load_interpreter": "model",
    "train_interpreter": "trainer",
    "bleu4": "metrics",
    "bert_score_f1": "metrics",
    "meteor": "metrics",
    "rouge_l": "metrics",
    "ensure_wordnet": "metrics",
    "MeteorDataError": "metrics",
    "JudgeConfig": "judge",
    "JudgeResult": "judge",
    "judge_many": "judge",
    "make_client": "judge",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
