"""Heima: efficient reasoning with hidden thinking tokens (progressive distillation, recovering stage)."""

from __future__ import annotations

from latent_core.exports import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
