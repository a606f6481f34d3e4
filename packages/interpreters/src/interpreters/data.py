"""Interpreter data: the captured states (``interpreters.capture`` output) and the prompt/target batches.

A row is ``{"id", "stage", "token", "question", "target", "hidden"}`` (``hidden``: the ``[d]`` state). Training
batches (:class:`InterpreterCollator`) are the explanatory prompt (user turn, through the LM's chat template, with
the placeholder) and the target (assistant turn), right-padded, labels on the target only
(``latent_core.collate.SupervisedCollator``), plus ``hidden`` ``[batch, d]``. :func:`prompt_batch` builds the
left-padded prompts for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from latent_core.collate import SupervisedCollator
from latent_core.thinking import STATES_INDEX_NAME, load_states

from interpreters.config import DEFAULT_PLACEHOLDER, DEFAULT_TEMPLATE

__all__ = ["INDEX_NAME", "InterpreterCollator", "load_captures", "prompt_batch", "render_prompt"]

INDEX_NAME = STATES_INDEX_NAME


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE, placeholder: str = DEFAULT_PLACEHOLDER) -> str:
    """The explanatory prompt for ``question`` (METHODS.md §1)."""
    return template.format(question=question, placeholder=placeholder)


def load_captures(capture_dir: str | Path, stages: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The states of ``capture_dir`` (index order), optionally only those of ``stages``: the output of
    ``interpreters capture`` or of ``heima generate --capture`` (one format, :func:`latent_core.thinking.load_states`;
    ``target`` is ``None`` for states recorded while Heima answered).

    Raises:
        FileNotFoundError: no ``index.jsonl`` (run ``interpreters capture`` or ``heima generate --capture`` first).
    """
    return load_states(capture_dir, stages)


class InterpreterCollator:
    """Training batches: ``input_ids``, ``attention_mask``, ``labels`` (target tokens only) and ``hidden``.

    Args:
        tokenizer: the interpreter LM's tokenizer (with the placeholder token added).
        template, placeholder: the explanatory prompt (see :func:`render_prompt`).
    """

    def __init__(self, tokenizer: Any, template: str = DEFAULT_TEMPLATE, placeholder: str = DEFAULT_PLACEHOLDER):
        self.template = template
        self.placeholder = placeholder
        self._collate = SupervisedCollator(tokenizer)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._collate(
            [
                {
                    "id": r.get("id"),
                    "prompt": render_prompt(r["question"], self.template, self.placeholder),
                    "answer": r["target"],
                }
                for r in rows
            ]
        )
        batch["hidden"] = torch.stack([torch.as_tensor(r["hidden"]).float() for r in rows])
        return batch


def prompt_batch(
    tokenizer: Any,
    questions: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts (chat template, generation prompt) for ``questions``."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": render_prompt(q, template, placeholder)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side
