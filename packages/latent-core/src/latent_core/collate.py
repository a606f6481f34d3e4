"""Batches for supervised fine-tuning: chat template, processor, labels on the answer only.

A row is ``{"id": ..., "prompt": str, "answer": str, "image": path | PIL.Image | None}`` (method data builders
produce these). The answer is the assistant turn; every prompt token and the padding get label ``-100``. A row
without an answer or whose image cannot be read raises an error naming the row's id, never a silent skip in the
middle of training (data builders skip and count bad rows before training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["SupervisedCollator"]

IGNORE_INDEX = -100


class SupervisedCollator:
    """Collate rows into processor inputs plus ``labels`` (answer tokens only), right-padded for training.

    Args:
        processor: the family's processor (or a tokenizer for text models).
        image_root: directory that relative image paths are resolved against.
    """

    def __init__(self, processor: Any, image_root: str | Path | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_root = Path(image_root) if image_root is not None else None

    def _image(self, row: dict[str, Any]) -> Image.Image | None:
        image = row.get("image")
        if image is None or isinstance(image, Image.Image):
            return image
        path = Path(image)
        if self.image_root is not None and not path.is_absolute():
            path = self.image_root / path
        try:
            with Image.open(path) as handle:
                return handle.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"row {row.get('id')!r}: cannot read image {str(path)!r} ({err})") from err

    def _messages(self, row: dict[str, Any], image: Image.Image | None, answer: str | None) -> list[dict]:
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": row["prompt"]})
        messages = [{"role": "user", "content": content if image is not None else row["prompt"]}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _encode(self, texts: list[str], images: list[Image.Image] | None) -> dict[str, torch.Tensor]:
        if images is None:
            return self.processor(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for row in rows:
            if not row.get("answer") and row.get("labels") is None:
                raise ValueError(f"row {row.get('id')!r} has no answer (labels): cannot train on it")
            if not row.get("prompt"):
                raise ValueError(f"row {row.get('id')!r} has no prompt")
        images = [self._image(row) for row in rows]
        if any(i is None for i in images) and not all(i is None for i in images):
            raise ValueError("a batch mixes rows with and without images: batch them separately")
        images = None if images[0] is None else images
        if images is not None and "Mllama" in type(self.processor).__name__:
            images = [[i] for i in images]
        apply = self.tokenizer.apply_chat_template
        full = [apply(self._messages(r, images and images[i], r["answer"]), tokenize=False) for i, r in enumerate(rows)]
        prompts = [
            apply(self._messages(r, images and images[i], None), tokenize=False, add_generation_prompt=True)
            for i, r in enumerate(rows)
        ]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            batch = self._encode(full, images)
            prompt_lengths = [
                int(self._encode([p], None if images is None else [images[i]])["attention_mask"].sum())
                for i, p in enumerate(prompts)
            ]
        finally:
            self.tokenizer.padding_side = side
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for i, length in enumerate(prompt_lengths):
            labels[i, :length] = IGNORE_INDEX
        batch["labels"] = labels
        return dict(batch)
