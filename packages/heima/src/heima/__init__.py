"""Heima: efficient reasoning with hidden thinking tokens (progressive distillation, recovering stage)."""

__version__ = "0.1.0"
