"""`latent reproduce coconut`: Coconut's claim on the proving ground, seed-repeated, against its controls.

The claim (Hao et al. 2024, Section 4, Table 1): continuous thoughts that replace the chain of thought step by step
(:mod:`latent_core.coconut`) answer multi-hop questions better than answering directly (their "No-CoT"), with far
fewer generated tokens than the chain of thought, and the thoughts carry the reasoning (replacing them breaks it).

From a base trained on CoT and direct answers (``make-base --mix cot+direct``: a direct answer is a trained skill,
so "direct" is a fair control) and its own shapes data (with the multi-hop kinds ``hop1..3`` of ``make-shapes
--hops``), this command runs:

1. the base's shapes data (regenerated from its ``make_base.json``);
2. for each seed of ``--seeds``: ``latent coconut train`` from the base with the same steps, batch and learning
   rate (the seed changes the data order);
3. on the first ``--eval-samples`` test questions (``test/llava_cot.jsonl``, the training prompt): the base asked
   with its chain of thought (``cot``) and directly (``direct``), each seed's last stage (``coconut``, with its
   thoughts zeroed and shuffled), each with blank images; the majority baseline. ``--eval-stages k,..`` also
   evaluates the first seed's intermediate stages k (k * c thoughts, then the steps left in text): where along the
   curriculum the accuracy goes.

``--kinds`` trains and evaluates on those question kinds only (:func:`latent_apps.shapes.select_kinds`, in
``<out>/shapes-kinds``): e.g. the kinds that aggregate over the scene (``count,exists,compare``), where the base's
direct answer sits at the answer prior and its chain of thought does not, with ``--unit sentence`` (one step per
scanned cell) and M the number of steps.

Outputs in ``--out``: ``results.json``, ``results.md`` (accuracy per kind and over the 2-3 hop questions, seed mean
and spread, generated tokens, controls) and ``accuracy_vs_hops.png``; every intermediate directory is reused on a
re-run with the same settings (another setting with the same ``--out`` is refused). The last stdout line is one JSON
record.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latent_apps.reproduce.common import (
    BASE_ROOT,
    HARD_HOPS,
    EvalJob,
    check_settings,
    checkout,
    eval_rows,
    num,
    pct,
    say,
    spread,
)

__all__ = ["CoconutRun", "reproduce_coconut"]

BASE = BASE_ROOT / "mllama-mix"
HOPS = ("hop1", *HARD_HOPS)
KINDS = ("colour", "exists", "count", "compare", *HOPS)


@dataclass
class CoconutRun:
    """Settings of one reproduction (every one a CLI flag; see the module docstring)."""

    out: Path = Path("runs/reproduce/coconut")
    base: Path | None = None
    shapes: Path | None = None
    steps_per_stage: int = 200
    c_thought: int = 2
    max_latent_stage: int = 3
    unit: str = "stage"
    batch_size: int = 32
    learning_rate: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    kinds: tuple[str, ...] = ()
    eval_stages: tuple[int, ...] = ()
    eval_samples: int | None = 400
    eval_batch_size: int = 50
    cot_max_new_tokens: int = 512
    show_progress: bool = True

    def resolve(self) -> CoconutRun:
        self.base = Path(self.base or checkout() / BASE)
        self.shapes = Path(self.shapes or self.out / "shapes")
        self.seeds, self.kinds, self.eval_stages = tuple(self.seeds), tuple(self.kinds), tuple(self.eval_stages)
        from latent_core.cli import UserError

        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise UserError(f"unknown question kinds {', '.join(unknown)}: choose among {', '.join(KINDS)}")
        late = [k for k in self.eval_stages if not 1 <= k < self.max_latent_stage]
        if late:
            raise UserError(f"--eval-stages {', '.join(map(str, late))}: stages 1..{self.max_latent_stage - 1} "
                            f"(stage {self.max_latent_stage} is always evaluated)")  # fmt: skip
        if not (self.base / "config.json").is_file():
            raise UserError(f"the base {self.base} is missing: pass --base DIR or train one with `uv run apps/cli "
                            "make-base --family mllama --size deep --mix cot+direct --shapes DIR` on the data of "
                            "`make-shapes --hops 1,2,3`")  # fmt: skip
        return self


def _train(run: CoconutRun, shapes: Path) -> dict[int, Path]:
    """Step 2: one Coconut run per seed (a finished stage is reused, a killed one resumes)."""
    from latent_core.coconut import COCONUT_NAME, CoconutConfig, read_coconut_rows, train_coconut
    from latent_core.readers import ReadReport

    config = CoconutConfig(c_thought=run.c_thought, max_latent_stage=run.max_latent_stage, unit=run.unit)
    rows: list[dict[str, Any]] = []
    finals = {}
    for seed in run.seeds:
        out = run.out / "train" / f"seed-{seed}"
        settings = {"base": str(run.base), "config": asdict(config), "steps_per_stage": run.steps_per_stage,
                    "batch_size": run.batch_size, "learning_rate": run.learning_rate, "seed": seed}  # fmt: skip
        if run.kinds:  # without them, the settings of earlier runs byte for byte
            settings["kinds"] = list(run.kinds)
        check_settings(out, settings, reuse=True)
        final = out / f"stage_{config.max_latent_stage}"
        if not (final / COCONUT_NAME).is_file():
            if not rows:
                report = ReadReport("train")
                rows = read_coconut_rows(shapes / "train" / "llava_cot.jsonl", shapes, config, report)
                if report.total_skipped:
                    raise ValueError(f"{shapes}/train/llava_cot.jsonl: {report}")
            say("coconut", run.show_progress, f"training seed {seed}: stages 1..{config.max_latent_stage}, "
                f"{run.steps_per_stage} steps each")  # fmt: skip
            train_coconut(run.base, rows, out, config, run.steps_per_stage, batch_size=run.batch_size,
                          learning_rate=run.learning_rate, seed=seed, show_progress=False)  # fmt: skip
        finals[seed] = final
    return finals


def _evaluate(run: CoconutRun, shapes: Path, finals: dict[int, Path]) -> dict[str, dict[str, Any]]:
    """Step 3: the base's CoT and direct answers, every seed's Coconut, with their controls."""

    def job(label: str, model: str | Path, method: str, options: dict | None, tokens: int) -> EvalJob:
        out = run.out / "eval" / label.split(" (")[0].replace(", ", "-").replace(" ", "-").lower()
        return EvalJob(label, model, method, options, tokens, out)

    jobs = [job("CoT (the base)", run.base, "cot", None, run.cot_max_new_tokens),
            job("direct (the base)", run.base, "direct", None, 32)]  # fmt: skip
    jobs += [job(f"Coconut, seed {s}", d, "coconut", {"diagnostics": True}, 64) for s, d in finals.items()]
    first = next(iter(finals))
    stages = [job(f"Coconut stage {k}, seed {first}", finals[first].parent / f"stage_{k}", "coconut",
                  {"diagnostics": True}, run.cot_max_new_tokens) for k in run.eval_stages]  # fmt: skip
    test = shapes / "test" / "llava_cot.jsonl"
    rows = eval_rows(jobs + stages, test, run.eval_samples, run.eval_batch_size, run.show_progress, tag="coconut")
    staged = {r["id"]: r["conversations"][1]["value"] for r in map(json.loads, test.open(encoding="utf-8"))}
    for j in stages:
        samples = [json.loads(x) for x in (j.out / test.stem / "samples.jsonl").open(encoding="utf-8")]
        rows[j.label]["carried_count"] = carried_counts(samples, staged)
    return rows


def carried_counts(samples: list[dict[str, Any]], staged: dict[str, str]) -> dict[str, Any] | None:
    """What an intermediate stage's thoughts hand on, on its count / exists questions: the first scanned cell
    written after the thoughts carries the running count of the cells they replaced. Returns, over the questions
    whose output writes a cell: how often that first running count equals the gold one at that cell (``right``),
    how often always writing that cell's most common gold value would be (``majority``: what carrying nothing
    gives), how often every written verdict is right (``verdicts_right``), and the questions that wrote no cell
    (``no_cell``); ``None`` without such questions. ``staged``: the gold staged answer of each sample id."""
    from collections import Counter

    from latent_apps.shapes import scan_entries

    right = verdicts = no_cell = 0
    gold_values: Counter = Counter()
    for sample in samples:
        if sample["category"] not in ("count", "exists"):
            continue
        gold = {cell: (verdict, total) for cell, verdict, total in scan_entries(staged[sample["id"]])}
        written = scan_entries(sample["prediction"])
        if not written or written[0][0] not in gold:
            no_cell += 1
            continue
        cell, _, total = written[0]
        gold_values[(cell, gold[cell][1])] += 1
        right += total == gold[cell][1]
        verdicts += all(gold.get(c, ("",))[0] == v for c, v, _ in written)
    n = sum(gold_values.values())
    if not n:
        return None
    best: dict[str, int] = {}
    for (cell, _), count in gold_values.items():
        best[cell] = max(best.get(cell, 0), count)
    return {"n": n, "right": right / n, "majority": sum(best.values()) / n, "verdicts_right": verdicts / n,
            "no_cell": no_cell}  # fmt: skip


def _coconut_summary(evaluated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Coconut's seeds: mean and spread of each number the table reports."""
    seeds = [r for label, r in evaluated.items() if label.startswith("Coconut, seed")]
    out: dict[str, Any] = {
        "accuracy": spread([r["accuracy"] for r in seeds]),
        "hop23_accuracy": spread([r["hop23_accuracy"] for r in seeds]),
        "blank_accuracy": spread([r.get("blank_accuracy") for r in seeds]),
        "generated_tokens": spread([r["generated_tokens"] for r in seeds]),
        "per_kind": {k: spread([r["accuracy_per_kind"].get(k) for r in seeds]) for k in KINDS},
    }
    for control in ("zero", "shuffle"):
        rows = [r.get("latent_controls", {}).get(control) for r in seeds]
        out[f"{control}_accuracy"] = spread([c["accuracy"] for c in rows if c])
        out[f"{control}_change_rate"] = spread([c["change_rate"] for c in rows if c])
    return out


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Coconut on the proving ground (`uv run apps/cli reproduce coconut`)",
        "",
        "| model | accuracy | " + " | ".join(KINDS) + " | hop 2-3 | blank images | tokens | truncated |",
        "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["eval"].items():
        kinds = row["accuracy_per_kind"]
        lines.append(
            f"| {name} | {pct(row['accuracy'])} | " + " | ".join(pct(kinds.get(k)) for k in KINDS)
            + f" | {pct(row['hop23_accuracy'])} | {pct(row.get('blank_accuracy'))} | "
            f"{num(row['generated_tokens'], '.1f')} | {row['truncated']} |"
        )  # fmt: skip
    c = results["coconut"]

    def ms(entry: dict[str, Any]) -> str:
        return "" if entry["mean"] is None else f"{pct(entry['mean'])} ± {pct(entry['std'])}"

    first = next(iter(results["eval"].values()))
    lines += [
        "",
        f"Coconut over {c['accuracy']['n']} seeds (mean ± population std): accuracy {ms(c['accuracy'])}, "
        f"hop 2-3 {ms(c['hop23_accuracy'])}; thoughts zeroed {ms(c['zero_accuracy'])} (answers changed "
        f"{ms(c['zero_change_rate'])}), shuffled {ms(c['shuffle_accuracy'])} (changed {ms(c['shuffle_change_rate'])}); "
        f"blank images {ms(c['blank_accuracy'])}.",
        f"Majority baseline: {pct(first['majority_baseline'])} ({first['n']} test questions). Tokens: generated "
        "tokens per answer (Coconut's thoughts are not tokens: it also runs its thoughts and 2 delimiters).",
    ]  # fmt: skip
    carried = [(name, row["carried_count"]) for name, row in results["eval"].items() if row.get("carried_count")]
    if carried:
        lines += [
            "",
            "What the thoughts hand on (count / exists questions of each intermediate stage; "
            "`carried_counts`): the running count written at the first cell after the thoughts.",
            "",
        ]
        lines += [f"- {name}: right {pct(c['right'])} (its cell's most common value: {pct(c['majority'])}); every "
                  f"written verdict right {pct(c['verdicts_right'])}; {c['n']} questions, {c['no_cell']} wrote no cell"
                  for name, c in carried]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against hops (when the questions have hop kinds), against generated tokens, and along the first
    seed's curriculum (when ``--eval-stages`` evaluated some: stage 0 is the base's CoT, stage M the final row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["eval"]
    stages = {int(name.split()[2].rstrip(",")): row for name, row in rows.items() if name.startswith("Coconut stage")}
    with_hops = any(k in row["accuracy_per_kind"] for row in rows.values() for k in HOPS)
    panels = 1 + with_hops + bool(stages)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    hops = axes.pop(0) if with_hops else None
    tokens = axes.pop(0)
    for name, row in rows.items():
        if hops is not None:
            kinds = row["accuracy_per_kind"]
            hops.plot([1, 2, 3], [100 * kinds[k] if k in kinds else float("nan") for k in HOPS], marker="o",
                      label=name)  # fmt: skip
            blank = row.get("blank_accuracy_per_kind") or {}
            if name.startswith("direct"):
                hops.plot([1, 2, 3], [100 * blank.get(k, float("nan")) for k in HOPS], linestyle=":", color="grey",
                          label="direct, blank images")  # fmt: skip
        tokens.scatter(row["generated_tokens"], 100 * row["accuracy"], s=30)
        tokens.annotate(name, (row["generated_tokens"], 100 * row["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    majority = 100 * rows["CoT (the base)"]["majority_baseline"]
    tokens.axhline(majority, linestyle="--", color="grey", linewidth=1)
    tokens.set_xscale("log")
    tokens.set_xlabel("generated tokens per answer (log)")
    tokens.set_ylabel("test accuracy (%)")
    tokens.set_title("accuracy against generated tokens")
    if hops is not None:
        hops.set_xticks([1, 2, 3])
        hops.set_xlabel("hops")
        hops.set_ylabel("test accuracy (%)")
        hops.set_title("accuracy against hops")
        hops.legend(fontsize=7)
    if stages:
        curve_axis = axes.pop(0)
        first = next(name for name in rows if name.startswith("Coconut, seed"))
        curve = {0: rows["CoT (the base)"], **stages, int(results["settings"]["max_latent_stage"]): rows[first]}
        xs = sorted(curve)
        curve_axis.plot(xs, [100 * curve[k]["accuracy"] for k in xs], marker="o", label=f"{first}, stage k")
        curve_axis.axhline(100 * rows["direct (the base)"]["accuracy"], linestyle="--", color="tab:orange",
                           label="direct (the base)")  # fmt: skip
        curve_axis.axhline(majority, linestyle=":", color="grey", label="majority")
        curve_axis.set_xlabel("curriculum stage k (0 = the CoT base)")
        curve_axis.set_ylabel("test accuracy (%)")
        curve_axis.set_title("accuracy along the curriculum")
        curve_axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reproduce_coconut(run: CoconutRun, command: str = "") -> dict[str, Any]:
    """Run the whole reproduction (module docstring); returns ``results.json``'s content, whose ``record`` is the
    last stdout line of the command."""
    from latent_apps.base import base_shapes

    start = time.perf_counter()
    run.resolve()
    run.out.mkdir(parents=True, exist_ok=True)
    shapes = base_shapes(run.base, run.shapes)
    if run.kinds:
        from latent_apps.shapes import select_kinds

        shapes = select_kinds(shapes, run.kinds, run.out / "shapes-kinds")
    finals = _train(run, shapes)
    evaluated = _evaluate(run, shapes, finals)
    coconut = _coconut_summary(evaluated)
    cot, direct = evaluated["CoT (the base)"], evaluated["direct (the base)"]
    record = {
        "cot_accuracy": cot["accuracy"],
        "direct_accuracy": direct["accuracy"],
        "coconut_accuracy": coconut["accuracy"]["mean"],
        "coconut_accuracy_std": coconut["accuracy"]["std"],
        "cot_hop23_accuracy": cot["hop23_accuracy"],
        "direct_hop23_accuracy": direct["hop23_accuracy"],
        "coconut_hop23_accuracy": coconut["hop23_accuracy"]["mean"],
        "coconut_hop23_accuracy_std": coconut["hop23_accuracy"]["std"],
        "coconut_zero_accuracy": coconut["zero_accuracy"]["mean"],
        "coconut_shuffle_accuracy": coconut["shuffle_accuracy"]["mean"],
        "cot_tokens": cot["generated_tokens"],
        "coconut_tokens": coconut["generated_tokens"]["mean"],
        "cot_blank_accuracy": cot.get("blank_accuracy"),
        "direct_blank_accuracy": direct.get("blank_accuracy"),
        "coconut_blank_accuracy": coconut["blank_accuracy"]["mean"],
        "majority_accuracy": cot["majority_baseline"],
        "seeds": len(run.seeds),
        "kinds": list(run.kinds) or None,
        "eval_n": cot["n"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    results = {
        "command": command,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()},
        "base": json.loads((run.base / "make_base.json").read_text()).get("command")
        if (run.base / "make_base.json").is_file()
        else None,
        "eval": evaluated,
        "coconut": coconut,
        "record": record,
    }
    (run.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (run.out / "results.md").write_text(_markdown(results))
    _plot(results, run.out / "accuracy_vs_hops.png")
    return results
