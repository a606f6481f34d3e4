"""`latent eval`: run an evaluation method over benchmark files and account for every sample.

For each benchmark (a VLMEvalKit TSV; a BLINK folder of per-task parquet files, each task a category; an MMVP
folder; a V* bench folder of per-image JSON, its options shuffled with a fixed seed; readers are chosen by suffix
or folder layout, see :data:`READERS` and :func:`register_reader`) the runner streams samples in batches through
the method (greedy, see :mod:`latent_apps.eval.methods`), extracts the answer (:mod:`latent_apps.eval.extract`;
kind ``choice`` when the sample has options, else ``yes_no`` / ``number`` / ``text`` by the gold answer's shape)
and appends one JSON record per sample to ``<out>/<bench>/samples.jsonl``, flushed after every batch, so a killed
run loses at most one batch. ``<bench>`` is the file name without suffix.

Record fields: ``id, index, category, question, options, gold, kind, prediction`` (the generated text),
``extracted, correct, generated_tokens, reasoning_tokens, latent_steps, latent_similarity, latency_s``.

**Latency** per sample is the wall time of its batch's method call divided by the batch size (it includes
preprocessing and generation, not reading the file), unless the method reports its own. **Tokens per
second** is the sum of generated tokens over the sum of latencies. Both depend on the batch size: compare
methods at the same ``batch_size``.

**Resume**: samples whose ids are already in ``samples.jsonl`` are skipped, so a record is never written twice;
a torn last line (a run killed mid-write) is dropped. ``run.json`` next to it holds the model, method and
``max_new_tokens``; resuming with different ones is an error (use another ``--out`` or ``--no-resume``).

**Summaries** are computed from ``samples.jsonl`` alone (:func:`summarize_records`), restricted to the samples
selected by this run (the first ``limit`` distinct ids of the file): ``<out>/<bench>/summary.json`` per
benchmark, ``<out>/summary.json`` for all and ``<out>/summary.md`` as a table.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from PIL import Image

from latent_apps.eval.extract import extract_answer, infer_kind, is_correct
from latent_apps.eval.methods import EvalMethod, Generation, get_method

__all__ = [
    "READERS",
    "eval_command",
    "read_samples_jsonl",
    "register_reader",
    "run_eval",
    "summarize_records",
    "write_summary_markdown",
]

Reader = Callable[[Path], tuple[Iterator[dict[str, Any]], Any]]
"""``reader(path) -> (samples, report)``: an iterator of sample dicts and a skip report it fills while iterated."""


def _read_vlmevalkit_tsv(path: Path) -> tuple[Iterator[dict[str, Any]], Any]:
    from latent_core.readers import ReadReport, read_vlmevalkit_tsv

    report = ReadReport()
    return read_vlmevalkit_tsv(path, report=report), report


def _read_blink(path: Path) -> tuple[Iterator[dict[str, Any]], Any]:
    from latent_core.readers import ReadReport, read_blink

    report = ReadReport()
    rows = ({**row, "category": row.get("category") or row.get("task")} for row in read_blink(path, report=report))
    return rows, report


def _read_mmvp(path: Path) -> tuple[Iterator[dict[str, Any]], Any]:
    from latent_core.readers import ReadReport, read_mmvp

    report = ReadReport()
    return read_mmvp(path, report=report), report


def _read_vstar(path: Path) -> tuple[Iterator[dict[str, Any]], Any]:
    from latent_core.readers import ReadReport, read_vstar

    report = ReadReport()
    return read_vstar(path, report=report), report


def _find_image_root(path: Path, image: str) -> Path:
    """The directory that LLaVA-CoT ``image`` paths of ``path`` are relative to: the file's folder or the nearest
    ancestor where ``image`` exists (the shapes task keeps ``images/`` next to ``train/`` and ``test/``)."""
    for parent in [path.parent, *path.parent.parents]:
        if (parent / image).is_file():
            return parent
    return path.parent


def _read_llava_cot_bench(path: Path, image_root: Path | None = None) -> tuple[Iterator[dict[str, Any]], Any]:
    """A LLaVA-CoT JSONL as a benchmark: one sample per human/gpt turn, asked with the human turn verbatim (the
    prompt the model was trained with), the gold answer its ``<CONCLUSION>``, options parsed from the prompt
    (:func:`latent_core.prompts.parse_options`), category the row's ``category`` or the image path's first folder
    (LLaVA-CoT's source: ``sqa``, ``chartqa``, ...). A turn without a conclusion is skipped and counted."""
    from latent_core.prompts import parse_options
    from latent_core.readers import ReadReport, parse_cot_stages, read_llava_cot

    report = ReadReport()
    if image_root is None:
        first = next((json.loads(line) for line in path.open(encoding="utf-8") if line.strip()), {})
        image_root = _find_image_root(path, str(first.get("image", ""))) if isinstance(first, dict) else path.parent

    def samples() -> Iterator[dict[str, Any]]:
        for row in read_llava_cot(path, image_root, report):
            conv = row["conversations"]
            pairs = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
            with Image.open(row["image"]) as handle:
                image = handle.convert("RGB")
            relative = Path(row["image"]).relative_to(image_root)
            category = row.get("category") or (relative.parts[0] if len(relative.parts) > 1 else None)
            for turn, (human, gpt) in enumerate(pairs):
                sid = row["id"] if len(pairs) == 1 else f"{row['id']}#{turn}"
                conclusion = parse_cot_stages(gpt).get("conclusion")
                if not conclusion:
                    report.skip("missing_stage:conclusion", sid)
                    continue
                prompt = human.replace("<image>", "").strip()
                yield {
                    "id": sid,
                    "index": sid,
                    "prompt": prompt,
                    "question": prompt,
                    "options": parse_options(prompt),
                    "answer": conclusion,
                    "image": image,
                    "category": category,
                }

    return samples(), report


READERS: dict[str, Reader] = {
    ".tsv": _read_vlmevalkit_tsv,
    ".parquet": _read_blink,
    ".jsonl": _read_llava_cot_bench,
}
"""File suffix (lower case, with the dot) -> reader. Add formats with :func:`register_reader`."""


def register_reader(suffix: str, reader: Reader) -> None:
    """Read files ending in ``suffix`` (e.g. ``".parquet"``) with ``reader(path) -> (samples, report)``."""
    READERS[suffix.lower() if suffix.startswith(".") else f".{suffix.lower()}"] = reader


def _reader_for(path: Path, image_root: Path | None = None) -> Reader:
    # A folder: the MMVP layout (Questions.csv + "MMVP Images/") or BLINK's per-task parquet files.
    if path.is_dir() or not path.suffix:
        if (path / "Questions.csv").is_file():
            return _read_mmvp
        if path.is_dir() and any(path.rglob("*.parquet")):
            return _read_blink
        if path.is_dir() and (any(path.glob("*/*.json")) or any(path.glob("*.json"))):
            return _read_vstar
        if not path.exists():
            raise FileNotFoundError(f"benchmark {path} does not exist")
    reader = READERS.get(path.suffix.lower())
    if reader is _read_llava_cot_bench and image_root is not None:
        return lambda p: _read_llava_cot_bench(p, image_root)
    if reader is None:
        raise ValueError(
            f"no reader for {path} (suffix {path.suffix!r}); supported: {', '.join(sorted(READERS))}. "
            "Convert the benchmark to a VLMEvalKit TSV or register a reader (latent_apps.eval.runner.register_reader)."
        )
    return reader


def _report_dict(report: Any) -> Any:
    """The reader's skip report as JSON-able data."""
    if report is None:
        return None
    for name in ("to_dict", "as_dict"):
        if callable(getattr(report, name, None)):
            return getattr(report, name)()
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    if isinstance(report, dict):
        return dict(report)
    return {k: v for k, v in vars(report).items() if not k.startswith("_")}


def _estimate_total(path: Path) -> int | None:
    """Rows of a TSV without decoding images (for the progress bar only; the reader may skip some)."""
    if path.suffix.lower() != ".tsv":
        return None
    try:
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as f:
            return max(0, sum(1 for _ in csv.reader(f, delimiter="\t")) - 1)
    except (OSError, csv.Error, UnicodeDecodeError, OverflowError):
        return None


def read_samples_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``samples.jsonl``; a torn last line (a killed write) is ignored, other bad lines raise."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({err}); fix or delete the file") from err
    return records


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a write interrupted by a kill) so appending starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (overall and per category), truncated and unanswered counts, token counts (generated, reasoning,
    thinking), latent steps and latency of per-sample records."""
    n = len(records)
    correct = [r for r in records if r["correct"]]
    categories: dict[str, list[dict[str, Any]]] = {}
    kinds: dict[str, int] = {}
    for r in records:
        if r.get("category") is not None:
            categories.setdefault(str(r["category"]), []).append(r)
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    latencies = [r["latency_s"] for r in records]
    tokens = [r["generated_tokens"] for r in records]
    return {
        "n": n,
        "n_correct": len(correct),
        "accuracy": len(correct) / n if n else None,
        "n_unextracted": sum(r["extracted"] is None for r in records),
        "n_truncated": sum(bool(r.get("truncated")) for r in records),
        "n_unanswered": sum(bool(r.get("unanswered")) for r in records),
        "kinds": dict(sorted(kinds.items())),
        "accuracy_per_category": {
            cat: {"n": len(rs), "accuracy": sum(bool(r["correct"]) for r in rs) / len(rs)}
            for cat, rs in sorted(categories.items())
        },
        "mean_generated_tokens": _mean(tokens),
        "mean_generated_tokens_correct": _mean(r["generated_tokens"] for r in correct),
        "mean_reasoning_tokens": _mean(r["reasoning_tokens"] for r in records if r["reasoning_tokens"] is not None),
        "mean_thinking_tokens": _mean(r["thinking_tokens"] for r in records if r.get("thinking_tokens") is not None),
        "mean_latent_steps": _mean(r["latent_steps"] for r in records if r["latent_steps"] is not None),
        **_latent_summary(records),
        "mean_latency_s": _mean(latencies),
        "tokens_per_s": sum(tokens) / sum(latencies) if latencies and sum(latencies) > 0 else None,
        **_control_summary(records),
    }


def _latent_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``latent_steps_distribution`` (steps -> samples; adaptive halting varies it) and ``mean_latent_similarity``
    (the mean cosine between different samples' latents) over the records that carry them; empty when none does."""
    steps = [r["latent_steps"] for r in records if r.get("latent_steps") is not None]
    out: dict[str, Any] = {}
    if steps:
        out["latent_steps_distribution"] = {str(k): steps.count(k) for k in sorted(set(steps))}
    similarity = [r["latent_similarity"] for r in records if r.get("latent_similarity") is not None]
    if similarity:
        out["mean_latent_similarity"] = _mean(similarity)
    return out


def _control_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``latent_controls``: per control (zeroed / shuffled / masked latents) its accuracy (overall and per category,
    so that a control is compared with the model on the same questions) and the rate at which the extracted answer
    changed, over the records that carry it; empty when none does."""
    names = sorted({name for r in records for name in r.get("controls") or {}})
    if not names:
        return {}
    out = {}
    for name in names:
        carrying = [r for r in records if name in (r.get("controls") or {})]
        rows = [r["controls"][name] for r in carrying]
        categories: dict[str, list[bool]] = {}
        for r, c in zip(carrying, rows, strict=True):
            if r.get("category") is not None:
                categories.setdefault(str(r["category"]), []).append(bool(c["correct"]))
        out[name] = {
            "n": len(rows),
            "accuracy": sum(bool(c["correct"]) for c in rows) / len(rows),
            "accuracy_per_category": {cat: sum(v) / len(v) for cat, v in sorted(categories.items())},
            "change_rate": sum(bool(c["changed"]) for c in rows) / len(rows),
        }
    return {"latent_controls": out}


def majority_baseline(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The accuracy of always giving the most common gold answer of each category and answer kind (a category
    asked both as multiple choice and open counts its letter and its open questions apart; a record without a
    category goes by its answer kind), computed on the evaluated records themselves: what a model that ignores the
    image and reads only the question's type and options could reach at best. Ties go to the answer seen first."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in records:
        category = str(r["category"]) if r.get("category") is not None else str(r["kind"])
        groups.setdefault((category, str(r["kind"])), []).append(str(r["gold"]).strip().lower())
    per: dict[str, dict[str, Any]] = {}
    hits = 0
    for (category, kind), golds in sorted(groups.items()):
        counts: dict[str, int] = {}
        for gold in golds:
            counts[gold] = counts.get(gold, 0) + 1
        answer = max(counts, key=lambda g: counts[g])  # dicts keep first-seen order: ties go to the first
        entry = per.setdefault(category, {"n": 0, "hits": 0, "answers": {}})
        entry["n"] += len(golds)
        entry["hits"] += counts[answer]
        entry["answers"][kind] = answer
        hits += counts[answer]
    for entry in per.values():
        entry["accuracy"] = entry.pop("hits") / entry["n"]
    n = len(records)
    return {"accuracy": hits / n if n else None, "per_category": per}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _device_name(model: Any) -> str:
    import torch

    device = getattr(model, "device", torch.device("cpu"))
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def _check_run_config(path: Path, config: dict[str, Any], resume: bool, has_records: bool) -> None:
    if resume and has_records and path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in config if old.get(k) != config[k]]
        if changed:
            raise ValueError(
                f"cannot resume {path.parent}: it was run with "
                + ", ".join(f"{k}={old.get(k)!r}" for k in changed)
                + " and this run has "
                + ", ".join(f"{k}={config[k]!r}" for k in changed)
                + ". Use another --out directory or --no-resume (which discards its samples)."
            )
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _record(
    sample: dict[str, Any], gen: Generation, latency_s: float, staged: bool = False, complete_only: bool = False
) -> dict[str, Any]:
    from latent_core.readers import conclusion_of

    options = {str(k): str(v) for k, v in (sample.get("options") or {}).items()}
    gold = sample.get("answer")
    gold = None if gold is None else str(gold).strip()
    kind = infer_kind(gold, options)
    # A staged output is read only from its closed <CONCLUSION> block; without one it is unanswered. A method that
    # answers directly (``complete_only``) is read only from an output that ended: a truncated one is a model that
    # began to reason instead, and a letter picked from its first words is no answer.
    scope = gen.text if not staged else conclusion_of(gen.text)
    if complete_only and gen.truncated:
        scope = None
    unanswered = scope is None
    extracted = None if unanswered else extract_answer(scope, kind, options or None)
    index = sample.get("index")
    record = {
        "id": str(sample["id"]),
        "index": index if isinstance(index, int | str) or index is None else str(index),
        "category": sample.get("category"),
        "question": sample.get("question"),
        "options": options,
        "gold": gold,
        "kind": kind,
        "prediction": gen.text,
        "extracted": extracted,
        "correct": is_correct(extracted, gold, kind),
        "unanswered": unanswered,
        "truncated": bool(gen.truncated),
        "generated_tokens": int(gen.generated_tokens),
        "reasoning_tokens": gen.reasoning_tokens,
        "thinking_tokens": gen.thinking_tokens,
        "latent_steps": gen.latent_steps,
        "latent_similarity": gen.latent_similarity,
        "latency_s": latency_s,
    }
    if gen.controls:  # the same sample under controls, scored the same way; "changed": another extracted answer
        record["controls"] = {}
        for name, text in gen.controls.items():  # read like the answer: a staged one from its <CONCLUSION> only
            other_scope = text if not staged else conclusion_of(text)
            other = None if other_scope is None else extract_answer(other_scope, kind, options or None)
            record["controls"][name] = {
                "prediction": text, "extracted": other, "correct": is_correct(other, gold, kind),
                "changed": other != extracted,
            }  # fmt: skip
    return record


def _run_batch(model, processor, method: EvalMethod, batch, max_new_tokens: int, f) -> None:
    start = time.perf_counter()
    generations = method(model, processor, batch, max_new_tokens)
    wall = time.perf_counter() - start
    if len(generations) != len(batch):
        raise RuntimeError(f"the method returned {len(generations)} generations for a batch of {len(batch)}")
    staged = bool(getattr(method, "staged", False))
    complete_only = bool(getattr(method, "complete_only", False))
    for sample, gen in zip(batch, generations, strict=True):
        latency = gen.latency_s if gen.latency_s is not None else wall / len(batch)
        f.write(json.dumps(_record(sample, gen, latency, staged, complete_only), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def blank_images(sample: dict[str, Any]) -> dict[str, Any]:
    """The ``--blank-images`` control: ``sample`` with each image replaced by a white one of the same size (for
    the shapes task: an empty grid). A model that scores as well on these ignores the image."""

    def blank(image: Any) -> Any:
        return Image.new("RGB", image.size, (255, 255, 255)) if image is not None else None

    out = dict(sample)
    if sample.get("image") is not None:
        out["image"] = blank(sample["image"])
    if sample.get("images"):
        out["images"] = [blank(image) for image in sample["images"]]
    return out


def _progress(show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _eval_bench(
    model, processor, method: EvalMethod, path: Path, bench_dir: Path, config, batch_size, max_new_tokens, resume,
    limit, progress, image_root: Path | None = None, transform: Callable[[dict], dict] | None = None,
) -> dict[str, Any]:  # fmt: skip
    reader = _reader_for(path, image_root)
    bench_dir.mkdir(parents=True, exist_ok=True)
    samples_path = bench_dir / "samples.jsonl"
    if resume:
        _drop_torn_tail(samples_path)
        done = {r["id"] for r in read_samples_jsonl(samples_path)}
    else:
        samples_path.unlink(missing_ok=True)
        done = set()
    _check_run_config(bench_dir / "run.json", config, resume, bool(done))

    total = _estimate_total(path)
    if limit is not None:
        total = limit if total is None else min(total, limit)
    label = path.stem if transform is None else f"{path.stem} ({bench_dir.name})"
    task = progress.add_task(label, total=total) if progress is not None else None

    samples, report = reader(path)
    selected: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    batch: list[dict[str, Any]] = []
    with open(samples_path, "a", encoding="utf-8") as f:

        def flush() -> None:
            if batch:
                _run_batch(model, processor, method, batch, max_new_tokens, f)
                if progress is not None:
                    progress.advance(task, len(batch))
                batch.clear()

        for sample in samples:
            if limit is not None and len(selected) >= limit:
                break
            sid = str(sample["id"])
            if sid in seen:
                duplicates += 1
                continue
            seen.add(sid)
            selected.append(sid)
            if sid in done:
                if progress is not None:
                    progress.advance(task)
                continue
            if batch and (batch[0].get("image") is None) != (sample.get("image") is None):
                flush()  # image and text-only samples are not batched together
            batch.append(sample if transform is None else transform(sample))
            if len(batch) >= batch_size:
                flush()
        flush()

    by_id = {r["id"]: r for r in read_samples_jsonl(samples_path)}
    records = [by_id[sid] for sid in selected if sid in by_id]
    summary = {
        "bench": str(path),
        "samples": str(samples_path),
        **summarize_records(records),
        "majority_baseline": majority_baseline(records),
        "skipped": _report_dict(report),
        "reader_complete": limit is None,
        "duplicate_ids": duplicates,
    }
    (bench_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def run_eval(
    model: Any,
    method: str | EvalMethod,
    benches: Sequence[Path],
    out: Path,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    resume: bool = True,
    limit: int | None = None,
    *,
    processor: Any = None,
    model_name: str | None = None,
    method_options: dict[str, Any] | None = None,
    show_progress: bool = True,
    blank: bool = False,
    image_root: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` with ``model`` on each benchmark file; write per-sample JSONL and summaries.

    Args:
        model: an alias, Hub id or local directory (loaded with ``latent_core.load_model`` / ``load_processor``),
            or a loaded model (then ``processor`` is required).
        method: a registered method name (see :func:`latent_apps.eval.methods.get_method`) or a method object.
        benches: benchmark files; the reader is chosen by suffix (:data:`READERS`). File stems must differ.
        out: output directory; ``out/<bench stem>/samples.jsonl`` and the summaries go there.
        batch_size: samples per ``method`` call.
        max_new_tokens: generation budget per sample; ``None`` = the method's ``default_max_new_tokens``.
        resume: skip ids already in ``samples.jsonl``; ``False`` starts each benchmark afresh.
        limit: evaluate only the first ``limit`` distinct samples of each file.
        processor: the processor of a loaded ``model``.
        model_name: the name recorded in the summary (default: the alias/path, or ``model.name_or_path``).
        method_options: keyword options for the method's factory (only with a method name).
        show_progress: draw a rich progress bar.
        blank: also run the blank-image control (:func:`blank_images`) into ``out/<bench>/blank/``; its summary
            is the bench summary's ``blank``.
        image_root: the image root of LLaVA-CoT JSONL benches (default: found next to the file).

    Returns:
        The summary written to ``out/summary.json``: run settings and versions, and ``benches`` (bench stem ->
        its summary, with ``majority_baseline`` and, with ``blank``, ``blank``).
    """
    import torch
    import transformers

    benches = [Path(b) for b in benches]
    method_name = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
    method_obj = get_method(method, **(method_options or {})) if isinstance(method, str) else method
    if max_new_tokens is None:
        max_new_tokens = int(getattr(method_obj, "default_max_new_tokens", 512))
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError("batch_size and max_new_tokens must be >= 1 and limit >= 0")
    stems = [b.stem for b in benches]
    if len(set(stems)) != len(stems):
        raise ValueError(f"benchmark files must have different names (outputs go to out/<name>): {stems}")
    for bench in benches:
        _reader_for(bench)  # an unknown format fails first, with the list of supported ones
        if not bench.exists():
            raise FileNotFoundError(f"benchmark {bench} does not exist")
    if isinstance(model, str | Path):
        model_name = model_name or str(model)
        loader = getattr(method_obj, "load", None)  # a method may know its own checkpoints (heima: stage dirs)
        if callable(loader):
            model, processor = loader(str(model))
        else:
            from latent_core import load_model, load_processor

            processor = processor or load_processor(str(model))
            model = load_model(str(model))
        if torch.cuda.is_available():
            model = model.to("cuda", dtype=torch.bfloat16)
    elif processor is None:
        raise ValueError("run_eval was given a loaded model without its processor: pass processor=...")
    model.eval()
    model_name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": model_name, "method": method_name, "method_options": method_options or {}}
    config["max_new_tokens"] = max_new_tokens
    summary: dict[str, Any] = {
        **config,
        "batch_size": batch_size,
        "limit": limit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": _device_name(model),
        "dtype": str(getattr(model, "dtype", "")),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "benches": {},
    }
    summary_path = out / "summary.json"
    if summary_path.exists():  # keep benchmarks of earlier runs of the same configuration
        old = json.loads(summary_path.read_text(encoding="utf-8"))
        if all(old.get(k) == v for k, v in config.items()):
            summary["benches"].update(old.get("benches", {}))
    with _progress(show_progress) as progress:
        for bench in benches:
            args = (batch_size, max_new_tokens, resume, limit, progress, image_root)
            result = _eval_bench(model, processor, method_obj, bench, out / bench.stem, config, *args)
            if blank:
                blank_config = {**config, "images": "blank"}
                result["blank"] = _eval_bench(
                    model, processor, method_obj, bench, out / bench.stem / "blank", blank_config, *args,
                    transform=blank_images,
                )  # fmt: skip
                (out / bench.stem / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            summary["benches"][bench.stem] = result
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    write_summary_markdown(summary, out / "summary.md")
    return summary


def _table_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """The columns of summary.md and the console table: one row per bench (and its blank-image control)."""
    rows = []
    for name, b in summary["benches"].items():
        for label, part in ((name, b), (f"{name} (blank images)", b.get("blank"))):
            if part is None:
                continue
            accuracy = None if part["accuracy"] is None else 100 * part["accuracy"]
            majority = (part.get("majority_baseline") or {}).get("accuracy")
            rows.append(
                (
                    label,
                    str(part["n"]),
                    _fmt(accuracy, ".1f"),
                    _fmt(None if majority is None else 100 * majority, ".1f"),
                    str(part.get("n_truncated", 0)),
                    str(part.get("n_unanswered", 0)),
                    _fmt(part["mean_generated_tokens"], ".1f"),
                    _fmt(part["mean_reasoning_tokens"], ".1f"),
                    _fmt(part.get("mean_thinking_tokens"), ".1f"),
                    _fmt(part["mean_latent_steps"], ".1f"),
                    _fmt(part["mean_latency_s"], ".3f"),
                    _fmt(part["tokens_per_s"], ".1f"),
                )
            )
    return rows


TABLE_COLUMNS = (
    "bench", "n", "accuracy %", "majority %", "truncated", "unanswered", "gen tok", "reasoning tok", "thinking tok",
    "latent steps", "latency s", "tok/s",
)  # fmt: skip


def write_summary_markdown(summary: dict[str, Any], path: Path) -> None:
    """``summary.md``: one row per benchmark (and per blank-image control), with the majority baseline."""
    lines = [
        f"# {summary['method']} on {summary['model']}",
        "",
        f"max_new_tokens={summary['max_new_tokens']}, batch_size={summary['batch_size']}, device={summary['device']}, "
        f"torch {summary['torch']}, transformers {summary['transformers']}. Latency = batch wall time / batch size. "
        "majority % = always the most common gold answer of each category (computed on the evaluated samples); "
        "truncated = stopped at max_new_tokens without EOS; unanswered = no answer could be read (a staged output "
        "without a closed <CONCLUSION>).",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(summary)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def eval_command(
    model: Annotated[str, typer.Option(help="Model alias (e.g. qwen2.5-vl-3b), Hub id or local checkpoint directory.")],
    bench: Annotated[
        list[Path],
        typer.Option(
            "--bench",
            help="Benchmark: a VLMEvalKit .tsv, a LLaVA-CoT .jsonl (gold = its <CONCLUSION>; asked with the training "
            "prompt), a BLINK folder or an MMVP folder (repeat --bench for several).",
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            help="Evaluation method: plain, cot (a model trained on staged CoT), direct (a base trained on CoT + "
            "direct answers, asked for the answer alone), coconut, heima, lavit, lare.",
        ),
    ] = "plain",
    out: Annotated[Path, typer.Option(help="Output directory: <out>/<bench>/samples.jsonl, summary.json/.md.")] = Path(
        "runs/eval"
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per generate call.")] = 8,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Generation budget per sample (greedy); default: the method's (plain 64, direct 32, cot 1024, "
            "heima 512).",
        ),
    ] = None,  # fmt: skip
    limit: Annotated[int | None, typer.Option(min=0, help="Only the first N samples of each benchmark.")] = None,
    blank_images: Annotated[
        bool, typer.Option("--blank-images", help="Also evaluate with every image blanked (control: is it used?).")
    ] = False,
    images: Annotated[
        Path | None, typer.Option(help="Image root of LLaVA-CoT .jsonl benches (default: found next to the file).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Skip samples already in samples.jsonl (default).")
    ] = True,
    mask_latents: Annotated[
        bool,
        typer.Option(
            "--mask-latents", help="--method lavit: mask the latent positions for the answer (Table 3's w/o latents)."
        ),
    ] = False,
    latent_diagnostics: Annotated[
        bool,
        typer.Option(
            "--latent-diagnostics",
            help="--method lavit | lare | coconut: also answer with the latents zeroed, shuffled across the batch "
            "(and, for lavit, masked); the summary's latent_controls gives each one's accuracy and answer-change "
            "rate.",
        ),
    ] = False,
    halt: Annotated[
        str | None,
        typer.Option(help="--method lare: adaptive halting (Table 4) on the distance cos, l1 or l2 (none: off)."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="--method lare: halt once the distance between z_t and z_{t-1} is below.")
    ] = None,
) -> None:
    """Evaluate a method on benchmark files: greedy decoding, answer extraction, per-sample JSONL (resumable)
    and summary.json / summary.md with accuracy next to the majority baseline (and the blank-image control with
    --blank-images), truncated and unanswered counts, generated / reasoning / thinking tokens and latency."""
    from rich.console import Console
    from rich.table import Table

    from latent_apps.eval.methods import UnknownMethodError

    try:
        get_method(method)
    except UnknownMethodError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None
    if mask_latents and method != "lavit":
        raise typer.BadParameter(
            "--mask-latents acts on a LaViT student's latent positions: use it with --method lavit"
        )
    if latent_diagnostics and method not in ("lavit", "lare", "coconut"):
        raise typer.BadParameter("--latent-diagnostics needs a latent method: --method lavit, lare or coconut")
    if (halt is not None or threshold is not None) and method != "lare":
        raise typer.BadParameter("--halt / --threshold are LaRe's adaptive halting: use them with --method lare")
    if (threshold is None) != (halt is None or halt == "none"):
        raise typer.BadParameter("--halt cos|l1|l2 and --threshold go together (--halt none: no halting)")
    options: dict[str, Any] = {"mask_latents": True} if mask_latents else {}
    if latent_diagnostics:
        options["diagnostics"] = True
    if halt is not None:
        options |= {"halt": halt, "threshold": threshold}
    # A bad alias / checkpoint / file, a model that is not available, a resume mismatch: one line (latent_core.cli).
    summary = run_eval(
        model, method, bench, out, batch_size, max_new_tokens, resume, limit, blank=blank_images, image_root=images,
        method_options=options or None,
    )  # fmt: skip
    table = Table(title=f"{summary['method']} on {summary['model']} (max_new_tokens={summary['max_new_tokens']})")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "bench" else "right")
    for row in _table_rows(summary):
        table.add_row(*row)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    console.print(f"summary: {out / 'summary.json'}")
