"""Decoding with LaRe (Section 3.1 "Inference Phase", Table 4): T refocusing iterations on a KV cache, then the
answer.

The sequence of one sample is ``[V, X_q, <bot>, z_1..z_T, <eot>, answer]``. **Where ``<bot>`` sits during the
iterations** is a choice (METHODS.md section 3; the paper writes the iterations over ``[V, X_q, z_1..z_{t-1}]`` and
adds the delimiters afterwards): here ``<bot>`` is already in place while iterating, so iteration 1 reads the
``<bot>`` position (its hidden states and its attention over the image) and iteration t > 1 the position of
z_{t-1}. The iterations then build exactly the prefix the answer is generated from, so one cache serves both: the
prompt and ``<bot>`` are prefilled once, each iteration is one single-position forward
(:func:`latent_core.generate_with_latents` with :class:`lare.model.RefocusStep`), ``<eot>`` follows z_T, and
``generate`` continues on the same cache. (Without ``<bot>`` during the iterations, inserting it afterwards would
shift every latent's position and the cache would have to be recomputed.) The naive definition - recompute the
whole prefix at every iteration and every answer token - gives the same latents and logits (tests/lare).

**Adaptive halting** (Table 4; ``halt`` ``cos`` | ``l1`` | ``l2``, ``threshold``): a sample stops after z_t
(2 <= t < T) once the distance between z_t and z_{t-1} is below the threshold; it keeps z_1..z_t and its ``<eot>``
follows z_t, exactly as if it had run alone with T = t (the batch stays rectangular by masking,
:func:`latent_core.distance_halt`). ``latent_steps`` is each sample's t.

``latents`` is the latent diagnostics' control (:mod:`latent_core.diagnostics`): ``zero`` feeds zeros,
``shuffle`` another sample's z_t, ``real`` (default) the sample's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from latent_core.diagnostics import control_step, pairwise_cosine, step_mean
from latent_core.latents import distance_halt, generate_with_latents
from latent_core.prompts import decode_answers, encode_chats, render_prompts

from lare.config import HALT_METRICS
from lare.model import LareModel

__all__ = ["LareAnswers", "encode_questions", "generate_answers"]


@dataclass
class LareAnswers:
    """Decoded answers: ``texts``; ``token_counts`` (generated tokens per answer, end of turn excluded;
    ``latent eval`` counts the end of turn too);
    ``latent_steps`` (iterations each sample ran: T, or fewer when it halted); ``latents`` ``[B, T, d]`` (zero after
    a halted sample's last latent); ``windows`` (per iteration ``[B, w*w]``: the image tokens each sample's window
    covered); ``sequences`` (each answer's token ids, end of turn excluded); ``latent_similarity`` (each sample's
    mean cosine to the other samples' latents, each averaged over the steps it ran: :mod:`latent_core.diagnostics`;
    ``nan`` for a batch of one or without latents); ``anchors`` ``[B, T * w * w, d]`` (every iteration's V_local:
    the visual anchors L_align and the probe pool); ``generate_output`` (what ``generate`` returned, e.g. its
    ``logits`` with ``output_logits=True``)."""

    texts: list[str]
    token_counts: list[int]
    latent_steps: list[int]
    latents: torch.Tensor
    windows: list[torch.Tensor]
    sequences: list[list[int]]
    latent_similarity: list[float]
    anchors: torch.Tensor | None = None
    generate_output: Any = None


def encode_questions(processor: Any, images: list[Any], questions: list[str], device: Any = None) -> dict[str, Any]:
    """The LEFT-padded batch of the user texts ``questions`` (:func:`latent_core.prompts.question_text`), one image
    each, in the chat template (the form LaRe trains on)."""
    chats = render_prompts(processor, questions, [1] * len(questions))
    inputs = dict(encode_chats(processor, chats, [[image.convert("RGB")] for image in images]))
    return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in inputs.items()}


@torch.no_grad()
def generate_answers(
    model: LareModel,
    processor: Any,
    images: list[Any],
    questions: list[str],
    max_new_tokens: int = 64,
    *,
    num_latents: int | None = None,
    halt: str | None = None,
    threshold: float | None = None,
    latents: str = "real",
    **generate_kwargs: Any,
) -> LareAnswers:
    """Greedy answers of ``model`` to ``questions`` about ``images`` after the refocusing iterations (see the module
    docstring). ``num_latents``, ``halt`` and ``threshold`` default to the model's config (``halt="none"`` switches
    a checkpoint's halting off); ``generate_kwargs`` go to ``generate`` (e.g. ``output_logits=True,
    return_dict_in_generate=True``)."""
    config = model.config.replace(num_latents=num_latents, threshold=threshold)
    if halt is not None:
        config = dataclasses.replace(config, halt=None if halt == "none" else halt)
    inputs = encode_questions(processor, images, questions, model.device)
    batch = inputs["input_ids"].shape[0]
    step = model.step()
    halt_fn = None if config.halt is None else distance_halt(config.threshold, HALT_METRICS[config.halt])
    out = generate_with_latents(
        model.vlm, inputs, config.num_latents, step_fn=control_step(step, latents, batch), halt_fn=halt_fn,
        max_new_tokens=max_new_tokens, do_sample=False, **step.loop_kwargs(inputs["input_ids"]), **generate_kwargs,
    )  # fmt: skip
    texts, counts, rows = decode_answers(processor, model.vlm, out.sequences)
    return LareAnswers(
        texts=texts,
        token_counts=counts,
        latent_steps=[int(n) for n in out.num_steps],
        latents=out.latents,
        windows=step.windows,
        sequences=rows,
        latent_similarity=pairwise_cosine(step_mean(out.latents, out.num_steps)).tolist()
        if config.num_latents
        else [float("nan")] * batch,
        anchors=torch.cat(step.v_locals, 1) if step.v_locals else None,
        generate_output=out.generate_output,
    )
