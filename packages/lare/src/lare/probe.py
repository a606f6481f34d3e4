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

:func:`representations` gathers those of a model on reasoning rows (:func:`probe_model` probes them): the mean-max
pooled latents (T iterations, no halting), the pooled final hidden states of the LLM over the reasoning text alone,
and the pooled visual anchors (every iteration's V_local; without the extractor, which has none, every image token:
the visual evidence that model's latents could hold).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "NEGATIVE_STRATEGIES",
    "pair_features",
    "probe_accuracy",
    "probe_model",
    "probe_pairs",
    "project",
    "representations",
]

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


def representations(
    model: Any, processor: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 16, show_progress: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(latents, texts, visuals)``, each ``[n, 2d]`` mean-max pooled (:func:`lare.losses.mean_max_pool`): the
    latents of T iterations (no halting), the LLM's final hidden states over the reasoning text alone, and the
    visual anchors (every iteration's V_local; without the extractor every image token after the projector)."""
    from latent_core.capture import capture_image_features
    from latent_core.collate import row_image
    from latent_core.prompts import question_text
    from rich.progress import track

    from lare.generate import encode_questions, generate_answers
    from lare.losses import mean_max_pool

    if model.config.num_latents < 1:
        raise ValueError("the probe needs latents: this model has num_latents = 0")
    tokenizer = processor.tokenizer
    latents, texts, visuals = [], [], []
    starts = range(0, len(rows), batch_size)
    for start in track(starts, description="lare probe: representations", disable=not show_progress):
        chunk = rows[start : start + batch_size]
        pictures = [row_image(row) for row in chunk]
        questions = [question_text(r["question"]) for r in chunk]
        got = generate_answers(model, processor, pictures, questions, 1, halt="none")
        latents.append(mean_max_pool(got.latents.float()))
        with torch.no_grad():
            if got.anchors is not None:
                visuals.append(mean_max_pool(got.anchors.float()))
            else:  # no extractor: every image token
                inputs = encode_questions(processor, pictures, questions, model.device)
                with capture_image_features(model.vlm, inputs["input_ids"]) as captured:
                    model.vlm.model(**inputs)
                visuals.append(torch.stack([mean_max_pool(f.float()[None])[0] for f in captured.features]))
            encoded = tokenizer([r["reasoning"] for r in chunk], add_special_tokens=False, padding="longest",
                                padding_side="right", truncation=True, max_length=256, return_tensors="pt")  # fmt: skip
            mask = encoded["attention_mask"].to(model.device)
            hidden = model.vlm.model.language_model(
                input_ids=encoded["input_ids"].to(model.device), attention_mask=mask
            ).last_hidden_state
        texts.append(mean_max_pool(hidden.float(), mask))
    return torch.cat(latents).cpu(), torch.cat(texts).cpu(), torch.cat(visuals).cpu()


def probe_model(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    pairs: int = 500,
    seeds: int = 3,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Table 6 on ``rows`` (:func:`latent_core.read_reasoning` records) for a :class:`lare.model.LareModel`: the
    text and the vision probe (:func:`probe_accuracy`) of its pooled latents (:func:`representations`)."""
    if len(rows) < 4:
        raise ValueError(f"{len(rows)} rows: the probe needs at least 4")
    pooled, texts, visuals = representations(model, processor, rows, batch_size=batch_size,
                                             show_progress=show_progress)  # fmt: skip
    n_pairs = min(pairs, 10 * len(rows))
    run = range(seeds)
    return {
        "samples": len(rows),
        "text": probe_accuracy(pooled, texts, seeds=run, positives=n_pairs, negatives=n_pairs),
        "vision": probe_accuracy(pooled, visuals, seeds=run, positives=n_pairs, negatives=n_pairs),
    }
