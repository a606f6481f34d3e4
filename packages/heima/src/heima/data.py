"""Heima's data: LLaVA-CoT samples with every progressive-distillation variant of the answer (METHODS.md §1).

:func:`prepare` reads LLaVA-CoT-100k (``latent_core.readers.read_llava_cot``), splits every gpt answer into its
stages (``parse_cot_stages``) and writes one record per (sample, turn) with all the answer variants
``answers[0..K]``: ``answers[s]`` is the original answer with its first ``s`` CoT stages (:data:`heima.config.STAGES`
order) replaced by their thinking tokens, every other character unchanged. ``answers[0]`` is the original text,
``answers[K]`` the fully replaced answer of the last progressive stage and of the recovering stage (Eq. 3); stage
``s`` trains on ``answers[s]`` (Eq. 5). One record per sample keeps every field together (ANCHORS.md: no second file
aligned by a seed).

Record fields::

    id              "<id>" (single-turn) or "<id>#<turn>" (multi-turn; turn = 0-based index of the human/gpt pair)
    turn            that 0-based turn index
    image           image path *relative to* images_root, as written in the data file
    images_root     absolute path of the image root (samples_for_stage joins the two)
    question        the human turn, ``<image>`` marker removed, stripped
    answers         list of K+1 strings (K = number of stages, 3 by default)
    stage_texts     {"summary": .., "caption": .., "reasoning": ..} (stripped stage texts)
    conclusion      the conclusion text
    thinking_tokens per stage, the list of tokens that replace it

Skipped and counted (never silently): the reader's reasons (``malformed_json``, ``missing_image``,
``missing_field:<name>``, ``bad_conversation``, ...) per data row, and per turn ``missing_stage:<name>`` for an answer
without (or with an empty) summary, caption, reasoning or conclusion. ``report.kept`` counts the records written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import datasets
from latent_core.readers import COT_STAGES, ReadReport, parse_cot_stages, read_llava_cot

from heima.config import RECOVER, STAGES, thinking_token, thinking_tokens

__all__ = ["PREPARE_SUMMARY_NAME", "load_prepared", "prepare", "replace_stages", "samples_for_stage"]

PREPARE_SUMMARY_NAME = "heima_prepare.json"
"""The JSON summary written next to the prepared dataset: tokens, options, report, num_stages."""

_STAGE_RE = re.compile(rf"<({'|'.join(s.upper() for s in COT_STAGES)})>(.*?)</\1>", flags=re.DOTALL)


def _stage_spans(answer: str) -> dict[str, tuple[int, int]]:
    """Span of each stage's ``<TAG>..</TAG>`` in ``answer``: the same matches as ``parse_cot_stages`` (first one)."""
    spans: dict[str, tuple[int, int]] = {}
    for m in _STAGE_RE.finditer(answer):
        spans.setdefault(m.group(1).lower(), m.span())
    return spans


def replace_stages(answer: str, replacements: dict[str, list[str]], drop_tags: bool = False) -> str:
    """``answer`` with the stages in ``replacements`` replaced by their tokens, all else unchanged.

    Tags kept (default, as the authors did): ``<SUMMARY>..</SUMMARY>`` -> ``<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>``;
    with ``drop_tags`` the tokens replace the whole tagged span. Several tokens are concatenated with no separator.

    Raises:
        ValueError: a stage to replace is not in ``answer``.
    """
    spans = _stage_spans(answer)
    out = answer
    for stage in sorted(replacements, key=lambda k: spans.get(k, (-1, -1))[0], reverse=True):
        if stage not in spans:
            raise ValueError(f"cannot replace stage {stage!r}: the answer has no <{stage.upper()}>..</..> span")
        start, end = spans[stage]
        tokens = "".join(replacements[stage])
        tag = stage.upper()
        out = out[:start] + (tokens if drop_tags else f"<{tag}>{tokens}</{tag}>") + out[end:]
    return out


def _token_count(tokenizer: Any, text: str) -> int:
    """len(tokens(text)) for the retention ratio: the tokenizer's ids without special tokens (no BOS)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _retained(ratio: float, length: int) -> int:
    """n_k = max(1, floor(ratio * length)) (METHODS.md §1), ``ratio`` taken as its decimal value (0.29 * 100 = 29)."""
    return max(1, math.floor(Fraction(repr(float(ratio))) * length))


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | Path):
        from latent_core.hub import load_processor

        tokenizer = load_processor(str(tokenizer))
    return getattr(tokenizer, "tokenizer", tokenizer)


def _progress(enabled: bool):
    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        disable=not enabled,
    )


def prepare(
    data: str | Path,
    images: str | Path,
    out: str | Path,
    tokens_per_stage: int = 1,
    retention_ratio: float | None = None,
    drop_tags: bool = False,
    tokenizer: Any = None,
    *,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> tuple[datasets.Dataset, ReadReport]:
    """Read LLaVA-CoT ``data`` (images under ``images``), build every answer variant, save to ``out``.

    Writes ``out`` with ``Dataset.save_to_disk`` and ``out/heima_prepare.json``: ``{"tokens": [every thinking token,
    stage by stage, in order], "options": {...}, "report": ReadReport.as_dict(), "num_stages": K, "num_records",
    "tokens_per_stage_max": {stage: max n}}``. Record fields: see the module docstring.

    Args:
        data: LLaVA-CoT JSONL (or a ``.json`` list).
        images: image root the rows' ``image`` paths are relative to.
        out: output directory (created; an earlier prepared dataset there is overwritten).
        tokens_per_stage: n distinct numbered tokens per stage (``<THINKING_OF_SUMMARY_1>..``); 1 (default) gives the
            single token ``<THINKING_OF_SUMMARY>``.
        retention_ratio: instead, ``n_k = max(1, floor(ratio * len(tokens(CoT_k))))`` per sample and stage, with
            numbered tokens (also for n_k = 1); ``len`` counts ``tokenizer`` ids without special tokens.
        drop_tags: replace the whole ``<SUMMARY>..</SUMMARY>`` span by the tokens instead of keeping the tags.
        tokenizer: needed with ``retention_ratio``: a tokenizer, a processor (its ``.tokenizer``) or a hub alias/path.
        stages: the CoT stages to replace, in order (default :data:`heima.config.STAGES`).
        progress: show a progress bar.

    Returns:
        The dataset and the report (``kept`` = records written; skipped rows and turns by reason).

    Raises:
        ValueError: bad options (``tokens_per_stage < 1``, a ratio outside (0, 1], a ratio without a tokenizer, a ratio
            together with ``tokens_per_stage != 1``, an unknown stage), or no usable sample at all.
        FileNotFoundError / latent_core.readers.DataFormatError: the data file is missing or not LLaVA-CoT.
    """
    stages = tuple(s.lower() for s in stages)
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise ValueError(f"stages must be a non-empty subset of {'/'.join(STAGES)}, got {list(stages)}")
    if tokens_per_stage < 1:
        raise ValueError(f"tokens_per_stage must be >= 1, got {tokens_per_stage}")
    if retention_ratio is not None:
        if not 0 < retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in (0, 1], got {retention_ratio}")
        if tokens_per_stage != 1:
            raise ValueError("give either tokens_per_stage or retention_ratio, not both (the ratio sets n per stage)")
        if tokenizer is None:
            raise ValueError(
                "retention_ratio needs a tokenizer to count the tokens of each CoT stage: pass tokenizer= (the "
                "tokenizer or processor of the model you will train, or its hub alias/path)"
            )
        tokenizer = _resolve_tokenizer(tokenizer)

    images_root = Path(images).resolve()
    report = ReadReport(str(data))
    records: list[dict[str, Any]] = []
    max_n = dict.fromkeys(stages, 0)

    with _progress(progress) as bar:
        task = bar.add_task(f"preparing {Path(data).name}", total=None)
        for row in read_llava_cot(data, images, report):
            conv = row["conversations"]
            pairs = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
            image = Path(row["image"]).relative_to(Path(images)).as_posix()  # the reader joined images / path
            for turn, (human, answer) in enumerate(pairs):
                rec_id = row["id"] if len(pairs) == 1 else f"{row['id']}#{turn}"
                parsed = parse_cot_stages(answer)
                missing = next((k for k in (*stages, "conclusion") if not parsed.get(k)), None)
                if missing is not None:
                    report.skip(f"missing_stage:{missing}", rec_id)
                    continue
                if retention_ratio is not None:
                    counts = {k: _retained(retention_ratio, _token_count(tokenizer, parsed[k])) for k in stages}
                    tokens = {k: [thinking_token(k, i) for i in range(1, counts[k] + 1)] for k in stages}
                else:
                    tokens = {k: thinking_tokens(k, tokens_per_stage) for k in stages}
                for k in stages:
                    max_n[k] = max(max_n[k], len(tokens[k]))
                answers = [
                    replace_stages(answer, {k: tokens[k] for k in stages[:s]}, drop_tags)
                    for s in range(len(stages) + 1)
                ]
                records.append(
                    {
                        "id": rec_id,
                        "turn": turn,
                        "image": image,
                        "images_root": str(images_root),
                        "question": human.replace("<image>", "").strip(),
                        "answers": answers,
                        "stage_texts": {k: parsed[k] for k in stages},
                        "conclusion": parsed["conclusion"],
                        "thinking_tokens": [tokens[k] for k in stages],
                    }
                )
                bar.advance(task)
    report.kept = len(records)
    if not records:
        raise ValueError(f"no usable sample in {data} (images under {images}):\n{report}")

    if retention_ratio is not None:
        all_tokens = [thinking_token(k, i) for k in stages for i in range(1, max_n[k] + 1)]
    else:
        all_tokens = [t for k in stages for t in thinking_tokens(k, tokens_per_stage)]

    dataset = datasets.Dataset.from_list(records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset.save_to_disk(str(out))
    meta = {
        "tokens": all_tokens,
        "options": {
            "data": str(Path(data).resolve()),
            "images": str(images_root),
            "stages": list(stages),
            "tokens_per_stage": tokens_per_stage,
            "retention_ratio": retention_ratio,
            "drop_tags": drop_tags,
            "tokenizer": (getattr(tokenizer, "name_or_path", None) or None) if tokenizer is not None else None,
        },
        "report": report.as_dict(),
        "num_stages": len(stages),
        "num_records": len(records),
        "tokens_per_stage_max": max_n,
    }
    (out / PREPARE_SUMMARY_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dataset, report


def load_prepared(out: str | Path) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The dataset and the ``heima_prepare.json`` summary written by :func:`prepare` in ``out``.

    Raises:
        FileNotFoundError: ``out`` holds no prepared dataset (run ``prepare`` first).
    """
    out = Path(out)
    summary = out / PREPARE_SUMMARY_NAME
    if not summary.is_file():
        raise FileNotFoundError(
            f"{out} is not a prepared Heima dataset (no {PREPARE_SUMMARY_NAME}): run heima.data.prepare "
            "(`heima prepare`) on the LLaVA-CoT data first"
        )
    meta = json.loads(summary.read_text(encoding="utf-8"))
    return datasets.load_from_disk(str(out)), meta


def samples_for_stage(
    dataset: datasets.Dataset | Sequence[dict[str, Any]],
    stage: int | str,
    one_shot: bool = False,
    images_root: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Training rows ``{"id", "prompt", "answer", "image"}`` of one stage (``latent_core.collate.SupervisedCollator``).

    ``prompt`` is the question, ``answer`` is ``answers[s]`` for progressive stage ``s`` (Eq. 5) and ``answers[K]`` for
    ``"recover"`` (Eq. 3), ``image`` the absolute image path (``images_root`` overrides the records' root, e.g. after
    moving the images). With ``one_shot`` (ablation "w/o progressive") only stage K and ``"recover"`` exist.

    Raises:
        ValueError: a stage outside ``0..K`` (or other than K / "recover" with ``one_shot``).
    """
    if len(dataset) == 0:
        return []
    k = len(dataset[0]["answers"]) - 1
    if str(stage) == RECOVER:
        index = k
    else:
        try:
            index = int(stage)
        except (TypeError, ValueError):
            raise ValueError(f"stage must be 0..{k} or {RECOVER!r}, got {stage!r}") from None
        if not 0 <= index <= k:
            raise ValueError(f"stage must be 0..{k} or {RECOVER!r} (the data has {k} CoT stages), got {stage!r}")
        if one_shot and index != k:
            raise ValueError(
                f"one_shot ('w/o progressive') trains only stage {k} (all stages replaced) and {RECOVER!r}, "
                f"got stage {index}"
            )
    override = Path(images_root).resolve() if images_root is not None else None
    rows = []
    for record in dataset:
        root = override if override is not None else Path(record["images_root"])
        rows.append(
            {
                "id": record["id"],
                "prompt": record["question"],
                "answer": record["answers"][index],
                "image": str(root / record["image"]),
            }
        )
    return rows
