"""``interpreters score``: Table A5 of Heima (paper 000) plus judge means, for the real hidden states and controls.

Input: ``decoded.jsonl`` lines ``{"id", "stage", "question", "target", "prediction", "condition", "image"}`` with
condition ``real`` (the captured thinking-token state), ``zero`` or ``shuffled`` (the controls). For every stage and
condition each metric is computed over that group's pairs; the **gap** ``real - control`` of every metric is the
information the thinking token carries beyond what the interpreter guesses from the question alone.

``"image"`` is the path of the sample's image (absolute, or relative to the judge's ``image_root`` or else the
working directory); the metrics ignore it, the LLM judge is shown it (Appendix C, Algorithm 1; see
:mod:`interpreters.judge`). Records whose ``target`` is missing or ``null`` (states captured at inference time have
no reference text) are neither scored nor judged: they are counted in ``skipped`` under
"no target (inference-time states)", like every other unusable line (malformed JSON, missing keys, unknown stage
or condition).

Writes ``scores.json`` (machine-readable) and ``scores.md`` (the table), and ``judge.jsonl`` when a judge is set.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from interpreters import metrics as _m
from interpreters.config import CONDITIONS, STAGES
from interpreters.judge import JudgeResult

__all__ = ["CONTROLS", "METRICS", "NO_TARGET", "read_decoded", "score", "write_markdown"]

logger = logging.getLogger(__name__)

#: The conditions the real hidden state is compared against (the gaps ``real - control``).
CONTROLS = tuple(c for c in CONDITIONS if c != "real")
#: metric name -> (column title of Table A5, 0-100 scale)
METRICS = {"bleu": "BLEU-4", "meteor": "METEOR", "rouge": "ROUGE-L", "bertscore": "BERTScore F1"}
_REQUIRED = ("stage", "prediction", "condition")
#: The ``skipped`` reason of records without a reference text.
NO_TARGET = "no target (inference-time states)"

#: A judge: takes pair dicts (stage, prediction, target, question, image) and returns one JudgeResult each, e.g.
#: ``functools.partial(judge_many, client=make_client(), config=JudgeConfig(model=...), image_root=...)``.
Judge = Callable[[list[dict]], list[JudgeResult]]


def read_decoded(path: Path) -> tuple[dict[tuple[str, str], list[dict]], Counter]:
    """Group ``decoded.jsonl`` records by (stage, condition); unusable lines are counted by reason, not scored.

    Reasons: malformed JSON, a line that is not a JSON object, missing keys, no target (:data:`NO_TARGET`: a
    missing or ``null`` ``target``), unknown stage or condition.
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    skipped: Counter = Counter()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["malformed JSON line"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not a JSON object"] += 1
                continue
            missing = [k for k in _REQUIRED if k not in record]
            if missing:
                skipped[f"missing {','.join(missing)}"] += 1
            elif record.get("target") is None:
                skipped[NO_TARGET] += 1
            elif record["stage"] not in STAGES:
                skipped[f"unknown stage {record['stage']!r}"] += 1
            elif record["condition"] not in CONDITIONS:
                skipped[f"unknown condition {record['condition']!r}"] += 1
            else:
                groups.setdefault((record["stage"], record["condition"]), []).append(record)
    for reason, count in skipped.items():
        logger.warning("%s: %d records not scored (%s)", path, count, reason)
    return groups, skipped


def _metric(name: str, preds: list[str], refs: list[str], bertscore_model: str | Path, num_layers: int | None):
    if name == "bleu":
        return _m.bleu4(preds, refs)
    if name == "meteor":
        return _m.meteor(preds, refs)
    if name == "rouge":
        return _m.rouge_l(preds, refs)
    if name == "bertscore":
        return _m.bert_score_f1(preds, refs, model=bertscore_model, num_layers=num_layers)
    raise ValueError(f"unknown metric {name!r}: choose from {sorted(METRICS)}")


def score(
    decoded_jsonl: Path,
    out: Path,
    metrics: Sequence[str] = ("bleu", "meteor", "rouge", "bertscore"),
    bertscore_model: str | Path = _m.DEFAULT_BERTSCORE_MODEL,
    bertscore_num_layers: int | None = None,
    judge: Judge | None = None,
) -> dict:
    """Score every (stage, condition) group of ``decoded_jsonl``; write ``scores.json``/``scores.md`` into ``out``.

    Returns the ``scores.json`` content: ``scores[stage][condition][metric]`` (0-100; ``judge_mean`` 1-5 over the
    scored calls, ``judge_failed`` the failed ones), ``gap[stage][control][metric] = real - control``, and counts.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {sorted(METRICS)}")
    if "meteor" in metrics:
        _m.ensure_wordnet()  # fail before any slow work, with instructions
    decoded_jsonl, out = Path(decoded_jsonl), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups, skipped = read_decoded(decoded_jsonl)
    if not groups:
        hint = (
            ": records without a target (states captured at inference time) cannot be scored; decode states captured "
            "from a dataset with reference CoT stages"
            if NO_TARGET in skipped
            else ""
        )
        raise ValueError(f"{decoded_jsonl} has no scorable records (skipped: {dict(skipped)}){hint}")

    scores: dict[str, dict[str, dict[str, float | int | None]]] = {}
    judged_lines = []
    for stage in STAGES:
        for condition in CONDITIONS:
            records = groups.get((stage, condition))
            if not records:
                continue
            preds = [r["prediction"] for r in records]
            refs = [r["target"] for r in records]
            row: dict[str, float | int | None] = {"n": len(records)}
            for name in metrics:
                row[name] = _metric(name, preds, refs, bertscore_model, bertscore_num_layers)
            if judge is not None:
                results = judge([{**r, "question": r.get("question", "")} for r in records])
                ok = [res.score for res in results if not res.failed]
                row["judge_mean"] = sum(ok) / len(ok) if ok else None
                row["judge_scored"] = len(ok)
                row["judge_failed"] = sum(res.failed for res in results)
                for record, res in zip(records, results, strict=True):
                    judged_lines.append(
                        {"id": record.get("id"), "stage": stage, "condition": condition, **res.to_dict()}
                    )
            scores.setdefault(stage, {})[condition] = row

    value_keys = list(metrics) + (["judge_mean"] if judge is not None else [])
    gap: dict[str, dict[str, dict[str, float | None]]] = {}
    for stage, by_condition in scores.items():
        real = by_condition.get("real")
        for control in CONTROLS:
            if real is None or control not in by_condition:
                continue
            gap.setdefault(stage, {})[control] = {
                key: (
                    None
                    if real.get(key) is None or by_condition[control].get(key) is None
                    else real[key] - by_condition[control][key]
                )
                for key in value_keys
            }

    result = {
        "decoded": str(decoded_jsonl),
        "metrics": list(metrics),
        "bertscore_model": str(bertscore_model) if "bertscore" in metrics else None,
        "bertscore_num_layers": bertscore_num_layers if "bertscore" in metrics else None,
        "judge": judge is not None,
        "scores": scores,
        "gap": gap,
        "skipped": dict(skipped),
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "scores.md").write_text(write_markdown(result), encoding="utf-8")
    if judge is not None:
        with open(out / "judge.jsonl", "w", encoding="utf-8") as fh:
            for line in judged_lines:
                fh.write(json.dumps(line) + "\n")
    return result


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def write_markdown(result: dict) -> str:
    """The table of ``scores.json`` shaped like Table A5: rows = stages, one block per condition and per gap."""
    keys = list(result["metrics"]) + (["judge_mean"] if result["judge"] else [])
    titles = [METRICS[k] for k in result["metrics"]] + (["Judge mean (1-5)"] if result["judge"] else [])
    header = "| Stage | n | " + " | ".join(titles) + (" | Judge failed |" if result["judge"] else " |")
    rule = "|" + "---|" * (header.count("|") - 1)
    lines = [f"# Interpreter scores ({result['decoded']})", ""]
    if result.get("bertscore_model"):
        lines += [f"BERTScore model: `{result['bertscore_model']}` (layer {result['bertscore_num_layers']}).", ""]
    blocks = [(f"Condition: {c}", c, None) for c in CONDITIONS] + [(f"Gap: real - {c}", None, c) for c in CONTROLS]
    for title, condition, control in blocks:
        rows = []
        for stage in STAGES:
            if condition is not None:
                row = result["scores"].get(stage, {}).get(condition)
                if row is None:
                    continue
                cells = [_fmt(row.get(k)) for k in keys]
                extra = [str(row.get("judge_failed", 0))] if result["judge"] else []
                rows.append(f"| {stage} | {row['n']} | " + " | ".join(cells + extra) + " |")
            else:
                row = result["gap"].get(stage, {}).get(control)
                if row is None:
                    continue
                cells = [_fmt(row.get(k), signed=True) for k in keys]
                extra = [""] if result["judge"] else []
                rows.append(f"| {stage} | | " + " | ".join(cells + extra) + " |")
        if rows:
            lines += [f"## {title}", "", header, rule, *rows, ""]
    if result.get("skipped"):
        lines += ["Records not scored: " + ", ".join(f"{k}: {v}" for k, v in result["skipped"].items()), ""]
    return "\n".join(lines)
