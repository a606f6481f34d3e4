"""`latent reproduce lavit`: LaViT's claim at CPU scale, in one run, against its controls.

The claim (paper 002, Tables 1-3 and Figure 5): a student that first produces K latent visual tokens, aligned with a
larger teacher's attention trajectory (L_traj) and visual concepts (L_concept) under the curriculum gate, answers
better than naive SFT on the same data, looks where the teacher looks (a lower KL to the teacher's attention map,
a lower entropy), and needs its latents (masking them at inference costs accuracy).

On the synthetic shapes task, from the shipped bases (``data/base``), this command runs:

1. the shapes data of the teacher base (regenerated from its ``make_base.json``: the same bytes both bases were
   trained on);
2. the teacher data: ``build-lavit-15k`` with the teacher (default the shipped ``--size small`` Qwen2.5-VL, 1.4M
   parameters) on the first ``--build-samples`` questions of the train split's Visual-CoT file; all three filters;
   resumable (``--teacher-data`` reuses a finished build);
3. from the same student base (default the shipped tiny Qwen2.5-VL, 392K), with the same steps, batch, learning rate
   and seed: **naive SFT** (image, question -> answer on the kept samples), **LaViT** (continuous latents, gate,
   L_concept + L_traj) and Table 3's ablations **w/o L_traj**, **w/o L_concept**, **w/o curriculum** (a hard
   gate for T_w steps, then open) and **single stage** (the gate always open);
4. evaluation on the shapes test split (``latent eval --method lavit`` on ``shapes_mc.tsv``, the student's training
   prompt): accuracy per kind, the majority baseline and the blank-image control for naive SFT and LaViT, and LaViT
   with its latent positions masked (Table 3's "w/o latent tokens");
5. ``lavit analyze`` on the first ``--analysis-samples`` test questions: the base, the teacher, naive SFT and LaViT,
   each from its own greedy response: entropy / salient regions / coefficient of variation of its attention over the
   image, the KL of its map to the teacher's, overlays; LaViT's latent diagnostics (zeroed, shuffled, masked).

Outputs in ``--out``: ``results.json``, ``results.md`` and every intermediate directory (a finished build, training,
evaluation or analysis is reused on a re-run). The last stdout line is one JSON record (accuracies as fractions).

Where the CPU-scale recipe departs from Table A1 it says so in ``results.json`` (``settings``): a learning rate for a
from-scratch 64-wide model (1e-3, not 5e-6), T_w scaled with the step budget, and K = 4 as in the paper.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latent_apps.reproduce.common import (
    BASE_ROOT,
    check_settings,
    checkout,
    choose_ablations,
    eval_row,
    num,
    pct,
    say,
    slug,
)

__all__ = ["LavitRun", "reproduce_lavit"]

VARIANTS: dict[str, dict[str, Any]] = {
    "naive SFT": {"naive": True},
    "LaViT": {},
    "w/o L_traj": {"traj_weight": 0.0},
    "w/o L_concept": {"concept_weight": 0.0},
    "w/o curriculum": {"gate": "hard"},
    "single stage": {"gate": "open"},
}
"""The trained students: the control, the method and its ablations (overrides of :class:`lavit.config.LavitConfig`)."""

_MAIN = ("naive SFT", "LaViT", "LaViT, latents masked")
"""The rows every run has (the rest of :data:`VARIANTS` are ablations)."""

OWN_INPUTS: dict[str, Any] = {"min_pixels": None, "max_pixels": None, "system_prompt": None}
"""At CPU scale the students and the teacher see the shapes bases' own inputs (84 px images, their processors'
bounds; the chat template's system turn they were trained with), not Table A1's pixel bounds (which would scale the
84 px scenes up to 448 px) or Appendix C.3's prompt; the build records them and training checks they agree. The
students train with no warm-up (the recorded results were made so; the paper's is ``warmup_steps=0.03``)."""


@dataclass
class LavitRun:
    """Settings of one reproduction (every one a CLI flag; see the module docstring)."""

    out: Path = Path("runs/reproduce/lavit")
    teacher: Path | None = None
    student: Path | None = None
    shapes: Path | None = None
    teacher_data: Path | None = None
    build_samples: int = 4000
    build_batch_size: int = 16
    teacher_max_new_tokens: int = 512
    steps: int = 1500
    gate_warmup: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-3
    num_latents: int = 4
    ablations: tuple[str, ...] = ("no-ltraj", "no-lconcept", "no-curriculum", "single-stage")
    """Table 3's ablations to train, by slug (``no-ltraj``, ``no-lconcept``, ``no-curriculum``,
    ``single-stage``); ``()``: naive SFT and LaViT only."""
    eval_samples: int | None = 800
    eval_batch_size: int = 64
    analysis_samples: int = 200
    analysis_max_new_tokens: int = 400
    seed: int = 0
    show_progress: bool = True
    own_build: bool = field(default=False, init=False, repr=False)

    def resolve(self) -> LavitRun:
        root = checkout()
        self.teacher = Path(self.teacher or root / BASE_ROOT / "qwen2_5_vl-small")
        self.student = Path(self.student or root / BASE_ROOT / "qwen2_5_vl")
        self.shapes = Path(self.shapes or self.out / "shapes")
        self.own_build = self.teacher_data is None  # built here (checked against --build-samples), not given
        self.teacher_data = Path(self.teacher_data or self.out / "teacher-data")
        self.ablations = choose_ablations(self.ablations, [slug(n) for n in VARIANTS if n not in _MAIN])
        return self


def _build(run: LavitRun, shapes: Path) -> dict[str, Any]:
    """The teacher data (step 2): resumed, or reused when its manifest says it is complete."""
    from latent_core.inference import load_trained
    from lavit.build import MANIFEST_NAME, BuildConfig, build
    from lavit.inputs import InputSettings
    from lavit.teacher import TeacherOptions

    manifest = run.teacher_data / MANIFEST_NAME
    if manifest.is_file() and "counts" in json.loads(manifest.read_text()):  # a finished build (or --teacher-data)
        done = json.loads(manifest.read_text())
        if run.own_build and done["settings"].get("limit") != run.build_samples:
            from latent_core.cli import UserError

            raise UserError(f"{run.teacher_data} holds a build of {done['settings'].get('limit')} questions, not "
                            f"--build-samples {run.build_samples}: use another --out")  # fmt: skip
        return done
    say("lavit", run.show_progress, f"building the teacher data ({run.build_samples} questions) in {run.teacher_data}")
    config = BuildConfig(
        data=str(shapes / "train" / "visual_cot.jsonl"), images=str(shapes), out=str(run.teacher_data),
        teacher=str(run.teacher), options=TeacherOptions.preset("paper", max_new_tokens=run.teacher_max_new_tokens),
        batch_size=run.build_batch_size, limit=run.build_samples, inputs=InputSettings.own(),
    )  # fmt: skip
    model, processor = load_trained(str(run.teacher), families=("qwen2_5_vl",), method="reproduce lavit")
    return build(config, model, processor)


def _train(run: LavitRun) -> dict[str, dict[str, Any]]:
    """Step 3: every variant from the same student base, same steps; a finished one is reused."""
    from lavit.config import LavitConfig
    from lavit.trainer import train_student

    trained = {}
    for name, overrides in VARIANTS.items():
        if name not in _MAIN and slug(name) not in run.ablations:
            continue
        naive = bool(overrides.get("naive"))
        out = run.out / "train" / slug(name)
        stage = out / ("naive" if naive else "student")
        summary_path = stage / "lavit_train.json"
        check_settings(out, _train_settings(run, name), reuse=summary_path.is_file())
        if not summary_path.is_file():
            say("lavit", run.show_progress, f"training {name} ({run.steps} steps)")
            values = dict(
                output_dir=str(out), num_latents=run.num_latents, gate_warmup=run.gate_warmup, max_steps=run.steps,
                per_device_train_batch_size=run.batch_size, learning_rate=run.learning_rate, seed=run.seed,
                logging_steps=10, report_to=[], remove_unused_columns=False, save_strategy="steps", save_steps=250,
                disable_tqdm=not run.show_progress, warmup_steps=0, **OWN_INPUTS,
            )  # fmt: skip
            values.update({k: v for k, v in overrides.items() if k != "naive"})
            config = LavitConfig.preset("paper", **values)
            with contextlib.redirect_stdout(io.StringIO()):  # HF prints its log dicts when tqdm is off
                train_student(config, run.teacher_data, str(run.student), out, naive=naive)
        summary = json.loads(summary_path.read_text())
        facts = ("steps", "samples", "first_loss", "last_loss", "seconds")
        trained[name] = {"dir": str(stage), **{k: summary.get(k) for k in facts}}
    return trained


def _train_settings(run: LavitRun, name: str) -> dict[str, Any]:
    keys = ("student", "teacher_data", "steps", "gate_warmup", "batch_size", "learning_rate", "num_latents", "seed")
    return {"variant": name, **{k: str(getattr(run, k)) for k in keys}}


def _key(name: str) -> str:
    """A variant's name as a record key: ``w/o L_traj`` -> ``no_ltraj``."""
    return slug(name).replace("-", "_")


def _evaluate(run: LavitRun, shapes: Path, trained: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Step 4: ``latent eval --method lavit`` of every variant; blank images for naive SFT and LaViT; LaViT masked."""
    from latent_apps.eval.runner import run_eval

    bench = shapes / "test" / "shapes_mc.tsv"
    diagnostics = {"diagnostics": True}  # LaViT also answers with its latents zeroed, shuffled and masked
    jobs = [
        (name, info["dir"], diagnostics if name == "LaViT" else {}, name in ("naive SFT", "LaViT"))
        for name, info in trained.items()
    ]
    jobs.append(("LaViT, latents masked", trained["LaViT"]["dir"], {"mask_latents": True}, False))
    results = {}
    for label, model, options, blank in jobs:
        say("lavit", run.show_progress, f"evaluating {label}")
        out = run.out / "eval" / slug(label.replace(",", ""))
        summary = run_eval(
            model, "lavit", [bench], out, batch_size=run.eval_batch_size, max_new_tokens=8, limit=run.eval_samples,
            method_options=options, blank=blank, show_progress=run.show_progress,
        )["benches"][bench.stem]  # fmt: skip
        results[label] = eval_row(summary)
    return results


def _analyze(run: LavitRun, shapes: Path, trained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Step 5: ``lavit analyze`` of the base, the teacher, naive SFT and LaViT on the same test questions."""
    from latent_core.readers import read_questions
    from lavit.analysis import analyze_models
    from lavit.inputs import InputSettings

    out = run.out / "analysis"
    settings = {
        "models": {k: str(v) for k, v in (("teacher", run.teacher), ("student", run.student))},
        "trained": {name: info["dir"] for name, info in trained.items()},
        "samples": run.analysis_samples,
        "max_new_tokens": run.analysis_max_new_tokens,
    }
    check_settings(out, settings, reuse=(out / "analysis.json").is_file())
    if (out / "analysis.json").is_file():
        return json.loads((out / "analysis.json").read_text())
    say("lavit", run.show_progress, f"analysing attention on {run.analysis_samples} test questions")
    models = {
        "teacher": str(run.teacher),
        "base": str(run.student),
        "naive SFT": trained["naive SFT"]["dir"],
        "LaViT": trained["LaViT"]["dir"],
    }
    samples = read_questions(shapes / "test" / "shapes_mc.tsv", run.analysis_samples)
    budget = run.analysis_max_new_tokens  # the base and the teacher write their chain of thought
    return analyze_models(
        models, samples, out, teacher="teacher", batch_size=32, max_new_tokens=budget, plain_inputs=InputSettings.own()
    )


def _markdown(results: dict[str, Any]) -> str:
    build = results["teacher_data"]["counts"]
    kinds = list(next(iter(results["eval"].values()))["accuracy_per_kind"])
    lines = [
        "# LaViT at CPU scale (`uv run apps/cli reproduce lavit`)",
        "",
        f"Teacher data: {build['kept']} kept of {build['samples']} questions; dropped "
        + ", ".join(f"{k} {v}" for k, v in build["rejected"].items())
        + ".",
        "",
        "| model | accuracy | " + " | ".join(kinds) + " | blank images | truncated |",
        "| --- | ---: | " + " | ".join("---:" for _ in kinds) + " | ---: | ---: |",
    ]
    for name, row in results["eval"].items():
        lines.append(
            f"| {name} | {pct(row['accuracy'])} | "
            + " | ".join(pct(row["accuracy_per_kind"].get(k)) for k in kinds)
            + f" | {pct(row.get('blank_accuracy'))} | {row['truncated']} |"
        )
    first = next(iter(results["eval"].values()))
    lines += ["", f"Majority baseline: {pct(first['majority_baseline'])} ({first['n']} test questions).", ""]
    lines += [
        "| model (analysis) | accuracy | entropy | salient | CV | KL to teacher | KL, answer rows | KL, latent rows "
        "| KL to A_traj target | same, latent rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in results["analysis"]["models"].items():
        lines.append(
            f"| {name} | {pct(entry.get('correct'))} | {num(entry.get('response_entropy'))} | "
            f"{num(entry.get('response_salient'), '.2f')} | {num(entry.get('response_cv'))} | "
            f"{num(entry.get('kl_to_teacher'))} | {num(entry.get('kl_to_teacher_answer'))} | "
            f"{num(entry.get('kl_to_teacher_latent'))} | {num(entry.get('kl_to_traj_target'))} | "
            f"{num(entry.get('kl_to_traj_target_latent'))} |"
        )
    controls = results["eval"]["LaViT"].get("latent_controls", {})
    if controls:
        lines += ["", f"LaViT's latents on the {results['eval']['LaViT']['n']} test questions: " + "; ".join(
            f"{name} accuracy {pct(c['accuracy'])}, answers changed {pct(c['change_rate'])}"
            for name, c in controls.items()
        ) + "."]  # fmt: skip
    diag = results["analysis"]["models"].get("LaViT", {}).get("diagnostics", {})
    if diag:
        lines += ["", "Analysis questions, LaViT's latents: " + "; ".join(
            f"{kind} accuracy {pct(d['accuracy'])}, answers changed {pct(d['change_rate'])}"
            for kind, d in diag.items() if isinstance(d, dict)
        ) + f"; mean pairwise cosine {num(diag.get('mean_pairwise_cosine'))}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def reproduce_lavit(run: LavitRun, command: str = "") -> dict[str, Any]:
    """Run the whole reproduction (module docstring); returns ``results.json``'s content, whose ``record`` is the
    last stdout line of the command."""
    from latent_apps.base import base_shapes

    start = time.perf_counter()
    run.resolve()
    run.out.mkdir(parents=True, exist_ok=True)
    shapes = base_shapes(run.teacher, run.shapes)
    manifest = _build(run, shapes)
    trained = _train(run)
    evaluated = _evaluate(run, shapes, trained)
    analysis = _analyze(run, shapes, trained)
    models = analysis["models"]
    record = {
        "naive_accuracy": evaluated["naive SFT"]["accuracy"],
        "lavit_accuracy": evaluated["LaViT"]["accuracy"],
        "masked_latents_accuracy": evaluated["LaViT, latents masked"]["accuracy"],
        **{f"{_key(n)}_accuracy": r["accuracy"] for n, r in evaluated.items() if n not in _MAIN},
        **{  # the zeroed / shuffled controls; the masked one's accuracy is the separate run's above
            f"{name}_latents_{what}": entry[what]
            for name, entry in evaluated["LaViT"].get("latent_controls", {}).items()
            for what in ("accuracy", "change_rate")
            if not (name == "masked" and what == "accuracy")
        },
        "majority_accuracy": evaluated["LaViT"]["majority_baseline"],
        "naive_blank_accuracy": evaluated["naive SFT"].get("blank_accuracy"),
        "lavit_blank_accuracy": evaluated["LaViT"].get("blank_accuracy"),
        "student_teacher_kl_naive": models["naive SFT"]["kl_to_teacher"],
        "student_teacher_kl_lavit": models["LaViT"]["kl_to_teacher"],
        "student_teacher_kl_lavit_answer_rows": models["LaViT"]["kl_to_teacher_answer"],
        "student_teacher_kl_lavit_latent_rows": models["LaViT"]["kl_to_teacher_latent"],
        "student_traj_target_kl_naive": models["naive SFT"]["kl_to_traj_target"],
        "student_traj_target_kl_lavit": models["LaViT"]["kl_to_traj_target"],
        "student_traj_target_kl_lavit_latent_rows": models["LaViT"]["kl_to_traj_target_latent"],
        "entropy_base": models["base"]["response_entropy"],
        "entropy_teacher": models["teacher"]["response_entropy"],
        "entropy_naive": models["naive SFT"]["response_entropy"],
        "entropy_lavit": models["LaViT"]["response_entropy"],
        "kept_samples": manifest["counts"]["kept"],
        "eval_n": evaluated["LaViT"]["n"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()}
    results = {
        "command": command,
        "settings": settings,
        "departures_from_table_a1": {
            "learning_rate": f"{run.learning_rate} (Table A1: 5e-6, for a pretrained 3B; the base is 64 wide, from "
            "scratch)",
            "steps": f"{run.steps}, T_w {run.gate_warmup} (Table A1: 1000, T_w 400)",
            "batch_size": run.batch_size,
        },
        "teacher_data": {k: manifest.get(k) for k in ("settings", "counts")},
        "train": trained,
        "eval": evaluated,
        "analysis": analysis,
        "record": record,
    }
    (run.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (run.out / "results.md").write_text(_markdown(results))
    return results
