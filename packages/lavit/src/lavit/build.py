"""``build-lavit-15k``: LaViT's teacher data from Visual-CoT, in fused teacher passes, filtered, resumable.

For every batch of Visual-CoT rows (image, question, answer, ground-truth bbox; :func:`latent_core.read_visual_cot`,
both real layouts) the teacher runs one fused pass (:func:`lavit.teacher.teacher_pass`), then the three filters
(:mod:`lavit.filters`) decide, in order: correctness, difficulty (answered right without the image), alignment
(< ``min_alignment`` of the A_traj mass inside the bbox). The output directory holds

- ``shard-NNNNN.safetensors`` (one per batch) with, per kept sample (per rejected one too with ``keep_rejected``),
  ``<id>/traj_dense`` (the min-max map, Eq. 3), ``<id>/traj_topk_indices`` and ``<id>/traj_topk_values`` (Top-K of
  it; the L_traj target is the values renormalised), and per image, once (V_sem does not depend on the question),
  ``vsem/<image>/tokens`` (``[n_image_tokens, d]`` bf16; left out with ``vsem_tokens=False``: 2-13 MB per image for
  the 32B teacher, while training uses the mean by default) and ``vsem/<image>/mean`` (``[d]`` fp32), in the shard of
  the line whose ``vsem_key`` names the image (its first sample); :func:`read_teacher_data` resolves it;
- ``index.jsonl``: one line per sample (kept or not): id, source, question, answer, teacher answer, the filter
  results and the reason of a rejection, alignment, merged grid ``(t, h, w)``, the image, its V_sem keys, the shard
  ``file`` and the sample's tensor ``keys``, its ``batch``;
- ``manifest.json``: the teacher, every option, the counts (read report, filters, kept);
- ``stats.json`` / ``stats.md``: Tables A3 / A4 (samples per source, question / answer length, visual tokens per
  image), over the kept samples;
- ``overlays/``: PNGs of A_traj and the bbox over the image for the first ``overlays`` kept and rejected samples.

**Scale-out**: under ``torchrun --nproc_per_node N`` (one node or several) every rank holds a teacher replica and
builds a disjoint share of the batches into ``parts/rank-NNN/``; rank 0 then merges the indexes into one
``index.jsonl`` whose ``file`` entries point into the parts. A teacher too large for one GPU is split with
``--device-map auto`` in a single process instead.

**Resumable**: a batch is written (shard renamed into place, then its index lines in one flushed append) or not at
all, so after a kill -9 the same command skips the batches in the index and redoes the rest; the shards come out
byte-identical to an uninterrupted build. A resume with other options is refused (the manifest names them).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from latent_core.cli import UserError

from lavit.filters import JudgeSettings, answers_match, judge_match
from lavit.inputs import InputSettings, check_inputs
from lavit.teacher import TeacherOptions, alignment, bbox_cell_weights, teacher_pass, trajectory_target

__all__ = [
    "BuildConfig",
    "BuildError",
    "build",
    "built_inputs",
    "check_settings",
    "check_student_inputs",
    "read_teacher_data",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
REJECTIONS = ("incorrect", "answerable_without_image", "misaligned")


class BuildError(UserError, ValueError):
    """A build that cannot go on as asked (a resume with other options, an unreadable output directory)."""


@dataclass
class BuildConfig:
    """What ``build-lavit-15k`` does; the defaults are the paper's (METHODS.md section 2)."""

    data: str
    images: str
    out: str
    teacher: str
    options: TeacherOptions = field(default_factory=TeacherOptions)
    batch_size: int = 8
    limit: int | None = None
    sources: tuple[str, ...] | None = None
    min_alignment: float = 0.2
    difficulty: bool = True
    text_model: str | None = None
    keep_rejected: bool = False
    overlays: int = 8
    judge: JudgeSettings | None = None
    vsem_tokens: bool = True
    inputs: InputSettings = field(default_factory=InputSettings)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the output: a resume must match it exactly."""
        return {
            "data": str(Path(self.data).resolve()),
            "images": str(Path(self.images).resolve()),
            "teacher": self.teacher,
            "options": self.options.as_dict(),
            "batch_size": self.batch_size,
            "limit": self.limit,
            "sources": sorted(self.sources) if self.sources else None,
            "min_alignment": self.min_alignment,
            "difficulty": self.difficulty,
            "text_model": self.text_model,
            "keep_rejected": self.keep_rejected,
            "vsem_tokens": self.vsem_tokens,
            "judge": None if self.judge is None else {"model": self.judge.model, "base_url": self.judge.base_url},
            "inputs": self.inputs.as_dict(),
        }


def _rows(config: BuildConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from latent_core.readers import ReadReport, read_visual_cot

    report = ReadReport(str(config.data))
    rows, other_source = [], 0
    for row in read_visual_cot(config.data, config.images, report):
        if config.sources and row.get("dataset") not in config.sources:
            other_source += 1
            continue
        rows.append(row)
        if config.limit is not None and len(rows) >= config.limit:
            break
    counts = report.as_dict()
    counts["other_source"] = other_source
    return rows, counts


def check_settings(config: BuildConfig) -> None:
    """Refuse (:class:`BuildError`) to resume an output directory built with other settings; start a new one's
    manifest. Cheap: the command calls it before loading the teacher."""
    _check_manifest(Path(config.out), config.settings())


def _check_manifest(out: Path, settings: dict[str, Any]) -> None:
    path = out / MANIFEST_NAME
    if path.is_file():
        try:
            saved = json.loads(path.read_text()).get("settings")
        except json.JSONDecodeError as err:
            raise BuildError(f"{path} is not valid JSON ({err}): the output directory is corrupted") from None
        if saved != settings:
            changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
            raise BuildError(
                f"{out} holds a build with other settings ({', '.join(changed)}): resuming would mix two builds. "
                "Rerun with the settings it was made with, or choose another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings}, indent=2) + "\n")


def _image_key(row: dict[str, Any], images: str) -> str:
    path = Path(row["image"])
    try:
        return path.resolve().relative_to(Path(images).resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _final(answer: str) -> str:
    """The answer a filter compares: the ``<CONCLUSION>`` of a staged (LLaVA-CoT) answer, else the whole answer."""
    from latent_core.readers import conclusion_of

    return conclusion_of(answer) or answer


def _text_answers(
    model: Any, processor: Any, questions: Sequence[str], max_new_tokens: int, system: str | None = None
) -> list[str]:
    """Greedy answers of ``model`` to ``questions`` without any image (the difficulty filter), after the system
    turn ``system`` (the teacher's)."""
    from latent_core.prompts import encode_chats, render_prompts

    text_only = not hasattr(processor, "image_processor")
    chats = render_prompts(processor, questions, [0] * len(questions), text_only=text_only, system=system)
    inputs = encode_chats(processor, chats, None, padding_side="left").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokenizer = getattr(processor, "tokenizer", processor)
    return [
        text.strip()
        for text in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]


def _overlay(
    path: Path, image: Any, dense: torch.Tensor, grid: tuple[int, int, int], bbox: list[float], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    width, height = image.size
    fig, ax = plt.subplots(figsize=(4, 4 * height / max(width, 1)))
    ax.imshow(image)
    heat = dense.reshape(grid[0], grid[1], grid[2])[0].numpy()
    ax.imshow(heat, cmap="inferno", alpha=0.5, extent=(0, width, height, 0), interpolation="nearest")
    x0, y0, x1, y1 = bbox
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=2))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def build(
    config: BuildConfig,
    model: Any,
    processor: Any,
    *,
    text_model: Any = None,
    text_processor: Any = None,
    judge_client: Any = None,
    on_batch: Callable[[int, dict[str, int], int], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume) the teacher data of ``config`` with the teacher ``model`` / ``processor``; returns the
    manifest (settings and counts). ``text_model`` / ``text_processor``: the difficulty filter's model (default: the
    teacher without the image). ``on_batch(j, counts, remaining)`` is called before the first batch (``j = -1``) and
    after each written one, with the kept / rejected counts so far and this process's batches still to do."""
    from latent_core.prompts import question_text
    from latent_core.shards import append_shard, read_index
    from PIL import Image

    root = Path(config.out)
    settings = config.settings()
    # Table A1's pixel bounds on the teacher's processor (the student trains with the same: lavit.config.check_inputs)
    inputs = config.inputs.apply(processor)
    rank, world = _distributed()
    if rank == 0:
        _check_manifest(root, settings)
    _barrier(world)
    if rank > 0:
        _check_manifest(root, settings)
    # One process writes into the output directory; under torchrun each rank builds the batches j with
    # j % world == rank into parts/rank-NNN/ (its own shards and index, resumable alike) and rank 0 merges.
    out = root if world == 1 else root / "parts" / f"rank-{rank:03d}"
    rows, read_counts = _rows(config)
    done_lines = read_index(out)
    done = {line["batch"] for line in done_lines}
    stored = {line["vsem_key"] for line in done_lines if line.get("vsem_key")}
    counts = Counter(line["reason"] or "kept" for line in done_lines)
    overlays: Counter[str] = Counter()
    if rank > 0:  # the pictures come from rank 0's batches only
        overlays.update({"kept": config.overlays, "rejected": config.overlays})
    overlays_dir = root / "overlays"
    if overlays_dir.is_dir():
        overlays.update(p.name.split("-", 1)[0] for p in overlays_dir.glob("*.png"))
    text_model, text_processor = text_model or model, text_processor or processor
    size = config.batch_size
    todo = [j for j in range((len(rows) + size - 1) // size) if j not in done and j % world == rank]
    if on_batch is not None:
        on_batch(-1, dict(counts), len(todo))
    for n, j in enumerate(todo):
        batch = rows[j * size : (j + 1) * size]
        images = [Image.open(row["image"]).convert("RGB") for row in batch]
        questions = [question_text(row["question"]) for row in batch]
        outs = teacher_pass(model, processor, images, questions, config.options, system=inputs.system_prompt)
        correct: list[bool | None] = []
        judged: list[str | None] = []
        finals = [_final(result.answer) for result in outs]
        for row, final in zip(batch, finals, strict=True):
            verdict, error = answers_match(final, row["answer"]), None
            if not verdict and config.judge is not None:
                verdict, error = judge_match(row["question"], final, row["answer"], config.judge, judge_client)
            correct.append(verdict)
            judged.append(error)
        blind: list[str | None] = [None] * len(batch)
        ask = [i for i, ok in enumerate(correct) if ok] if config.difficulty else []
        if ask:
            answers = _text_answers(
                text_model,
                text_processor,
                [questions[i] for i in ask],
                config.options.max_new_tokens,
                system=inputs.system_prompt,
            )
            for i, answer in zip(ask, answers, strict=True):
                blind[i] = _final(answer)
        tensors: dict[str, torch.Tensor] = {}
        lines = []
        for i, (row, result) in enumerate(zip(batch, outs, strict=True)):
            traj = trajectory_target(result.scores, config.options.top_k)
            t, h, w = result.grid
            cells = bbox_cell_weights(row["bbox"], row["image_size"], (w * result.cell_px, h * result.cell_px), (h, w))
            share = alignment(traj["dense"], cells.repeat(t))
            blind_correct = None if blind[i] is None else answers_match(blind[i], row["answer"])
            if correct[i] is None:
                reason = "judge_error"
            elif not correct[i]:
                reason = "incorrect"
            elif blind_correct:
                reason = "answerable_without_image"
            elif share < config.min_alignment:
                reason = "misaligned"
            else:
                reason = None
            kept = reason is None
            counts[reason or "kept"] += 1
            sid = str(row["id"])
            line = {
                "id": sid, "source": row.get("dataset"), "question": row["question"], "answer": row["answer"],
                "teacher_answer": result.answer, "teacher_final": finals[i], "truncated": result.truncated,
                "correct": correct[i],
                "judge_error": judged[i], "text_answer": blind[i], "text_correct": blind_correct,
                "alignment": round(share, 6), "kept": kept, "reason": reason, "grid": list(result.grid),
                "image_tokens": int(result.scores.numel()), "queries": result.queries,
                "image": _image_key(row, config.images), "bbox": row["bbox"], "batch": j, "keys": None,
                "vsem_key": None,
            }  # fmt: skip
            if kept or config.keep_rejected:
                keys = {"traj_dense": f"{sid}/traj_dense", "traj_topk_indices": f"{sid}/traj_topk_indices",
                        "traj_topk_values": f"{sid}/traj_topk_values"}  # fmt: skip
                tensors[keys["traj_dense"]] = traj["dense"].contiguous()
                tensors[keys["traj_topk_indices"]] = traj["indices"].to(torch.int64).contiguous()
                tensors[keys["traj_topk_values"]] = traj["values"].contiguous()
                image_key = line["image"]
                vsem = {"tokens": f"vsem/{image_key}/tokens", "mean": f"vsem/{image_key}/mean"}
                if image_key not in stored:
                    if config.vsem_tokens:
                        tensors[vsem["tokens"]] = result.v_sem.to(torch.bfloat16).contiguous()
                    tensors[vsem["mean"]] = result.v_sem.float().mean(0).contiguous()
                    stored.add(image_key)
                    line["vsem_key"] = image_key
                line["keys"] = {**keys, "vsem_tokens": vsem["tokens"] if config.vsem_tokens else None,
                                "vsem_mean": vsem["mean"]}  # fmt: skip
            lines.append(line)
            group = "kept" if kept else "rejected"
            if overlays[group] < config.overlays:
                overlays[group] += 1
                title = f"{sid}: {finals[i][:30]!r} ({reason or 'kept'}, {share:.2f} in bbox)"
                name = f"{group}-{overlays[group]:03d}-{sid.replace('/', '_')}.png"
                _overlay(overlays_dir / name, images[i], traj["dense"], result.grid, row["bbox"], title)
        append_shard(out, j, tensors, lines)
        if on_batch is not None:
            on_batch(j, dict(counts), len(todo) - n - 1)
    _barrier(world)
    if world > 1:
        if rank > 0:
            return {"settings": settings, "rank": rank}
        _merge_parts(root, world)
    return _finish(root, settings, read_counts, rows, inputs)


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` of a torchrun launch (the process group already set up), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _merge_parts(root: Path, world: int) -> None:
    """Rank 0: one ``index.jsonl`` over every rank's part, in batch order, each line's ``file`` relative to
    ``root`` (written to a temporary file and renamed, so a kill leaves the old index or the new one)."""
    import os

    from latent_core.shards import INDEX_NAME, read_index

    lines = []
    for rank in range(world):
        part = Path("parts") / f"rank-{rank:03d}"
        lines += [{**line, "file": (part / line["file"]).as_posix()} for line in read_index(root / part)]
    lines.sort(key=lambda line: line["batch"])  # stable: a batch's lines keep their order
    tmp = root / (INDEX_NAME + ".tmp")
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, root / INDEX_NAME)


def _finish(
    out: Path, settings: dict[str, Any], read_counts: dict[str, Any], rows: list[dict[str, Any]], inputs: InputSettings
) -> dict:
    """Counts from the index (so a resumed build reports the whole build), stats, and the manifest (with the
    ``inputs`` the teacher saw: system prompt and the pixel bounds its processor resized within)."""
    from latent_core.shards import read_index

    lines = read_index(out)
    by_reason = Counter(line["reason"] or "kept" for line in lines)
    counts = {
        "read": read_counts,
        "samples": len(lines),
        "kept": by_reason.get("kept", 0),
        "rejected": {reason: by_reason.get(reason, 0) for reason in REJECTIONS},
        "errors": {"judge": by_reason.get("judge_error", 0)},
        "truncated_answers": sum(1 for line in lines if line["truncated"]),
        "images_with_vsem": sum(1 for line in lines if line.get("vsem_key")),
    }
    stats = _stats([line for line in lines if line["kept"]])
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out / "stats.md").write_text(_stats_markdown(stats, counts))
    manifest = {"settings": settings, "inputs": inputs.as_dict(), "counts": counts}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _stats(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Tables A3 / A4 over the kept samples: samples per source, question / answer words, visual tokens per image."""

    def summary(values: list[int]) -> dict[str, float | int | None]:
        if not values:
            return {"mean": None, "min": None, "max": None}
        return {"mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values)}

    images = {line["image"]: line["image_tokens"] for line in lines}
    return {
        "samples": len(lines),
        "per_source": dict(sorted(Counter(str(line["source"]) for line in lines).items())),
        "question_words": summary([len(line["question"].split()) for line in lines]),
        "answer_words": summary([len(line["answer"].split()) for line in lines]),
        "visual_tokens_per_image": summary(list(images.values())),
        "images": len(images),
    }


def _stats_markdown(stats: dict[str, Any], counts: dict[str, Any]) -> str:
    out = ["# LaViT teacher data", "", f"Samples read: {counts['samples']}, kept: {counts['kept']}.", ""]
    out += ["| filter | rejected |", "| --- | ---: |"]
    out += [f"| {reason} | {n} |" for reason, n in counts["rejected"].items()]
    out += ["", "| source | kept samples |", "| --- | ---: |"]
    out += [f"| {source} | {n} |" for source, n in stats["per_source"].items()]
    out += ["", "| length | mean | min | max |", "| --- | ---: | ---: | ---: |"]
    for name in ("question_words", "answer_words", "visual_tokens_per_image"):
        s = stats[name]
        out.append(f"| {name.replace('_', ' ')} | {s['mean']} | {s['min']} | {s['max']} |")
    return "\n".join(out) + "\n"


def built_inputs(directory: str | Path) -> InputSettings:
    """The :class:`lavit.config.InputSettings` the teacher data in ``directory`` was built with (those its processor
    resolved to; a build not finished yet: the ones asked for; a build from before they were recorded: the
    processor's own bounds and the template's system prompt)."""
    manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    return InputSettings.recorded(manifest.get("inputs") or manifest["settings"].get("inputs"))


def check_student_inputs(directory: str | Path, student: InputSettings) -> None:
    """Refuse a student whose inputs differ from the build's (:func:`lavit.config.check_inputs`)."""
    check_inputs(built_inputs(directory), student, directory)


def read_teacher_data(directory: str | Path, kept_only: bool = True) -> Iterator[dict[str, Any]]:
    """The samples of a built directory in index order: each index line plus its tensors ``traj_dense``,
    ``traj_topk_indices``, ``traj_topk_values``, ``vsem_tokens`` and ``vsem_mean`` (the image's V_sem, from whichever
    shard holds it). ``kept_only``: skip the rejected samples.

    Raises:
        FileNotFoundError: no ``index.jsonl`` in ``directory``.
    """
    from latent_core.hub import load_tensors
    from latent_core.shards import INDEX_NAME, read_index

    root = Path(directory)
    if not (root / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{root} has no {INDEX_NAME}: build it with `uv run apps/cli build-lavit-15k`")
    lines = read_index(root, repair=False)
    vsem_file = {line["vsem_key"]: line["file"] for line in lines if line.get("vsem_key")}
    shards: dict[str, dict[str, torch.Tensor]] = {}

    def shard(name: str) -> dict[str, torch.Tensor]:
        if name not in shards:
            shards.clear()  # one shard in memory at a time (index order visits a shard's lines together)
            shards[name] = load_tensors(root / name)
        return shards[name]

    for line in lines:
        if (kept_only and not line["kept"]) or not line.get("keys"):
            continue
        keys = line["keys"]
        tensors = {
            name: shard(line["file"])[keys[name]] for name in ("traj_dense", "traj_topk_indices", "traj_topk_values")
        }
        vsem = (
            load_tensors(root / vsem_file[line["image"]])
            if vsem_file[line["image"]] != line["file"]
            else shard(line["file"])
        )
        tensors["vsem_mean"] = vsem[keys["vsem_mean"]]
        tensors["vsem_tokens"] = vsem[keys["vsem_tokens"]] if keys.get("vsem_tokens") else None
        yield {**line, **tensors}
