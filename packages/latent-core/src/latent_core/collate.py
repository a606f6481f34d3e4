"""Batches for supervised fine-tuning: chat template, processor, labels on the answer only.

A row is ``{"id": ..., "prompt": str, "answer": str, "image": path | PIL.Image | None}`` (method data builders
produce these). The prompt goes through :mod:`latent_core.prompts` (the one builder that generation and evaluation
use too). The answer is the assistant turn; every prompt token and the padding get label ``-100``. A row
without an answer or whose image cannot be read raises an error naming the row's id, never a silent skip in the
middle of training (data builders skip and count bad rows before training).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latent_core.prompts import chat_messages, encode_chats, render_prompts

__all__ = ["SupervisedCollator"]

IGNORE_INDEX = -100


class SupervisedCollator:
    """Collate rows into processor inputs plus ``labels`` (answer tokens only), right-padded for training.

    Args:
        processor: the family's processor (or a tokenizer for text models).
        image_root: directory that relative image paths are resolved against.
        system: a system turn before every prompt (a method's own, e.g. LaViT's Appendix C.3 prompt); ``None``:
            the chat template's default.
    """

    def __init__(self, processor: Any, image_root: str | Path | None = None, system: str | None = None) -> None:
        self.processor = processor
        self.system = system
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_root = Path(image_root) if image_root is not None else None
        self.text_only = not hasattr(processor, "image_processor")

    def _image(self, row: dict[str, Any]) -> Image.Image | None:
        return row_image(row, self.image_root)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for row in rows:
            if not row.get("answer") and row.get("labels") is None:
                raise ValueError(f"row {row.get('id')!r} has no answer (labels): cannot train on it")
            if not row.get("prompt"):
                raise ValueError(f"row {row.get('id')!r} has no prompt")
        images = [self._image(row) for row in rows]
        if any(i is None for i in images) and not all(i is None for i in images):
            raise ValueError("a batch mixes rows with and without images: batch them separately")
        groups = None if images[0] is None else [[image] for image in images]
        n_images = [0 if groups is None else 1 for _ in rows]
        apply = self.tokenizer.apply_chat_template
        full = [
            apply(
                chat_messages(r["prompt"], n, r["answer"], text_only=self.text_only, system=self.system), tokenize=False
            )
            for r, n in zip(rows, n_images, strict=True)
        ]
        prompts = render_prompts(
            self.processor, [r["prompt"] for r in rows], n_images, self.text_only, system=self.system
        )
        batch = encode_chats(self.processor, full, groups, padding_side="right")
        # Prompt lengths (image tokens expanded) from one batched call on the prompts alone.
        prompt_lengths = encode_chats(self.processor, prompts, groups, padding_side="right")["attention_mask"].sum(1)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        for i, length in enumerate(prompt_lengths.tolist()):
            labels[i, :length] = IGNORE_INDEX
        batch["labels"] = labels
        return dict(batch)


def answer_token_ids(
    processor: Any, user_text: str, answer: str, num_images: int = 1, system: str | None = None
) -> list[int]:
    """The assistant turn's tokens for ``answer`` exactly as the chat template writes them after the generation
    prompt of ``user_text`` (after the system turn ``system``, when given; end of turn included): the targets a
    latent method teacher-forces after its prompt (and latents)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    full = tokenizer.apply_chat_template(chat_messages(user_text, num_images, answer, system=system), tokenize=False)
    prompt = render_prompts(processor, [user_text], [num_images], system=system)[0]
    if not full.startswith(prompt):
        raise ValueError("the chat template does not write the answer after the generation prompt")
    return tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]


def pad_targets(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, labels)`` ``[B, max_len]`` of token lists, labels ``-100`` at the padding."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        labels[i, : len(row)] = ids[i, : len(row)]
    return ids, labels


def row_image(row: dict[str, Any], image_root: str | Path | None = None) -> Image.Image | None:
    """The RGB image of a data row: ``row["image"]`` as a PIL image or a path (relative ones under ``image_root``);
    ``None`` without one; an unreadable file is a ``ValueError`` naming the row and the path."""
    image = row.get("image")
    if image is None or isinstance(image, Image.Image):
        return image
    path = Path(image)
    if image_root is not None and not path.is_absolute():
        path = Path(image_root) / path
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"row {row.get('id')!r}: cannot read image {str(path)!r} ({err})") from err


def answer_batch(processor: Any, rows: Sequence[dict[str, Any]], system: str | None = None) -> dict[str, Any]:
    """A latent method's batch of ``{id, image, question, answer}`` rows: the image and question
    (:func:`latent_core.prompts.question_text`, no instruction) in the chat template with the generation prompt
    (after the system turn ``system``, when given), LEFT padded, plus ``answer_ids`` / ``labels``, the assistant
    turn of each answer (:func:`answer_token_ids`) right padded. The latents go between the two."""
    from latent_core.prompts import question_text

    tokenizer = getattr(processor, "tokenizer", processor)
    questions = [question_text(row["question"]) for row in rows]
    images = [[row_image(row)] for row in rows]
    batch = dict(encode_chats(processor, render_prompts(processor, questions, [1] * len(rows), system=system), images))
    answers = [
        answer_token_ids(processor, q, row["answer"], system=system) for q, row in zip(questions, rows, strict=True)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch["answer_ids"], batch["labels"] = pad_targets(answers, pad)
    return batch
