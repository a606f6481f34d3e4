"""Probing (Table 6) on planted data: a representation that is a noisy linear map of the latents is told apart from
the other samples' clearly; an independent one is not (chance, 50%)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lare.probe import pair_features, probe_accuracy, probe_pairs, project

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pairs_balance_and_negative_strategies():
    g = torch.Generator().manual_seed(0)
    u, v = project(torch.randn(40, 12, generator=g)), project(torch.randn(40, 12, generator=g))
    categories = ["a", "b"] * 20
    pairs, y, kinds = probe_pairs(v, categories, positives=30, negatives=30, seed=0)
    assert pairs.shape == (60, 2) and int(y.sum()) == 30
    assert {k: kinds.count(k) for k in set(kinds)} == {"positive": 30, "random": 10, "hard": 10, "category": 10}
    assert all(i == j for (i, j), label in zip(pairs, y, strict=True) if label == 1)
    assert all(i != j for (i, j), label in zip(pairs, y, strict=True) if label == 0)
    similarity = v @ v.T
    np.fill_diagonal(similarity, -np.inf)
    for (i, j), kind in zip(pairs, kinds, strict=True):
        if kind == "hard":
            assert j == similarity[i].argmax()
        if kind == "category":
            assert categories[i] == categories[j]
    assert np.allclose(np.linalg.norm(u, axis=1), 1.0)
    x = pair_features(u, v, pairs)
    assert x.shape == (60, 512) and np.allclose(x[0, :256], u[pairs[0, 0]] * v[pairs[0, 1]])


def test_separable_and_inseparable_planted_data():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(200, 16, generator=g)
    mixing = torch.randn(16, 24, generator=g)
    matched = latents @ mixing + 0.05 * torch.randn(200, 24, generator=g)  # the latents carry the other modality
    independent = torch.randn(200, 24, generator=g)  # they carry nothing of it
    good = probe_accuracy(latents, matched, seeds=(0,), positives=200, negatives=200)
    bad = probe_accuracy(latents, independent, seeds=(0,), positives=200, negatives=200)
    assert good["svm_accuracy"] > 0.85 and good["mlp_accuracy"] > 0.85
    assert abs(bad["svm_accuracy"] - 0.5) < 0.12 and abs(bad["mlp_accuracy"] - 0.5) < 0.12
    assert good["pairs"] == 400 and good["svm_std"] == 0.0
