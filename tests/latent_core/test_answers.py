"""Answer matching (latent_core.answers), written out by hand: option letters are read before articles are dropped,
so "A. red" answers "A" while "A red circle" (an article) does not."""

from __future__ import annotations

import pytest
from latent_core.answers import answers_match


@pytest.mark.parametrize(
    ("prediction", "truth", "expected"),
    [
        ("A. red", "A", True),
        ("(A) red", "A", True),
        ("A: red", "A", True),
        ("a", "A", True),
        ("Answer: C", "C", True),
        ("B blue", "B", True),
        ("b) blue", "B", True),
        ("A red circle", "A", False),
        ("I think B", "B", False),
        ("B", "A", False),
        ("blue", "B", False),
        ("Yes, there is one.", "yes", True),
        ("2 red circles", "two", True),
        ("no", "not sure", False),
        ("", "yes", False),
    ],
)
def test_answers_match_by_hand(prediction, truth, expected):
    assert answers_match(prediction, truth) is expected
