"""The ``coconut`` evaluation method: a Coconut stage's batched, KV-cached decoding (the prompt and
``<|start-latent|>`` prefilled once, the continuous thoughts, ``<|end-latent|>``, then the remaining steps and the
answer), registered as ``coconut`` when this module is imported (``latent_apps.eval`` imports it).

Prompts are the training ones (:func:`latent_apps.eval.methods.build_prompt_text` with no instruction, as
:class:`latent_core.coconut.CoconutCollator` asks: a shapes bench is asked with its human turn), one image per
sample, LEFT-padded, greedy (:func:`latent_core.coconut.generate_coconut`). The output is staged (the steps the
stage still writes, then ``<CONCLUSION>``): the answer is read only from a closed ``<CONCLUSION>`` block.
``num_latents`` (``latent eval --method coconut --num-latents N``) overrides the stage's count of thoughts.
``diagnostics=True`` (``--latent-diagnostics``) also answers each sample with its thoughts zeroed and shuffled across
the batch (:mod:`latent_core.diagnostics`); every sample reports ``latent_similarity``.

``--model`` is a ``latent coconut train`` stage (``<run>/stage_k``) or its run directory (the last stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from latent_apps.eval.methods import (
    Generation,
    build_inputs,
    build_prompt_text,
    control_texts,
    latent_generations,
    register_method,
)

__all__ = ["CoconutMethod"]


class CoconutMethod:
    """Batched greedy decoding of a Coconut stage (see the module docstring)."""

    name = "coconut"
    instruction = None
    staged = True
    default_max_new_tokens = 64

    def __init__(self, num_latents: int | None = None, diagnostics: bool = False) -> None:
        self.num_latents, self.diagnostics = num_latents, diagnostics
        self.record: dict[str, Any] | None = None

    def load(self, model: str) -> tuple[Any, Any]:
        """``(model, processor)`` for ``--model``, a Coconut stage or run directory."""
        from latent_core.coconut import load_coconut

        loaded, processor, self.record = load_coconut(model)
        return loaded, processor

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        from latent_core.coconut import generate_coconut

        if self.record is None:
            raise ValueError("the coconut method needs its model loaded through CoconutMethod.load (a Coconut stage)")
        texts = [build_prompt_text(sample, self.instruction) for sample in samples]
        inputs, _ = build_inputs(model, processor, samples, texts)
        inputs = dict(inputs.to(model.device))
        run = partial(generate_coconut, model, processor, inputs, self.record, max_new_tokens,
                      num_latents=self.num_latents)  # fmt: skip
        answers = run()
        runs = {kind: {"latents": kind} for kind in ("zero", "shuffle")} if self.diagnostics else {}
        controls = control_texts(run, runs, len(samples))
        return latent_generations(answers, max_new_tokens, controls, answers.latent_similarity)


register_method("coconut", CoconutMethod)
