"""Capture the thinking-token hidden states of a frozen Heima, teacher-forced on the fully replaced answers.

METHODS.md §1 "Interpreters": for every prepared record the Heima stage model (``latent_core.inference.load_trained``:
a stage output or an exported checkpoint) runs one forward over the chat-templated question + ``answers[K]`` (the
answer with every CoT stage replaced by its thinking tokens; batches built by ``latent_core.collate
.SupervisedCollator``, image included) inside ``latent_core.capture.capture_hidden_states`` at the final norm. Which
position is a choice: ``position="predictor"`` (default, as the authors released) keeps the state at t-1 that
*predicts* the thinking token at t; ``position="token"`` keeps the state at the thinking token t (the paper's text).

Output: the one states format of :mod:`latent_core.thinking` (``heima generate --capture`` writes it too):
``shard-00000.safetensors``, ... (tensor key ``"<id>/<token>"``, a float32 ``[d]``), ``index.jsonl`` (one line per
state: ``id, stage, token, question, target`` = the stage's original text, ``position`` = the captured column,
``mode``, ``image``, ``file``, ``key``), plus ``capture.json`` (options and counts).

Resumable after a kill: shard ``j`` always holds records ``[j * shard_size, (j + 1) * shard_size)`` in dataset
order, batched from its own first record, so its bytes do not depend on earlier runs. A shard is written to a
temporary file and renamed, and only then are its index lines appended (one write, flushed); a resumed run skips the
shards the index names and rewrites any other (a shard renamed but not yet indexed is rewritten identically).
Records without an expected state (e.g. a thinking token truncated away) are counted in ``capture.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from latent_core.capture import capture_hidden_states, select_predictors, select_tokens
from latent_core.collate import SupervisedCollator
from latent_core.families import VISION_FAMILIES  # Heima's families (heima.config.SUPPORTED_FAMILIES)
from latent_core.thinking import (
    STATES_INDEX_NAME,
    indexed_files,
    parse_thinking_token,
    read_index,
    shard_name,
    write_states_shard,
)
from tqdm.auto import tqdm

__all__ = ["CAPTURE_SUMMARY_NAME", "INDEX_NAME", "capture", "shard_name"]  # shard_name: latent_core.thinking

INDEX_NAME = STATES_INDEX_NAME
CAPTURE_SUMMARY_NAME = "capture.json"
PREPARE_SUMMARY_NAME = "heima_prepare.json"  # heima's prepared-data summary (read as a data file)
_RESUME_KEYS = ("heima", "prepared", "position", "shard_size")


def _load_prepared(prepared_dir: Path) -> tuple[Any, dict[str, Any]]:
    import datasets

    meta_path = prepared_dir / PREPARE_SUMMARY_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{prepared_dir} has no {PREPARE_SUMMARY_NAME}: pass the directory `heima prepare` wrote"
        )
    return datasets.load_from_disk(str(prepared_dir)), json.loads(meta_path.read_text())


def _image_path(record: dict[str, Any]) -> str | None:
    image = record.get("image")
    return str(Path(record.get("images_root") or ".") / image) if image else None


def _row(record: dict[str, Any]) -> dict[str, Any]:
    answer = record["answers"][-1]
    return {"id": record["id"], "prompt": record["question"], "answer": answer, "image": _image_path(record)}


def _capture_shard(
    model: Any,
    collator: SupervisedCollator,
    records: list[dict[str, Any]],
    thinking: dict[int, str],
    position: str,
    batch_size: int,
    problems: Counter,
    bar: Any,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The states and index entries of one shard's records."""
    device = next(model.parameters()).device
    select = (select_predictors if position == "predictor" else select_tokens)(sorted(thinking))
    tensors: list[torch.Tensor] = []
    entries: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        batch_records = records[start : start + batch_size]
        batch = collator([_row(r) for r in batch_records])
        batch.pop("labels")
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode(), capture_hidden_states(model, select, device="cpu") as recorder:
            model(**batch)
        for b, record in enumerate(batch_records):
            expected = [t for tokens in record["thinking_tokens"] for t in tokens]
            seen = set()
            for state, column, token_id in zip(
                recorder.states[b], recorder.positions[b], recorder.token_ids[b], strict=True
            ):
                token = thinking[int(token_id)]
                parsed = parse_thinking_token(token)
                stage = parsed[0] if parsed else None
                if stage is None or stage not in record["stage_texts"]:
                    problems["unknown_stage"] += 1
                    continue
                if token in seen:
                    problems["duplicate_token"] += 1
                    continue
                seen.add(token)
                tensors.append(state.float())
                entry = {
                    "id": str(record["id"]),
                    "stage": stage,
                    "token": token,
                    "question": record["question"],
                    "target": record["stage_texts"][stage],
                    "position": int(column),
                    "mode": position,
                }
                if _image_path(record) is not None:
                    entry["image"] = _image_path(record)
                entries.append(entry)
            problems["missing_state"] += sum(t not in seen for t in expected)
        bar.update(len(batch_records))
    return tensors, entries


def capture(
    heima_dir: str | Path,
    prepared_dir: str | Path,
    out: str | Path,
    position: Literal["predictor", "token"] = "predictor",
    batch_size: int = 8,
    shard_size: int = 256,
    *,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Capture every thinking token's hidden state (see the module docstring); returns the ``capture.json`` summary.

    Args:
        heima_dir: a trained Heima stage directory (e.g. ``runs/heima/recover``) or an exported checkpoint.
        prepared_dir: ``heima prepare``'s output (``datasets.save_to_disk`` + ``heima_prepare.json``).
        out: output directory; an existing capture there is resumed (same options required).
        position: ``"predictor"`` (t-1, default, as released) or ``"token"`` (t).
        batch_size: records per forward.
        shard_size: records per shard (fixed: it defines the shards, keep it when resuming).
        base_model, dtype, device: passed to ``latent_core.inference.load_trained``.
        limit: capture only the first ``limit`` records.

    Raises:
        ValueError: a bad option, or ``out`` holds a capture made with other options.
    """
    from latent_core.inference import load_trained

    if position not in ("predictor", "token"):
        raise ValueError(f"position must be 'predictor' (state at t-1, default) or 'token' (at t), got {position!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    heima_dir, prepared_dir, out = Path(heima_dir), Path(prepared_dir), Path(out)
    dataset, meta = _load_prepared(prepared_dir)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    options = {
        "heima": str(heima_dir),
        "prepared": str(prepared_dir),
        "position": position,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "records": n,
    }
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / CAPTURE_SUMMARY_NAME
    if summary_path.is_file():
        previous = json.loads(summary_path.read_text()).get("options", {})
        changed = [k for k in _RESUME_KEYS if k in previous and previous[k] != options[k]]
        if changed:
            raise ValueError(
                f"{out} holds a capture made with other options ({', '.join(f'{k}={previous[k]!r}' for k in changed)}):"
                " resume with the same options or write to a new directory"
            )
    summary_path.write_text(json.dumps({"options": options, "complete": False}, indent=2) + "\n")
    done = indexed_files(out)

    model, processor = load_trained(
        heima_dir, base_model, dtype=dtype, device=device, default_tokens=lambda _: list(meta.get("tokens", [])),
        families=VISION_FAMILIES, method="interpreters capture (the Heima model)",
    )  # fmt: skip
    tokenizer = getattr(processor, "tokenizer", processor)
    tokens = list(meta.get("tokens", []))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unknown = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if not tokens or unknown:
        raise ValueError(
            f"the Heima model's tokenizer lacks the thinking tokens {unknown or tokens} of {prepared_dir}: "
            "capture with the Heima stage trained on this prepared data"
        )
    thinking = dict(zip((int(i) for i in ids), tokens, strict=True))
    collator = SupervisedCollator(processor)

    started = time.perf_counter()
    problems: Counter = Counter()
    shards = list(range(0, n, shard_size))
    resumed = 0
    bar = tqdm(total=n, desc="capture", disable=not show_progress)
    for j, first in enumerate(shards):
        name = shard_name(j)
        last = min(first + shard_size, n)
        if name in done:
            resumed += 1
            bar.update(last - first)
            continue
        records = [dataset[i] for i in range(first, last)]
        tensors, entries = _capture_shard(model, collator, records, thinking, position, batch_size, problems, bar)
        write_states_shard(out, j, entries, tensors)
    bar.close()

    entries = read_index(out)
    hidden_size = int(model.config.get_text_config().hidden_size)
    summary = {
        "options": options,
        "complete": True,
        "tokens": tokens,
        "hidden_size": hidden_size,
        "shards": len(shards),
        "resumed_shards": resumed,
        "states": len(entries),
        "states_per_stage": dict(Counter(e["stage"] for e in entries)),
        "problems": dict(problems),
        "problems_note": "counts of this run only (resumed shards were counted when they were written)",
        "seconds": time.perf_counter() - started,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
