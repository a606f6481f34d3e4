"""Decontamination of LaRe's reasoning data (METHODS.md section 3: Vision-R1-cold for stage IV).

Two filters, each reported per removed row with its reason and evidence:

1. **exact question-answer matches** with the benchmarks' *training* splits (the paper: AI2D and ScienceQA): a
   reasoning row whose normalised question and answer (:func:`qa_key`: case, punctuation, whitespace and articles
   ignored; a benchmark's option letter resolved to its option text) equal a benchmark row's is dropped;
2. **near-duplicate images** of any benchmark *test* image: cosine >= ``threshold`` (lost from the paper:
   **choice**, default 0.95) between CLIP ViT-L/14 image embeddings (the pooled, projected CLIP image features,
   L2-normalised).

Embeddings are computed in batches and kept in a resumable cache (:class:`EmbeddingCache`: safetensors shards and
an index of the ids they hold; a killed run keeps every finished shard and recomputes only the rest). The
nearest-neighbour search (:func:`nearest`) multiplies blocks of reasoning embeddings with the whole test matrix, so
memory is ``block x n_test`` (250k x 20k images at d = 768 runs in blocks of 4096: 330 MB of scores at a time).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["EmbeddingCache", "clip_embedder", "decontaminate", "nearest", "qa_key"]

_ARTICLES = {"a", "an", "the"}


def qa_key(question: str, answer: str) -> str:
    """The normalised (question, answer) pair two rows are compared by: lower case, ``<image>`` and punctuation
    removed, articles dropped, whitespace collapsed."""

    def norm(text: str) -> str:
        text = str(text).replace("<image>", " ").lower()
        text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
        return " ".join(w for w in text.split() if w not in _ARTICLES)

    return f"{norm(question)}\x1f{norm(answer)}"


def benchmark_keys(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``qa_key -> benchmark row id`` for benchmark rows (VLMEvalKit records: a letter answer is resolved to its
    option text, so "B" and "blue" meet)."""
    keys = {}
    for row in rows:
        answer = str(row.get("answer") or "")
        options = row.get("options") or {}
        answer = options.get(answer.strip(), answer)
        keys.setdefault(qa_key(row["question"], answer), str(row["id"]))
    return keys


class EmbeddingCache:
    """Embeddings by id in ``directory``: ``shard-XXXXX.safetensors`` (one tensor ``embeddings [n, d]``) and
    ``index.jsonl`` (one line per shard: its file and ids, written after the shard, so a killed run never lists a
    shard it did not finish)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index = self.directory / "index.jsonl"
        self.shards: list[tuple[str, list[str]]] = []
        if self.index.is_file():
            for line in self.index.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: its shard is recomputed
                    continue
                if (self.directory / entry["file"]).is_file():
                    self.shards.append((entry["file"], list(entry["ids"])))

    def ids(self) -> set[str]:
        return {i for _, ids in self.shards for i in ids}

    def add(self, ids: Sequence[str], embeddings: Tensor) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"embeddings": embeddings.detach().float().contiguous().cpu()}, str(self.directory / name))
        with self.index.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"file": name, "ids": list(ids)}) + "\n")
        self.shards.append((name, list(ids)))

    def load(self, ids: Sequence[str]) -> Tensor:
        """``[len(ids), d]`` in the order of ``ids`` (each must be cached)."""
        from latent_core.hub import load_tensors

        rows: dict[str, Tensor] = {}
        wanted = set(ids)
        for name, shard_ids in self.shards:
            if wanted.isdisjoint(shard_ids):
                continue
            block = load_tensors(self.directory / name)["embeddings"]
            rows.update((i, block[k]) for k, i in enumerate(shard_ids) if i in wanted)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise KeyError(f"{len(missing)} ids are not in the embedding cache {self.directory}, e.g. {missing[:3]}")
        return torch.stack([rows[i] for i in ids]) if ids else torch.zeros(0, 0)

    def fill(
        self,
        items: Iterable[tuple[str, Any]],
        embed: Callable[[list[Any]], Tensor],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Embed the ``(id, image)`` items not cached yet, ``batch_size`` at a time, one shard per batch; returns
        how many were computed. ``image`` may be a path or a PIL image (opened only when needed)."""
        done = self.ids()
        batch: list[tuple[str, Any]] = []
        computed = 0
        for item_id, image in items:
            if item_id in done:
                continue
            done.add(item_id)
            batch.append((item_id, image))
            if len(batch) == batch_size:
                computed += self._flush(batch, embed, progress)
        if batch:
            computed += self._flush(batch, embed, progress)
        return computed

    def _flush(self, batch: list[tuple[str, Any]], embed: Callable[[list[Any]], Tensor], progress) -> int:
        from PIL import Image

        images = []
        for _, image in batch:
            if isinstance(image, str | Path):
                with Image.open(image) as handle:
                    image = handle.convert("RGB")
            images.append(image.convert("RGB"))
        self.add([i for i, _ in batch], embed(images))
        n = len(batch)
        batch.clear()
        if progress is not None:
            progress(n)
        return n


def clip_embedder(vision: str = "clip-vit-l-14", device: str | None = None) -> Callable[[list[Any]], Tensor]:
    """``images -> [n, d]`` L2-normalised CLIP image embeddings (``CLIPVisionModelWithProjection``: the pooled,
    projected features CLIP compares images with), from an alias, Hub id or path."""
    from latent_core.hub import load_pretrained
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(CLIPVisionModelWithProjection.from_pretrained, vision).to(device).eval()
    processor = load_pretrained(CLIPImageProcessor.from_pretrained, vision)

    @torch.no_grad()
    def embed(images: list[Any]) -> Tensor:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        return torch.nn.functional.normalize(model(pixel_values=pixels).image_embeds.float(), dim=-1).cpu()

    return embed


def nearest(queries: Tensor, keys: Tensor, block: int = 4096) -> tuple[Tensor, Tensor]:
    """For each row of ``queries [n, d]`` the largest cosine with any row of ``keys [m, d]`` and that row's index,
    computed ``block`` queries at a time (both sides L2-normalised here)."""
    if keys.shape[0] == 0:
        return torch.full((queries.shape[0],), float("-inf")), torch.full((queries.shape[0],), -1)
    keys = torch.nn.functional.normalize(keys.float(), dim=-1)
    best, where = [], []
    for start in range(0, queries.shape[0], block):
        chunk = torch.nn.functional.normalize(queries[start : start + block].float(), dim=-1)
        value, index = (chunk @ keys.T).max(-1)
        best.append(value)
        where.append(index)
    if not best:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(best), torch.cat(where)


def decontaminate(
    rows: Sequence[dict[str, Any]],
    train_benchmarks: Sequence[dict[str, Any]],
    test_images: Sequence[tuple[str, Any]],
    embed: Callable[[list[Any]], Tensor],
    cache: str | Path,
    threshold: float = 0.95,
    batch_size: int = 64,
    block: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(kept rows, report)``: ``rows`` (reasoning records with ``id``, ``image``, ``question``, ``answer``) without
    the exact question-answer matches of ``train_benchmarks`` (VLMEvalKit records) and without the images whose
    embedding's cosine with any of ``test_images`` (``(id, image)``) is >= ``threshold``. Embeddings go through the
    resumable cache in ``cache`` (``reasoning/`` and ``test/``). The report counts each reason and lists every
    removed row with its evidence (the benchmark row id, or the test image id and the cosine). ``progress(n)`` is
    called after each embedded batch of n images."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ids = [str(r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("reasoning rows must have distinct ids (the embedding cache is keyed by id)")
    keys = benchmark_keys(train_benchmarks)
    removed: list[dict[str, Any]] = []
    survivors = []
    for row in rows:
        match = keys.get(qa_key(row["question"], row["answer"]))
        if match is not None:
            removed.append({"id": str(row["id"]), "reason": "exact_qa_match", "benchmark_id": match})
        else:
            survivors.append(row)
    test_cache, row_cache = EmbeddingCache(Path(cache) / "test"), EmbeddingCache(Path(cache) / "reasoning")
    test_cache.fill(((str(i), image) for i, image in test_images), embed, batch_size, progress)
    row_cache.fill(((str(r["id"]), r["image"]) for r in survivors), embed, batch_size, progress)
    test_ids = [str(i) for i, _ in test_images]
    kept = survivors
    if survivors and test_ids:
        scores, where = nearest(row_cache.load([str(r["id"]) for r in survivors]), test_cache.load(test_ids), block)
        kept = []
        for row, score, index in zip(survivors, scores.tolist(), where.tolist(), strict=True):
            if score >= threshold:
                removed.append({"id": str(row["id"]), "reason": "near_duplicate_image", "test_id": test_ids[index],
                                "cosine": round(score, 6)})  # fmt: skip
            else:
                kept.append(row)
    reasons: dict[str, int] = {}
    for entry in removed:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    report = {
        "rows": len(rows),
        "kept": len(kept),
        "removed": reasons,
        "threshold": threshold,
        "train_benchmark_rows": len(train_benchmarks),
        "test_images": len(test_ids),
        "removed_rows": removed,
    }
    return kept, report
