"""The three filters of LaViT-SFT-15K (METHODS.md section 2), each counted by the builder's report.

1. **correctness**: the teacher's answer matches the ground truth after normalisation (:func:`answers_match`:
   case, punctuation, articles, number words, option letters), or an LLM judge says so (:func:`judge_match`, any
   OpenAI-compatible endpoint, the key from the environment). A judge call that still fails after its retries is
   an *error*, never "incorrect".
2. **difficulty**: drop a sample the same teacher (or ``--text-model``) answers correctly *without the image*.
3. **alignment**: drop a sample with less than ``min_alignment`` (0.2) of its A_traj mass inside the ground-truth
   bbox on the teacher's merged patch grid (:func:`lavit.teacher.alignment`).
"""

from __future__ import annotations

import os
import string
import time
from dataclasses import dataclass
from typing import Any

from latent_core.answers import answers_match, normalize_answer

__all__ = ["JudgeSettings", "answers_match", "judge_match", "normalize_answer"]


@dataclass(frozen=True)
class JudgeSettings:
    """An OpenAI-compatible chat endpoint that judges correctness. ``api_key_env`` names the environment variable
    holding the key (never passed on the command line or written anywhere)."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    retries: int = 2
    backoff: float = 1.0
    timeout: float = 60.0


JUDGE_PROMPT = (
    "Question: {question}\nGround-truth answer: {truth}\nModel answer: {prediction}\n"
    "Does the model answer mean the same as the ground-truth answer? Reply with one word: yes or no."
)


def judge_match(
    question: str, prediction: str, truth: str, settings: JudgeSettings, client: Any = None
) -> tuple[bool | None, str | None]:
    """``(verdict, error)``: the judge's yes / no, or ``(None, reason)`` when every attempt failed (an API error,
    a timeout, a reply that is neither yes nor no). ``client``: an ``openai.OpenAI``-like object (tests pass a
    fake); by default one is made from ``settings``."""
    if client is None:
        import openai

        key = os.environ.get(settings.api_key_env)
        if not key:
            return None, f"no API key: set the environment variable {settings.api_key_env}"
        client = openai.OpenAI(base_url=settings.base_url, api_key=key, timeout=settings.timeout)
    message = JUDGE_PROMPT.format(question=question, truth=truth, prediction=prediction)
    reason = "no attempt"
    for attempt in range(settings.retries + 1):
        try:
            reply = client.chat.completions.create(
                model=settings.model, messages=[{"role": "user", "content": message}], temperature=0, max_tokens=4
            )
            word = (reply.choices[0].message.content or "").strip().lower().strip(string.punctuation)
            if word in ("yes", "no"):
                return word == "yes", None
            reason = f"unusable reply {word[:40]!r}"
        except Exception as exc:  # openai.APIError, httpx errors, a malformed body: retried, then an error
            reason = f"{type(exc).__name__}: {str(exc)[:120]}"
        if attempt < settings.retries:
            time.sleep(settings.backoff * 2**attempt)
    return None, reason
