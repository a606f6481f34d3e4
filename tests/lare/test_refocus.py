"""The sliding window (Section 3.1) against hand computations on planted saliency maps: sums, ties, edges, stride,
and the w x w cells V_local covers."""

from __future__ import annotations

import pytest
import torch
from lare.refocus import best_window, grid_side, refocus, saliency_map, window_indices, window_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brute_force(saliency: torch.Tensor, window: int, stride: int) -> tuple[int, int]:
    """Every window by hand, in row-major order; a later window wins only with a strictly larger sum."""
    side = saliency.shape[-1]
    best, where = None, None
    for r in range(0, side - window + 1, stride):
        for c in range(0, side - window + 1, stride):
            total = sum(float(saliency[i, j]) for i in range(r, r + window) for j in range(c, c + window))
            if best is None or total > best:
                best, where = total, (r, c)
    return where


def test_grid_side_needs_a_square_of_patch_tokens():
    assert grid_side(256) == 16 and grid_side(36) == 6
    with pytest.raises(ValueError, match="class token"):
        grid_side(257)  # CLIP's class token kept ('full' strategy)


def test_planted_peaks_interior_and_at_the_edges():
    side, window = 16, 8
    maps = torch.zeros(3, side, side)
    maps[0, 5:9, 6:10] = 1.0  # interior blob: every window containing it ties -> the first in row-major order
    maps[1, 15, 15] = 5.0  # bottom-right corner: the window must end at the edge
    maps[1, 0, 0] = 4.0
    maps[2, 3, 12] = 2.0  # right edge, rows 3..
    maps[2, 10, 15] = 2.0
    rows, cols = best_window(maps, window)
    assert (int(rows[1]), int(cols[1])) == (8, 8)  # the only windows holding the 5.0 start at 8 on both axes
    for b in range(3):
        assert (int(rows[b]), int(cols[b])) == _brute_force(maps[b], window, 1)
    # The interior blob (rows 5-8, cols 6-9) fits in windows starting at rows 1..5 and cols 2..6; ties -> (1, 2).
    assert (int(rows[0]), int(cols[0])) == (1, 2)
    # Sample 2: both peaks fit in one window only when it spans rows 3..10 and cols 8..15 -> starts at (3, 8).
    assert (int(rows[2]), int(cols[2])) == (3, 8)


def test_random_maps_and_strides_match_brute_force():
    g = torch.Generator().manual_seed(0)
    for side, window, stride in [(16, 8, 1), (16, 4, 2), (16, 5, 3), (6, 3, 1), (16, 16, 1), (16, 1, 1)]:
        maps = torch.rand(4, side, side, generator=g)
        rows, cols = best_window(maps, window, stride)
        for b in range(4):
            assert (int(rows[b]), int(cols[b])) == _brute_force(maps[b], window, stride), (side, window, stride)
    with pytest.raises(ValueError, match="larger than"):
        best_window(torch.rand(1, 6, 6), 7)


def test_all_equal_map_ties_to_the_top_left_window():
    rows, cols = best_window(torch.ones(2, 16, 16), 8, 1)
    assert rows.tolist() == [0, 0] and cols.tolist() == [0, 0]


def test_v_local_is_the_w_by_w_cells_of_the_window_in_row_major_order():
    side, window, d = 16, 8, 3
    n = side * side
    features = torch.arange(2 * n * d, dtype=torch.float).reshape(2, n, d)
    attention = torch.zeros(2, n)
    attention[0, 15 * side + 15] = 1.0  # bottom-right corner -> window at (8, 8)
    attention[1, 2 * side + 3] = 1.0  # near the top-left -> the first window that holds (2, 3): (0, 0)
    v_local, indices = refocus(attention, features, window)
    assert v_local.shape == (2, window * window, d)
    for b, (r0, c0) in enumerate([(8, 8), (0, 0)]):
        expected = [r * side + c for r in range(r0, r0 + window) for c in range(c0, c0 + window)]
        assert indices[b].tolist() == expected
        assert torch.equal(v_local[b], features[b, expected])
        assert len(set(expected)) == window * window  # w x w distinct cells of the 16x16 grid
    # The saliency map is the attention row laid out row-major on the grid.
    assert saliency_map(attention)[0, 15, 15] == 1.0 and saliency_map(attention)[1, 2, 3] == 1.0
    # window_indices / window_tokens alone, at an edge with a small window
    idx = window_indices(torch.tensor([14]), torch.tensor([0]), 2, side)
    assert idx.tolist() == [[224, 225, 240, 241]]
    assert torch.equal(window_tokens(features[:1], idx), features[0, [224, 225, 240, 241]][None])
