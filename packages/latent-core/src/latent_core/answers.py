"""Answer matching without a judge: normalisation and a match rule shared by the data builders and the methods'
quick scoring (``lavit generate``, ``lare generate``). ``latent eval`` scores with its own extraction
(:mod:`latent_apps.eval.extract`)."""

from __future__ import annotations

import re
import string

__all__ = ["answers_match", "normalize_answer"]

_NUMBERS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
_LETTER = re.compile(r"^\(?([a-z])\)?[.:)]?$")
_LEADING_LETTER = re.compile(r"^\(?([a-z])(?:\)|[.:]|\)[.:]|$)")  # "a." "(a)" "a)" "a:" or the letter alone
_LETTER_WORD = re.compile(r"^([b-hj-z])\s")  # "B blue"; a leading "a" or "i" followed by a space is a word
_ANSWER_PREFIX = re.compile(r"^(the )?(final )?answer( is)?\s*[:\-]?\s*")


def normalize_answer(text: str) -> str:
    """Lower case; a leading "answer:" dropped; punctuation and articles removed; number words as digits (zero to
    twenty); an option letter alone (``(B)``, ``B.``, ``b)``) as the bare letter; whitespace collapsed."""
    text = str(text).strip().lower()
    text = _ANSWER_PREFIX.sub("", text)
    letter = _LETTER.match(text)
    if letter:
        return letter.group(1)
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    words = [_NUMBERS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def answers_match(prediction: str, truth: str) -> bool:
    """Whether ``prediction`` answers ``truth``: equal after :func:`normalize_answer`, or the prediction starts
    with the whole normalised truth followed by a word boundary (``"yes, there is one"`` answers ``"yes"``;
    ``"2 red circles"`` answers ``"two"``; ``"no"`` does not answer ``"not sure"``). An option letter matches
    only the same letter, read before articles are dropped: ``"A. red"``, ``"(A) red"``, ``"A: red"`` and ``"A"``
    answer ``"A"``, ``"B blue"`` answers ``"B"``; ``"A red circle"`` (an article, not a letter) does not."""
    pred, want = normalize_answer(prediction), normalize_answer(truth)
    if not pred or not want:
        return False
    if len(want) == 1 and want.isalpha():  # an option letter: "b" must not match "blue"
        raw = _ANSWER_PREFIX.sub("", str(prediction).strip().lower())
        letter = _LEADING_LETTER.match(raw) or _LETTER_WORD.match(raw)
        return letter is not None and letter.group(1) == want
    if pred == want:
        return True
    return pred.startswith(want + " ")
