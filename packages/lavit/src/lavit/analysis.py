"""LaViT's attention analysis (Table 2, Figure 5) and the latent diagnostics (METHODS.md section 2).

Attention maps are a model's attention over the image tokens (any non-negative scores; renormalised here):

- :func:`attention_stats`: the entropy (nats) of the renormalised map, the salient-region count (tokens above 1.5x
  the mean) and the coefficient of variation (std / mean);
- :func:`map_kl`: KL(teacher || model) between two maps on the same grid (``eps`` floors the model's zeros);
- :func:`mean_pairwise_cosine` (:mod:`latent_core.diagnostics`, shared with LaRe): the mean cosine between the
  latents of different samples (near 1: the latents collapsed to one vector whatever the input, the complaint
  users of other implementations report);
- :func:`change_rate`: how often an answer changes when the latents are zeroed, shuffled or masked;
- :func:`response_maps`: each model's map on the same inputs (any Qwen2.5-VL: a base, the teacher, a naive-SFT or a
  LaViT student), from its own greedy response: one teacher-forced pass over prompt + (latents) + answer records
  the attention of the **response queries** over the image keys (mean over heads and layers, then over the
  queries; :func:`latent_core.record_attention`). The response queries are the
  positions that produce the response: for a plain model the last prompt position (it predicts the first answer
  token) and every answer token fed; for a LaViT student the K latent positions and every answer token fed (the
  last latent predicts the first answer token). ``answer_map`` leaves the first K - 1 latent rows out (the
  like-for-like comparison with a plain model), ``latent_map`` is the K latent rows alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from latent_core.diagnostics import change_rate, mean_pairwise_cosine
from torch import Tensor

__all__ = [
    "ResponseMap",
    "analyze_models",
    "attention_stats",
    "change_rate",
    "map_kl",
    "mean_pairwise_cosine",
    "response_maps",
    "write_overlay",
]


def attention_stats(scores: Tensor, salient_factor: float = 1.5) -> dict[str, float]:
    """``entropy`` (nats, of the map renormalised to sum to 1), ``salient`` (tokens above ``salient_factor`` x the
    mean) and ``cv`` (population standard deviation / mean) of an attention map ``[n]``."""
    p = scores.double().flatten()
    p = p / p.sum()
    inside = p > 0
    entropy = float(-(p[inside] * p[inside].log()).sum())
    mean = float(p.mean())
    return {
        "entropy": entropy,
        "salient": int((p > salient_factor * mean).sum()),
        "cv": float(p.std(unbiased=False)) / mean,
    }


def map_kl(teacher: Tensor, model: Tensor, eps: float = 1e-12) -> float:
    """KL(teacher || model) in nats between two attention maps over the same image tokens (both renormalised)."""
    p = teacher.double().flatten()
    q = model.double().flatten()
    p, q = p / p.sum(), (q / q.sum()).clamp(min=eps)
    inside = p > 0
    return float((p[inside] * (p[inside].log() - q[inside].log())).sum())


@dataclass
class ResponseMap:
    """One sample's attention maps (see the module docstring): ``response_map`` (every response query),
    ``answer_map`` (the queries that predict answer tokens), ``latent_map`` (the K latent rows; ``None`` for a plain
    model), each ``[n_image]`` raw attention mass; ``grid`` the merged ``(h, w)``; the greedy ``answer``."""

    answer: str
    answer_ids: list[int]
    response_map: Tensor
    answer_map: Tensor
    latent_map: Tensor | None
    grid: tuple[int, int]


@torch.no_grad()
def response_maps(
    model: Any,
    processor: Any,
    images: list[Any],
    questions: list[str],
    latent_ids: Sequence[int] | None = None,
    mode: str = "continuous",
    max_new_tokens: int = 64,
    system: str | None = None,
) -> list[ResponseMap]:
    """Greedy answers and the response-query attention maps of one batch (see the module docstring).

    Args:
        model: a Qwen2.5-VL-like model (a LaViT student with its latent tokens, or any plain one), eval mode.
        processor: its processor.
        images, questions: one PIL image and one user text (:func:`latent_core.prompts.question_text`) per sample.
        latent_ids: the student's ``<v-trace_1..K>`` ids; ``None``: a plain model (no latent block).
        mode: ``continuous`` or ``discrete`` (students only).
        max_new_tokens: the answer budget (a longer answer is cut; its fed tokens still count).
        system: the model's system turn (:func:`lavit.generate.load_student`; ``None``: the template's).
    """
    from latent_core.attention import record_attention
    from latent_core.families import backbone_of, image_token_mask
    from latent_core.latents import forward_with_latents
    from latent_core.prompts import encode_chats, render_prompts

    from lavit.generate import generate_answers
    from lavit.model import append_tokens, merged_grids

    tokenizer = getattr(processor, "tokenizer", processor)
    chats = render_prompts(processor, questions, [1] * len(questions), system=system)
    inputs = dict(encode_chats(processor, chats, [[i] for i in images]))
    inputs = {k: v.to(model.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    batch, prompt_len = inputs["input_ids"].shape
    k = len(latent_ids) if latent_ids else 0
    answers = generate_answers(model, processor, images, questions, latent_ids, mode, max_new_tokens, system=system)
    sequences = answers.sequences
    lengths = [len(row) for row in sequences]
    width = max(max(lengths), 1)
    answer_ids = torch.full((batch, width), tokenizer.pad_token_id or 0, dtype=torch.long, device=model.device)
    for b, row in enumerate(sequences):
        answer_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    total = prompt_len + k + width
    start = prompt_len if k else prompt_len - 1  # the first response query
    columns = torch.arange(total, device=model.device)[None]
    ends_at = prompt_len + k + torch.tensor(lengths, device=model.device)[:, None]
    queries = (columns >= start) & (columns < ends_at)
    image = torch.nn.functional.pad(image_token_mask(model, inputs["input_ids"]), (0, total - prompt_len))
    with record_attention(model, queries, image) as recorder:
        if k and mode == "continuous":
            # the loop feeds every answer token but the last (whose output predicts nothing): one more column
            fed = torch.nn.functional.pad(answer_ids, (0, 1), value=tokenizer.pad_token_id or 0)
            forward_with_latents(model, inputs, k - 1, start_ids=list(latent_ids[:1]), answer_ids=fed)
        else:
            extra = answer_ids
            if k:
                block = torch.tensor(list(latent_ids), device=model.device).expand(batch, -1)
                extra = torch.cat([block, answer_ids], 1)
            backbone_of(model)(**append_tokens(inputs, extra))  # no LM head; PEFT-wrapped too
        rows = recorder.weights
    grids = merged_grids(model, inputs)
    results = []
    for b in range(batch):
        sample = rows[b].float().cpu()  # [n_queries, n_image]
        latent = sample[:k].mean(0) if k else None
        predicting = sample[k - 1 :] if k else sample
        results.append(
            ResponseMap(
                answer=answers.texts[b],
                answer_ids=list(sequences[b]),
                response_map=sample.mean(0),
                answer_map=predicting.mean(0),
                latent_map=latent,
                grid=grids[b],
            )
        )
    return results


def write_overlay(
    path: str | Path, image: Any, maps: dict[str, Tensor], grids: dict[str, tuple[int, int]], title: str = ""
) -> None:
    """A side-by-side PNG: the image, then each model's map (renormalised) over it, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = image.size
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.4 * (len(maps) + 1), 2.6))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for ax, (name, scores) in zip(axes[1:], maps.items(), strict=True):
        h, w = grids[name]
        heat = (scores / scores.sum().clamp(min=1e-12)).reshape(h, w).numpy()
        ax.imshow(image)
        ax.imshow(heat, cmap="inferno", alpha=0.55, extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # drop nan
    return sum(values) / len(values) if values else None


def analyze_models(
    models: dict[str, str],
    samples: list[dict[str, Any]],
    out: str | Path,
    teacher: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    overlays: int = 8,
    loader: Any = None,
    plain_inputs: Any = None,
) -> dict[str, Any]:
    """Table 2 / Figure 5 and the latent diagnostics for a set of models on the same samples.

    For every model (name -> a ``lavit train`` stage, a naive-SFT stage or any Qwen2.5-VL checkpoint) and sample:
    the greedy answer (its ``<CONCLUSION>`` when it writes one, scored against the gold one with
    :func:`lavit.filters.answers_match`) and its response maps
    (:func:`response_maps`) with :func:`attention_stats`; the KL of each model's maps to the ``teacher`` model's
    response map (resampled onto the model's grid when grids differ), and to that map made into L_traj's target
    (:func:`lavit.teacher.trajectory_target`: min-max, Top-K, renormalised). For a LaViT student, the diagnostics:
    answers with the latents zeroed, shuffled across the batch (continuous mode) and masked, their accuracies and
    change rates against the real answers, and the mean pairwise cosine of the latents fed.

    Writes ``<out>/samples.jsonl`` (per sample and model), ``<out>/analysis.json`` (the summary, returned) and
    ``<out>/overlays/<n>.png`` (the first ``overlays`` samples, one panel per model). ``loader(path) -> (model,
    processor, latent_ids, mode, system)`` defaults to :func:`lavit.generate.load_student` (a plain checkpoint
    presented with ``plain_inputs``: default the paper's :class:`lavit.config.InputSettings`).
    """
    from latent_core.answers import answers_match
    from latent_core.readers import conclusion_of

    from lavit.generate import generate_answers, load_student
    from lavit.losses import resample_trajectory
    from lavit.teacher import trajectory_target

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = loader or partial(load_student, plain_inputs=plain_inputs)
    if teacher is not None and teacher not in models:
        raise ValueError(f"the teacher {teacher!r} is not one of the models {sorted(models)}")
    order = ([teacher] if teacher else []) + [name for name in models if name != teacher]
    per_sample: dict[str, list[dict[str, Any]]] = {}
    maps: dict[str, list[ResponseMap]] = {}
    summary: dict[str, Any] = {"samples": len(samples), "teacher": teacher, "models": {}}
    for name in order:
        model, processor, latent_ids, mode, system = loader(models[name])
        found: list[ResponseMap] = []
        diag: dict[str, list] = {"zero": [], "shuffle": [], "masked": [], "latents": []}
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images, texts = [s["image"] for s in chunk], [s["text"] for s in chunk]
            found += response_maps(model, processor, images, texts, latent_ids, mode, max_new_tokens, system)
            if latent_ids:
                run = partial(
                    generate_answers, model, processor, images, texts, latent_ids, mode, max_new_tokens, system=system
                )
                diag["masked"] += run(mask_latents=True).texts
                if mode == "continuous":
                    diag["zero"] += run(latents="zero").texts
                    diag["shuffle"] += run(latents="shuffle").texts
                    diag["latents"].append(run().latents.cpu())
        del model
        maps[name] = found
        rows = []
        for sample, got in zip(samples, found, strict=True):
            final = conclusion_of(got.answer) or got.answer  # a chain-of-thought model's <CONCLUSION>
            row = {"id": sample["id"], "model": name, "answer": got.answer, "final": final, "grid": list(got.grid)}
            if sample.get("answer") is not None:
                row["correct"] = answers_match(final, str(sample["answer"]))
            row.update({f"answer_{k}": v for k, v in attention_stats(got.answer_map).items()})
            row.update({f"response_{k}": v for k, v in attention_stats(got.response_map).items()})
            if got.latent_map is not None:
                row.update({f"latent_{k}": v for k, v in attention_stats(got.latent_map).items()})
            rows.append(row)
        if teacher is not None:
            for row, got, ref in zip(rows, found, maps[teacher], strict=True):
                target = resample_trajectory(ref.response_map / ref.response_map.sum(), ref.grid, got.grid)
                row["kl_to_teacher"] = map_kl(target, got.response_map)
                row["kl_to_teacher_answer"] = map_kl(target, got.answer_map)
                # the same map as L_traj's target: min-max, Top-K, renormalised (Eq. 3)
                top_k = resample_trajectory(trajectory_target(ref.response_map)["target"], ref.grid, got.grid)
                row["kl_to_traj_target"] = map_kl(top_k, got.response_map)
                if got.latent_map is not None:
                    row["kl_to_teacher_latent"] = map_kl(target, got.latent_map)
                    row["kl_to_traj_target_latent"] = map_kl(top_k, got.latent_map)
        keys = sorted({key for row in rows for key in row if key not in ("id", "model", "answer", "final", "grid")})
        entry: dict[str, Any] = {"path": str(models[name]), "mode": mode}
        entry.update({key: _mean([float(row[key]) for row in rows if key in row]) for key in keys})
        answers = [got.answer for got in found]
        if latent_ids:
            gold = [s.get("answer") for s in samples]
            entry["diagnostics"] = {}
            for kind in ("zero", "shuffle", "masked"):
                if not diag[kind]:
                    continue
                right = [answers_match(a, str(g)) for a, g in zip(diag[kind], gold, strict=True) if g is not None]
                entry["diagnostics"][kind] = {
                    "accuracy": _mean([float(r) for r in right]),
                    "change_rate": change_rate(answers, diag[kind]),
                }
            if diag["latents"]:
                fed = torch.cat([t.reshape(t.shape[0], -1) for t in diag["latents"]])
                entry["diagnostics"]["mean_pairwise_cosine"] = mean_pairwise_cosine(fed[:, None])
        summary["models"][name] = entry
        per_sample[name] = rows
    with (out / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for name in order:
            for row in per_sample[name]:
                handle.write(json.dumps(row) + "\n")
    for i, sample in enumerate(samples[:overlays]):
        panels = {name: maps[name][i].response_map for name in order}
        grids = {name: maps[name][i].grid for name in order}
        finals = {name: conclusion_of(maps[name][i].answer) or maps[name][i].answer for name in order}
        title = f"{sample['id']}: " + "; ".join(f"{name} {finals[name][:20]!r}" for name in order)
        write_overlay(out / "overlays" / f"{i:03d}.png", sample["image"], panels, grids, title)
    (out / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
