"""Interpreters: decode Heima thinking-token hidden states back to text."""

__version__ = "0.1.0"
