"""Probing (Table 6): do the latents encode the sample's reasoning text and its visual evidence?

Each sample gives a pooled latent vector and a representation of another modality (the pooled LLM hidden states of
its reasoning text, or its pooled visual anchors). Both are projected to 256-d by a fixed Gaussian random projection
(seed 0; **choice**: the paper's projection was lost) and L2-normalised. A *pair* (latent of i, representation of j)
is positive when i = j. 500 positive and 500 negative pairs are drawn, the negatives split evenly between three
strategies (**choice**): ``random`` (any other sample), ``hard`` (the other sample whose representation is most
similar to i's) and ``category`` (another sample of i's category; random when there is none). The two spaces are
unrelated, so the representation is first mapped into the latents' space by a ridge regression fitted on the
*training* split's positive pairs (**choice**), and a pair's features are ``[u * Wv, |u - Wv|]`` (a linear
classifier can then read agreement). A stratified 70/30 split, then a linear SVM (C chosen by 5-fold
cross-validation) and a one-hidden-layer MLP (256 units, early stopping) from scikit-learn; everything is repeated
over ``seeds`` (fresh pairs and split) and reported as mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["NEGATIVE_STRATEGIES", "pair_features", "probe_accuracy", "probe_pairs", "project"]

NEGATIVE_STRATEGIES = ("random", "hard", "category")


def project(x: Tensor, dim: int = 256, seed: int = 0) -> np.ndarray:
    """``x [n, d]`` through a fixed Gaussian random projection to ``dim``, L2-normalised rows."""
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(x.shape[-1], dim, generator=g, dtype=torch.float64) / dim**0.5
    out = x.double() @ matrix
    return torch.nn.functional.normalize(out, dim=-1).numpy()


def probe_pairs(
    others: np.ndarray,
    categories: Sequence[Any] | None = None,
    positives: int = 500,
    negatives: int = 500,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(pairs [n, 2], labels [n], kinds)``: ``positives`` matching pairs (i, i) and ``negatives`` pairs (i, j != i),
    the negatives split evenly over :data:`NEGATIVE_STRATEGIES` (``hard`` picks the j whose representation in
    ``others`` is most similar to i's); ``kinds`` names each pair's source."""
    n = others.shape[0]
    if n < 2:
        raise ValueError("probing needs at least two samples")
    rng = np.random.default_rng(seed)
    similarity = others @ others.T
    np.fill_diagonal(similarity, -np.inf)
    hardest = similarity.argmax(1)
    pairs, labels, kinds = [], [], []
    for i in rng.choice(n, positives, replace=positives > n):
        pairs.append((int(i), int(i)))
        labels.append(1)
        kinds.append("positive")
    for k in range(negatives):
        strategy = NEGATIVE_STRATEGIES[k % len(NEGATIVE_STRATEGIES)]
        i = int(rng.integers(n))
        j = None
        if strategy == "hard":
            j = int(hardest[i])
        elif strategy == "category" and categories is not None:
            same = [m for m in range(n) if m != i and categories[m] == categories[i]]
            j = int(rng.choice(same)) if same else None
        if j is None:
            j = int((i + 1 + rng.integers(n - 1)) % n)
        pairs.append((i, j))
        labels.append(0)
        kinds.append(strategy)
    return np.asarray(pairs), np.asarray(labels), kinds


def pair_features(u: np.ndarray, mapped: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``[u_i * m_j, |u_i - m_j|]`` for each pair (i, j), with ``mapped`` the representations in the latents' space."""
    a, b = u[pairs[:, 0]], mapped[pairs[:, 1]]
    return np.concatenate([a * b, np.abs(a - b)], 1)


def probe_accuracy(
    latents: Tensor,
    others: Tensor,
    categories: Sequence[Any] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    positives: int = 500,
    negatives: int = 500,
    dim: int = 256,
) -> dict[str, Any]:
    """Table 6's probe: SVM and MLP test accuracy (mean and std over ``seeds``) of telling matching pairs from
    non-matching ones (see the module docstring)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import LinearSVC

    u, v = project(latents, dim, seed=0), project(others, dim, seed=1)
    scores: dict[str, list[float]] = {"svm": [], "mlp": []}
    for seed in seeds:
        pairs, y, _ = probe_pairs(v, categories, positives, negatives, seed)
        train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
        fit = train[y[train] == 1]  # the map into the latents' space sees training positives only
        ridge = Ridge(alpha=1.0).fit(v[pairs[fit, 1]], u[pairs[fit, 0]])
        mapped = ridge.predict(v)
        mapped /= np.linalg.norm(mapped, axis=1, keepdims=True).clip(min=1e-12)
        x = pair_features(u, mapped, pairs)
        svm = GridSearchCV(LinearSVC(max_iter=20000), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=5)
        scores["svm"].append(float(svm.fit(x[train], y[train]).score(x[test], y[test])))
        mlp = MLPClassifier(hidden_layer_sizes=(256,), early_stopping=True, max_iter=500, random_state=seed)
        scores["mlp"].append(float(mlp.fit(x[train], y[train]).score(x[test], y[test])))
    return {
        "n_samples": int(latents.shape[0]),
        "pairs": positives + negatives,
        "seeds": list(seeds),
        **{f"{name}_accuracy": float(np.mean(values)) for name, values in scores.items()},
        **{f"{name}_std": float(np.std(values)) for name, values in scores.items()},
        "per_seed": scores,
    }
