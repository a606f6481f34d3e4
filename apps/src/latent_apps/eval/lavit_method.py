"""The ``lavit`` evaluation method: the LaViT student's batched, KV-cached decoding (prefill, K latent steps, the
answer), registered as ``lavit`` when this module is imported (``latent_apps.eval`` imports it).

Prompts are the training ones (:func:`latent_apps.eval.methods.build_prompt_text` with no instruction, as
:class:`lavit.data.LavitCollator` asks), one image per sample, LEFT-padded, greedy
(:func:`lavit.generate.generate_answers`). ``mask_latents=True`` (``latent eval --method lavit --mask-latents``) is
Table 3's "w/o latent tokens": the answer's queries get a hard mask on the latent positions. ``diagnostics=True``
(``--latent-diagnostics``) also answers each sample with the latents zeroed, shuffled across the batch (continuous
mode) and masked; the runner scores them and the summary's ``latent_controls`` gives accuracy and change rate.
In continuous mode each sample also reports ``latent_similarity`` (:mod:`latent_core.diagnostics`).
Each sample reports its generated tokens (the end of turn included), ``latent_steps`` (K) and ``truncated``.

``--model`` is a ``lavit train`` stage (``<run>/student``: the trained weights on the base it names, with the latent
tokens of its ``latent_stage.json``); a ``lavit train --naive`` stage (the control) is decoded with the same prompt
and no latent block.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from latent_apps.eval.methods import (
    Generation,
    build_prompt_text,
    control_texts,
    latent_generations,
    register_method,
)

__all__ = ["LavitMethod"]


class LavitMethod:
    """Batched greedy decoding of a LaViT student (see the module docstring)."""

    name = "lavit"
    instruction = None
    staged = False
    default_max_new_tokens = 64

    def __init__(self, mask_latents: bool = False, mode: str | None = None, diagnostics: bool = False) -> None:
        self.mask_latents = mask_latents
        self.diagnostics = diagnostics
        self.mode = mode
        self.latent_ids: list[int] | None = None
        self.system: str | None = None  # the stage's system prompt (latent_stage.json)

    def load(self, model: str) -> tuple[Any, Any]:
        """``(model, processor)`` for ``--model``: a ``lavit train`` stage on its base, or a checkpoint."""
        from lavit.generate import load_student

        loaded, processor, latent_ids, mode, self.system = load_student(model, method="latent eval --method lavit")
        if mode == "plain":
            raise ValueError(f"{model} is not a `lavit train` stage (its latent_stage.json names no lavit method)")
        self.mode = self.mode or mode
        self.latent_ids = latent_ids or []
        return loaded, processor

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        from lavit.generate import generate_answers

        if self.latent_ids is None:
            raise ValueError("the lavit method needs its model loaded through LavitMethod.load (a `lavit train` stage)")
        images = [sample["image"].convert("RGB") for sample in samples]
        texts = [build_prompt_text(sample, self.instruction) for sample in samples]
        mode = self.mode or "continuous"
        latent_ids = self.latent_ids or None  # a naive-SFT stage (the control): the same prompt, no latent block
        run = partial(
            generate_answers, model, processor, images, texts, latent_ids, mode, max_new_tokens, system=self.system
        )
        answers = run(mask_latents=self.mask_latents)
        similarity = [None] * len(samples)
        if answers.latents is not None and answers.latents.shape[1]:  # continuous mode: what the steps fed
            from latent_core.diagnostics import pairwise_cosine, step_mean

            similarity = pairwise_cosine(step_mean(answers.latents)).tolist()
        runs: dict[str, dict] = {}
        if self.diagnostics and latent_ids:  # the latent diagnostics: zeroed / shuffled (continuous mode), masked
            runs = {"masked": {"mask_latents": True}}
            if mode == "continuous":
                runs = {"zero": {"latents": "zero"}, "shuffle": {"latents": "shuffle"}, **runs}
        controls = control_texts(run, runs, len(samples))
        return latent_generations(answers, max_new_tokens, controls, similarity)


register_method("lavit", LavitMethod)
