"""LaViT's attention analysis (Table 2, Figure 5) and the latent diagnostics (METHODS.md section 2).

Attention maps are a model's attention over the image tokens (any non-negative scores; renormalised here):

- :func:`attention_stats`: the entropy (nats) of the renormalised map, the salient-region count (tokens above 1.5x
  the mean) and the coefficient of variation (std / mean);
- :func:`map_kl`: KL(teacher || model) between two maps on the same grid (``eps`` floors the model's zeros);
- :func:`mean_pairwise_cosine`: the mean cosine between the latents of different samples (near 1: the latents
  collapsed to one vector whatever the input, the complaint users of other implementations report);
- :func:`change_rate`: how often an answer changes when the latents are zeroed, shuffled or masked.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["attention_stats", "change_rate", "map_kl", "mean_pairwise_cosine"]


def attention_stats(scores: Tensor, salient_factor: float = 1.5) -> dict[str, float]:
    """``entropy`` (nats, of the map renormalised to sum to 1), ``salient`` (tokens above ``salient_factor`` x the
    mean) and ``cv`` (population standard deviation / mean) of an attention map ``[n]``."""
    p = scores.double().flatten()
    p = p / p.sum()
    inside = p > 0
    entropy = float(-(p[inside] * p[inside].log()).sum())
    mean = float(p.mean())
    return {
        "entropy": entropy,
        "salient": int((p > salient_factor * mean).sum()),
        "cv": float(p.std(unbiased=False)) / mean,
    }


def map_kl(teacher: Tensor, model: Tensor, eps: float = 1e-12) -> float:
    """KL(teacher || model) in nats between two attention maps over the same image tokens (both renormalised)."""
    p = teacher.double().flatten()
    q = model.double().flatten()
    p, q = p / p.sum(), (q / q.sum()).clamp(min=eps)
    inside = p > 0
    return float((p[inside] * (p[inside].log() - q[inside].log())).sum())


def mean_pairwise_cosine(latents: Tensor) -> float:
    """The mean cosine similarity between the latents of different samples: ``latents`` ``[B, K, d]`` flattened
    per sample to ``[B, K * d]``; ``nan`` for fewer than two samples."""
    flat = latents.double().reshape(latents.shape[0], -1)
    if flat.shape[0] < 2:
        return float("nan")
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sims = unit @ unit.T
    n = flat.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def change_rate(answers: Sequence[str], other: Sequence[str]) -> float:
    """The share of samples whose answer differs between two runs (e.g. real vs zeroed latents)."""
    if len(answers) != len(other):
        raise ValueError(f"{len(answers)} answers vs {len(other)}: compare runs over the same samples")
    if not answers:
        return float("nan")
    return sum(a != b for a, b in zip(answers, other, strict=True)) / len(answers)
