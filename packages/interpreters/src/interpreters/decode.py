"""Decode captured hidden states to text with a trained interpreter, under the real and the control conditions.

Greedy (``do_sample=False``, one beam), batched with left padding. For every stage and condition (``real``: the
captured state; ``zero``: a zero vector; ``shuffled``: another sample's state of the same stage, a fixed seeded
derangement, :func:`interpreters.model.apply_condition`) each sample's prediction is written to ``decoded.jsonl``:
``{"id", "stage", "token", "question", "target", "prediction", "condition", "image"}``, plus a ``decode.json``
summary. The states come from ``interpreters capture`` (teacher-forced, with the reference ``target``) or from
``heima generate --capture`` (recorded while Heima answered: ``target`` is ``null``; that is the paper's use case,
explaining what the model thought at inference time). ``image`` is the sample's image path when the capture has it
(the judge of Appendix C shows it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from interpreters.config import CONDITIONS, STAGES, UNIFIED
from interpreters.data import load_captures, prompt_batch
from interpreters.model import InterpreterModel, apply_condition, load_interpreter

__all__ = ["DECODED_NAME", "DECODE_SUMMARY_NAME", "decode", "interpreter_for"]

DECODED_NAME = "decoded.jsonl"
DECODE_SUMMARY_NAME = "decode.json"


def interpreter_for(directory: str | Path, stage: str) -> Path:
    """The interpreter directory for ``stage``: ``directory`` itself when it is one, else ``directory/<stage>``, else
    ``directory/unified``."""
    directory = Path(directory)
    for candidate in (directory, directory / stage, directory / UNIFIED):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no interpreter for stage {stage!r} in {directory} (looked for an adapter in it, in {stage}/ and {UNIFIED}/): "
        f"run `interpreters train --stage {stage}` first"
    )


@torch.no_grad()
def _generate(
    model: InterpreterModel, tokenizer: Any, rows: list[dict], hidden: torch.Tensor, batch_size: int, max_new: int
) -> list[str]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    predictions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = prompt_batch(tokenizer, [r["question"] for r in batch], model.template, model.placeholder)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model.generate(
            inputs["input_ids"],
            hidden[start : start + batch_size].to(device),
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        predictions += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return predictions


def decode(
    interpreter: str | Path | InterpreterModel,
    capture_dir: str | Path,
    out: str | Path,
    stages: Sequence[str] = STAGES,
    conditions: Sequence[str] = CONDITIONS,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    *,
    tokenizer: Any = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Decode every captured state of ``stages`` under every condition; returns the path of ``decoded.jsonl``.

    Args:
        interpreter: a trained interpreter directory, a run directory with ``<stage>/`` or ``unified/`` interpreters,
            or an :class:`InterpreterModel` (then ``tokenizer`` is required).
        capture_dir: the output of :func:`interpreters.capture.capture`.
        out: output directory (created).
        stages, conditions: what to decode (conditions from :data:`interpreters.config.CONDITIONS`).
        batch_size, max_new_tokens: generation batch and budget.
        seed: seed of the ``shuffled`` permutation.
    """
    for condition in conditions:
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
    if isinstance(interpreter, InterpreterModel) and tokenizer is None:
        raise ValueError("decoding with an InterpreterModel object needs its tokenizer= as well")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded: dict[Path, tuple[InterpreterModel, Any]] = {}
    lines, counts, sources = [], {}, {}
    todo = [(s, c) for s in stages for c in conditions]
    bar = tqdm(total=len(todo), desc="decode", disable=not show_progress)
    for stage in stages:
        rows = load_captures(capture_dir, [stage])
        if not rows:
            counts[stage] = 0
            bar.update(len(conditions))
            continue
        if isinstance(interpreter, InterpreterModel):
            model, tok = interpreter.eval(), tokenizer
            sources[stage] = "<model>"
        else:
            path = interpreter_for(interpreter, stage)
            if path not in loaded:
                loaded[path] = load_interpreter(path)
            model, tok = loaded[path]
            sources[stage] = str(path)
        hidden = torch.stack([r["hidden"].float() for r in rows])
        counts[stage] = len(rows)
        for condition in conditions:
            fed = apply_condition(hidden, condition, seed)
            predictions = _generate(model, tok, rows, fed, batch_size, max_new_tokens)
            for row, prediction in zip(rows, predictions, strict=True):
                line = {
                    "id": row["id"],
                    "stage": stage,
                    "token": row.get("token"),
                    "question": row["question"],
                    "target": row.get("target"),
                    "prediction": prediction,
                    "condition": condition,
                }
                if row.get("image") is not None:
                    line["image"] = row["image"]
                lines.append(line)
            bar.update(1)
    bar.close()
    path = out / DECODED_NAME
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    summary = {
        "interpreter": sources,
        "capture": str(capture_dir),
        "stages": list(stages),
        "conditions": list(conditions),
        "samples": counts,
        "lines": len(lines),
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    (out / DECODE_SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return path
