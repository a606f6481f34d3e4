"""LaViT's attention statistics and latent diagnostics against hand computations, and the zeroed / shuffled latents
of the decoding loop."""

from __future__ import annotations

import math

import pytest
import torch
from latent_core.testing import tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from lavit.analysis import attention_stats, change_rate, map_kl, mean_pairwise_cosine
from lavit.config import latent_tokens
from lavit.generate import generate_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attention_stats_by_hand():
    stats = attention_stats(torch.tensor([2.0, 1.0, 1.0, 0.0]))  # renormalised: 0.5, 0.25, 0.25, 0
    assert stats["entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert stats["salient"] == 1  # only 0.5 > 1.5 x 0.25
    std = math.sqrt(((0.5 - 0.25) ** 2 + 0 + 0 + 0.25**2) / 4)
    assert stats["cv"] == pytest.approx(std / 0.25)
    flat = attention_stats(torch.ones(8))
    assert flat["entropy"] == pytest.approx(math.log(8)) and flat["salient"] == 0 and flat["cv"] == 0


def test_kl_cosine_and_change_rate_by_hand():
    assert map_kl(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])) == pytest.approx(
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    )
    assert map_kl(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(0.0)
    same = torch.ones(3, 2, 4)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    opposite = torch.stack([torch.ones(2, 4), -torch.ones(2, 4)])
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    assert change_rate(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    with pytest.raises(ValueError):
        change_rate(["a"], [])


def test_zeroed_and_shuffled_latents_feed_what_they_say():
    model, processor = tiny_model("qwen2_5_vl")
    ids = add_special_tokens(model, processor, latent_tokens(3))
    model.eval()
    images = [tiny_image(i, size=84) for i in range(3)]
    questions = ["How many red circles are there?", "Is there a star?", "What colour is the square?"]

    def run(kind):
        return generate_answers(model, processor, images, questions, ids, max_new_tokens=3, latents=kind)

    real, zero, shuffled = run("real"), run("zero"), run("shuffle")
    assert real.latents.shape[:2] == (3, 2) and real.latents.abs().sum() > 0
    assert zero.latents.abs().sum() == 0
    # The first continuous latent is the hidden state of <v-trace_1>, the same in both runs: shuffled, it is another
    # sample's, and no sample keeps its own.
    order = [int((real.latents[:, 0] - row).abs().sum(-1).argmin()) for row in shuffled.latents[:, 0]]
    torch.testing.assert_close(shuffled.latents[:, 0], real.latents[order, 0])
    assert sorted(order) == [0, 1, 2] and all(o != i for i, o in enumerate(order))
    with pytest.raises(ValueError, match="continuous mode"):
        generate_answers(model, processor, images, questions, ids, mode="discrete", latents="zero")
