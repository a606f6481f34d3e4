"""Thinking tokens and their hidden states on disk: one definition for Heima and its interpreters.

**Names** (METHODS.md §1 "Thinking tokens"): :data:`THINKING_STAGES` are the LLaVA-CoT stages a thinking token
replaces (every stage of :data:`latent_core.readers.COT_STAGES` but the conclusion). The token of a stage is
``<THINKING_OF_SUMMARY>`` (one token per stage, the default) or the numbered ``<THINKING_OF_SUMMARY_1>``.. when a
stage has several; :func:`thinking_token` writes them, :func:`parse_thinking_token` reads them back (upper-case
stage names only: the tokens are always written upper-case).

**States on disk** (the one format of ``heima generate --capture`` and ``interpreters capture``; ``interpreters
decode`` reads either). A directory with

- ``shard-00000.safetensors``, ... : float tensors ``[d]`` keyed ``"<id>/<token>"`` (``"<id>/<token>#2"``, ... when a
  sample generated the same thinking token again);
- ``index.jsonl``: one line per state, in order: ``id``, ``stage``, ``token``, ``question``, ``position`` (the column
  of the recorded state), ``mode`` (``"predictor"``: the state at t-1 that predicts the token; ``"token"``: the state
  at the token), ``file``, ``key``; optional ``target`` (the stage's original text: teacher-forced captures have it,
  states recorded while a deployed model answered do not), ``image`` (the sample's image path) and anything else
  the writer adds.

Shards are written atomically (a temporary file renamed) and only then are their index lines appended in one
flushed write, so a killed writer leaves a readable directory: :func:`read_index` drops a torn last line, and
:func:`indexed_files` tells a resuming writer which shards are done.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from latent_core.readers import COT_STAGES
from latent_core.shards import INDEX_NAME, append_shard, read_index, shard_name

__all__ = [
    "STATES_INDEX_NAME",
    "THINKING_STAGES",
    "indexed_files",
    "load_states",
    "parse_thinking_token",
    "read_index",
    "shard_name",
    "stage_of_token",
    "thinking_token",
    "thinking_tokens",
    "write_states_shard",
]

THINKING_STAGES: tuple[str, ...] = tuple(s for s in COT_STAGES if s != "conclusion")
"""The CoT stages a thinking token replaces, in answer order (summary, caption, reasoning; METHODS.md §1)."""

STATES_INDEX_NAME = INDEX_NAME
"""The index file of a states directory."""

_TOKEN = re.compile(r"<THINKING_OF_([A-Z][A-Z0-9]*?)(?:_(\d+))?>")


def thinking_token(stage: str, i: int | None = None) -> str:
    """The thinking token of ``stage``: ``<THINKING_OF_SUMMARY>``, or the ``i``-th (1-based) numbered one
    ``<THINKING_OF_SUMMARY_1>``.. when a stage has several (METHODS.md §1)."""
    name = stage.upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9]*", name):
        raise ValueError(f"a stage name is letters and digits starting with a letter, got {stage!r}")
    if i is None:
        return f"<THINKING_OF_{name}>"
    if i < 1:
        raise ValueError(f"thinking token index must be >= 1 (1-based), got {i}")
    return f"<THINKING_OF_{name}_{i}>"


def thinking_tokens(stage: str, n: int) -> list[str]:
    """The ``n`` thinking tokens of ``stage``: ``[<THINKING_OF_X>]`` for ``n == 1``, else the numbered
    ``<THINKING_OF_X_1>..<THINKING_OF_X_n>`` (the ablations' "n tokens per stage", METHODS.md §1)."""
    if n < 1:
        raise ValueError(f"a stage needs at least one thinking token, got n={n}")
    if n == 1:
        return [thinking_token(stage)]
    return [thinking_token(stage, i) for i in range(1, n + 1)]


def parse_thinking_token(token: str) -> tuple[str, int | None] | None:
    """``"<THINKING_OF_SUMMARY_2>"`` -> ``("summary", 2)``, ``"<THINKING_OF_CAPTION>"`` -> ``("caption", None)``;
    ``None`` for anything else (other tokens, lower-case names)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    return match.group(1).lower(), int(match.group(2)) if match.group(2) else None


def stage_of_token(token: str) -> str:
    """The stage a thinking token stands for: ``"<THINKING_OF_SUMMARY_2>"`` -> ``"summary"``.

    Raises:
        ValueError: ``token`` is not a thinking token.
    """
    parsed = parse_thinking_token(token)
    if parsed is None:
        raise ValueError(f"{token!r} is not a thinking token (<THINKING_OF_STAGE> or <THINKING_OF_STAGE_i>)")
    return parsed[0]


# ---------------------------------------------------------------------------------------------------------------
# States on disk
# ---------------------------------------------------------------------------------------------------------------


def indexed_files(directory: str | Path) -> set[str]:
    """Shard files the index names: the shards a resuming writer skips."""
    return {e["file"] for e in read_index(directory)}


def write_states_shard(directory: str | Path, j: int, entries: Sequence[dict[str, Any]], tensors: Iterable[Any]) -> str:
    """Write shard ``j``: ``entries[i]``'s state is ``tensors[i]``; each entry gets ``file`` and a unique ``key``
    (``"<id>/<token>"``, ``#2``.. on repeats). The shard is renamed into place, then the index lines are appended in
    one flushed write. Returns the shard's file name.

    Raises:
        ValueError: an entry lacks ``id``, ``stage``, ``token``, ``question``, ``position`` or ``mode``, or the
            counts of entries and tensors differ.
    """
    import torch

    tensors = list(tensors)
    if len(tensors) != len(entries):
        raise ValueError(f"{len(entries)} index entries but {len(tensors)} states")
    shard: dict[str, torch.Tensor] = {}
    lines = []
    for entry, tensor in zip(entries, tensors, strict=True):
        missing = [k for k in ("id", "stage", "token", "question", "position", "mode") if k not in entry]
        if missing:
            raise ValueError(f"a state's index entry lacks {', '.join(missing)}: {entry}")
        base = f"{entry['id']}/{entry['token']}"
        key, n = base, 1
        while key in shard:
            n += 1
            key = f"{base}#{n}"
        shard[key] = torch.as_tensor(tensor).detach().to("cpu", torch.float32).contiguous()
        lines.append({**entry, "id": str(entry["id"]), "key": key})
    return append_shard(directory, j, shard, lines)


def load_states(directory: str | Path, stages: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The states of a directory in index order, optionally only those of ``stages``: each index line with its
    tensor under ``"hidden"`` and ``target`` (``None`` when the writer had no reference text).

    Raises:
        FileNotFoundError: no index (the message says which commands write one), or a shard it names is missing.
        ValueError: a shard is unreadable (:class:`latent_core.hub.CheckpointError`) or lacks a key the index names
            (the messages name the file).
    """
    from latent_core.hub import load_tensors

    directory = Path(directory)
    if not (directory / STATES_INDEX_NAME).is_file():
        raise FileNotFoundError(
            f"{directory} has no {STATES_INDEX_NAME}: write one with `interpreters capture` (teacher-forced) or "
            "`heima generate --capture` (while answering)"
        )
    wanted = set(stages) if stages is not None else None
    rows, shards = [], {}
    for entry in read_index(directory, repair=False):
        if wanted is not None and entry.get("stage") not in wanted:
            continue
        file = entry["file"]
        if file not in shards:
            path = directory / file
            if not path.is_file():
                raise FileNotFoundError(f"{path} is named in {directory / STATES_INDEX_NAME} but missing")
            shards[file] = load_tensors(path)
        if entry["key"] not in shards[file]:
            raise ValueError(f"{directory / file} has no tensor {entry['key']!r} named in its index")
        rows.append({"target": None, **entry, "hidden": shards[file][entry["key"]]})
    return rows
