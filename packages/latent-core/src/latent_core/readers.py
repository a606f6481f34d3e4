"""Validated readers for the training and evaluation data formats (METHODS.md sections 1-4).

Every reader is a generator of plain dicts, each with a stable string ``id``. Rows that fail validation are
skipped **and counted** in a :class:`ReadReport` (reason -> count, plus the first few row ids or line numbers),
never dropped silently: pass ``report=ReadReport()`` to inspect the counts; without one, the reader logs the
table at WARNING level once it is exhausted, if anything was skipped. Problems that cannot be skipped (the file
is missing, the file is not in the expected format) raise :class:`FileNotFoundError` or
:class:`DataFormatError` naming the file and what is wrong.

- :func:`read_llava_cot`: LLaVA-CoT-100k (JSONL, streamed line by line; a ``.json`` list also works), with
  :func:`parse_cot_stages` for the tagged gpt answers;
- :func:`read_visual_cot`: Visual-CoT samples with a pixel bbox (metadata JSONL, or the LLaVA-style
  ``"image": [path, "path###[x0, y0, x1, y1]"]`` form);
- :func:`read_reasoning`: LaRe reasoning data (flat fields, or conversations with ``<think>..</think>``);
- :func:`read_vlmevalkit_tsv`, :func:`read_mmvp`, :func:`read_vstar`, :func:`read_blink`: the evaluation formats.

Skip reasons (stable strings, used as report keys): ``malformed_json``, ``not_an_object``,
``missing_field:<name>``, ``missing_image``, ``undecodable_image``, ``unknown_image_ref``, ``bad_conversation``,
``bad_bbox``, ``bbox_outside_image``, ``image_size_mismatch``, ``bad_options``, ``bad_answer``,
``answer_not_in_options``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "CONCLUSION_TAG",
    "COT_STAGES",
    "DataFormatError",
    "conclusion_of",
    "ReadReport",
    "parse_cot_stages",
    "read_blink",
    "read_llava_cot",
    "read_mmvp",
    "read_questions",
    "read_reasoning",
    "read_visual_cot",
    "read_vlmevalkit_tsv",
    "read_vstar",
    "reasoning_token_count",
]

logger = logging.getLogger(__name__)

COT_STAGES: tuple[str, ...] = ("summary", "caption", "reasoning", "conclusion")
"""The LLaVA-CoT answer stages, in order; tags are the upper-case names (``<SUMMARY>..</SUMMARY>``)."""

_MAX_EXAMPLES = 5
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataFormatError(ValueError):
    """A data file is not in the format its reader expects (the message names the file and the problem)."""


class ReadReport:
    """Counts of kept rows and of skipped rows by reason, with the first few skipped row ids per reason.

    One report may be passed to several readers (or reports merged with :meth:`merge`) to total a data set.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def keep(self) -> None:
        self.kept += 1

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped row; ``where`` is its id, or ``"line N"`` when it has none."""
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(where)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadReport) -> ReadReport:
        """Add ``other``'s counts into this report (in place) and return it."""
        self.kept += other.kept
        self.skipped.update(other.skipped)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: max(0, _MAX_EXAMPLES - len(mine))])
        return self

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary: name, kept, skipped (reason -> count, sorted), total_skipped, examples."""
        return {
            "name": self.name,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "total_skipped": self.total_skipped,
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    def __str__(self) -> str:
        title = f"{self.name}: " if self.name else ""
        lines = [f"{title}kept {self.kept}, skipped {self.total_skipped}"]
        if self.skipped:
            width = max(len(r) for r in self.skipped)
            for reason, count in sorted(self.skipped.items()):
                lines.append(f"  {reason:<{width}}  {count:>7}  e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ReadReport(name={self.name!r}, kept={self.kept}, skipped={dict(self.skipped)})"


# ----------------------------------------------------------------------------------------------- helpers


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _start(report: ReadReport | None, name: str) -> tuple[ReadReport, bool]:
    if report is None:
        return ReadReport(name), True
    if not report.name:
        report.name = name
    return report, False


def _finish(report: ReadReport, owned: bool) -> None:
    if owned and report.skipped:
        logger.warning("skipped rows (pass report=ReadReport() to inspect):\n%s", report)


def _json_rows(path: Path, report: ReadReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a JSONL file, streamed; a ``.json`` file must hold a list.

    Blank lines are not rows and are passed over; malformed lines and non-object rows are counted.
    """
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e}); expected a list of objects, or use .jsonl") from e
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
        for n, obj in enumerate(data, start=1):
            if isinstance(obj, dict):
                yield n, obj
            else:
                report.skip("not_an_object", f"item {n}")
        return
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                report.skip("malformed_json", f"line {n}")
                continue
            if isinstance(obj, dict):
                yield n, obj
            else:
                report.skip("not_an_object", f"line {n}")


def _row_id(obj: dict[str, Any], keys: Iterable[str]) -> str | None:
    for key in keys:
        value = obj.get(key)
        if value is not None and value != "":
            return str(value)
    return None


def _text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _is_conversation(conv: Any) -> bool:
    """A non-empty list of {"from", "value"} turns alternating human, gpt, human, gpt..."""
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return False
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return False
        if turn.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return False
    return True


_USER_ROLES, _ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def _chat_turns(conv: Any) -> list[str] | None:
    """The texts of a conversation whose turns alternate user, assistant, ... in either schema of Vision-R1-cold
    (``{"from": "human"|"gpt", "value"}`` or ``{"role": "user"|"assistant", "content"}``, ``content`` a string or a
    list of ``{"type": "text", "text"}`` parts); ``None`` if it is not one."""
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        return None
    texts = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return None
        role = turn.get("from", turn.get("role"))
        if role not in (_USER_ROLES if i % 2 == 0 else _ASSISTANT_ROLES):
            return None
        text = turn.get("value", turn.get("content"))
        if isinstance(text, list):
            parts = [p.get("text") for p in text if isinstance(p, dict) and p.get("type") == "text"]
            text = "\n".join(p for p in parts if isinstance(p, str)) if parts else None
        if not isinstance(text, str):
            return None
        texts.append(text)
    return texts


def _decode_image(data: bytes) -> Image.Image | None:
    """A fully decoded PIL image, or None when the bytes are not an image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return img


def _image_or_skip(path: Path | None, report: ReadReport, row_id: str) -> Image.Image | None:
    """The decoded image at ``path``, or None with the row counted as ``missing_image`` / ``undecodable_image``."""
    if path is None or not path.is_file():
        report.skip("missing_image", row_id)
        return None
    image = _load_image_file(path)
    if image is None:
        report.skip("undecodable_image", row_id)
    return image


def _load_image_file(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _letter(answer: Any) -> str | None:
    """``"(A)"``, ``"A"``, ``"(a)"``, ``"A)"`` -> ``"A"``; anything else -> None."""
    if not isinstance(answer, str):
        return None
    m = re.fullmatch(r"\s*\(?\s*([A-Za-z])\s*\)?\s*", answer)
    return m.group(1).upper() if m else None


# ----------------------------------------------------------------------------------------------- LLaVA-CoT


def parse_cot_stages(answer: str) -> dict[str, str]:
    """The stages of a LLaVA-CoT answer: ``<SUMMARY>s</SUMMARY>..<CONCLUSION>a</CONCLUSION>`` ->
    ``{"summary": "s", "caption": ..., "reasoning": ..., "conclusion": "a"}`` (text stripped).

    A stage whose tags are absent or unclosed is an absent key (callers count it); a repeated stage keeps its
    first occurrence.
    """
    stages: dict[str, str] = {}
    for m in re.finditer(r"<(SUMMARY|CAPTION|REASONING|CONCLUSION)>(.*?)</\1>", answer, flags=re.DOTALL):
        stages.setdefault(m.group(1).lower(), m.group(2).strip())
    return {k: stages[k] for k in COT_STAGES if k in stages}


CONCLUSION_TAG = "<CONCLUSION>"
_CONCLUSION_BLOCK = re.compile(r"<CONCLUSION>(.*?)</CONCLUSION>", flags=re.DOTALL)


def conclusion_of(text: str) -> str | None:
    """The answer of a staged output: the content of its first closed ``<CONCLUSION>..</CONCLUSION>`` block
    (stripped), or ``None`` when it has none (an output cut before its conclusion is unanswered)."""
    match = _CONCLUSION_BLOCK.search(text or "")
    return match.group(1).strip() if match else None


def reasoning_token_count(tokenizer: Any, ids: list[int]) -> int:
    """Tokens of a generated staged output ``ids`` (no EOS) before the one where ``<CONCLUSION>`` starts: the
    tokens spent reasoning (stages, tags, thinking tokens). The tag is found in the decoded text, so it may span
    several tokens or share one with what precedes it; without a conclusion every token counts."""
    text = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
    start = text.find(CONCLUSION_TAG)
    if start < 0:
        return len(ids)
    lo, hi = 0, len(ids) - 1  # smallest k such that decode(ids[: k + 1]) extends past ``start``
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=False)) > start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def read_llava_cot(
    path: str | Path, image_root: str | Path, report: ReadReport | None = None
) -> Iterator[dict[str, Any]]:
    """LLaVA-CoT-100k rows (METHODS.md section 1): ``{"id", "image": Path, "conversations": [...]}``.

    ``path`` is JSONL (streamed) or a ``.json`` list; ``image`` is resolved against ``image_root``; a string
    ``category`` (not in the released file; the shapes task writes the question kind there) is passed through. The gpt
    answers are returned as is (tags kept: see :func:`parse_cot_stages`); the reader does not check the stages,
    since one multi-turn row gives one sample per turn. Skipped and counted: ``malformed_json``,
    ``not_an_object``, ``missing_field:{id,image,conversations}``, ``missing_image`` (no such file),
    ``bad_conversation`` (not alternating human/gpt turns, starting with human, ending with gpt).
    """
    path = _require_file(path, "LLaVA-CoT")
    root = Path(image_root)
    report, owned = _start(report, str(path))
    for n, obj in _json_rows(path, report):
        row_id = _row_id(obj, ("id",))
        where = row_id or f"line {n}"
        missing = next((k for k in ("id", "image", "conversations") if not obj.get(k)), None)
        if missing or not isinstance(obj["image"], str):
            report.skip(f"missing_field:{missing or 'image'}", where)
            continue
        if not _is_conversation(obj["conversations"]):
            report.skip("bad_conversation", where)
            continue
        image = root / obj["image"]
        if not image.is_file():
            report.skip("missing_image", where)
            continue
        report.keep()
        yield {
            "id": row_id,
            "image": image,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in obj["conversations"]],
            **({"category": obj["category"]} if isinstance(obj.get("category"), str) else {}),
        }
    _finish(report, owned)


# ----------------------------------------------------------------------------------------------- Visual-CoT

_BBOX_REQUEST = re.compile(r"\s*Please provide the bounding box coordinate of the region.*$", flags=re.DOTALL)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _visual_cot_fields(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(image, question, answer, boxes) from either Visual-CoT layout, or (None, skip reason)."""
    image, boxes = obj.get("image"), None
    question, answer = _text(obj, "question"), _text(obj, "answer")
    if isinstance(image, list):  # LLaVA form: ["a.jpg", "a.jpg###[x0, y0, x1, y1]"] + conversations
        refs = [s for s in image if isinstance(s, str) and "###" in s]
        image = image[0] if image and isinstance(image[0], str) else None
        if refs:
            try:
                boxes = [json.loads(refs[0].split("###", 1)[1])]
            except json.JSONDecodeError:
                return None, "bad_bbox"
        conv = obj.get("conversations")
        if _is_conversation(conv):
            question = question or _BBOX_REQUEST.sub("", conv[0]["value"].replace("<image>", "")).strip() or None
            answer = answer or conv[-1]["value"].strip() or None
    else:
        raw = obj.get("bboxs", obj.get("bbox"))
        if raw is not None:
            boxes = raw if isinstance(raw, list) and raw and isinstance(raw[0], list) else [raw]
    for key, value in (("image", image), ("question", question), ("answer", answer), ("bbox", boxes)):
        if not value or (key == "image" and not isinstance(value, str)):
            return None, f"missing_field:{key}"
    return {"image": image, "question": question, "answer": answer, "boxes": boxes}, None


def read_visual_cot(
    path: str | Path, image_root: str | Path, report: ReadReport | None = None
) -> Iterator[dict[str, Any]]:
    """Visual-CoT samples with a ground-truth bbox in pixels (METHODS.md section 2).

    Yields ``{"id", "image": Path, "image_size": (w, h), "question", "answer", "bbox": [x0, y0, x1, y1],
    "bboxes": [[...], ...], "dataset", "split"}`` (``dataset``/``split`` None when absent). Two layouts:
    the metadata rows (``question_id``/``id``, ``image``, ``question``, ``answer``, ``bboxs`` (list of boxes)
    or ``bbox``, optional ``width``/``height``/``dataset``/``split``) and the LLaVA-style rows
    (``image: [path, "path###[x0, y0, x1, y1]"]`` with the question in the first human turn and the answer in
    the last gpt turn). Several boxes are merged into their union as ``bbox`` (as Visual-CoT does). Rows without
    an id get ``"<file stem>:<line>"``. The image is opened only to read its size.

    Skipped and counted: ``malformed_json``, ``not_an_object``, ``missing_field:{image,question,answer,bbox}``,
    ``missing_image``, ``undecodable_image``, ``bad_bbox`` (not 4 numbers, or x0 >= x1, or y0 >= y1),
    ``bbox_outside_image``, ``image_size_mismatch`` (the row's width/height differ from the file's).
    """
    path = _require_file(path, "Visual-CoT")
    root = Path(image_root)
    report, owned = _start(report, str(path))
    for n, obj in _json_rows(path, report):
        row_id = _row_id(obj, ("id", "question_id")) or f"{path.stem}:{n}"
        fields, reason = _visual_cot_fields(obj)
        if fields is None:
            report.skip(reason, row_id)
            continue
        boxes = fields["boxes"]
        if not all(isinstance(b, list) and len(b) == 4 and all(map(_number, b)) for b in boxes) or not all(
            b[0] < b[2] and b[1] < b[3] for b in boxes
        ):
            report.skip("bad_bbox", row_id)
            continue
        image = root / fields["image"]
        if not image.is_file():
            report.skip("missing_image", row_id)
            continue
        try:
            with Image.open(image) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError):
            report.skip("undecodable_image", row_id)
            continue
        if (obj.get("width"), obj.get("height")) not in ((None, None), (width, height)):
            report.skip("image_size_mismatch", row_id)
            continue
        if not all(b[0] >= 0 and b[1] >= 0 and b[2] <= width and b[3] <= height for b in boxes):
            report.skip("bbox_outside_image", row_id)
            continue
        boxes = [[float(v) for v in b] for b in boxes]
        union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        report.keep()
        yield {
            "id": row_id,
            "image": image,
            "image_size": (width, height),
            "question": fields["question"],
            "answer": fields["answer"],
            "bbox": union,
            "bboxes": boxes,
            "dataset": obj.get("dataset"),
            "split": obj.get("split"),
        }
    _finish(report, owned)


# ----------------------------------------------------------------------------------------------- LaRe reasoning

_THINK = re.compile(r"<think>(.*?)</think>(.*)", flags=re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)


def read_reasoning(
    path: str | Path, image_root: str | Path, report: ReadReport | None = None
) -> Iterator[dict[str, Any]]:
    """LaRe reasoning data (METHODS.md section 3): ``{"id", "image": Path, "question", "reasoning", "answer"}``.

    Accepts flat rows (``id``, ``image``, ``question``, ``reasoning``, ``answer``) and conversation rows with the
    question in the first user turn (``<image>`` removed) and the reasoning in ``<think>..</think>`` of the last
    assistant turn followed by the answer, optionally in ``<answer>..</answer>``. Vision-R1-cold ships two JSON
    arrays with different schemas (METHODS.md section 5), both read here, each file on its own:
    ``{id, image, conversations: [{from: human|gpt, value}]}`` (LLaVA) and ``{images: [path], conversations:
    [{role: user|assistant, content}]}`` (chat; ``from``/``value`` keys are accepted in either, and a ``content``
    list of ``{"type": "text", "text"}`` parts is joined). Rows without an id get ``"<file stem>:<line>"``.
    Skipped and counted: ``malformed_json``, ``not_an_object``, ``bad_conversation``, ``multiple_images`` (LaRe
    takes one image), ``missing_field:{image,question,reasoning,answer}``, ``missing_image``.
    """
    path = _require_file(path, "reasoning")
    root = Path(image_root)
    report, owned = _start(report, str(path))
    for n, obj in _json_rows(path, report):
        row_id = _row_id(obj, ("id", "question_id")) or f"{path.stem}:{n}"
        fields = {k: _text(obj, k) for k in ("image", "question", "reasoning", "answer")}
        images = obj.get("images")
        if fields["image"] is None and isinstance(images, list) and images:
            if len(images) > 1:
                report.skip("multiple_images", row_id)
                continue
            fields["image"] = str(images[0]) if isinstance(images[0], str) and images[0].strip() else None
        if "conversations" in obj:
            conv = _chat_turns(obj["conversations"])
            if conv is None:
                report.skip("bad_conversation", row_id)
                continue
            fields["question"] = fields["question"] or conv[0].replace("<image>", "").strip() or None
            m = _THINK.search(conv[-1])
            if m:
                answer = m.group(2)
                tagged = _ANSWER.search(answer)
                fields["reasoning"] = fields["reasoning"] or m.group(1).strip() or None
                fields["answer"] = fields["answer"] or (tagged.group(1) if tagged else answer).strip() or None
        missing = next((k for k, v in fields.items() if v is None), None)
        if missing:
            report.skip(f"missing_field:{missing}", row_id)
            continue
        image = root / fields["image"]
        if not image.is_file():
            report.skip("missing_image", row_id)
            continue
        report.keep()
        yield {"id": row_id, **fields, "image": image}
    _finish(report, owned)


# ----------------------------------------------------------------------------------------------- evaluation sets


def _options(values: dict[str, Any]) -> dict[str, str]:
    """Letter -> option text, dropping empty/NaN options (their count varies per row)."""
    out = {}
    for letter, value in values.items():
        if value is None or (isinstance(value, float) and value != value):
            continue
        text = str(value).strip()
        if text:
            out[letter] = text
    return out


def _b64_images(value: str) -> list[Image.Image] | None:
    """One base64 image, or a Python-literal list of them (multi-image rows); None if any does not decode."""
    items: Any = [value]
    if value.lstrip().startswith("["):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return None
    images = []
    for item in items:
        try:
            data = base64.b64decode(str(item), validate=True)
        except (binascii.Error, ValueError):
            return None
        img = _decode_image(data)
        if img is None:
            return None
        images.append(img)
    return images or None


def read_vlmevalkit_tsv(path: str | Path, report: ReadReport | None = None) -> Iterator[dict[str, Any]]:
    """A VLMEvalKit benchmark TSV (MMStar, MMBench, AI2D, POPE, ...; METHODS.md section 4).

    Yields ``{"id", "index", "question", "options": {"A": ..}, "answer", "image": PIL.Image, "images": [...],
    "hint", "category", "l2_category", "source"}``; options are the single-letter columns with empty cells
    dropped (``{}`` for yes/no or open questions), ``answer`` is the cell as is (None when the file has no
    answer column), ``hint``/``category``/``l2_category`` None when absent or empty. ``image`` holds base64
    (decoded here; a ``"['..', '..']"`` list gives several ``images``), or, as VLMEvalKit allows, a short string
    of digits naming the ``index`` of the row whose image is reused.

    Raises :class:`DataFormatError` when a required column (index, question, image) is missing. Skipped and
    counted: ``missing_field:question``, ``undecodable_image``, ``unknown_image_ref``,
    ``answer_not_in_options`` (a single-letter answer not among a multiple-choice row's options).
    """
    import pandas as pd

    path = _require_file(path, "VLMEvalKit TSV")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot be parsed as a tab-separated file ({e})") from e
    missing = [c for c in ("index", "question", "image") if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"{path}: not a VLMEvalKit TSV, missing column(s) {missing} (found {list(df.columns)[:12]}); "
            "expected tab-separated columns index, question, A, B, ..., answer, image (base64)"
        )
    report, owned = _start(report, str(path))
    letters = [c for c in df.columns if len(c) == 1 and c in _LETTERS]
    by_index = dict(zip(df["index"], df["image"], strict=True))

    def cell(row: Any, name: str) -> str | None:
        value = row.get(name)
        return value.strip() or None if isinstance(value, str) else None

    for _, row in df.iterrows():
        row_id = str(row["index"]).strip()
        question = cell(row, "question")
        if question is None:
            report.skip("missing_field:question", row_id)
            continue
        raw = row["image"].strip()
        if len(raw) <= 64 and raw.isdigit():  # VLMEvalKit: the index of the row whose image is reused
            ref = by_index.get(raw)
            if ref is None or (len(ref.strip()) <= 64 and ref.strip().isdigit()):
                report.skip("unknown_image_ref", row_id)
                continue
            raw = ref.strip()
        images = _b64_images(raw)
        if images is None:
            report.skip("undecodable_image", row_id)
            continue
        options = _options({k: row[k] for k in letters})
        answer = row["answer"].strip() if "answer" in df.columns else None
        if options and answer and len(answer) == 1 and answer in _LETTERS and answer not in options:
            report.skip("answer_not_in_options", row_id)
            continue
        report.keep()
        yield {
            "id": row_id,
            "index": row_id,
            "question": question,
            "options": options,
            "answer": answer,
            "image": images[0],
            "images": images,
            "hint": cell(row, "hint"),
            "category": cell(row, "category"),
            "l2_category": cell(row, "l2-category") or cell(row, "l2_category"),
            "source": path.stem,
        }
    _finish(report, owned)


_MMVP_OPTION = re.compile(r"\(([a-zA-Z])\)\s*(.*?)\s*(?=\([a-zA-Z]\)|$)", flags=re.DOTALL)


def read_mmvp(root: str | Path, report: ReadReport | None = None) -> Iterator[dict[str, Any]]:
    """MMVP (METHODS.md section 4): ``root/Questions.csv`` + ``root/"MMVP Images"/{Index}.jpg``.

    Yields ``{"id", "question", "options": {"A": "Open", "B": "Closed"}, "answer": "A", "image": PIL.Image,
    "image_path": Path}`` from options like ``"(a) Open (b) Closed"`` and answers like ``"(a)"``. The index
    column may be spelled ``Index`` or ``lndex`` (as the released CSV has it). Raises
    :class:`DataFormatError` when a column is missing. Skipped and counted: ``missing_field:<column>``,
    ``missing_image``, ``undecodable_image``, ``bad_options`` (not "(a) .. (b) .."), ``bad_answer``,
    ``answer_not_in_options``.
    """
    import pandas as pd

    root = Path(root)
    csv = _require_file(root / "Questions.csv", "MMVP questions")
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    index_col = next((c for c in ("Index", "lndex") if c in df.columns), None)
    missing = [c for c in ("Question", "Options", "Correct Answer") if c not in df.columns]
    if index_col is None or missing:
        missing = (["Index"] if index_col is None else []) + missing
        raise DataFormatError(
            f"{csv}: not the MMVP questions file, missing column(s) {missing}"
            f" (found {list(df.columns)}); expected Index, Question, Options, Correct Answer"
        )
    report, owned = _start(report, str(root))
    for i, row in df.iterrows():
        row_id = row[index_col].strip()
        empty = next((c for c in (index_col, "Question", "Options", "Correct Answer") if not row[c].strip()), None)
        if empty:
            report.skip(f"missing_field:{empty}", row_id or f"row {int(i) + 2}")
            continue
        pairs = _MMVP_OPTION.findall(row["Options"].strip())
        options = {letter.upper(): text for letter, text in pairs}
        if len(options) < 2 or len(options) != len(pairs) or not all(options.values()):
            report.skip("bad_options", row_id)
            continue
        answer = _letter(row["Correct Answer"])
        if answer is None:
            report.skip("bad_answer", row_id)
            continue
        if answer not in options:
            report.skip("answer_not_in_options", row_id)
            continue
        image_path = root / "MMVP Images" / f"{row_id}.jpg"
        image = _image_or_skip(image_path, report, row_id)
        if image is None:
            continue
        report.keep()
        yield {
            "id": row_id,
            "question": row["Question"].strip(),
            "options": options,
            "answer": answer,
            "image": image,
            "image_path": image_path,
        }
    _finish(report, owned)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_vstar(root: str | Path, report: ReadReport | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """V* bench (METHODS.md section 5) as released: per category folder (``direct_attributes``,
    ``relative_position``) one ``<name>.json`` next to its image ``<name>.jpg``, the JSON holding ``question``,
    ``options`` (a list whose **first** entry is always the right one), ``bbox`` (``[x, y, w, h]`` per target
    object) and ``target_object``.

    Because the right option always comes first, the options are shuffled before lettering, with a generator seeded
    by ``seed`` and the row id (the same order on every run and machine, independent of the reading order). Yields
    ``{"id": "<category>/<name>", "category", "question", "options": {"A": ..}, "answer": letter, "image",
    "image_path", "bbox": [[x0, y0, x1, y1], ...] (corners, pixels), "target_object"}``.

    Raises :class:`FileNotFoundError` when ``root`` is not a folder or holds no JSON. Skipped and counted:
    ``malformed_json``, ``not_an_object``, ``missing_field:<name>``, ``bad_options`` (fewer than two, or not
    strings), ``bad_bbox`` (not ``[x, y, w, h]`` with w, h > 0), ``missing_image``, ``undecodable_image``.
    """
    import random

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"V* bench folder not found: {root}")
    files = sorted(root.glob("*.json")) + sorted(root.glob("*/*.json"))
    if not files:
        raise FileNotFoundError(f"{root}: no V* bench JSON files (<category>/<name>.json next to <name>.jpg)")
    report, owned = _start(report, str(root))
    for file in files:
        row_id = file.relative_to(root).with_suffix("").as_posix()
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            report.skip("malformed_json", row_id)
            continue
        if not isinstance(obj, dict):
            report.skip("not_an_object", row_id)
            continue
        missing = next((k for k in ("question", "options", "bbox") if not obj.get(k)), None)
        if missing:
            report.skip(f"missing_field:{missing}", row_id)
            continue
        options = obj["options"]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            report.skip("bad_options", row_id)
            continue
        boxes = obj["bbox"]
        boxes = [boxes] if isinstance(boxes, list) and boxes and _number(boxes[0]) else boxes
        if not isinstance(boxes, list) or not all(
            isinstance(b, list) and len(b) == 4 and all(map(_number, b)) and min(b[2:]) > 0 for b in boxes
        ):
            report.skip("bad_bbox", row_id)
            continue
        image_path = next((file.with_suffix(s) for s in _IMAGE_SUFFIXES if file.with_suffix(s).is_file()), None)
        image = _image_or_skip(image_path, report, row_id)
        if image is None:
            continue
        order = list(range(len(options)))
        random.Random(f"{seed}:{row_id}").shuffle(order)
        lettered = {_LETTERS[i]: options[j] for i, j in enumerate(order)}
        report.keep()
        yield {
            "id": row_id,
            "category": file.parent.name if file.parent != root else None,
            "question": str(obj["question"]).strip(),
            "options": lettered,
            "answer": _LETTERS[order.index(0)],
            "image": image,
            "image_path": image_path,
            "bbox": [[x, y, x + w, y + h] for x, y, w, h in boxes],
            "target_object": obj.get("target_object"),
        }
    _finish(report, owned)


def _blink_files(path: Path, split: str) -> list[tuple[str, Path]]:
    """(task, parquet file) pairs: one file, a dir of ``<task>.parquet``, or the HF ``<Task>/<split>-*.parquet``."""
    if path.is_file():
        task = path.parent.name if path.name.startswith(f"{split}-") else path.stem
        return [(task, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"BLINK parquet file or directory not found: {path}")
    files = [(p.stem, p) for p in sorted(path.glob("*.parquet"))]
    files += [(p.parent.name, p) for p in sorted(path.glob(f"*/{split}-*.parquet"))]
    if not files:
        raise FileNotFoundError(f"{path}: no BLINK parquet files (<task>.parquet or <Task>/{split}-*.parquet)")
    return files


def read_blink(
    path_or_dir: str | Path,
    report: ReadReport | None = None,
    tasks: Iterable[str] | None = None,
    split: str = "val",
) -> Iterator[dict[str, Any]]:
    """BLINK (METHODS.md section 4): per-task parquet files as the Hugging Face data set ships them.

    ``path_or_dir`` is one parquet file, a directory of ``<task>.parquet`` files, or the HF layout
    ``<Task>/<split>-*.parquet`` (task = the directory name, e.g. ``Relative_Depth``); ``tasks`` keeps only the
    named tasks. Yields ``{"id", "task", "question", "prompt", "options": {"A": ..}, "answer": "A",
    "images": [PIL.Image, ...]}`` from the columns ``idx``, ``question`` (or ``prompt``), ``choices``,
    ``answer`` (``"(A)"``; None when empty or hidden, as in the test split) and ``image_1``..``image_4``
    (``{"bytes": ..}`` structs; null ones are absent). Rows are streamed batch by batch.

    Raises :class:`DataFormatError` when a file lacks ``choices``, a question column, or any ``image_N`` column.
    Skipped and counted: ``missing_field:question``, ``bad_options``, ``missing_image`` (no image at all),
    ``undecodable_image``, ``bad_answer``, ``answer_not_in_options``.
    """
    import pyarrow.parquet as pq

    path = Path(path_or_dir)
    wanted = None if tasks is None else set(tasks)
    files = [(t, p) for t, p in _blink_files(path, split) if wanted is None or t in wanted]
    if wanted is not None and not files:
        raise FileNotFoundError(f"{path}: none of the BLINK tasks {sorted(wanted)} found")
    report, owned = _start(report, str(path))
    for task, file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
            raise DataFormatError(f"{file}: not a parquet file ({e})") from e
        columns = pf.schema_arrow.names
        image_cols = sorted((c for c in columns if re.fullmatch(r"image_\d+", c)), key=lambda c: int(c[6:]))
        question_col = "question" if "question" in columns else "prompt" if "prompt" in columns else None
        if question_col is None or "choices" not in columns or not image_cols:
            raise DataFormatError(
                f"{file}: not a BLINK parquet file, needs columns question (or prompt), choices, image_1.. "
                f"(found {columns})"
            )
        n = 0
        for batch in pf.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                n += 1
                row_id = str(row.get("idx") or f"{task}:{n}")
                question = row.get(question_col)
                if not isinstance(question, str) or not question.strip():
                    report.skip("missing_field:question", row_id)
                    continue
                choices = row.get("choices")
                if not isinstance(choices, list) or not choices or len(choices) > len(_LETTERS):
                    report.skip("bad_options", row_id)
                    continue
                options = {_LETTERS[i]: str(c) for i, c in enumerate(choices)}
                cells = [row.get(c) for c in image_cols]
                blobs = [c.get("bytes") if isinstance(c, dict) else None for c in cells]
                if not any(blobs):
                    report.skip("missing_image", row_id)
                    continue
                images = [_decode_image(b) for b in blobs if b]
                if any(img is None for img in images):
                    report.skip("undecodable_image", row_id)
                    continue
                raw_answer = row.get("answer")
                answer = None
                if isinstance(raw_answer, str) and raw_answer.strip() and raw_answer.strip().lower() != "hidden":
                    answer = _letter(raw_answer)
                    if answer is None:
                        report.skip("bad_answer", row_id)
                        continue
                    if answer not in options:
                        report.skip("answer_not_in_options", row_id)
                        continue
                report.keep()
                yield {
                    "id": row_id,
                    "task": task,
                    "question": question.strip(),
                    "prompt": row.get("prompt"),
                    "options": options,
                    "answer": answer,
                    "images": images,
                }
    _finish(report, owned)


def read_questions(
    path: str | Path, limit: int | None = None, images: str | Path | None = None
) -> list[dict[str, Any]]:
    """Questions with their images from any format the toolkit reads (``lavit analyze`` / ``generate``,
    ``lare generate``): a VLMEvalKit TSV (MMStar, the shapes test split), an MMVP folder, a V* bench folder, or a
    Visual-CoT JSONL (``images``: its image root, default the file's folder). Each is ``{"id", "image" (PIL, RGB),
    "text" (the user text, :func:`latent_core.prompts.question_text`, no instruction: the form LaViT and LaRe train
    on), "answer" (gold or None)}``; the first ``limit``. Skipped rows are counted by the readers' reports
    (logged)."""
    from itertools import islice

    from PIL import Image

    from latent_core.prompts import question_text

    path = Path(path)
    if path.is_dir():
        rows = read_mmvp(path) if (path / "Questions.csv").is_file() else read_vstar(path)
    elif path.suffix.lower() == ".tsv":
        rows = read_vlmevalkit_tsv(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = read_visual_cot(path, images or path.parent)
    else:
        raise ValueError(f"{path}: not a TSV, a Visual-CoT JSONL, or an MMVP / V* folder")
    samples = []
    for row in islice(rows, limit):
        image = row.get("image")
        if isinstance(image, str | Path):
            with Image.open(image) as handle:
                image = handle.convert("RGB")
        samples.append(
            {
                "id": str(row["id"]),
                "image": image.convert("RGB"),
                "text": question_text(row["question"], row.get("options") or None, row.get("hint"), None),
                "answer": row.get("answer"),
            }
        )
    return samples
