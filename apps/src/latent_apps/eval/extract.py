"""Answer extraction: from a model's free text to a multiple-choice letter, yes/no, a number or a short phrase.

Models are asked to answer directly, but chatty and chain-of-thought models (Heima, LLaVA-CoT) add prose. The
rules below are deterministic and ordered; each returns ``None`` rather than guess when the text is ambiguous,
and an unextracted answer counts as wrong.

**Scope.** When the text has a ``<CONCLUSION>...</CONCLUSION>`` block (LLaVA-CoT / Heima outputs), only the
last such block is read; an opening tag without its closing tag (generation cut at ``max_new_tokens``) scopes
to the text after it. Markdown emphasis (``**B**``) is ignored.

**Multiple choice** (:func:`extract_choice`), first rule that fires wins:

1. the whole scope is a letter: ``"B"``, ``"(b)"``, ``"B."``;
2. an explicit cue, the *last* one in the scope wins (a chain of thought may revise itself):
   ``"answer is (B)"``, ``"Answer: b"``, ``"the correct option is C"``, ``"choice D"``;
3. the scope starts with a labelled letter: ``"B) Closed"``, ``"(C) red"``, ``"b. closed"``;
4. standalone capital letters that are option keys (``"B is correct"``, ``"it's C"``), except letters
   right after a negation (``not``, ``isn't``, ``rather than``, ``instead of``: ``"C, not A"`` -> ``C``) and
   ``A``/``I`` used as an article or pronoun (followed by a lower-case word other than a short list of
   verbs/conjunctions: ``"A dog"`` is no candidate, ``"A is right"`` and ``"A or B"`` are). Exactly one
   distinct candidate -> that letter; two or more (``"A or B"``) -> ``None``;
5. option text: the option whose text occurs in the scope as a whole phrase (case-insensitive; not after a
   negation). When several match, the longest wins if it contains all the others (``"dark red"`` over
   ``"red"``); otherwise ``None``.

Lower-case letters count only when bracketed or followed by punctuation / end of text (so ``"the answer is a
dog"`` is not ``A``).

**Yes/no** (:func:`extract_yes_no`): a leading ``yes``/``no`` (``"Yes."``, ``"no, there isn't"``); else the
last ``answer is yes/no`` cue; else, as VLMEvalKit's ``YOrN_Extraction``, ``yes`` if the word ``yes`` occurs
and ``no`` does not, and vice versa; otherwise ``None``.

**Numbers** (:func:`extract_number`): the last ``answer is/:`` cue followed by a number; else the first number
written in digits (``-3``, ``2.5``, ``1,000``); else the first number written in words (``zero`` .. ``nineteen``,
the tens, ``twenty-one``/``twenty one``, ``hundred``). Digits win over words because ``one`` is often a pronoun
(``"the one on the left has 3"`` -> 3). ``"no"``/``"none"`` are not read as 0.

**Short phrases** (kind ``"text"``): the scope itself; correct when its normalised form (lower case, no
punctuation or articles) equals the gold's. Open-ended benchmarks graded by a judge model (MMVet) need more.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "KINDS",
    "AnswerKind",
    "extract_answer",
    "extract_choice",
    "extract_number",
    "extract_yes_no",
    "infer_kind",
    "is_correct",
]

AnswerKind = Literal["choice", "yes_no", "number", "text"]
KINDS: tuple[str, ...] = ("choice", "yes_no", "number", "text")

_CONCLUSION_OPEN = re.compile(r"<\s*CONCLUSION\s*>", re.IGNORECASE)
_CONCLUSION_CLOSE = re.compile(r"<\s*/\s*CONCLUSION\s*>", re.IGNORECASE)
_NEGATION = re.compile(r"(?:\bnot|n't|\bnever|\brather\s+than|\binstead\s+of|\bexcept)\s*[\"'(\[]*$", re.IGNORECASE)
# After "A"/"I": words that make the letter a subject ("A is correct", "A or B"), not an article or pronoun.
_LETTER_VERBS = {
    "is", "was", "and", "or", "seems", "appears", "looks", "fits", "matches", "would", "should", "could",
    "must", "can", "might", "will", "has", "describes", "shows", "best", "because", "since", "as", "too",
}  # fmt: skip
_CUE = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|will\s+be|=))?\s*[:：]?\s*"
    r"(?:option\s+|choice\s+)?([(\[]?)\s*([A-Za-z])\s*([)\]]?)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_LEADING = re.compile(r"^\s*([(\[]?)([A-Za-z])([)\].:])")

_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_NUMBER_WORD = re.compile(
    r"\b(?:(?P<tens>" + "|".join(_TENS) + r")(?:[\s-]+(?P<tu>" + "|".join(list(_UNITS)[1:10]) + r"))?"
    r"|(?P<unit>" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")|(?P<hundred>a\s+hundred|one\s+hundred))\b",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_NUMBER_CUE = re.compile(r"\banswer\b(?:\s+(?:is|would\s+be|should\s+be|=))?\s*[:：=]?\s*", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _scope(text: str) -> str:
    """The part of ``text`` to read: inside the last <CONCLUSION> block if there is one; no markdown emphasis."""
    text = text or ""
    opens = list(_CONCLUSION_OPEN.finditer(text))
    if opens:
        rest = text[opens[-1].end() :]
        close = _CONCLUSION_CLOSE.search(rest)
        text = rest[: close.start()] if close else rest
    return text.replace("**", "").replace("__", "").strip()


def _negated(scope: str, start: int) -> bool:
    return bool(_NEGATION.search(scope[max(0, start - 24) : start]))


def _letter(letter: str, keys: dict[str, str], bracketed: bool, after: str) -> str | None:
    """``letter`` as an option key, or None; a lower-case letter needs brackets or punctuation/end after it."""
    key = keys.get(letter.upper())
    if key is None:
        return None
    if letter.islower() and not bracketed and re.match(r"\s*[A-Za-z0-9]", after):
        return None
    return key


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter that ``text`` answers, or ``None`` (see the module docstring for the rules).

    Args:
        text: the model's output.
        options: option letter -> option text, e.g. ``{"A": "Open", "B": "Closed"}``.
    """
    keys = {str(k).strip().upper(): str(k).strip().upper() for k in options}
    scope = _scope(text)
    if not scope or not keys:
        return None
    # 1. the whole scope is a letter.
    bare = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\]]?[.:,!]?", scope)
    if bare and bare.group(1).upper() in keys:
        return bare.group(1).upper()
    # 2. explicit cues; the last one wins.
    found = None
    for m in _CUE.finditer(scope):
        letter = _letter(m.group(2), keys, bool(m.group(1) and m.group(3)), scope[m.end() :])
        if letter is not None:
            found = letter
    if found is not None:
        return found
    # 3. a labelled letter at the start: "B) Closed", "(C) red".
    lead = _LEADING.match(scope)
    if lead and lead.group(2).upper() in keys:
        return lead.group(2).upper()
    # 4. standalone capital letters that are option keys.
    candidates = set()
    for m in re.finditer(r"(?<![A-Za-z0-9'’])([A-Z])(?![A-Za-z0-9'’])", scope):
        letter = m.group(1)
        if letter not in keys or _negated(scope, m.start()):
            continue
        if letter in "AI":
            nxt = re.match(r"\s+([a-z]+)", scope[m.end() :])
            if nxt and nxt.group(1) not in _LETTER_VERBS:
                continue
        candidates.add(letter)
    if len(candidates) == 1:
        return candidates.pop()
    if candidates:
        return None
    # 5. option text.
    return _match_option_text(scope, options)


def _match_option_text(scope: str, options: dict[str, str]) -> str | None:
    low = scope.lower()
    matches: list[tuple[str, str]] = []
    for key, value in options.items():
        phrase = re.sub(r"\s+", " ", str(value).strip().lower()).rstrip(".")
        if not phrase:
            continue
        pattern = r"(?<![\w])" + re.escape(phrase).replace(r"\ ", r"\s+") + r"(?![\w])"
        if any(not _negated(low, m.start()) for m in re.finditer(pattern, low)):
            matches.append((str(key).strip().upper(), phrase))
    if len(matches) == 1:
        return matches[0][0]
    if matches:
        longest = max(matches, key=lambda kv: len(kv[1]))
        if all(phrase in longest[1] for _, phrase in matches):
            return longest[0]
    return None


def extract_yes_no(text: str) -> Literal["yes", "no"] | None:
    """``"yes"``, ``"no"`` or ``None`` (both or neither said; see the module docstring)."""
    scope = _scope(text).lower()
    lead = re.match(r"^[\s\"'(\[]*(yes|no)\b", scope)
    if lead:
        return lead.group(1)  # type: ignore[return-value]
    cues = re.findall(r"\banswer\b(?:\s+(?:is|would\s+be|should\s+be))?\s*[:：]?\s*[\"'(]?(yes|no)\b", scope)
    if cues:
        return cues[-1]  # type: ignore[return-value]
    words = set(re.findall(r"[a-z]+", scope))
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return None


def _to_number(token: str) -> int | float:
    value = float(token.replace(",", ""))
    if "." not in token and value.is_integer():
        return int(value)
    return value


def _word_number(m: re.Match[str]) -> int:
    if m.group("hundred"):
        return 100
    if m.group("unit"):
        return _UNITS[m.group("unit").lower()]
    value = _TENS[m.group("tens").lower()]
    return value + (_UNITS[m.group("tu").lower()] if m.group("tu") else 0)


def _first_number(text: str) -> int | float | None:
    digits = _DIGITS.search(text)
    if digits:
        return _to_number(digits.group(0))
    word = _NUMBER_WORD.search(text)
    return _word_number(word) if word else None


def extract_number(text: str) -> int | float | None:
    """The number ``text`` answers (int when written without a decimal point), or ``None``."""
    scope = _scope(text)
    for cue in reversed(list(_NUMBER_CUE.finditer(scope))):
        rest = scope[cue.end() :]
        m = _DIGITS.match(rest) or _NUMBER_WORD.match(rest)
        if m is not None:
            return _to_number(m.group(0)) if m.re is _DIGITS else _word_number(m)
    return _first_number(scope)


def _normalise_text(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def infer_kind(gold: object, options: dict[str, str] | None = None) -> AnswerKind:
    """The answer kind of a sample: ``choice`` when it has options, else ``yes_no`` / ``number`` by the gold
    answer's shape (``"Yes"``, ``"no"`` / ``"3"``, ``"-2.5"``, ``"three"``), else ``text``."""
    if options:
        return "choice"
    gold_text = str(gold).strip().lower().rstrip(".")
    if gold_text in ("yes", "no"):
        return "yes_no"
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", gold_text) or _NUMBER_WORD.fullmatch(gold_text):
        return "number"
    return "text"


def extract_answer(text: str, kind: str, options: dict[str, str] | None = None) -> str | int | float | None:
    """Dispatch on ``kind`` (one of :data:`KINDS`): the extracted answer, or ``None``."""
    if kind == "choice":
        if not options:
            raise ValueError("extract_answer(kind='choice') needs the options (letter -> text)")
        return extract_choice(text, options)
    if kind == "yes_no":
        return extract_yes_no(text)
    if kind == "number":
        return extract_number(text)
    if kind == "text":
        scope = _scope(text)
        return scope or None
    raise ValueError(f"unknown answer kind {kind!r}; choose one of {', '.join(KINDS)}")


def is_correct(pred: object, gold: object, kind: str) -> bool:
    """Whether the extracted answer ``pred`` matches ``gold``. ``None`` is never correct.

    ``choice``: same letter (case-insensitive); ``yes_no``: same word; ``number``: equal within 1e-6 relative
    (gold may be written in words); ``text``: equal after lower-casing and dropping punctuation and articles.
    """
    if pred is None or gold is None:
        return False
    if kind == "choice":
        return str(pred).strip().upper() == str(gold).strip().upper()
    if kind == "yes_no":
        return str(pred).strip().lower() == str(gold).strip().lower().rstrip(".")
    if kind == "number":
        gold_value = gold if isinstance(gold, int | float) else extract_number(str(gold))
        if gold_value is None:
            return False
        return abs(float(pred) - float(gold_value)) <= 1e-6 * max(1.0, abs(float(gold_value)))
    if kind == "text":
        return _normalise_text(str(pred)) == _normalise_text(str(gold))
    raise ValueError(f"unknown answer kind {kind!r}; choose one of {', '.join(KINDS)}")
