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


def test_no_extractor_visual_evidence_is_every_projected_image_token(tiny_lare):
    # Without the extractor there are no windows: the probe's visual representation is the mean-max pool of every
    # image token after the projector, computed here independently with get_image_features.
    import copy
    import dataclasses

    from lare.generate import encode_questions
    from lare.losses import mean_max_pool
    from lare.probe import representations
    from latent_core.testing import tiny_image

    model, processor = tiny_lare
    no_extractor = copy.copy(model)
    no_extractor.config = dataclasses.replace(model.config, extractor=False, num_latents=2)
    rows = [{"image": tiny_image(i, 64), "question": f"Question {i}?", "reasoning": "row 1 column 1: red."}
            for i in range(3)]  # fmt: skip
    latents, texts, visuals = representations(no_extractor, processor, rows, batch_size=2)
    assert latents.shape == texts.shape == visuals.shape == (3, 2 * model.vlm.config.text_config.hidden_size)
    with torch.no_grad():
        for i, row in enumerate(rows):
            inputs = encode_questions(processor, [row["image"]], [row["question"]])
            features = model.vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
            torch.testing.assert_close(visuals[i], mean_max_pool(features[None].float())[0], atol=1e-5, rtol=0)
