"""Interpreters: decode Heima thinking-token hidden states back to text, and measure what they carry."""

from __future__ import annotations

from latent_core.exports import lazy_exports

__version__ = "0.1.0"

# Functions named like their module (capture, decode and score) are not re-exported: they would shadow the submodule.

_EXPORTS: dict[str, str] = {
    "InterpreterConfig": "config",
    "InterpreterModel": "model",
    "build_interpreter": "model",
    "load_interpreter": "model",
    "prepare_interpreter": "trainer",
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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
