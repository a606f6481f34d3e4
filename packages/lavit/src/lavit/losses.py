"""LaViT's alignment losses (METHODS.md section 2, Eq. 6, 7, 9): L = L_ntp + lambda (L_concept + L_traj).

- :class:`ConceptHead` is phi = Linear(d, d) - GELU - Linear(d, d_teacher), and :func:`concept_loss` is
  ``L_concept = 1 - cos(phi(h_z), V_sem)`` with ``h_z`` the hidden state of the **last** latent token and V_sem the
  teacher's mean-pooled visual features (Appendix C.1's holistic target).
- :func:`trajectory_loss` is ``L_traj = sum_j KL(A_traj || A_student^(j))`` over the latent tokens ``j``, where
  ``A_student^(j)`` is the student's real attention from latent ``j`` over the image keys (mean over heads and layers,
  recorded by :func:`latent_core.record_attention`) renormalised over the image keys, and ``A_traj`` the Top-K target
  renormalised to sum to 1 (:func:`lavit.teacher.trajectory_target`).
- :func:`resample_trajectory` puts a teacher map on the student's merged patch grid when the grids differ: area
  pooling along an axis that shrinks (the Top-K mass is kept), bilinear along one that grows (Appendix C.2), then
  renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConceptHead", "concept_loss", "resample_trajectory", "trajectory_loss"]


class ConceptHead(nn.Module):
    """phi: the student's hidden size ``d`` -> the teacher's ``d_teacher`` (Eq. 6)."""

    def __init__(self, hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, teacher_hidden))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden)


def concept_loss(projected: Tensor, v_sem: Tensor) -> Tensor:
    """``mean_b (1 - cos(projected_b, v_sem_b))`` (Eq. 6); ``projected = phi(h_z)`` ``[B, d_T]``, ``v_sem``
    ``[B, d_T]``, computed in fp32."""
    return (1 - F.cosine_similarity(projected.float(), v_sem.to(projected.device).float(), dim=-1)).mean()


def resample_trajectory(target: Tensor, teacher_grid: tuple[int, int], student_grid: tuple[int, int]) -> Tensor:
    """A_traj ``[h_T * w_T]`` (row-major) on the student's grid ``[h_S * w_S]``, one axis at a time: an axis the
    student has fewer cells on is area-pooled (each teacher cell's mass goes to the student cells it overlaps, in
    proportion to the overlap: an integer ratio is a block sum, so no Top-K peak is lost between sample points); an
    axis with as many or more cells is bilinearly interpolated (Appendix C.2; ``align_corners=False``: cell centres
    map to cell centres). Clamped at 0, renormalised to sum to 1. Equal grids return the map unchanged."""
    if tuple(teacher_grid) == tuple(student_grid):
        return target
    (h_t, w_t), (h_s, w_s) = teacher_grid, student_grid
    grid = target.float().reshape(h_t, w_t)
    rows, cols = _axis_operator(h_t, h_s, grid.device), _axis_operator(w_t, w_s, grid.device)
    out = (rows @ grid @ cols.T).flatten().clamp(min=0)
    total = out.sum()
    return out / total if float(total) > 0 else torch.full_like(out, 1.0 / out.numel())


def _axis_operator(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """``[n_out, n_in]``: the 1-D map of :func:`resample_trajectory` along one axis of ``n_in`` cells onto
    ``n_out`` over the same extent: overlap fractions when shrinking (each column sums to 1: mass kept), linear
    interpolation weights otherwise."""
    if n_out >= n_in:
        eye = torch.eye(n_in, device=device)[None]  # [1, n_in (channels), n_in]: the image of each input cell
        return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T
    edges_in = torch.arange(n_in + 1, device=device, dtype=torch.float64) / n_in
    edges_out = torch.arange(n_out + 1, device=device, dtype=torch.float64) / n_out
    low = torch.maximum(edges_out[:-1, None], edges_in[None, :-1])
    high = torch.minimum(edges_out[1:, None], edges_in[None, 1:])
    return ((high - low).clamp(min=0) * n_in).float()


def trajectory_loss(target: Tensor, student_rows: Tensor, eps: float = 1e-8) -> Tensor:
    """``sum_j KL(target || student_j)`` (Eq. 7) for one sample.

    Args:
        target: ``[n_image]`` A_traj, summing to 1 (zeros outside the Top-K: they add nothing to the KL).
        student_rows: ``[K, n_image]`` the student's attention of each latent token over the image keys (any scale:
            renormalised over the image keys here, as the paper does).
        eps: floor of the student's probabilities inside the log (an image key the student ignores entirely).
    """
    rows = student_rows.float()
    rows = rows / rows.sum(-1, keepdim=True).clamp(min=eps)
    p = target.float().to(rows.device)
    inside = p > 0
    kl = (p[inside] * (p[inside].log() - rows[:, inside].clamp(min=eps).log())).sum(-1)  # [K]
    return kl.sum()
