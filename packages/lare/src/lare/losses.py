"""LaRe's semantic augmentation (Section 3.2, METHODS.md section 3): L = L_ntp + l_align L_align + l_img L_img +
l_text L_text. The weights were lost (grid search): flags of the training config (**choice**).

- :func:`mean_max_pool`: mean-max hybrid pooling over a sequence (**choice**: the concatenation of the masked mean
  and the masked max, so both sides of a pair pool the same way).
- :func:`info_nce`: symmetric InfoNCE with temperature tau and in-batch negatives; L_align is its sum over the two
  pairings (latents vs the reasoning text's pooled LLM hidden states, latents vs the pooled visual anchors).
- :class:`Reconstructor` / :func:`diffusion_loss`: L_img, denoising score matching - the window's image crop
  encoded by a KL VAE with f = 16 (``AutoencoderKL``), DDPM linear betas 1e-4..0.02 over 1000 steps
  (``DDPMScheduler``), epsilon predicted by a ``UNet2DConditionModel`` (block_out_channels (96, 192, 384, 512),
  layers_per_block 3, Down / CrossAttnDown / CrossAttnDown / Down, up mirrored, cross_attention_dim 768, head dim
  64, 32 norm groups) conditioned on the latents projected to 768.
- :func:`text_prefix_targets`: L_text's targets, the first 32 tokens of the explicit reasoning text, predicted after
  ``[image, question, <bot> z <eot>]`` (the loss itself is the next-token loss of that continuation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Reconstructor",
    "diffusion_loss",
    "info_nce",
    "mean_max_pool",
    "symmetric_alignment",
    "text_prefix_targets",
    "unet_config",
]


def mean_max_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``x [B, L, d]`` -> ``[B, 2d]``: the mean and the max over the positions where ``mask [B, L]`` is true
    (all positions without a mask), concatenated."""
    if mask is None:
        return torch.cat([x.mean(1), x.amax(1)], -1)
    keep = mask.to(torch.bool)
    if not bool(keep.any(-1).all()):
        raise ValueError("mean_max_pool: a sample has no position to pool")
    weights = keep.to(x.dtype)[..., None]
    mean = (x * weights).sum(1) / weights.sum(1)
    maximum = x.masked_fill(~keep[..., None], torch.finfo(x.dtype).min).amax(1)
    return torch.cat([mean, maximum], -1)


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between ``a [B, d]`` and ``b [B, d]`` (row i of each is a positive pair, the other rows of
    the batch its negatives): the mean of the a->b and b->a cross-entropies over cosine similarities / tau."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"info_nce needs two [B, d] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def symmetric_alignment(
    latents: Tensor,
    text_hidden: Tensor,
    text_mask: Tensor,
    visual: Tensor,
    visual_mask: Tensor | None = None,
    temperature: float = 0.07,
) -> dict[str, Tensor]:
    """L_align's two terms: ``align_text`` (pooled latents ``[B, T, d]`` vs the pooled LLM hidden states of the
    reasoning text ``[B, L, d]`` under ``text_mask``) and ``align_visual`` (vs the pooled visual anchors
    ``[B, m, d]``)."""
    pooled = mean_max_pool(latents)
    return {
        "align_text": info_nce(pooled, mean_max_pool(text_hidden, text_mask), temperature),
        "align_visual": info_nce(pooled, mean_max_pool(visual, visual_mask), temperature),
    }


def unet_config(
    sample_size: int, in_channels: int, cross_attention_dim: int = 768, head_dim: int = 64
) -> dict[str, Any]:
    """The U-Net of L_img (METHODS.md section 3) as ``UNet2DConditionModel`` arguments. diffusers reads
    ``attention_head_dim`` as the number of heads (a naming it keeps for compatibility), so a head dimension of 64
    is asked for as ``channels // 64`` heads per block."""
    channels = (96, 192, 384, 512)
    return dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=tuple(max(c // head_dim, 1) for c in channels),
        norm_num_groups=32,
    )


class Reconstructor(nn.Module):
    """L_img's trainable part: the projection of the latents to the U-Net's cross-attention width and the U-Net.
    ``unet`` is any ``UNet2DConditionModel`` (:func:`unet_config` gives the paper's; tests use a tiny one)."""

    def __init__(self, latent_dim: int, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.project = nn.Linear(latent_dim, unet.config.cross_attention_dim)

    def forward(self, noisy: Tensor, timesteps: Tensor, latents: Tensor) -> Tensor:
        """The predicted noise for ``noisy [B, C, h, w]`` at ``timesteps [B]``, conditioned on ``latents [B, T, d]``."""
        return self.unet(noisy, timesteps, encoder_hidden_states=self.project(latents)).sample


def diffusion_loss(
    reconstructor: Reconstructor,
    x0: Tensor,
    latents: Tensor,
    scheduler: Any,
    noise: Tensor | None = None,
    timesteps: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_img (denoising score matching, epsilon prediction): ``x0 [B, C, h, w]`` the VAE latent of each window's
    crop, noised by ``scheduler`` (a ``DDPMScheduler``) at uniform random timesteps; the mean squared error between
    the noise and the reconstructor's prediction. ``noise`` / ``timesteps`` fix the draw (tests)."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if timesteps is None:
        high = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, high, (x0.shape[0],), generator=generator, device=x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    predicted = reconstructor(noisy, timesteps, latents)
    return F.mse_loss(predicted.float(), noise.float())


def text_prefix_targets(tokenizer: Any, texts: Sequence[str], length: int = 32) -> tuple[Tensor, Tensor]:
    """L_text's teacher-forced ids and labels ``[B, length]``: the first ``length`` tokens of each reasoning text
    (no special tokens), right padded with the pad id and labelled -100 where a text is shorter."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(texts), length), pad, dtype=torch.long)
    labels = torch.full((len(texts), length), -100, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        labels[i, : len(tokens)] = ids[i, : len(tokens)]
    return ids, labels
