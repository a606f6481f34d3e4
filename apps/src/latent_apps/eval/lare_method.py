"""The ``lare`` evaluation method: LaRe's batched, KV-cached decoding (the prompt and ``<bot>`` prefilled once, T
refocusing iterations, ``<eot>``, the answer), registered as ``lare`` when this module is imported
(``latent_apps.eval`` imports it).

Prompts are the training ones (:func:`latent_apps.eval.methods.build_prompt_text` with no instruction), one image
per sample, LEFT-padded, greedy (:func:`lare.generate.generate_answers`). ``halt`` / ``threshold``
(``latent eval --method lare --halt cos --threshold 0.05``) switch on adaptive halting (Table 4); each sample reports
its own ``latent_steps`` and the summary gives their mean and distribution next to the tokens generated when correct.
``diagnostics=True`` (``--latent-diagnostics``) also answers each sample with its latents zeroed and shuffled across
the batch (:mod:`latent_core.diagnostics`, the controls LaViT's method reports too); every sample also reports the
mean cosine of its latents to those of the other samples of its batch (``latent_similarity``: near 1 means
collapsed latents; each sample's latents averaged over the steps it ran, :mod:`latent_core.diagnostics`).

``--model`` is a LaRe checkpoint (``lare init`` or a trained one: ``lare_config.json`` and the extractor next to the
llava model).
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

__all__ = ["LareMethod"]


class LareMethod:
    """Batched greedy decoding of a LaRe model (see the module docstring)."""

    name = "lare"
    instruction = None
    staged = False
    default_max_new_tokens = 64

    def __init__(
        self,
        halt: str | None = None,
        threshold: float | None = None,
        num_latents: int | None = None,
        diagnostics: bool = False,
    ) -> None:
        from lare.config import HALT_METRICS

        if halt is not None and halt not in (*HALT_METRICS, "none"):
            raise ValueError(f"--halt must be one of {', '.join(HALT_METRICS)} or none, got {halt!r}")
        if threshold is not None and halt is None:
            raise ValueError("--threshold needs --halt cos|l1|l2")
        self.halt, self.threshold, self.num_latents = halt, threshold, num_latents
        self.diagnostics = diagnostics

    def load(self, model: str) -> tuple[Any, Any]:
        """``(LareModel, processor)`` for ``--model``, a LaRe checkpoint."""
        from lare.model import load_lare

        return load_lare(model)

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        from lare.generate import generate_answers
        from lare.model import LareModel

        if not isinstance(model, LareModel):
            raise ValueError("the lare method needs a LaRe checkpoint loaded through LareMethod.load")
        several = next((s for s in samples if s.get("image") is None or len(s.get("images") or [1]) > 1), None)
        if several is not None:
            raise ValueError(f"LaRe answers about one image per question; sample {several['id']} has none or several")
        images = [sample["image"] for sample in samples]
        texts = [build_prompt_text(sample, self.instruction) for sample in samples]
        run = partial(
            generate_answers, model, processor, images, texts, max_new_tokens, num_latents=self.num_latents,
            halt=self.halt, threshold=self.threshold,
        )  # fmt: skip
        answers = run()
        runs = {kind: {"latents": kind} for kind in ("zero", "shuffle")} if self.diagnostics else {}
        controls = control_texts(run, runs, len(samples))
        return latent_generations(answers, max_new_tokens, controls, answers.latent_similarity)


register_method("lare", LareMethod)
