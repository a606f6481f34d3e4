"""`latent reproduce all`: every method on the proving ground, from the same data and budget, in one table.

The proving ground (issue 26): the shapes task with multi-hop colour questions (``make-shapes --hops 1,2,3``: the
answer needs h = 1, 2, 3 serial local steps) and bases trained on chain-of-thought *and* direct answers
(``make-base --mix cot+direct``), so a direct answer is a trained skill and the fair floor of every latent method.
Each paper keeps its own model family, all trained on the same shapes data (checked: the bases' ``make_base.json``
must name the same ``make-shapes`` arguments):

- ``--base`` (mllama): the CoT and direct-answer rows, Heima (``reproduce heima``: progressive and one-shot, with
  its interpreters) and Coconut (``reproduce coconut``);
- ``--lavit-student`` / ``--lavit-teacher`` (Qwen2.5-VL): LaViT, its naive-SFT control and w/o L_traj
  (``reproduce lavit``);
- ``--lare-base`` (llava): LaRe, its no-latent control and w/o extractor (``reproduce lare``).

Every method's own reproduction runs once per seed of ``--seeds`` (Coconut's runs every seed itself) in
``<out>/<method>/seed-<s>``, so their resume and settings checks hold as they are; every trained variant gets the
same budget of ``--steps`` optimizer steps at ``--batch-size`` questions, split over its stages:

- Heima: ``steps // 4`` for each of stages 0..3 (the one-shot ablation: those of stages 1..3, from the base), then
  the recovering stage's own 150 steps for both;
- Coconut: ``steps // 3`` for each of its 3 curriculum stages (c = 2 thoughts per replaced stage);
- LaViT: ``steps`` for every student, T_w = 0.4 ``steps`` (Table A1's 400 of 1000); the teacher data are built
  once (the first seed's run) and reused;
- LaRe: stages I / II / III of ``steps // 120``, ``steps // 6`` and the rest (the no-latent control skips II).

Each evaluates on the first ``--eval-samples`` questions of the same test split (each reproduction's own format of
them, with its training prompt). The table gives, per row, the seed mean ± population spread of the accuracy, of
today's four kinds (colour, exists, count, compare), of the 2-3 hop questions, and of the controls (blank images,
latents zeroed / shuffled, over all questions and over the 2-3 hop ones), generated tokens, the majority
baseline and, for the hop kinds, the accuracy of answering from the question's moves alone (``hop_shortcut``);
``targets`` checks the issue's targets on those numbers (a latent control against the method's own accuracy on
the same 2-3 hop questions). Outputs in ``--out``: ``results.json``, ``results.md``,
``accuracy_vs_tokens_hops.png``; the last stdout line is one JSON record. Invocations with other ``--methods`` or
``--seeds`` and the same ``--out`` and settings fill one table (so sessions can share the comparison):
``results.json`` keeps each (method, seed) reproduction's rows (``runs``), an invocation adds or replaces the ones
it runs, and ``made_by`` names the command behind each. A target judged on the seed spread needs >= 2 seeds of its
method (``met`` is ``None`` until then). Coconut's reproduction trains its seeds in one run: give it all of them at
once.
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
    kinds_accuracy,
    pct,
    say,
    spread,
)

__all__ = ["METHODS", "ROWS", "AllRun", "combine", "reproduce_all", "targets", "verdict"]

METHODS: tuple[str, ...] = ("heima", "coconut", "lavit", "lare")
TODAY: tuple[str, ...] = ("colour", "exists", "count", "compare")
"""The question kinds of the task before the hop questions (the target "direct >= 75% on today's kinds")."""
HOPS: tuple[str, ...] = ("hop1", *HARD_HOPS)

ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("CoT (the base)", "base", "cot", "cot"),
    ("direct (the base)", "base", "direct", "direct"),
    ("Heima, progressive", "heima", "recover", "heima"),
    ("Heima, one-shot", "heima", "one-shot-recover", "heima_oneshot"),
    ("Coconut", "coconut", "Coconut, seed {seed}", "coconut"),
    ("LaViT", "lavit", "LaViT", "lavit"),
    ("LaViT: naive SFT", "lavit", "naive SFT", "lavit_naive"),
    ("LaViT w/o L_traj", "lavit", "w/o L_traj", "lavit_no_ltraj"),
    ("LaRe", "lare", "LaRe", "lare"),
    ("LaRe: no-latent SFT", "lare", "no-latent SFT", "lare_sft"),
    ("LaRe w/o extractor", "lare", "w/o extractor", "lare_no_extractor"),
)
"""The table's rows: (name, the method whose run holds it, its label in that run's ``results["eval"]``, its key
in the JSON record)."""

DEFAULT_BASES = {"base": "mllama-mix", "lavit_student": "qwen2_5_vl-mix", "lavit_teacher": "qwen2_5_vl-small-mix",
                 "lare_base": "llava-mix"}  # fmt: skip
FAMILY = {"base": "mllama", "lavit_student": "qwen2_5_vl", "lavit_teacher": "qwen2_5_vl", "lare_base": "llava"}
NEEDS = {"base": ("heima", "coconut"), "lavit_student": ("lavit",), "lavit_teacher": ("lavit",),
         "lare_base": ("lare",)}  # fmt: skip
"""Which base each method starts from; the CoT / direct rows always come from ``base``."""


@dataclass
class AllRun:
    """Settings of the whole comparison (every one a CLI flag; see the module docstring)."""

    out: Path = Path("runs/reproduce/all")
    base: Path | None = None
    lavit_student: Path | None = None
    lavit_teacher: Path | None = None
    lare_base: Path | None = None
    interpreter_base: Path | None = None
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1200
    batch_size: int = 16
    eval_samples: int = 400
    eval_batch_size: int = 50
    cot_max_new_tokens: int = 512
    show_progress: bool = True

    def resolve(self) -> AllRun:
        """Defaults filled in; unknown methods, missing bases and bases trained on other data refused in one line,
        before anything runs."""
        from latent_core.cli import UserError

        self.methods, self.seeds = tuple(self.methods), tuple(self.seeds)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            given = ", ".join(unknown) or "(none given)"
            raise UserError(f"unknown methods {given}: choose among {', '.join(METHODS)}")
        if not self.seeds:
            raise UserError("no seeds: pass --seeds 0,1,2")
        if self.steps < 120:
            raise UserError(f"--steps {self.steps}: at least 120 (LaRe's stage I gets steps // 120)")
        from latent_apps.base import recorded_shapes_args

        root = checkout() / BASE_ROOT
        args = {}
        for key, default in DEFAULT_BASES.items():
            setattr(self, key, Path(getattr(self, key) or root / default))
            if key != "base" and not any(m in self.methods for m in NEEDS[key]):
                continue
            path = getattr(self, key)
            info = path / "make_base.json"
            if not info.is_file():
                raise UserError(
                    f"the {key.replace('_', ' ')} {path} is missing (needed by {', '.join(NEEDS[key])}): pass "
                    f"--{key.replace('_', '-')} DIR, train one with `uv run apps/cli make-base --family "
                    f"{FAMILY[key]} --mix cot+direct --shapes DIR` on the data of `make-shapes --hops 1,2,3`, or "
                    "leave its methods out of --methods"
                )  # fmt: skip
            args[key] = recorded_shapes_args(path)
        first = args["base"]
        other = {k: v for k, v in args.items() if v != first}
        if other:
            raise UserError(
                f"the bases were trained on other shapes data than --base ({first}): "
                + "; ".join(f"{k} {v}" for k, v in other.items())
                + " - one table needs one test split: train every base on the same make-shapes output"
            )
        return self

    def split(self) -> dict[str, Any]:
        """The per-method step counts of the budget (module docstring)."""
        s1, s2 = self.steps // 120, self.steps // 6
        return {"heima_stage": self.steps // 4, "coconut_stage": self.steps // 3, "lavit": self.steps,
                "lavit_gate_warmup": 2 * self.steps // 5, "lare": (s1, s2, self.steps - s1 - s2)}  # fmt: skip


def _base_rows(run: AllRun, shapes: Path) -> dict[str, dict[str, Any]]:
    """The base's CoT and direct answers (seed-free: greedy decoding of one model)."""
    jobs = [EvalJob(method, run.base, method, None, tokens, run.out / "base" / method)
            for method, tokens in (("cot", run.cot_max_new_tokens), ("direct", 32))]  # fmt: skip
    return eval_rows(jobs, shapes / "test" / "llava_cot.jsonl", run.eval_samples, run.eval_batch_size,
                     run.show_progress, tag="all")  # fmt: skip


def _shortcut(run: AllRun, shapes: Path) -> dict[str, float | None]:
    """The floor of the hop rows: per hop kind (and over 2-3 hops) the accuracy of answering from the question's
    moves alone, never finding the anchor (:func:`latent_apps.shapes.hop_shortcut_accuracy`), on the questions the
    base's rows were evaluated on."""
    from latent_apps.shapes import hop_shortcut_accuracy

    samples = run.out / "base" / "cot" / "llava_cot" / "samples.jsonl"
    ids = [json.loads(line)["id"] for line in samples.open(encoding="utf-8")]
    per_kind = hop_shortcut_accuracy(shapes, ids)
    row = {"accuracy_per_kind": {k: v["accuracy"] for k, v in per_kind.items()},
           "count_per_kind": {k: v["n"] for k, v in per_kind.items()}}  # fmt: skip
    return {**row["accuracy_per_kind"], "hop23": kinds_accuracy(row)}


def _run_methods(run: AllRun, shapes: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Every chosen method's reproduction, once per seed: ``{method: {seed: results}}``."""
    split = run.split()
    done: dict[str, dict[int, dict[str, Any]]] = {}
    common = {"eval_samples": run.eval_samples, "eval_batch_size": run.eval_batch_size,
              "show_progress": run.show_progress}  # fmt: skip
    if "heima" in run.methods:
        from latent_apps.reproduce.heima import HeimaRun, reproduce_heima

        done["heima"] = {}
        for seed in run.seeds:
            say("all", run.show_progress, f"heima, seed {seed}")
            sub = HeimaRun(
                family="mllama", out=run.out / "heima" / f"seed-{seed}", base=run.base, shapes=shapes,
                interpreter_base=run.interpreter_base, stage_steps=split["heima_stage"], batch_size=run.batch_size,
                max_new_tokens=run.cot_max_new_tokens, seed=seed, **common,
            )  # fmt: skip
            done["heima"][seed] = reproduce_heima(sub, command=f"reproduce all (heima, seed {seed})")
    if "coconut" in run.methods:
        from latent_apps.reproduce.coconut import CoconutRun, reproduce_coconut

        say("all", run.show_progress, f"coconut, seeds {', '.join(map(str, run.seeds))}")
        sub = CoconutRun(
            out=run.out / "coconut", base=run.base, shapes=shapes, steps_per_stage=split["coconut_stage"],
            batch_size=run.batch_size, seeds=run.seeds, cot_max_new_tokens=run.cot_max_new_tokens, **common,
        )  # fmt: skip
        results = reproduce_coconut(sub, command="reproduce all (coconut)")
        done["coconut"] = {seed: results for seed in run.seeds}
    if "lavit" in run.methods:
        from latent_apps.reproduce.lavit import LavitRun, reproduce_lavit

        done["lavit"] = {}
        built = None
        for seed in run.seeds:
            say("all", run.show_progress, f"lavit, seed {seed}")
            sub = LavitRun(
                out=run.out / "lavit" / f"seed-{seed}", teacher=run.lavit_teacher, student=run.lavit_student,
                shapes=shapes, teacher_data=built, steps=split["lavit"], gate_warmup=split["lavit_gate_warmup"],
                batch_size=run.batch_size, ablations=("no-ltraj",), seed=seed, **common,
            )  # fmt: skip
            done["lavit"][seed] = reproduce_lavit(sub, command=f"reproduce all (lavit, seed {seed})")
            built = built or sub.teacher_data
    if "lare" in run.methods:
        from latent_apps.reproduce.lare import LareRun, reproduce_lare

        done["lare"] = {}
        for seed in run.seeds:
            say("all", run.show_progress, f"lare, seed {seed}")
            sub = LareRun(
                out=run.out / "lare" / f"seed-{seed}", base=run.lare_base, shapes=shapes, stage_steps=split["lare"],
                batch_size=run.batch_size, ablations=("no-extractor",), halting=(), seed=seed,
                cot_max_new_tokens=run.cot_max_new_tokens, cot_eval=run.out / "lare" / "base-cot", **common,
            )  # fmt: skip
            done["lare"][seed] = reproduce_lare(sub, command=f"reproduce all (lare, seed {seed})")
    return done


def combine(base: dict[str, dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The table: for each row of :data:`ROWS` that ran, the seed mean and spread of every number it reports.

    ``base``: the base's ``cot`` and ``direct`` rows (:func:`eval_row`); ``runs``: ``{method: {seed: results}}``
    of the methods' reproductions (each ``results["eval"]`` a dict of :func:`eval_row` rows)."""
    table: dict[str, dict[str, Any]] = {}
    for name, method, label, key in ROWS:
        if method == "base":
            seeds = {None: base[label]} if label in base else {}
        else:
            seeds = {s: r["eval"].get(label.format(seed=s)) for s, r in runs.get(method, {}).items()}
            seeds = {s: row for s, row in seeds.items() if row is not None}
        if not seeds:
            continue
        rows = list(seeds.values())

        def control(row: dict[str, Any], kind: str) -> float | None:
            return ((row.get("latent_controls") or {}).get(kind) or {}).get("accuracy")

        def control_hop23(row: dict[str, Any], kind: str) -> float | None:
            per_kind = ((row.get("latent_controls") or {}).get(kind) or {}).get("accuracy_per_category")
            return kinds_accuracy({"count_per_kind": row.get("count_per_kind"), "accuracy_per_kind": per_kind})

        entry = {
            "method": method,
            "key": key,
            "seeds": [s for s in seeds if s is not None],
            "n": rows[0]["n"],
            "accuracy": spread([r["accuracy"] for r in rows]),
            "today_accuracy": spread([kinds_accuracy(r, TODAY) for r in rows]),
            "hop23_accuracy": spread([kinds_accuracy(r) for r in rows]),
            "per_kind": {k: spread([r["accuracy_per_kind"].get(k) for r in rows]) for k in (*TODAY, *HOPS)},
            "blank_accuracy": spread([r.get("blank_accuracy") for r in rows]),
            "blank_hop23_accuracy": spread([kinds_accuracy(r, key="blank_accuracy_per_kind") for r in rows]),
            "zero_accuracy": spread([control(r, "zero") for r in rows]),
            "shuffle_accuracy": spread([control(r, "shuffle") for r in rows]),
            "zero_hop23_accuracy": spread([control_hop23(r, "zero") for r in rows]),
            "shuffle_hop23_accuracy": spread([control_hop23(r, "shuffle") for r in rows]),
            "generated_tokens": spread([r["generated_tokens"] for r in rows]),
            "truncated": sum(r["truncated"] for r in rows),
            "unanswered": sum(r["unanswered"] for r in rows),
            "majority_baseline": rows[0]["majority_baseline"],
        }
        if name == "Heima, progressive":
            entry["caption_rougeL_gap_shuffled"] = spread(
                [runs["heima"][s]["record"].get("caption_rougeL_gap_shuffled") for s in seeds]
            )
        table[name] = entry
    return table


MIN_SEEDS = 2
"""The seeds a target judged on the seed spread needs before it is met or missed (``met`` is ``None`` below)."""


def _mean(table: dict[str, Any], row: str, key: str) -> float | None:
    return table.get(row, {}).get(key, {}).get("mean")


def _std(table: dict[str, Any], row: str, key: str) -> float | None:
    return table.get(row, {}).get(key, {}).get("std")


def targets(table: dict[str, dict[str, Any]], shortcut: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """The issue's targets on the table's numbers: each with its numbers and ``met`` (``None``: its rows did not
    run); the 2-3 hop targets also give ``shortcut_hop23`` (:func:`_shortcut`), the accuracy the moves alone
    reach. Seed spreads are population standard deviations; "beats by more than the spread" compares the gap of
    the means with the larger of the two spreads."""
    out: list[dict[str, Any]] = []

    def add(key: str, target: str, met: bool | None, **numbers: Any) -> None:
        out.append({"id": key, "target": target, "met": met, **numbers})

    direct, cot = _mean(table, "direct (the base)", "today_accuracy"), _mean(table, "CoT (the base)", "today_accuracy")
    add("bases", "direct answer >= 75% on today's kinds; CoT >= 95%", None if direct is None or cot is None
        else direct >= 0.75 and cot >= 0.95, direct=direct, cot=cot)  # fmt: skip

    floor = {"Coconut": "direct (the base)", "LaViT": "LaViT: naive SFT", "LaRe": "LaRe: no-latent SFT"}
    for method, control in floor.items():
        mean, std = _mean(table, method, "hop23_accuracy"), _std(table, method, "hop23_accuracy")
        base = _mean(table, control, "hop23_accuracy")
        if mean is None or base is None:
            continue
        gap = mean - base
        seeds = len(table[method]["seeds"])
        # the latents' effect on the same 2-3 hop questions (a control's accuracy over all kinds is not comparable)
        controls = (_mean(table, method, "zero_hop23_accuracy"), _mean(table, method, "shuffle_hop23_accuracy"))
        drops = [mean - v for v in controls if v is not None]
        met = gap >= 0.10 and (std or 0) < gap and bool(drops) and min(drops) >= 0.10 if seeds >= MIN_SEEDS else None
        add(f"{method.lower()}_hops", f"{method} beats its direct answer ({control}) on 2-3 hops by >= 10 points, "
            "spread < gap; zeroed / shuffled latents drop it >= 10 points", met, hop23=mean, hop23_std=std,
            direct_hop23=base, gap=gap, latent_drops=drops, shortcut_hop23=(shortcut or {}).get("hop23"),
            seeds=seeds)  # fmt: skip

    heima, tokens = table.get("Heima, progressive"), _mean(table, "Heima, progressive", "generated_tokens")
    if heima and "CoT (the base)" in table:
        solved = [k for k in TODAY if (table["direct (the base)"]["per_kind"][k]["mean"] or 0) >= 0.75]
        base_kinds = table["CoT (the base)"]["per_kind"]
        gaps = {k: (base_kinds[k]["mean"] or 0) - (heima["per_kind"][k]["mean"] or 0) for k in solved}
        ratio = tokens / table["CoT (the base)"]["generated_tokens"]["mean"] if tokens is not None else None
        rouge = heima.get("caption_rougeL_gap_shuffled", {}).get("mean")
        met = bool(solved) and max(gaps.values()) <= 0.05 and ratio is not None and ratio <= 0.25
        met = met and rouge is not None and rouge >= 0.05
        add("heima", "Heima within 5 points of CoT on the kinds direct answers solve (>= 75%), <= 0.25x tokens; "
            "caption interpreter >= 5 ROUGE-L over shuffled", met, kinds=solved, cot_minus_heima=gaps,
            token_ratio=ratio, caption_rougeL_gap=rouge)  # fmt: skip

    for method, controls in (("LaViT", ("LaViT: naive SFT",)), ("LaRe", ("LaRe: no-latent SFT", "LaRe w/o extractor"))):
        if method not in table or not all(c in table for c in controls):
            continue
        mean, std = _mean(table, method, "accuracy"), _std(table, method, "accuracy")
        gaps = {c: mean - _mean(table, c, "accuracy") for c in controls}
        noise = {c: max(std, _std(table, c, "accuracy")) for c in controls}
        seeds = min(len(table[name]["seeds"]) for name in (method, *controls))
        add(f"{method.lower()}_controls", f"{method} > {', '.join(controls)} by more than the seed spread",
            all(gaps[c] > noise[c] for c in controls) if seeds >= MIN_SEEDS else None, gaps=gaps, spreads=noise,
            seeds=seeds)  # fmt: skip
    return out


def verdict(target: dict[str, Any], met: str, missed: str) -> str:
    """A target's verdict in words: ``met`` / ``missed``, "undecided (< 2 seeds)" or "not run"."""
    if target["met"] is None:
        return f"undecided (< {MIN_SEEDS} seeds)" if target.get("seeds", MIN_SEEDS) < MIN_SEEDS else "not run"
    return met if target["met"] else missed


def _ms(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return ""
    return pct(entry["mean"]) + (f" ± {100 * entry['std']:.1f}" if entry["n"] > 1 else "")


def _markdown(results: dict[str, Any]) -> str:
    table = results["table"]
    lines = [
        "# Every method on the proving ground (`uv run apps/cli reproduce all`)",
        "",
        "Seed mean ± population spread (points) over the seeds of each row; blank = every image blanked; zeroed /"
        " shuffled = the method's latents replaced at inference.",
        "",
        "| model | seeds | accuracy | today's kinds | hop 1 | hop 2 | hop 3 | hop 2-3 | blank | blank, hop 2-3 | "
        "zeroed | zeroed, hop 2-3 | shuffled | shuffled, hop 2-3 | tokens | truncated |",
        "| --- " + "| ---: " * 15 + "|",
    ]
    for name, e in table.items():
        tokens = e["generated_tokens"]["mean"]
        lines.append(
            f"| {name} | {len(e['seeds']) or '-'} | {_ms(e['accuracy'])} | {_ms(e['today_accuracy'])} | "
            + " | ".join(_ms(e["per_kind"][k]) for k in HOPS)
            + f" | {_ms(e['hop23_accuracy'])} | {_ms(e['blank_accuracy'])} | {_ms(e['blank_hop23_accuracy'])} | "
            f"{_ms(e['zero_accuracy'])} | {_ms(e['zero_hop23_accuracy'])} | {_ms(e['shuffle_accuracy'])} | "
            f"{_ms(e['shuffle_hop23_accuracy'])} | "
            f"{'' if tokens is None else f'{tokens:.1f}'} | {e['truncated']} |"
        )  # fmt: skip
    first = next(iter(table.values()))
    lines += ["", f"Majority baseline: {pct(first['majority_baseline'])} ({first['n']} test questions)."]
    shortcut = results.get("hop_shortcut") or {}
    if shortcut:
        lines += ["", "Answered from the moves alone, never finding the anchor (the hop rows' floor, "
                  "`latent_apps.shapes.hop_shortcut`): " + ", ".join(
                      f"{'hop 2-3' if k == 'hop23' else k.replace('hop', 'hop ')} {pct(v)}" for k, v in shortcut.items()
                      if v is not None) + "."]  # fmt: skip
    lines += ["", "| target | met | numbers |", "| --- | --- | --- |"]
    for t in results["targets"]:
        numbers = {k: v for k, v in t.items() if k not in ("id", "target", "met")}
        met = verdict(t, "yes", "no")
        lines.append(f"| {t['target']} | {met} | `{json.dumps(numbers, default=_round)}` |")
    made_by = results.get("made_by") or {results["command"]: ["every row"]}
    if len(made_by) == 1:
        lines += ["", f"Command: `{results['command']}`."]
    else:  # rows filled by invocations with other --methods / --seeds in the same --out
        lines += ["", "Commands (one per invocation, same `--out` and settings):", ""]
        lines += [f"- {', '.join(rows)}: `{made}`" for made, rows in made_by.items()]
    return "\n".join(lines) + "\n"


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else str(value)


def _plot(table: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tokens, hops) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, e in table.items():
        x, y = e["generated_tokens"]["mean"], e["accuracy"]["mean"]
        tokens.errorbar(x, 100 * y, yerr=100 * (e["accuracy"]["std"] or 0), fmt="o", capsize=3)
        tokens.annotate(name, (x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ys = [e["per_kind"][k]["mean"] for k in HOPS]
        hops.errorbar([1, 2, 3], [float("nan") if v is None else 100 * v for v in ys], marker="o", capsize=3,
                      yerr=[100 * (e["per_kind"][k]["std"] or 0) for k in HOPS], label=name)  # fmt: skip
    majority = 100 * next(iter(table.values()))["majority_baseline"]
    for ax in (tokens, hops):
        ax.axhline(majority, linestyle="--", color="grey", linewidth=1)
        ax.set_ylabel("test accuracy (%)")
    tokens.set_xscale("log")
    tokens.set_xlabel("generated tokens per answer (log)")
    tokens.set_title("accuracy against generated tokens")
    hops.set_xticks([1, 2, 3])
    hops.set_xlabel("hops")
    hops.set_title("accuracy against hops")
    hops.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_seed(runs: dict[str, dict[int, dict[str, Any]]], command: str) -> dict[str, dict[int, dict[str, Any]]]:
    """What ``results.json`` keeps of each (method, seed) reproduction: the eval rows of its table rows, the record
    entries the table reads, and the command that made it (the methods' full results stay in their folders)."""

    def keep(method: str, seed: int, results: dict[str, Any]) -> dict[str, Any]:
        labels = [label.format(seed=seed) for _, m, label, _ in ROWS if m == method]
        return {"eval": {label: results["eval"][label] for label in labels if label in results.get("eval", {})},
                "record": {k: v for k, v in (results.get("record") or {}).items() if k in RECORD_KEYS},
                "command": command}  # fmt: skip

    return {method: {seed: keep(method, seed, r) for seed, r in seeds.items()} for method, seeds in runs.items()}


RECORD_KEYS = ("caption_rougeL_gap_shuffled",)
"""The entries of a reproduction's record the table reads (:func:`combine`)."""


def _made_by(command: str, runs: dict[str, dict[int, dict[str, Any]]], old_rows: dict[str, str]):
    """``{command: ["base rows", "lare seed 0", ...]}``: which invocation made which rows (``old_rows``: the
    command of each row kept whole, :func:`_kept`)."""
    made: dict[str, list[str]] = {command: ["base rows"]}
    for method, seeds in runs.items():
        for seed, r in seeds.items():
            made.setdefault(r["command"], []).append(f"{method} seed {seed}")
    for name, made_it in old_rows.items():
        made.setdefault(made_it, []).append(name)
    return made


def _kept(out: Path, run: AllRun) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, dict[str, Any]], dict]:
    """What an earlier invocation in the same ``out`` holds and this one does not run again, so invocations with
    other ``--methods`` or ``--seeds`` (one session each) fill one table: its (method, seed) reproductions outside
    this invocation's ``--methods`` x ``--seeds`` (:func:`_per_seed`); the table rows of methods it holds no
    per-seed rows of (written before ``runs`` was kept) and this invocation does not run, whole; and those rows'
    commands. :func:`check_settings` has already refused an ``out`` made with other settings; the base rows are
    always evaluated again (from their own folders)."""
    path = out / "results.json"
    if not path.is_file():
        return {}, {}, {}
    old = json.loads(path.read_text())
    held = old.get("runs") or {}
    runs = {
        method: {int(seed): r for seed, r in seeds.items() if method not in run.methods or int(seed) not in run.seeds}
        for method, seeds in held.items()
    }  # fmt: skip
    rows = {name: e for name, e in old["table"].items() if e["method"] not in ("base", *run.methods, *held)}
    by_row = {row: made for made, names in (old.get("made_by") or {}).items() for row in names}
    return {m: seeds for m, seeds in runs.items() if seeds}, rows, {r: by_row.get(r, old["command"]) for r in rows}


def reproduce_all(run: AllRun, command: str = "") -> dict[str, Any]:
    """Run the comparison (module docstring); returns ``results.json``'s content, whose ``record`` is the last
    stdout line of the command."""
    from latent_apps.base import base_shapes

    start = time.perf_counter()
    run.resolve()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items() if k != "show_progress"}
    check_settings(run.out, {k: v for k, v in settings.items() if k not in ("methods", "seeds")}, reuse=True)
    shapes = base_shapes(run.base, run.out / "shapes")
    base = _base_rows(run, shapes)
    shortcut = _shortcut(run, shapes)
    kept, old_rows, old_commands = _kept(run.out, run)
    runs = _per_seed(_run_methods(run, shapes), command)
    for method, seeds in kept.items():
        runs[method] = {**seeds, **runs.get(method, {})}
    runs = {m: dict(sorted(runs[m].items())) for m in METHODS if m in runs}
    table = combine(base, runs)
    table = {name: table.get(name) or old_rows[name] for name, *_ in ROWS if name in table or name in old_rows}
    checks = targets(table, shortcut)
    record = {
        **{f"{e['key']}_{k}": e[k]["mean"] for e in table.values() for k in ("accuracy", "hop23_accuracy")},
        **{f"{e['key']}_accuracy_std": e["accuracy"]["std"] for e in table.values()},
        "majority_accuracy": base["cot"]["majority_baseline"],
        "hop23_shortcut_accuracy": shortcut.get("hop23"),
        "targets_met": sum(t["met"] is True for t in checks),
        "targets_checked": sum(t["met"] is not None for t in checks),
        "seeds": max(len(e["seeds"]) for e in table.values()),
        "eval_n": base["cot"]["n"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    methods = [m for m in METHODS if m in runs or any(e["method"] == m for e in old_rows.values())]
    seeds = sorted({s for seeds in runs.values() for s in seeds} | set(run.seeds))
    results = {"command": command, "settings": {**settings, "methods": methods, "seeds": seeds, "split": run.split()},
               "table": table, "targets": checks, "hop_shortcut": shortcut, "record": record, "runs": runs,
               "made_by": _made_by(command, runs, old_commands)}  # fmt: skip
    (run.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (run.out / "results.md").write_text(_markdown(results))
    _plot(table, run.out / "accuracy_vs_tokens_hops.png")
    return results
