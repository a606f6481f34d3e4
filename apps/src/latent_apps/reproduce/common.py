"""What the reproductions share: where the shipped bases are, progress lines, the settings check that keeps a
re-run from mixing results made with other settings, directory slugs, the choice of ablations, one evaluation row
(with its accuracy over the 2-3 hop questions) and the loop that evaluates a list of models into such rows, the seed
mean and spread, and number formatting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "BASE_ROOT", "HARD_HOPS", "SETTINGS_NAME", "EvalJob", "check_settings", "checkout", "choose_ablations",
    "eval_row", "eval_rows", "kinds_accuracy", "num", "pct", "say", "slug", "spread",
]  # fmt: skip

BASE_ROOT = Path("data") / "base"
SETTINGS_NAME = "reproduce_settings.json"


def checkout() -> Path:
    """The checkout holding ``data/base`` (the working directory or above it, or above this file)."""
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            if (parent / BASE_ROOT).is_dir():
                return parent
    return Path.cwd()


def say(method: str, show: bool, message: str) -> None:
    """A progress line on stderr: ``reproduce <method> <message>``."""
    if show:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]reproduce {method}[/bold] {message}")


def check_settings(directory: Path, settings: dict[str, Any], reuse: bool) -> None:
    """A step's output is reused only if it was made with the same settings: a re-run with other settings and the
    same ``--out`` is refused (use another ``--out``), never mixed with the old results."""
    path = directory / SETTINGS_NAME
    if reuse and path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(settings)):  # tuples
        from latent_core.cli import UserError

        raise UserError(f"{directory} was made with other settings ({path}): use another --out")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def slug(name: str) -> str:
    """A variant's name as a directory name: ``w/o L_traj`` -> ``no-ltraj``."""
    return name.lower().replace("w/o ", "no-").replace(" ", "-").replace("_", "")


def choose_ablations(chosen: Any, known: list[str]) -> tuple[str, ...]:
    """The ablations a reproduction trains, by slug (:func:`slug`); an unknown one is a one-line error."""
    chosen = tuple(chosen)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        from latent_core.cli import UserError

        raise UserError(f"unknown ablations {', '.join(unknown)}: choose among {', '.join(known)}")
    return chosen


HARD_HOPS: tuple[str, ...] = ("hop2", "hop3")
"""The question kinds of the proving ground's target (``make-shapes --hops``): two and three serial hops."""


def kinds_accuracy(row: dict[str, Any], kinds: tuple[str, ...] = HARD_HOPS, key: str = "accuracy_per_kind"):
    """Accuracy over the questions of ``kinds`` (each kind weighted by its count); ``None`` without them."""
    counts, per_kind = row.get("count_per_kind") or {}, row.get(key) or {}
    total = sum(counts.get(k, 0) for k in kinds)
    if not total or any(k not in per_kind for k in kinds if counts.get(k)):
        return None
    return sum(per_kind[k] * counts.get(k, 0) for k in kinds if counts.get(k)) / total


def spread(values: list[Any]) -> dict[str, Any]:
    """Mean, population standard deviation, min and max of the seeds' values (``None`` ones left out)."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip


def eval_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The row of one evaluation summary in the reproductions' tables: accuracy (per kind, with the kinds' counts,
    and over the 2-3 hop questions), controls (majority, blank images per kind, the latent controls where the
    method ran them), tokens, truncated / unanswered counts."""
    row = {
        "n": summary["n"],
        "accuracy": summary["accuracy"],
        "accuracy_per_kind": {k: v["accuracy"] for k, v in summary["accuracy_per_category"].items()},
        "majority_baseline": summary["majority_baseline"]["accuracy"],
        "generated_tokens": summary["mean_generated_tokens"],
        "reasoning_tokens": summary["mean_reasoning_tokens"],
        "thinking_tokens": summary.get("mean_thinking_tokens"),
        "truncated": summary["n_truncated"],
        "unanswered": summary["n_unanswered"],
        "latency_s": summary["mean_latency_s"],
    }
    row["count_per_kind"] = {k: v["n"] for k, v in summary["accuracy_per_category"].items()}
    if summary.get("blank"):
        row["blank_accuracy"] = summary["blank"]["accuracy"]
        row["blank_accuracy_per_kind"] = {
            k: v["accuracy"] for k, v in (summary["blank"].get("accuracy_per_category") or {}).items()
        }
    for key in ("mean_latent_steps", "mean_latent_similarity", "latent_controls"):
        if summary.get(key) is not None:
            row[key] = summary[key]
    row["hop23_accuracy"] = kinds_accuracy(row)
    return row


class EvalJob(NamedTuple):
    """One model to evaluate: its row label, checkpoint, ``latent eval`` method and options, generation budget and
    output directory."""

    label: str
    model: str | Path
    method: str
    options: dict[str, Any] | None
    max_new_tokens: int
    out: Path


def eval_rows(
    jobs: Sequence[EvalJob],
    bench: Path,
    limit: int | None,
    batch_size: int,
    show_progress: bool = False,
    tag: str | None = None,
) -> dict[str, dict[str, Any]]:
    """``{label: eval_row}`` of every job: ``latent eval`` of its model on ``bench`` with the blank-image control
    (resumable per job: :func:`latent_apps.eval.runner.run_eval`), a progress line under ``tag`` when given."""
    from latent_apps.eval.runner import run_eval

    rows = {}
    for job in jobs:
        if tag:
            say(tag, show_progress, f"evaluating {job.label}")
        summary = run_eval(
            str(job.model), job.method, [bench], job.out, batch_size=batch_size, max_new_tokens=job.max_new_tokens,
            limit=limit, method_options=job.options or None, blank=True, show_progress=show_progress,
        )["benches"][bench.stem]  # fmt: skip
        rows[job.label] = eval_row(summary)
    return rows


def pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def num(value: Any, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)
