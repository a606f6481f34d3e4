"""What the reproductions share: where the shipped bases are, progress lines, the settings check that keeps a
re-run from mixing results made with other settings, directory slugs, one evaluation row, and number formatting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BASE_ROOT", "SETTINGS_NAME", "check_settings", "checkout", "eval_row", "num", "pct", "say", "slug"]

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
    if reuse and path.is_file() and json.loads(path.read_text()) != settings:
        from latent_core.cli import UserError

        raise UserError(f"{directory} was made with other settings ({path}): use another --out")
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def slug(name: str) -> str:
    """A variant's name as a directory name: ``w/o L_traj`` -> ``no-ltraj``."""
    return name.lower().replace("w/o ", "no-").replace(" ", "-").replace("_", "")


def eval_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The row of one evaluation summary in the reproductions' tables."""
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
    if summary.get("blank"):
        row["blank_accuracy"] = summary["blank"]["accuracy"]
    return row


def pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def num(value: Any, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)
