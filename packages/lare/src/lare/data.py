"""LaRe's training batches (METHODS.md section 3): reasoning rows (:func:`latent_core.read_reasoning`: Vision-R1-cold
or any reasoning JSONL, decontaminated by ``lare decontaminate``) -> :meth:`lare.model.LareForTraining.forward`'s
arguments.

Per row ``{id, image, question, reasoning, answer}``:

- the prompt: the image and the question (:func:`latent_core.prompts.question_text`, no instruction) in the chat
  template with the generation prompt, LEFT padded (the form :func:`lare.generate.generate_answers` asks);
- ``answer_ids`` / ``labels``: the assistant turn of the answer as the chat template writes it (end of turn included);
- ``text_ids`` / ``text_labels``: L_text's first ``text_prefix`` (32) tokens of the reasoning text;
- ``reasoning_ids`` / ``reasoning_mask``: the reasoning text alone (at most ``max_reasoning_tokens``, right padded),
  whose LLM hidden states L_align pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latent_core.collate import answer_batch, pad_targets

from lare.losses import text_prefix_targets

__all__ = ["LareCollator"]


class LareCollator:
    """Reasoning rows -> a LaRe training batch (see the module docstring)."""

    def __init__(self, processor: Any, text_prefix: int = 32, max_reasoning_tokens: int = 256) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.text_prefix, self.max_reasoning_tokens = text_prefix, max_reasoning_tokens

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = answer_batch(self.processor, rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        reasoning = [row["reasoning"] for row in rows]
        batch["text_ids"], batch["text_labels"] = text_prefix_targets(self.tokenizer, reasoning, self.text_prefix)
        tokens = [
            self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_reasoning_tokens] or [pad]
            for text in reasoning
        ]
        ids, labels = pad_targets(tokens, pad)
        batch["reasoning_ids"], batch["reasoning_mask"] = ids, (labels != -100).long()
        return batch
