"""Tensors on disk for long jobs: safetensors shards plus one ``index.jsonl``, written so a kill loses nothing.

A directory holds ``shard-00000.safetensors``, ... and ``index.jsonl`` (one JSON line per record, naming its shard
``file`` and its tensor keys). :func:`append_shard` writes a shard to a temporary file, renames it into place, then
appends its index lines in one flushed write; :func:`read_index` drops a torn last line (a kill during the append),
so a resuming writer sees exactly the records whose shard is complete and redoes the rest. Used by the thinking
states (``latent_core.thinking``) and LaViT's teacher data (``lavit.build``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["INDEX_NAME", "append_shard", "read_index", "shard_name"]

INDEX_NAME = "index.jsonl"


def shard_name(j: int) -> str:
    """File name of shard ``j``."""
    return f"shard-{j:05d}.safetensors"


def read_index(directory: str | Path, *, repair: bool = True) -> list[dict[str, Any]]:
    """The index lines of ``directory`` (``[]`` when there is no index). A torn last line (a kill during the
    append) is dropped, and with ``repair`` the file is rewritten without it.

    Raises:
        ValueError: a line before the last is not JSON (a corrupted index, not a kill: the message names it).
    """
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return []
    entries, torn = [], False
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith("\n"):
                raise ValueError("incomplete line")
            entries.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON line: the index is corrupted") from None
            torn = True
    if torn and repair:
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    return entries


def append_shard(directory: str | Path, j: int, tensors: Mapping[str, Any], lines: Sequence[dict[str, Any]]) -> str:
    """Write shard ``j`` holding ``tensors`` (keys sorted, so equal inputs give equal bytes), rename it into place,
    then append ``lines`` to the index (each gets ``"file"``) in one flushed write. Returns the shard's name."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = shard_name(j)
    tmp = directory / (name + ".tmp")
    save_file(dict(sorted(tensors.items())), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / name)
    with open(directory / INDEX_NAME, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps({**line, "file": name}, ensure_ascii=False) + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    return name
