"""The LLM judge of Heima's Appendix C (paper 000, Algorithm 1): a 1-5 similarity rank of a reconstructed CoT stage.

Algorithm 1 gives the judge the image, the question, the reconstructed stage and its ground truth. So does this
module: the image file named by a record's ``"image"`` path is sent, base64-encoded with its MIME type, as an
OpenAI chat ``image_url`` content part (``data:image/png;base64,...``) in the user turn "Following is the given image:
... The corresponding question is: ...". Any OpenAI-compatible chat-completions endpoint that accepts images works
(``openai`` package): base URL, model and API key come from arguments or the environment (``OPENAI_BASE_URL``,
``OPENAI_API_KEY``; the model has no default). For an endpoint that takes text only, ``JudgeConfig(text_only=True)``
sends a text note in place of the image (``image_note``, or "(not shown: the judge is text-only)"); that departs
from the paper and the caller chooses it explicitly.

Failures are recorded with their reason and not scored, never papered over: a record without an image path, or
whose image file is missing or unreadable, while ``text_only`` is off (no call is made: it is never judged without
its image); a call that still fails after the retries (HTTP errors, timeouts); a reply with no usable rank (not
JSON, no integer 1-5 under ``"T"``). The API key is never logged or written. The paper's per-rank examples are
elided ("...") in the paper itself and are left out here.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import mimetypes
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "JudgeConfig",
    "JudgeResult",
    "build_messages",
    "image_data_url",
    "judge_many",
    "judge_one",
    "make_client",
    "parse_rank",
    "resolve_image",
]

logger = logging.getLogger(__name__)

STAGE_DESCRIPTIONS = {
    "summary": "Summary – A brief restatement or paraphrasing of the question.",
    "caption": "Caption – A description or summary of the content of the image.",
    "reasoning": "Reasoning – A logical explanation of how the answer is derived from the image and the question.",
}

#: Algorithm 1 of Appendix C, first user turn (verbatim).
INTRO = (
    "When responding to questions about an image, a deep analysis is crucial for providing accurate answers. "
    "The analysis of an image-question pair could be one of the following components:\n\n"
    + "\n\n".join(STAGE_DESCRIPTIONS.values())
    + " You will be provided with one of them along with the ground truth. Your task is to evaluate whether the "
    "analysis is closely aligned with the ground truth according to given image and question pair."
)

#: Algorithm 1, last user turn (verbatim, without the elided per-rank examples).
RUBRIC = """\
Please rank the similarity with an integer between 1 and 5, where the larger number means the generated {T} is \
more close to the ground truth. Please rate the similarity on a scale from 1 to 5, where:

1: Completely unrelated.
The generated {T} and ground truth discuss entirely different themes, and there is no overlap in content, or \
subject matter.

2: Minimally related.
The generated {T} and ground truth are tangentially connected. Only a minimum fraction of the theme or content in \
ground truth is mentioned in the generated {T}.

3: Somewhat related but with notable discrepancies.
The generated {T} and ground truth share key elements in theme or content but exhibit clear differences in focus, \
description, or details. While the overall themes or settings may overlap (e.g., animals, fences, grassy area), \
the generated {T} introduces significant factual errors or omits important details.

4: Closely related with small differences.
The generated {T} and ground truth align on the main theme and share most of the key details. However, there are \
minor differences in phrasing, specific details, or focus.

5: Nearly identical.
The generated {T} and ground truth are highly similar, sharing nearly all content, details, and key descriptions, \
with only minor or negligible phrasing differences.

The output should be in a json format:
{{"T": (Rank), "reason": ...}}
(Rank) is the integer of the similarity rank.
"reason" stores the reason of ranking a given {T} and ground truth."""

#: What a text-only judge is told in place of the image, unless the caller gives an ``image_note``.
TEXT_ONLY_NOTE = "(not shown: the judge is text-only)"

#: Why a record without an image path is not judged while ``text_only`` is off.
NO_IMAGE = "no image path in the record"

#: How the reason of a pair whose image file cannot be read begins (the path and the cause follow).
IMAGE_UNREADABLE = "image missing or unreadable"


@dataclass(frozen=True)
class JudgeResult:
    """One judged pair: ``score`` 1-5, or ``failed`` with a ``reason``; ``raw`` is the model's reply text."""

    score: int | None
    failed: bool
    reason: str | None
    raw: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JudgeConfig:
    """How to call the judge. ``retries``: extra attempts after the first; waits ``backoff * 2**attempt`` s.

    ``text_only``: the endpoint takes no images, so a text note replaces the image of Algorithm 1 (off by default:
    the image is sent, as in the paper, and a pair whose image cannot be read fails).
    """

    model: str
    retries: int = 4
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    text_only: bool = False


def make_client(base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
    """An ``openai.OpenAI`` client; ``base_url``/``api_key`` default to ``OPENAI_BASE_URL``/``OPENAI_API_KEY``.

    The client's own retries are off (``max_retries=0``): :func:`judge_one` retries with its own backoff and
    records what failed.
    """
    import openai

    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise ValueError(
            "no API key for the judge: set the OPENAI_API_KEY environment variable (the key is read only from there; "
            "--judge-model and --judge-base-url choose the model and the endpoint)"
        )
    return openai.OpenAI(
        base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
    )


def resolve_image(image: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Path:
    """A record's image path: absolute as given; relative to ``image_root`` if set, else to the working directory."""
    path = Path(image).expanduser()
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root).expanduser() / path
    return path


def image_data_url(path: str | os.PathLike) -> str:
    """``data:<mime>;base64,<the file's bytes>``: the file is sent unchanged; the MIME type comes from its content.

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it is not an image Pillow can read.
    """
    from PIL import Image

    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()  # catches truncated or corrupt files, which the endpoint would reject
    except Exception as exc:  # PIL raises several types (UnidentifiedImageError, SyntaxError, struct.error, ...)
        raise ValueError(f"not an image Pillow can read ({type(exc).__name__}: {exc})") from exc
    mime = Image.MIME.get(fmt or "") or mimetypes.guess_type(str(path))[0]
    if not mime or not mime.startswith("image/"):
        raise ValueError(f"no image MIME type for format {fmt!r}")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def build_messages(
    stage: str,
    prediction: str,
    target: str,
    question: str,
    image_note: str | None = None,
    *,
    image_url: str | None = None,
) -> list:
    """The chat messages of Algorithm 1 (Appendix C) for one stage ``T`` in {summary, caption, reasoning}.

    With ``image_url`` (e.g. from :func:`image_data_url`) the image turn carries it as an ``image_url`` content
    part; without it that turn is text only and names the image by ``image_note`` (default :data:`TEXT_ONLY_NOTE`).
    """
    if stage not in STAGE_DESCRIPTIONS:
        raise ValueError(f"unknown stage {stage!r}: expected one of {sorted(STAGE_DESCRIPTIONS)}")
    t = stage
    if image_url is not None:
        image_turn: str | list = [
            {"type": "text", "text": "Following is the given image:"},
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": f"The corresponding question is: {question}"},
        ]
    else:
        note = image_note if image_note else TEXT_ONLY_NOTE
        image_turn = f"Following is the given image: {note}\n\nThe corresponding question is: {question}"
    return [
        {"role": "user", "content": INTRO},
        {
            "role": "user",
            "content": f"In this conversation, you will be given a generated {t} and its ground truth.\n\n"
            f"The {t} is: {prediction}\n\nThe ground truth is: {target}",
        },
        {"role": "user", "content": image_turn},
        {"role": "user", "content": RUBRIC.format(T=t)},
    ]


def parse_rank(text: str) -> tuple[int | None, str | None]:
    """The rank under ``"T"`` of the JSON object in ``text`` (code fences allowed): ``(rank, None)`` or
    ``(None, why not)``."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0:
        return None, "no JSON object in the reply"
    try:
        obj = json.loads(text[start : end + 1] if end > start else text[start:])
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON in the reply: {exc.msg}"
    if not isinstance(obj, dict) or "T" not in obj:
        return None, 'no "T" rank in the reply JSON'
    rank = obj["T"]
    if isinstance(rank, str) and rank.strip().isdigit():
        rank = int(rank.strip())
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 5:
        return None, f'"T" is {rank!r}, not an integer 1-5'
    return rank, None


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    return f"{name} (HTTP {status})" if status is not None else name


def judge_one(
    client,
    config: JudgeConfig,
    stage: str,
    prediction: str,
    target: str,
    question: str,
    image_note: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    image: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> JudgeResult:
    """Judge one pair; transport errors are retried with exponential backoff, an unusable reply is not.

    ``image``: the image file (resolved by :func:`resolve_image` against ``image_root``). Unless
    ``config.text_only``, a missing path or an unreadable file fails the pair without calling the endpoint.
    """
    image_url = None
    if not config.text_only:
        if image is None or not str(image).strip():
            logger.warning("judge pair not sent: %s", NO_IMAGE)
            return JudgeResult(None, True, NO_IMAGE, "")
        path = resolve_image(image, image_root)
        try:
            image_url = image_data_url(path)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            reason = f"{IMAGE_UNREADABLE}: {str(path)!r}: {why}"
            logger.warning("judge pair not sent: %s", reason)
            return JudgeResult(None, True, reason, "")
    messages = build_messages(stage, prediction, target, question, image_note, image_url=image_url)
    last_error = "no attempt made"
    for attempt in range(config.retries + 1):
        if attempt:
            sleep(config.backoff * 2 ** (attempt - 1))
        try:
            response = client.chat.completions.create(
                model=config.model,
                messages=messages,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                timeout=config.timeout,
            )
        except Exception as exc:  # openai.APIError, httpx errors, a bad body: all recorded, none scored
            last_error = _describe(exc)
            logger.warning("judge call %d/%d failed: %s", attempt + 1, config.retries + 1, last_error)
            continue
        try:
            raw = response.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            return JudgeResult(None, True, "reply has no choices[0].message.content", "")
        rank, why = parse_rank(raw)
        if rank is None:
            logger.warning("judge reply unusable: %s", why)
            return JudgeResult(None, True, why, raw)
        return JudgeResult(rank, False, None, raw)
    return JudgeResult(None, True, f"failed after {config.retries + 1} attempts: {last_error}", "")


def judge_many(
    pairs: Iterable[dict],
    client,
    config: JudgeConfig,
    progress: Callable[[int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    *,
    image_root: str | os.PathLike | None = None,
) -> list[JudgeResult]:
    """Judge records with keys ``stage``, ``prediction``, ``target``, ``question`` and ``image`` (a path, absolute
    or relative to ``image_root``, else to the working directory; ``image_note`` optional, for ``text_only``)."""
    results = []
    for pair in pairs:
        results.append(
            judge_one(
                client,
                config,
                pair["stage"],
                pair["prediction"],
                pair["target"],
                pair.get("question", ""),
                pair.get("image_note"),
                sleep=sleep,
                image=pair.get("image"),
                image_root=image_root,
            )
        )
        if progress is not None:
            progress(1)
    no_image = sum(r.failed and (r.reason or "").startswith((NO_IMAGE, IMAGE_UNREADABLE)) for r in results)
    if no_image:
        logger.warning("%d of %d pairs not judged: no readable image (see their reasons)", no_image, len(results))
    return results
