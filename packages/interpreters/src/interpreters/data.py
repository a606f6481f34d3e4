"""Interpreter data: the captured states (``interpreters.capture`` output) and the prompt/target batches.

A row is ``{"id", "stage", "token", "question", "target", "hidden"}`` (``hidden``: the ``[d]`` state). Training
batches (:class:`InterpreterCollator`) are the explanatory prompt (user turn, through the LM's chat template, with
the placeholder) and the target (assistant turn), right-padded, labels on the target only
(``latent_core.collate.SupervisedCollator``), plus ``hidden`` ``[batch, d]``. :func:`prompt_batch` builds the
left-padded prompts for generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from latent_core.collate import SupervisedCollator
from safetensors.torch import load_file

from interpreters.config import DEFAULT_PLACEHOLDER, DEFAULT_TEMPLATE

__all__ = ["INDEX_NAME", "InterpreterCollator", "load_captures", "prompt_batch", "render_prompt"]

INDEX_NAME = "index.jsonl"


def render_prompt(question: str, template: str = DEFAULT_TEMPLATE, placeholder: str = DEFAULT_PLACEHOLDER) -> str:
    """The explanatory prompt for ``question`` (METHODS.md §1)."""
    return template.format(question=question, placeholder=placeholder)


def load_captures(capture_dir: str | Path, stages: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The captured rows of ``capture_dir`` (index order), optionally only those of ``stages``.

    Raises:
        FileNotFoundError: no ``index.jsonl`` (run ``interpreters capture`` first).
    """
    capture_dir = Path(capture_dir)
    index = capture_dir / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{capture_dir} has no {INDEX_NAME}: run `interpreters capture` to write it")
    wanted = set(stages) if stages is not None else None
    rows, shards = [], {}
    for line in index.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if wanted is not None and entry["stage"] not in wanted:
            continue
        if entry["file"] not in shards:
            shards[entry["file"]] = load_file(str(capture_dir / entry["file"]))
        rows.append({**entry, "hidden": shards[entry["file"]][entry["key"]]})
    return rows


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
