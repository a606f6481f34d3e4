"""Latent diagnostics shared by the latent methods (LaViT, LaRe): are the latents used, and do they differ?

The most common complaint about latent-reasoning models is that their latents are skipped, collapse to
near-identical states across samples, or can be perturbed without changing answers (ANCHORS.md). These answer it:

- :func:`control_step`: the latent steps feed zeros (``zero``) or another sample's latent (``shuffle``: a fixed
  permutation of the batch with no fixed point, seed 0) instead of the model's own (``real``); the answers are then
  compared with :func:`change_rate`.
- :func:`pairwise_cosine`: each sample's mean cosine to the latents of the other samples (near 1: collapsed), on
  :func:`step_mean` (each sample's latents averaged over the steps it ran, so adaptive halting does not skew it).

With adaptive halting, ``shuffle`` may hand an active sample the (meaningless) output computed for a sample that has
halted: the control then feeds noise rather than another sample's latent for those steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from latent_core.latents import StepFn

__all__ = [
    "LATENT_CONTROLS",
    "change_rate",
    "control_step",
    "mean_pairwise_cosine",
    "pairwise_cosine",
    "step_mean",
]

LATENT_CONTROLS = ("real", "zero", "shuffle")


def _shuffle_order(batch: int) -> Tensor:
    """A fixed permutation of ``batch`` samples in which no sample keeps its own place (identity for one)."""
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(0))
    if batch > 1 and bool((order == torch.arange(batch)).any()):
        order = torch.roll(torch.arange(batch), 1)
    return order


def control_step(step_fn: StepFn | None, kind: str, batch: int) -> StepFn | None:
    """``step_fn`` (``None``: the identity of Coconut-style loops) under a latent control: ``real`` returns it
    unchanged, ``zero`` feeds zeros of its output's shape, ``shuffle`` feeds another sample's output (a batch of one
    has no other sample and keeps its own: do not end a run on a single-sample batch). The wrapped ``step_fn`` still
    runs, so stateful step functions (LaRe's extractor history) see every step."""
    if kind not in LATENT_CONTROLS:
        raise ValueError(f"latents must be one of {', '.join(LATENT_CONTROLS)}, got {kind!r}")
    if kind == "real":
        return step_fn
    inner = step_fn or (lambda hidden, state: hidden)
    if kind == "zero":
        return lambda hidden, state: torch.zeros_like(inner(hidden, state))
    order = _shuffle_order(batch)
    return lambda hidden, state: inner(hidden, state)[order.to(hidden.device)]


def step_mean(latents: Tensor, num_steps: Tensor | Sequence[int] | None = None) -> Tensor:
    """``latents [B, K, d]`` -> ``[B, d]``: each sample's latents averaged over its first ``num_steps[b]`` steps
    (all K without ``num_steps``)."""
    if num_steps is None:
        return latents.float().mean(1)
    steps = torch.as_tensor(list(num_steps) if not isinstance(num_steps, Tensor) else num_steps).to(latents.device)
    if bool((steps < 1).any()):
        raise ValueError("every sample needs at least one latent step")
    keep = torch.arange(latents.shape[1], device=latents.device)[None] < steps[:, None]
    return (latents.float() * keep[..., None]).sum(1) / steps[:, None].float()


def pairwise_cosine(latents: Tensor) -> Tensor:
    """``[B]``: each sample's mean cosine similarity to the latents of the other samples; ``latents`` ``[B, ...]``
    is flattened per sample (``[B, K, d]`` -> ``[B, K * d]``); ``nan`` for fewer than two samples."""
    flat = latents.double().reshape(latents.shape[0], -1)
    n = flat.shape[0]
    if n < 2:
        return torch.full((n,), float("nan"), dtype=torch.float64)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sims = unit @ unit.T
    return (sims.sum(-1) - sims.diagonal()) / (n - 1)


def mean_pairwise_cosine(latents: Tensor) -> float:
    """The mean cosine similarity between the latents of different samples (the mean of :func:`pairwise_cosine`);
    ``nan`` for fewer than two samples."""
    return float(pairwise_cosine(latents).mean())


def change_rate(answers: Sequence[str], other: Sequence[str]) -> float:
    """The share of samples whose answer differs between two runs (e.g. real vs zeroed latents)."""
    if len(answers) != len(other):
        raise ValueError(f"{len(answers)} answers vs {len(other)}: compare runs over the same samples")
    if not answers:
        return float("nan")
    return sum(a != b for a, b in zip(answers, other, strict=True)) / len(answers)
