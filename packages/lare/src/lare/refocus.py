"""The sliding window of latent refocusing (Section 3.1, METHODS.md section 3).

One iteration t: the attention of the current position to the image tokens (mean over heads and layers, handed
over by :func:`latent_core.generate_with_latents`'s ``step_attention``) is laid out on the image grid as the
saliency map; a ``w x w`` window is sum-pooled over it with stride s; the window with the largest sum is chosen and
its projector-output visual tokens are V_local, the keys and values of the extractor's cross-attention.

Ties go to the first window in row-major order (top-most, then left-most: ``argmax`` of the flattened pooled map).
Every function is batched over samples; the image tokens are in row-major order (CLIP's patch order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["best_window", "grid_side", "refocus", "saliency_map", "window_indices", "window_tokens"]


def grid_side(n_tokens: int) -> int:
    """The side g of a square ``g x g`` grid of ``n_tokens`` image tokens (256 -> 16)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens or side == 0:
        raise ValueError(
            f"{n_tokens} image tokens do not form a square grid: LaRe's window needs the patch tokens alone "
            "(llava's vision_feature_select_strategy 'default', which drops CLIP's class token)"
        )
    return side


def saliency_map(attention: Tensor) -> Tensor:
    """``attention [B, n]`` (one row per sample over its n image tokens) -> the ``[B, g, g]`` saliency map."""
    side = grid_side(attention.shape[-1])
    return attention.reshape(attention.shape[0], side, side)


def best_window(saliency: Tensor, window: int, stride: int = 1) -> tuple[Tensor, Tensor]:
    """The top-left cell ``(rows [B], cols [B])`` of the ``window x window`` window with the largest sum over
    ``saliency [B, g, g]``; windows start at 0, s, 2s, ... and lie inside the grid; ties: the first in row-major
    order."""
    side = saliency.shape[-1]
    if window > side:
        raise ValueError(f"window {window} is larger than the {side}x{side} grid")
    pooled = F.avg_pool2d(saliency[:, None].float(), window, stride, divisor_override=1)[:, 0]  # sums
    n_cols = pooled.shape[-1]
    best = pooled.flatten(1).argmax(-1)
    return (best // n_cols) * stride, (best % n_cols) * stride


def window_indices(rows: Tensor, cols: Tensor, window: int, side: int) -> Tensor:
    """``[B, window * window]`` the row-major token indices of each sample's window on the ``side x side`` grid."""
    offsets = torch.arange(window, device=rows.device)
    cells_r = rows[:, None, None] + offsets[None, :, None]  # [B, w, 1]
    cells_c = cols[:, None, None] + offsets[None, None, :]  # [B, 1, w]
    return (cells_r * side + cells_c).reshape(rows.shape[0], -1)


def window_tokens(features: Tensor, indices: Tensor) -> Tensor:
    """``features [B, n, d]`` at ``indices [B, m]`` -> ``[B, m, d]`` (V_local)."""
    return torch.gather(features, 1, indices[..., None].expand(-1, -1, features.shape[-1]))


def refocus(attention: Tensor, features: Tensor, window: int, stride: int = 1) -> tuple[Tensor, Tensor]:
    """One refocusing: ``(V_local [B, w*w, d], indices [B, w*w])`` from this step's attention ``[B, n]`` over the
    image tokens and their projector-output features ``[B, n, d]``."""
    if attention.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"attention {tuple(attention.shape)} and image features {tuple(features.shape)} disagree on [batch, n]"
        )
    saliency = saliency_map(attention)
    rows, cols = best_window(saliency, window, stride)
    indices = window_indices(rows, cols, window, saliency.shape[-1])
    return window_tokens(features, indices), indices
