"""`latent reproduce lare`: LaRe's claim at CPU scale, in one run, against its controls.

The claim (paper 003, Tables 1, 3, 4 and 6): latent refocusing - T latent tokens, each from an extractor that
cross-attends to the image window the model attends to most, trained with L_align, L_img and L_text - answers more
accurately than chain-of-thought fine-tuning while generating fewer tokens (+9.4 points, -16.5% tokens), each part
of the method matters (Table 3), adaptive halting saves iterations (Table 4), and the latents identify their
sample's reasoning text and visual evidence better with the extractor than without it (Table 6).

On the synthetic shapes task, from the shipped llava base (``data/base/llava``, CoT-fine-tuned from scratch on
these scenes' chains of thought), this command runs:

1. the shapes data of the base (regenerated from its ``make_base.json``) and the reasoning texts of its train split
   (``train/reasoning.jsonl``: the question, with its options for about half, the reasoning, the answer);
2. a small f = 16 KL VAE for L_img trained on crops of the train images (:mod:`lare.vae`; none can be downloaded);
3. from the same base, with the same stage steps, batch, learning rate and seed, each through ``lare init
   --from-llava`` and ``lare train`` stages I (projector), II (extractor + U-Net) and III (all but vision):
   **LaRe** and Table 3's ablations **w/o extractor** (z_t is the hidden state), **w/o sliding window** (V_local is
   every image token), **w/o alignment**, **w/o image reconstruction**, **w/o text reconstruction** (a loss weight
   0); and the **no-latent SFT** control (``num_latents = 0``: ``[V, X_q, <bot>, <eot>, answer]``, stages I and III
   only, nothing of stage II would train). ``--jobs N`` trains N variants at a time in separate processes;
4. evaluation on the first ``--eval-samples`` test questions: the CoT row is the base with its own chain of thought
   (``latent eval --method cot`` on ``test/llava_cot.jsonl``, the form it was trained with), every variant with
   ``latent eval --method lare`` on ``test/shapes_mc.tsv`` (the same questions in the same order; the TSV lists
   every question's options, the CoT file those of about half, as the train splits do); blank images for CoT,
   the SFT control and LaRe; LaRe's latents zeroed and shuffled;
   the majority baseline; Table 4's halting rows (LaRe with ``--halt METRIC --threshold X``, each of ``--halting``);
5. Table 6's probe (:func:`lare.probe.probe_model`) of LaRe and of the w/o-extractor variant on ``--probe-samples``
   train rows: SVM and MLP accuracy of telling matching (latent, reasoning text) and (latent, visual evidence) pairs
   from non-matching ones.

Outputs in ``--out``: ``results.json``, ``results.md`` and every intermediate directory (a finished VAE, stage,
evaluation or probe is reused on a re-run; a re-run with other settings and the same ``--out`` is refused). The last
stdout line is one JSON record (accuracies as fractions).

Where the CPU-scale recipe departs from Appendix A it says so in ``results.json`` (``departures_from_appendix_a``):
a learning rate for a from-scratch 64-wide model, far fewer steps, a small extractor (Appendix B's 1536-wide one
would be 24x the LLM's width) and a small U-Net and VAE.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from latent_apps.reproduce.common import (
    BASE_ROOT,
    SETTINGS_NAME,
    check_settings,
    checkout,
    choose_ablations,
    eval_row,
    pct,
    say,
    slug,
)

__all__ = ["VARIANTS", "LareRun", "reproduce_lare"]

BASE = BASE_ROOT / "llava"
SFT = "no-latent SFT"
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    SFT: {"init": {"num_latents": 0}},
    "LaRe": {},
    "w/o extractor": {"init": {"extractor": False}},
    "w/o sliding window": {"init": {"sliding_window": False}},
    "w/o alignment": {"train": {"align_text_weight": 0.0, "align_visual_weight": 0.0}},
    "w/o image reconstruction": {"train": {"img_weight": 0.0}},
    "w/o text reconstruction": {"train": {"text_weight": 0.0}},
}
"""The trained models: the control, the method and Table 3's ablations (``init``: :class:`lare.config.LareConfig`
overrides; ``train``: :class:`lare.config.LareTrainConfig` overrides)."""
COT = "CoT (the base)"


@dataclass
class LareRun:
    """Settings of one reproduction (every one a CLI flag; see the module docstring)."""

    out: Path = Path("runs/reproduce/lare")
    base: Path | None = None
    shapes: Path | None = None
    stage_steps: tuple[int, int, int] = (10, 200, 1000)
    batch_size: int = 16
    learning_rate: float = 1e-3
    num_latents: int = 4
    extractor_hidden: int = 128
    extractor_heads: int = 4
    align_weight: float = 0.1
    img_weight: float = 0.5
    text_weight: float = 0.5
    vae_steps: int = 200
    vae_width: int = 8
    crop_size: int = 64
    ablations: tuple[str, ...] = tuple(slug(n) for n in VARIANTS if n.startswith("w/o "))
    """Table 3's ablations to train, by slug (``no-extractor``, ``no-sliding-window``, ``no-alignment``,
    ``no-image-reconstruction``, ``no-text-reconstruction``)."""
    jobs: int = 1
    eval_samples: int | None = 400
    eval_batch_size: int = 64
    cot_max_new_tokens: int = 400
    cot_eval: Path | None = None
    """Where the base's CoT evaluation is kept (default ``OUT/eval/cot``): greedy decoding of the base is
    seed-free, so ``reproduce all`` shares one folder across its seeds."""
    halting: tuple[str, ...] = ("cos:0.02", "cos:0.05", "cos:0.1")
    probe_samples: int = 500
    probe_seeds: int = 3
    seed: int = 0
    show_progress: bool = True

    def resolve(self) -> LareRun:
        self.base = Path(self.base or checkout() / BASE)
        self.shapes = Path(self.shapes or self.out / "shapes")
        self.stage_steps = tuple(self.stage_steps)
        self.halting = tuple(self.halting)
        for spec in self.halting:
            _halting(spec)
        self.ablations = choose_ablations(self.ablations, [slug(n) for n in VARIANTS if n.startswith("w/o ")])
        return self

    def variants(self) -> list[str]:
        """The control, LaRe and the chosen ablations (w/o image reconstruction only when LaRe has L_img)."""
        chosen = [n for n in VARIANTS if n in (SFT, "LaRe") or slug(n) in self.ablations]
        return [n for n in chosen if self.img_weight > 0 or VARIANTS[n].get("train", {}).get("img_weight") != 0.0]


def _halting(spec: str) -> tuple[str, float]:
    """``"cos:0.05"`` -> ``("cos", 0.05)``; a malformed one is a one-line error."""
    from lare.config import HALT_METRICS

    metric, _, value = spec.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = None
    if metric not in HALT_METRICS or threshold is None or threshold < 0:
        from latent_core.cli import UserError

        raise UserError(f"--halting {spec!r}: expected METRIC:THRESHOLD with METRIC one of {', '.join(HALT_METRICS)}")
    return metric, threshold


def _rows(shapes: Path) -> list[dict[str, Any]]:
    from latent_core.readers import ReadReport, read_reasoning

    report = ReadReport("reasoning")
    rows = list(read_reasoning(shapes / "train" / "reasoning.jsonl", shapes, report))
    if report.total_skipped:
        raise ValueError(f"{shapes}/train/reasoning.jsonl: {report.total_skipped} unreadable rows")
    return rows


def _vae(run: LareRun, rows: list[dict[str, Any]]) -> Path | None:
    """Step 2: the VAE L_img encodes with (None when no variant uses L_img)."""
    from lare.vae import train_vae
    from latent_core.collate import row_image

    if run.img_weight <= 0:
        return None
    out = run.out / "vae"
    settings = {"steps": run.vae_steps, "width": run.vae_width, "crop_size": run.crop_size, "seed": run.seed}
    check_settings(out, settings, reuse=(out / "lare_vae.json").is_file())
    if not (out / "lare_vae.json").is_file():
        say("lare", run.show_progress, f"training the KL VAE for L_img ({run.vae_steps} steps)")
        images = list({str(row["image"]): row for row in rows}.values())[:2000]
        train_vae([row_image(r) for r in images], out, steps=run.vae_steps, crop_size=run.crop_size,
                  width=run.vae_width, seed=run.seed)  # fmt: skip
    return out


def _train_settings(run: LareRun, name: str) -> dict[str, Any]:
    keys = ("base", "stage_steps", "batch_size", "learning_rate", "num_latents", "extractor_hidden",
            "extractor_heads", "align_weight", "img_weight", "text_weight", "crop_size", "seed")  # fmt: skip
    return {"variant": name, **{k: str(getattr(run, k)) for k in keys}}


def _stages(run: LareRun, name: str) -> list[int]:
    return [1, 3] if VARIANTS[name].get("init", {}).get("num_latents") == 0 else [1, 2, 3]


def _stage_done(directory: Path) -> bool:
    """A stage is finished once ``train_stage`` wrote its loss curves into ``lare_train.json``: its last write, after
    the extractor, the reconstructor and the config (a stage killed before that is trained again)."""
    path = directory / "lare_train.json"
    return path.is_file() and "loss_curves" in json.loads(path.read_text())


def _final(run: LareRun, name: str) -> Path:
    return run.out / "train" / slug(name) / "run" / "stage-3"


def train_variant(run: LareRun, name: str, vae: Path | None, threads: int | None = None) -> dict[str, Any]:
    """Step 3 for one variant: ``lare init --from-llava`` with its overrides, then its stages; a finished stage is
    reused. Returns the final stage's summary facts (module level: the ``--jobs`` workers run it)."""
    import torch
    from lare.config import LareConfig, LareTrainConfig
    from lare.losses import Reconstructor
    from lare.model import from_llava
    from lare.trainer import stage_dir, train_stage
    from lare.vae import small_unet_config

    if threads:  # a --jobs worker: the runtime set-up of every command, then its share of the threads
        from latent_core.cli import configure_runtime

        configure_runtime()
        torch.set_num_threads(threads)
    spec = VARIANTS[name]
    root = run.out / "train" / slug(name)
    init = root / "init"
    if not (init / "lare_config.json").is_file():
        config = LareConfig(num_latents=run.num_latents, extractor_hidden=run.extractor_hidden,
                            extractor_heads=run.extractor_heads).replace(**spec.get("init", {}))  # fmt: skip
        model, processor = from_llava(str(run.base), config)
        model.save_pretrained(init, processor)
    rows: list[dict[str, Any]] = []  # read only when a stage has to train
    weights = {"align_text_weight": run.align_weight, "align_visual_weight": run.align_weight,
               "img_weight": run.img_weight if vae is not None else 0.0, "text_weight": run.text_weight,
               **spec.get("train", {})}  # fmt: skip
    stages = _stages(run, name)
    summary: dict[str, Any] = {}
    for index, stage in enumerate(stages):
        out = stage_dir(root / "run", stage)
        if _stage_done(out):
            summary = json.loads((out / "lare_train.json").read_text())
            continue
        rows = rows or _rows(run.shapes)
        steps = run.stage_steps[stage - 1]
        config = LareTrainConfig(
            output_dir=str(out), per_device_train_batch_size=run.batch_size, learning_rate=run.learning_rate,
            max_steps=steps, seed=run.seed, logging_steps=10, report_to=[], remove_unused_columns=False,
            save_strategy="steps", save_steps=250, disable_tqdm=True, crop_size=run.crop_size, **weights,
        )  # fmt: skip
        reconstructor = None
        if stage == 2 and weights["img_weight"] > 0:  # the shapes-scale U-Net; later stages rebuild it from its config
            from diffusers import AutoencoderKL, UNet2DConditionModel

            vae_config = AutoencoderKL.load_config(str(vae))
            size = run.crop_size // 2 ** (len(vae_config["block_out_channels"]) - 1)
            hidden = json.loads((init / "config.json").read_text())["text_config"]["hidden_size"]
            torch.manual_seed(run.seed)
            unet = UNet2DConditionModel(**small_unet_config(size, vae_config["latent_channels"]))
            reconstructor = Reconstructor(hidden, unet)
        start = stage_dir(root / "run", stages[index - 1]) if index and stages[index - 1] != stage - 1 else None
        with contextlib.redirect_stdout(io.StringIO()):  # HF prints its log dicts when tqdm is off
            summary = train_stage(config, stage, rows, init, root / "run", vae=str(vae) if vae else None,
                                  reconstructor=reconstructor, start=start)  # fmt: skip
    facts = ("steps", "samples", "first_loss", "last_loss", "seconds")
    return {"dir": str(_final(run, name)), "stages": stages, **{k: summary.get(k) for k in facts}}


def _train(run: LareRun, vae: Path | None) -> dict[str, dict[str, Any]]:
    """Step 3: every variant, ``--jobs`` at a time."""
    names = run.variants()
    for name in names:  # any work of a variant (its init, a stage, a checkpoint) is reused only with its settings
        root = run.out / "train" / slug(name)
        started = root.is_dir() and any(p.name != SETTINGS_NAME for p in root.iterdir())
        check_settings(root, _train_settings(run, name), reuse=started)
    todo = [n for n in names if not _stage_done(_final(run, n))]
    if todo:
        say(
            "lare",
            run.show_progress,
            f"training {', '.join(todo)} (stages {run.stage_steps} steps, {run.jobs} at a time)",
        )
    if run.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        import torch

        workers = min(run.jobs, len(todo))
        threads = max(1, torch.get_num_threads() // workers)  # LATENT_THREADS / the CPU quota, shared out
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for future in [pool.submit(train_variant, run, name, vae, threads) for name in todo]:
                future.result()
        except BrokenProcessPool as err:
            from latent_core.cli import UserError

            raise UserError(f"a training worker died ({err}): run the same command again to resume, with fewer "
                            "--jobs if it ran out of memory") from None  # fmt: skip
        finally:
            pool.shutdown(cancel_futures=True)
    return {name: train_variant(run, name, vae) for name in names}


def _evaluate(run: LareRun, shapes: Path, trained: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Step 4: the CoT base (its own prompt) and every variant (``lare``), the controls and the halting rows."""
    from latent_apps.eval.runner import run_eval

    mc, cot = shapes / "test" / "shapes_mc.tsv", shapes / "test" / "llava_cot.jsonl"
    jobs: list[tuple[str, str, str, Path, dict[str, Any], bool]] = [(COT, str(run.base), "cot", cot, {}, True)]
    for name, info in trained.items():
        options = {"diagnostics": True} if name in ("LaRe", "w/o extractor") else {}
        jobs.append((name, info["dir"], "lare", mc, options, name in (SFT, "LaRe")))
    for spec in run.halting:
        metric, threshold = _halting(spec)
        jobs.append((f"LaRe, halting {metric} < {threshold:g}", trained["LaRe"]["dir"], "lare", mc,
                     {"halt": metric, "threshold": threshold}, False))  # fmt: skip
    results = {}
    for label, model, method, bench, options, blank in jobs:
        out = run.out / "eval" / slug(label.replace(",", "").replace("<", "lt").replace(" (the base)", ""))
        out = Path(run.cot_eval) if label == COT and run.cot_eval else out
        say("lare", run.show_progress, f"evaluating {label}")
        tokens = run.cot_max_new_tokens if method == "cot" else 8
        summary = run_eval(
            model, method, [bench], out, batch_size=run.eval_batch_size, max_new_tokens=tokens,
            limit=run.eval_samples, method_options=options, blank=blank, show_progress=run.show_progress,
        )["benches"][bench.stem]  # fmt: skip
        row = eval_row(summary)
        row["generated_tokens_correct"] = summary.get("mean_generated_tokens_correct")
        if summary.get("latent_steps_distribution") is not None:
            row["latent_steps_distribution"] = summary["latent_steps_distribution"]
        results[label] = row
    return results


def _probe(run: LareRun, trained: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Step 5: Table 6's probe of LaRe and of the w/o-extractor variant."""
    from lare.model import load_lare
    from lare.probe import probe_model

    rows = _rows(run.shapes)[: run.probe_samples]
    probed = {}
    for name in ("LaRe", "w/o extractor"):
        if name not in trained:
            continue
        out = run.out / "probe" / slug(name)
        settings = {"model": trained[name]["dir"], "samples": len(rows), "seeds": run.probe_seeds}
        check_settings(out, settings, reuse=(out / "probe.json").is_file())
        if not (out / "probe.json").is_file():
            say("lare", run.show_progress, f"probing {name}'s latents on {len(rows)} train rows")
            model, processor = load_lare(trained[name]["dir"])
            summary = probe_model(model, processor, rows, pairs=min(500, 5 * len(rows)), seeds=run.probe_seeds)
            (out / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")
        probed[name] = json.loads((out / "probe.json").read_text())
    return probed


def _markdown(results: dict[str, Any]) -> str:
    def num(value: Any, spec: str = ".1f") -> str:
        return "" if value is None else format(value, spec)

    lines = [
        "# LaRe at CPU scale (`uv run apps/cli reproduce lare`)",
        "",
        "| model | accuracy | colour | exists | count | compare | blank images | tokens | tokens, correct "
        "| latent steps | truncated |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["eval"].items():
        kinds = row["accuracy_per_kind"]
        lines.append(
            f"| {name} | {pct(row['accuracy'])} | "
            + " | ".join(pct(kinds.get(k)) for k in ("colour", "exists", "count", "compare"))
            + f" | {pct(row.get('blank_accuracy'))} | {num(row['generated_tokens'])} | "
            f"{num(row.get('generated_tokens_correct'))} | {num(row.get('mean_latent_steps'), '.2f')} | "
            f"{row['truncated']} |"
        )
    first = results["eval"]["LaRe"]
    lines += ["", f"Majority baseline: {pct(first['majority_baseline'])} ({first['n']} test questions).", ""]
    for name in ("LaRe", "w/o extractor"):
        controls = results["eval"].get(name, {}).get("latent_controls", {})
        if controls:
            cosine = num(results["eval"][name].get("mean_latent_similarity"), ".3f")
            lines.append(f"{name}'s latents: " + "; ".join(
                f"{kind} accuracy {pct(c['accuracy'])}, answers changed {pct(c['change_rate'])}"
                for kind, c in controls.items()
            ) + f"; mean cross-sample cosine {cosine}.")  # fmt: skip
    if results["probe"]:
        lines += ["", "| probe (Table 6) | text, SVM | text, MLP | vision, SVM | vision, MLP |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for name, entry in results["probe"].items():
            cells = [f"{pct(entry[m][f'{c}_accuracy'])} ± {pct(entry[m][f'{c}_std'])}"
                     for m in ("text", "vision") for c in ("svm", "mlp")]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    vae = results.get("vae")
    if vae:
        lines += ["", f"L_img's VAE: {vae['parameters']} parameters, {vae['steps']} steps, reconstruction MSE "
                      f"{vae['first_mse']} -> {vae['last_mse']} (in [-1, 1])."]  # fmt: skip
    return "\n".join(lines) + "\n"


def reproduce_lare(run: LareRun, command: str = "") -> dict[str, Any]:
    """Run the whole reproduction (module docstring); returns ``results.json``'s content, whose ``record`` is the
    last stdout line of the command."""
    from latent_apps.base import base_shapes

    start = time.perf_counter()
    run.resolve()
    run.out.mkdir(parents=True, exist_ok=True)
    shapes = base_shapes(run.base, run.shapes)
    rows = _rows(shapes)
    vae = _vae(run, rows)
    trained = _train(run, vae)
    evaluated = _evaluate(run, shapes, trained)
    probed = _probe(run, trained)
    lare, cot = evaluated["LaRe"], evaluated[COT]

    def probe(name: str, kind: str) -> float | None:
        return probed.get(name, {}).get(kind, {}).get("svm_accuracy")

    record = {
        "cot_accuracy": cot["accuracy"],
        "lare_accuracy": lare["accuracy"],
        "cot_tokens_correct": cot["generated_tokens_correct"],
        # the positions LaRe runs past the question when correct: <bot>, the latent steps, <eot>, then the generated
        # answer tokens (the answer and the end of turn, as latent eval counts them)
        "lare_tokens_correct": None
        if lare["generated_tokens_correct"] is None
        else lare["generated_tokens_correct"] + lare.get("mean_latent_steps", 0) + 2,
        "lare_answer_tokens_correct": lare["generated_tokens_correct"],
        "sft_accuracy": evaluated[SFT]["accuracy"],
        **{
            f"{slug(n).replace('-', '_')}_accuracy": evaluated[n]["accuracy"] if n in evaluated else None
            for n in VARIANTS
            if n.startswith("w/o ")
        },
        **{
            f"halting_{n.split('halting ')[1].replace(' < ', '_')}_{what}": r.get(key)
            for n, r in evaluated.items()
            if "halting" in n
            for what, key in (("accuracy", "accuracy"), ("steps", "mean_latent_steps"))
        },
        **{
            f"lare_{kind}_latents_{what}": entry[what]
            for kind, entry in lare.get("latent_controls", {}).items()
            for what in ("accuracy", "change_rate")
        },
        "probe_accuracy_lare": probe("LaRe", "text"),
        "probe_accuracy_no_extractor": probe("w/o extractor", "text"),
        "probe_vision_accuracy_lare": probe("LaRe", "vision"),
        "probe_vision_accuracy_no_extractor": probe("w/o extractor", "vision"),
        "cot_blank_accuracy": cot.get("blank_accuracy"),
        "sft_blank_accuracy": evaluated[SFT].get("blank_accuracy"),
        "lare_blank_accuracy": lare.get("blank_accuracy"),
        "majority_accuracy": lare["majority_baseline"],
        "eval_n": lare["n"],
        "wall_s": round(time.perf_counter() - start, 1),
    }
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run).items()}
    steps = "/".join(str(s) for s in run.stage_steps)
    results = {
        "command": command,
        "settings": settings,
        "departures_from_appendix_a": {
            "learning_rate": f"{run.learning_rate} in every stage (lost; LLaVA-1.5's 1e-3 / 2e-5 are for a "
            "pretrained 7B; the base here is 64 wide, from scratch)",
            "steps": f"stages I/II/III {steps} steps, batch {run.batch_size} (Appendix A: one epoch of 256 / 128)",
            "stage_iv": "not run: on the shapes task stage IV's reasoning data are stage III's",
            "extractor": f"{run.extractor_hidden} wide, {run.extractor_heads} heads (Appendix B: 1536, 12)",
            "l_img": f"a {run.vae_width}-wide f = 16 VAE trained here and a quarter-width U-Net (lare.vae)"
            if vae
            else "off (--img-weight 0)",
        },
        "vae": json.loads((vae / "lare_vae.json").read_text()) if vae else None,
        "train": trained,
        "eval": evaluated,
        "probe": probed,
        "record": record,
    }
    (run.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (run.out / "results.md").write_text(_markdown(results))
    return results
