"""Answer extraction on chatty model outputs: one table, one expected answer per output."""

from __future__ import annotations

import pytest
from latent_apps.eval.extract import extract_answer, extract_choice, infer_kind, is_correct

DOOR = {"A": "Open", "B": "Closed", "C": "Half open", "D": "Missing"}
COLOURS = {"A": "red", "B": "dark red", "C": "blue", "D": "a dog"}

CASES = [
    # (output, kind, options, expected)
    # --- multiple choice: letters
    ("B", "choice", DOOR, "B"),
    ("b", "choice", DOOR, "B"),
    ("(C)", "choice", DOOR, "C"),
    ("The answer is (B).", "choice", DOOR, "B"),
    ("Answer: b", "choice", DOOR, "B"),
    ("B) Closed", "choice", DOOR, "B"),
    ("b. closed", "choice", DOOR, "B"),
    ("**D**", "choice", DOOR, "D"),
    ("The correct option is C because the door is ajar.", "choice", DOOR, "C"),
    ("I think it's C, not A", "choice", DOOR, "C"),
    ("It is not A. It is B.", "choice", DOOR, "B"),
    ("A or B", "choice", DOOR, None),  # two candidates: ambiguous
    ("Either A or C could be right.", "choice", DOOR, None),
    ("A is correct.", "choice", DOOR, "A"),
    ("E", "choice", DOOR, None),  # not an option
    ("First the answer is A. Wait, on reflection the answer is D.", "choice", DOOR, "D"),  # last cue wins
    (
        "<SUMMARY>Compare A and B.</SUMMARY><REASONING>A looks wrong.</REASONING><CONCLUSION>B</CONCLUSION>",
        "choice",
        DOOR,
        "B",
    ),  # fmt: skip
    ("<REASONING>Options A and C.</REASONING><CONCLUSION>The answer is C", "choice", DOOR, "C"),  # unclosed tag
    # --- multiple choice: option text
    ("Closed", "choice", DOOR, "B"),
    ("The door is closed.", "choice", DOOR, "B"),
    ("half open", "choice", DOOR, "C"),  # "Half open" contains "Open": the longest match wins
    ("It is dark red.", "choice", COLOURS, "B"),
    ("the answer is a dog", "choice", COLOURS, "D"),  # lower-case "a" + word is an article, then option text
    ("A dog is sitting there.", "choice", COLOURS, "D"),
    ("It's not red, it's blue", "choice", COLOURS, "C"),
    ("red or blue, hard to say", "choice", COLOURS, None),
    ("I cannot tell.", "choice", DOOR, None),
    ("", "choice", DOOR, None),
    # --- yes / no
    ("Yes.", "yes_no", None, "yes"),
    ("YES", "yes_no", None, "yes"),
    ("no, there isn't", "yes_no", None, "no"),
    ("No", "yes_no", None, "no"),
    ("There is no cat in the image.", "yes_no", None, "no"),
    ("Yes, there is a dog, and no cat.", "yes_no", None, "yes"),  # leading word wins
    ("I think the answer is yes.", "yes_no", None, "yes"),
    ("Maybe yes, maybe no", "yes_no", None, None),
    ("<REASONING>No red here? yes there is.</REASONING><CONCLUSION>No.</CONCLUSION>", "yes_no", None, "no"),
    ("The image shows a table.", "yes_no", None, None),
    # --- numbers
    ("3", "number", None, 3),
    ("There are three.", "number", None, 3),
    ("2 red circles", "number", None, 2),
    ("Twenty-one", "number", None, 21),
    ("forty two apples", "number", None, 42),
    ("The temperature is -4 degrees.", "number", None, -4),
    ("about 2.5 metres", "number", None, 2.5),
    ("1,200 people", "number", None, 1200),
    ("The one on the left has 3 stripes.", "number", None, 3),  # digits win over words
    ("In row 1 I see circles. The answer is 4.", "number", None, 4),  # cue wins over the first number
    ("Answer: seven", "number", None, 7),
    ("<REASONING>Row 1 has 2, row 2 has 3.</REASONING><CONCLUSION>5</CONCLUSION>", "number", None, 5),
    ("I don't know", "number", None, None),
    # --- short text
    ("The cat.", "text", None, "The cat."),
]


@pytest.mark.parametrize("text, kind, options, expected", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_extract_table(text, kind, options, expected):
    got = extract_answer(text, kind, options)
    assert got == expected
    assert type(got) is type(expected)  # 3 is an int, 2.5 a float, None stays None


def test_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize(
    "pred, gold, kind, expected",
    [
        ("B", "b", "choice", True),
        ("B", "A", "choice", False),
        (None, "A", "choice", False),
        ("yes", "Yes", "yes_no", True),
        ("no", "yes", "yes_no", False),
        (3, "3", "number", True),
        (3, "three", "number", True),
        (2.5, "2.50", "number", True),
        (3, "4", "number", False),
        ("The Cat.", "cat", "text", True),
        ("a dog", "cat", "text", False),
    ],
)
def test_is_correct(pred, gold, kind, expected):
    assert is_correct(pred, gold, kind) is expected


@pytest.mark.parametrize(
    "gold, options, kind",
    [("A", {"A": "x", "B": "y"}, "choice"), ("Yes", None, "yes_no"), ("no", {}, "yes_no"), ("12", None, "number"),
     ("-2.5", None, "number"), ("three", None, "number"), ("a red car", None, "text")],
)  # fmt: skip
def test_infer_kind(gold, options, kind):
    assert infer_kind(gold, options) == kind


def test_unknown_kind_and_missing_options():
    with pytest.raises(ValueError, match="unknown answer kind"):
        extract_answer("B", "essay")
    with pytest.raises(ValueError, match="needs the options"):
        extract_answer("B", "choice")
    assert extract_choice("B", {}) is None
