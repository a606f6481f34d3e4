"""The student's training data: the builder's kept samples (``build-lavit-15k``) as rows, and their batches.

A row is ``{"id", "image": Path, "question", "answer", "traj_target": [n] (A_traj's Top-K renormalised to sum to 1,
on the teacher's merged grid), "traj_grid": (h, w), "vsem_mean": [d_teacher]}``. :class:`LavitCollator` makes the
student's batch: the prompts (image + question, generation prompt; :mod:`latent_core.prompts`, the one prompt
builder) LEFT padded, as the latent loop needs; the answer tokens as the chat template writes the assistant turn
(its end-of-turn included, so the student learns to stop), RIGHT padded with label -100 on the padding; the teacher
signals as lists and a stacked V_sem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from latent_core.collate import answer_batch

from lavit.build import MANIFEST_NAME, read_teacher_data

__all__ = ["LavitCollator", "teacher_rows"]


def teacher_rows(directory: str | Path, image_root: str | Path | None = None) -> list[dict[str, Any]]:
    """The kept samples of a ``build-lavit-15k`` output as training rows (see the module docstring). Images are
    resolved against ``image_root`` (default: the ``--images`` the build was made with, from its manifest).

    Raises:
        FileNotFoundError: not a build directory, or an image is missing (the message names it).
    """
    directory = Path(directory)
    if image_root is None:
        manifest = directory / MANIFEST_NAME
        if not manifest.is_file():
            raise FileNotFoundError(f"{directory} has no {MANIFEST_NAME}: is it a build-lavit-15k output?")
        image_root = json.loads(manifest.read_text())["settings"]["images"]
    rows = []
    for sample in read_teacher_data(directory):
        image = Path(image_root) / sample["image"]
        if not image.is_file():
            raise FileNotFoundError(f"sample {sample['id']!r}: image {image} is missing")
        values = sample["traj_topk_values"].float()
        target = torch.zeros(sample["image_tokens"])
        total = float(values.sum())
        target[sample["traj_topk_indices"]] = values / total if total > 0 else 1.0 / len(values)
        _, h, w = sample["grid"]
        rows.append(
            {
                "id": sample["id"],
                "image": image,
                "question": sample["question"],
                "answer": sample["answer"],
                "traj_target": target,
                "traj_grid": (h, w),
                "vsem_mean": sample["vsem_mean"].float(),
            }
        )
    return rows


class LavitCollator:
    """Rows -> the student's batch (:meth:`lavit.model.LavitStudent.forward`'s arguments)."""

    def __init__(self, processor: Any, system: str | None = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system = system  # the system turn (Appendix C.3's prompt; None: the template's)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = answer_batch(self.processor, rows, system=self.system)
        if all("traj_target" in row for row in rows):
            batch["traj_targets"] = [row["traj_target"] for row in rows]
            batch["traj_grids"] = [tuple(row["traj_grid"]) for row in rows]
        if all("vsem_mean" in row for row in rows):
            batch["vsem_mean"] = torch.stack([row["vsem_mean"] for row in rows])
        return batch
