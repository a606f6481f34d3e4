"""Decoding with the LaViT student: batched and KV-cached; prefill, the K latent steps, then the answer.

- continuous: :func:`latent_core.generate_with_latents` (``<v-trace_1>`` ends the prefill, K - 1 continuous steps on
  the cache, then ordinary ``generate``);
- discrete: the K latent tokens appended to the prompt, then ordinary ``generate``.

``latents`` (continuous mode) replaces what is fed at the latent steps, for the latent diagnostics
(:mod:`lavit.analysis`): ``zero`` feeds zeros, ``shuffle`` feeds another sample's hidden state (a fixed permutation
of the batch, seed 0; a batch of one has no other sample and keeps its own, so the last batch of a run should not be
a single sample); ``real`` (default) is the student's own.

``mask_latents`` is Table 3's "w/o latent tokens" (masking the latent tokens at inference): every query that
produces the answer - the last latent position, which predicts the first answer token, and every answer token - gets
a hard mask (``-inf``, through :func:`latent_core.attention_bias`) on the K latent keys, so the answer is computed
from the prompt alone; everything before is unchanged. The last latent position keeps its own input in its residual
stream: the fixed ``<v-trace_K>`` embedding in discrete mode, z_{K-1} in continuous mode (the zeroed and shuffled
latents of ``latents`` are the controls that remove the content). (The released code's flag masked placeholder ids
in the prompt and so changed nothing; ANCHORS.md.)
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from latent_core.attention import attention_bias
from latent_core.diagnostics import control_step
from latent_core.latents import generate_with_latents
from latent_core.prompts import decode_answers, encode_chats, render_prompts

from lavit.inputs import InputSettings
from lavit.model import append_tokens

__all__ = ["LavitAnswers", "generate_answers", "load_student"]


@dataclass
class LavitAnswers:
    """Decoded answers: ``texts``, ``token_counts`` (generated tokens per answer, end of turn excluded),
    ``latent_steps`` (latent positions per sample: K), ``latents`` (continuous mode: ``[B, K - 1, d]`` what was fed
    at the continuous latent steps; ``None`` in discrete mode), ``sequences`` (each answer's token ids, end of turn
    excluded)."""

    texts: list[str]
    token_counts: list[int]
    latent_steps: list[int]
    latents: torch.Tensor | None = None
    sequences: list[list[int]] | None = None


def load_student(
    path: str, method: str = "lavit", plain_inputs: InputSettings | None = None
) -> tuple[Any, Any, list[int] | None, str, str | None]:
    """``(model, processor, latent_ids, mode, system)`` for a ``lavit train`` stage (on the base its
    ``latent_stage.json`` names), a naive-SFT stage (``latent_ids`` ``None``, mode ``naive``) or any Qwen2.5-VL
    checkpoint (a base or a teacher: ``None``, ``plain``); eval mode. A stage is presented as it was trained (the
    pixel bounds set on its processor and the system prompt ``system`` its ``latent_stage.json`` records); a plain
    checkpoint with ``plain_inputs`` (default: the paper's, :class:`lavit.config.InputSettings`)."""
    from latent_core.inference import load_trained
    from latent_core.trainer import stage_info

    # phi (Eq. 6's projection to the teacher's width) is a training head: inference leaves it out
    model, processor = load_trained(path, families=("qwen2_5_vl",), method=method, skip_extra_prefixes=("phi.",))
    info = stage_info(path)
    if info.get("method") != "lavit":
        system = (plain_inputs or InputSettings()).apply(processor).system_prompt
        return model, processor, None, "plain", system
    system = InputSettings.recorded(info.get("inputs")).apply(processor).system_prompt
    mode = info.get("mode", "continuous")
    tokens = info.get("tokens") or []
    if mode == "naive":
        return model, processor, None, mode, system
    if not tokens:
        raise ValueError(f"{path} names no latent tokens in latent_stage.json: is it a `lavit train` stage?")
    tokenizer = getattr(processor, "tokenizer", processor)
    return model, processor, [tokenizer.convert_tokens_to_ids(token) for token in tokens], mode, system


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    images: list[Any],
    questions: list[str],
    latent_ids: list[int] | None,
    mode: str = "continuous",
    max_new_tokens: int = 64,
    mask_latents: bool = False,
    latents: str = "real",
    system: str | None = None,
) -> LavitAnswers:
    """Greedy answers of the student ``model`` (the backbone, latent tokens added) to ``questions`` (user texts,
    :func:`latent_core.prompts.question_text`) about ``images``; see the module docstring. No ``latent_ids``: a
    plain model (a naive-SFT stage, a base, the teacher) answers the same prompt with no latent block. ``system``:
    the system turn the stage was trained with (:func:`load_student` returns it)."""
    chats = render_prompts(processor, questions, [1] * len(questions), system=system)
    inputs = dict(encode_chats(processor, chats, [[i] for i in images]))
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    batch, prompt_len = inputs["input_ids"].shape
    k = len(latent_ids or [])
    if not k and (mask_latents or latents != "real"):
        raise ValueError("masked, zeroed or shuffled latents need a student with latent tokens")
    answer_start = prompt_len + k
    with ExitStack() as stack:
        if mask_latents:
            queries = torch.zeros((batch, answer_start), dtype=torch.bool, device=model.device)
            queries[:, answer_start - 1] = True  # the last latent position predicts the first answer token
            keys = torch.zeros_like(queries)
            keys[:, prompt_len:answer_start] = True
            stack.enter_context(attention_bias(model, queries, keys, float("-inf"), extend_queries=True))
        generation = dict(max_new_tokens=max_new_tokens, do_sample=False)
        fed = None
        if not k:
            sequences = model.generate(**inputs, **generation)[:, prompt_len:]
        elif mode == "continuous":
            out = generate_with_latents(
                model, inputs, k - 1, step_fn=control_step(None, latents, batch), start_ids=latent_ids[:1], **generation
            )
            sequences, fed = out.sequences, out.latents
        else:
            if latents != "real":
                raise ValueError("zeroed / shuffled latents need continuous mode (discrete latents are tokens)")
            latent = torch.tensor(latent_ids, device=model.device).expand(batch, -1)
            full = append_tokens(inputs, latent)
            sequences = model.generate(**full, **generation)[:, answer_start:]
    texts, counts, sequences = decode_answers(processor, model, sequences)
    return LavitAnswers(texts=texts, token_counts=counts, latent_steps=[k] * batch, latents=fed, sequences=sequences)
