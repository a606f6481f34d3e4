"""The ``heima`` evaluation method: greedy generation of a Heima model, with reasoning tokens counted.

Registered as ``heima`` when this module is imported (``latent_apps.eval`` imports it). Prompts are the training
ones (:func:`latent_apps.eval.methods.build_prompt_text` with no instruction for open questions, the builder the
training collator uses), one user turn with the image, LEFT-padded and decoded greedily by
:func:`heima.generate.generate`. Per sample the method reports ``generated_tokens`` (up to and including EOS),
``reasoning_tokens`` (generated tokens before the ``<CONCLUSION>`` tag: thinking tokens, stage tags and any stage
still written out), ``thinking_tokens``, ``truncated`` and the generated text; the answer is read from its closed
``<CONCLUSION>`` block only (``staged``).

``--model`` may be an exported checkpoint (``heima export``; loads like any checkpoint) or a stage output directory
(adapter + thinking tokens): :meth:`HeimaMethod.load` puts such a stage on its base model
(:func:`heima.generate.load_for_inference`); the runner calls it when the method has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latent_apps.eval.methods import Generation, build_prompt_text, register_method

__all__ = ["HeimaMethod"]


class HeimaMethod:
    """Batched greedy generation of a Heima model (see the module docstring).

    Args:
        batch_size: samples per ``generate`` call inside one runner batch (default: the runner's batch at once).
    """

    name = "heima"
    instruction = None
    staged = True
    default_max_new_tokens = 512

    def __init__(self, batch_size: int | None = None) -> None:
        self.batch_size = batch_size

    @staticmethod
    def load(model: str) -> tuple[Any, Any]:
        """``(model, processor)`` for ``--model``: a Heima stage directory (adapter on its base) or a checkpoint."""
        from heima.generate import load_for_inference

        return load_for_inference(model)

    def __call__(
        self, model: Any, processor: Any, samples: Sequence[dict[str, Any]], max_new_tokens: int
    ) -> list[Generation]:
        from heima.generate import generate

        prompts = [{**sample, "question": build_prompt_text(sample, self.instruction)} for sample in samples]
        records = generate(
            model, processor, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size or len(prompts) or 1
        )
        return [
            Generation(
                text=r["text"],
                generated_tokens=r["generated_tokens"],
                reasoning_tokens=r["reasoning_tokens"],
                thinking_tokens=r["thinking_tokens"],
                truncated=r["truncated"],
            )
            for r in records
        ]


register_method("heima", HeimaMethod)
