"""LaRe's losses against hand computations: symmetric InfoNCE with temperature and mean-max pooling, the diffusion
loss against a manual DDPM noising of a known latent, and L_text's targets covering exactly the first 32 tokens."""

from __future__ import annotations

import math

import pytest
import torch
from lare.losses import (
    Reconstructor,
    diffusion_loss,
    info_nce,
    mean_max_pool,
    symmetric_alignment,
    text_prefix_targets,
    unet_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mean_max_pool_by_hand_with_a_mask():
    x = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_max_pool(x, mask).tolist() == [[2.0, 1.0, 3.0, 4.0]]  # mean of the first two, then their max
    torch.testing.assert_close(mean_max_pool(x), torch.tensor([[104 / 3, 102 / 3, 100.0, 100.0]]))
    with pytest.raises(ValueError, match="no position"):
        mean_max_pool(x, torch.zeros(1, 3))


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.5], [0.0, 1.0], [-1.0, 1.0]])
    tau = 0.5

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a.tolist()], [unit(v) for v in b.tolist()]
    sim = [[sum(x * y for x, y in zip(p, q, strict=True)) / tau for q in ub] for p in ua]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(s) for s in rows[i])) for i in range(3)) / 3

    expected = (ce(sim) + ce([list(col) for col in zip(*sim, strict=True)])) / 2
    assert info_nce(a, b, tau).item() == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments, and scale-free (cosine)
    assert info_nce(b, a, tau).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(3 * a, b, tau).item() == pytest.approx(expected, rel=1e-6)
    # a perfectly aligned, well separated batch at a low temperature costs ~0
    eye = torch.eye(3)
    assert info_nce(eye, eye, 0.01).item() < 1e-6


def test_symmetric_alignment_pools_each_side_then_pairs_them():
    g = torch.Generator().manual_seed(0)
    latents, text, visual = (torch.randn(4, n, 6, generator=g) for n in (3, 5, 2))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0], [1] + [0] * 4])
    got = symmetric_alignment(latents, text, mask, visual, temperature=0.2)
    pooled = mean_max_pool(latents)
    assert got["align_text"].item() == pytest.approx(info_nce(pooled, mean_max_pool(text, mask), 0.2).item())
    assert got["align_visual"].item() == pytest.approx(info_nce(pooled, mean_max_pool(visual), 0.2).item())


def test_diffusion_loss_against_a_manual_ddpm_noising(tiny_diffusion):
    from diffusers import DDPMScheduler

    reconstructor = Reconstructor(6, tiny_diffusion()[1])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    latents = torch.randn(2, 3, 6, generator=g)
    t = torch.tensor([10, 900])
    # by hand: linear betas, alpha_bar_t = prod(1 - beta_s, s <= t), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[t].float()[:, None, None, None]
    noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        predicted = reconstructor.unet(noisy, t, encoder_hidden_states=reconstructor.project(latents)).sample
        expected = ((predicted - noise) ** 2).mean()
        got = diffusion_loss(reconstructor, x0, latents, scheduler, noise=noise, timesteps=t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # gradients reach the latents (what conditions the U-Net) and the projection
    latents.requires_grad_(True)
    diffusion_loss(reconstructor, x0, latents, scheduler, noise=noise, timesteps=t).backward()
    assert latents.grad.abs().sum() > 0 and reconstructor.project.weight.grad.abs().sum() > 0


def test_paper_unet_has_head_dim_64_and_the_spec_blocks():
    from diffusers import UNet2DConditionModel

    config = unet_config(sample_size=8, in_channels=4)
    assert config["block_out_channels"] == (96, 192, 384, 512) and config["layers_per_block"] == 3
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    attentions = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert attentions and all(m.inner_dim // m.heads == 64 for m in attentions)
    assert {m.cross_attention_dim for m in attentions if m.is_cross_attention} == {768}


def test_text_prefix_targets_cover_exactly_the_first_32_tokens():
    from latent_core.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer("qwen2_5_vl")
    long = " ".join(["the count is two and the answer is yes"] * 10)
    short = "row 1 column 2: red circle"
    ids, labels = text_prefix_targets(tokenizer, [long, short], 32)
    long_ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    short_ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 32 and len(short_ids) < 32
    assert ids[0].tolist() == long_ids[:32] and labels[0].tolist() == long_ids[:32]
    assert labels[1].tolist() == short_ids + [-100] * (32 - len(short_ids))
    assert ids[1, len(short_ids) :].eq(tokenizer.pad_token_id).all()
