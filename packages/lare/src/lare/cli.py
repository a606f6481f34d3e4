"""The ``lare`` command line.

lare init --vision clip-vit-l-14 --llm qwen2.5-0.5b --out runs/lare/init     (or --from-llava <llava checkpoint>)
lare train --stage 1|2|3|4 --data reasoning.jsonl --images DIR [--base runs/lare/init] [--run-dir runs/lare] [--vae ID]
lare generate --model runs/lare/init --data <bench> [--halt cos|l1|l2 --threshold X] [--latents real|zero|shuffle]
lare analyze --model lare=runs/lare/stage-4 --model cot=runs/cot --data MMStar.tsv
lare probe --model runs/lare/stage-4 --data reasoning.jsonl --images DIR
lare decontaminate --data vision_r1_cold.json --images DIR --train-bench AI2D_train.tsv --test-bench MMStar.tsv
"""

import json
from pathlib import Path
from typing import Annotated

import typer
from latent_core.cli import BF16_OPTION, method_app

import lare

app = method_app("lare", lare.__doc__)


@app.command()
def init(
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")] = Path("runs/lare/init"),
    vision: Annotated[
        str, typer.Option(help="CLIP vision tower: alias (clip-vit-l-14), Hub id or path (a full CLIP checkpoint too).")
    ] = "clip-vit-l-14",
    llm: Annotated[str, typer.Option(help="LLM: alias (qwen2.5-0.5b|1.5b|7b), Hub id or path.")] = "qwen2.5-0.5b",
    from_llava: Annotated[
        str | None, typer.Option(help="Start from this llava checkpoint instead of composing --vision and --llm.")
    ] = None,
    num_latents: Annotated[
        int, typer.Option(min=0, help="T refocusing iterations (paper: 4); 0: the no-latent SFT control.")
    ] = 4,
    window: Annotated[
        int | None, typer.Option(min=1, help="Sliding-window side in grid cells (default: half the grid, 8 of 16).")
    ] = None,
    stride: Annotated[int, typer.Option(min=1, help="Sliding-window stride.")] = 1,
    extractor_layers: Annotated[int, typer.Option(min=1, help="Appendix B: 2.")] = 2,
    extractor_heads: Annotated[int, typer.Option(min=1, help="Appendix B: 12.")] = 12,
    extractor_hidden: Annotated[int, typer.Option(min=1, help="Appendix B: 1536.")] = 1536,
    query: Annotated[str, typer.Option(help="layers (softmax over every layer's state) or last.")] = "layers",
    extractor: Annotated[
        bool, typer.Option(help="--no-extractor: Table 3's ablation, z_t is the LLM's hidden state itself.")
    ] = True,
    sliding_window: Annotated[
        bool, typer.Option(help="--no-sliding-window: Table 3's ablation, V_local is every image token.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the fresh projector and extractor.")] = 0,
) -> None:
    """Compose a LaRe model from a pretrained CLIP vision tower and LLM (a fresh projector and extractor, <image>,
    <bot> and <eot> added), or add the extractor and delimiters to an existing llava checkpoint; writes the
    checkpoint and lare_init.json."""
    from lare import model as lare_model
    from lare.config import LareConfig

    config = LareConfig(
        num_latents=num_latents, window=window, stride=stride, extractor_layers=extractor_layers,
        extractor_heads=extractor_heads, extractor_hidden=extractor_hidden, query=query, extractor=extractor,
        sliding_window=sliding_window,
    )  # fmt: skip
    if from_llava:
        model, processor = lare_model.from_llava(from_llava, config, seed=seed)
    else:
        model, processor = lare_model.compose(vision, llm, config, seed=seed)
    model.save_pretrained(out, processor)
    grid = model.grid()
    summary = {
        "out": str(out),
        "composed_from": {"llava": from_llava} if from_llava else {"vision": vision, "llm": llm},
        "grid": [grid, grid],
        "window": config.window_for(grid),
        "extractor_parameters": sum(p.numel() for p in model.extractor.parameters()),
        "vlm_parameters": sum(p.numel() for p in model.vlm.parameters()),
        "bot_id": model.bot_id,
        "eot_id": model.eot_id,
    }
    (out / "lare_init.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def train(
    stage: Annotated[
        int, typer.Option(min=1, max=4, help="Appendix A stage: 1 projector, 2 extractor + U-Net, 3-4 all but vision.")
    ],
    data: Annotated[
        list[Path], typer.Option(help="Reasoning data (decontaminated JSONL, Vision-R1-cold JSON), repeatable.")
    ],
    images: Annotated[Path, typer.Option(help="Image root of the reasoning data.")],
    base: Annotated[str, typer.Option(help="The `lare init` checkpoint stage 1 starts from.")] = "runs/lare/init",
    run_dir: Annotated[Path, typer.Option(help="Run directory: stage N is saved in <run-dir>/stage-N.")] = Path(
        "runs/lare"
    ),
    vae: Annotated[str | None, typer.Option(help="KL VAE (f=16) for L_img, by id or path (stages 2-4).")] = None,
    start: Annotated[
        Path | None, typer.Option(help="Start from this stage directory instead of <run-dir>/stage-(N-1).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Per-device batch (Appendix A: 256 in stage I, 128 after).")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak learning rate (lost; default 1e-3 stage I, 2e-5 after).")
    ] = None,
    epochs: Annotated[float, typer.Option(help="Epochs (Appendix A: 1).")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps (-1: the epochs decide).")] = -1,
    align_text_weight: Annotated[float, typer.Option(help="L_align text term (0: off).")] = 0.1,
    align_visual_weight: Annotated[float, typer.Option(help="L_align visual term (0: off).")] = 0.1,
    img_weight: Annotated[float, typer.Option(help="L_img (0: off, the w/o image reconstruction ablation).")] = 0.5,
    text_weight: Annotated[float, typer.Option(help="L_text (0: off, the w/o text reconstruction ablation).")] = 0.5,
    crop_size: Annotated[int, typer.Option(min=8, help="Side the window's crop is resized to for the VAE.")] = 128,
    seed: Annotated[int, typer.Option(help="Data order and initialisation seed.")] = 0,
    deepspeed: Annotated[str | None, typer.Option(help="zero2, zero3, zero3_offload or a JSON config.")] = None,
    bf16: BF16_OPTION = None,
) -> None:
    """Train one LaRe stage from the previous one (stage 1 from the `lare init` checkpoint); resumable; writes the
    stage, lare_train.json (every loss curve by name) and lare_train.png."""
    from latent_core.readers import ReadReport, read_reasoning

    from lare.config import LareTrainConfig
    from lare.trainer import STAGE_BATCH, STAGE_LEARNING_RATE, stage_dir, train_stage

    rows, report = [], ReadReport("reasoning")
    for path in data:
        rows += list(read_reasoning(path, images, report))
    if report.total_skipped:
        typer.echo(f"skipped {report.total_skipped} rows: {dict(report.skipped)}", err=True)
    config = LareTrainConfig(
        output_dir=str(stage_dir(run_dir, stage)), per_device_train_batch_size=batch_size or STAGE_BATCH[stage],
        learning_rate=learning_rate or STAGE_LEARNING_RATE[stage], num_train_epochs=epochs, max_steps=max_steps,
        align_text_weight=align_text_weight, align_visual_weight=align_visual_weight, img_weight=img_weight,
        text_weight=text_weight, crop_size=crop_size, seed=seed, deepspeed=deepspeed, logging_steps=1, report_to=[],
        remove_unused_columns=False, save_strategy="steps", save_steps=100, bf16=bf16,
    )  # fmt: skip
    summary = train_stage(config, stage, rows, base, run_dir, vae=vae, start=start)
    shown = {k: summary.get(k) for k in ("stage", "steps", "first_loss", "last_loss", "samples", "output_dir")}
    typer.echo(json.dumps(shown, indent=2))


@app.command("train-vae")
def train_vae_command(
    data: Annotated[
        list[Path], typer.Option(help="Reasoning data (JSONL, Vision-R1-cold JSON) whose images to train on.")
    ],
    images: Annotated[Path, typer.Option(help="Image root of the reasoning data.")],
    out: Annotated[Path, typer.Option(help="Output directory (an AutoencoderKL checkpoint, for --vae).")] = Path(
        "runs/lare-vae"
    ),
    steps: Annotated[int, typer.Option(min=1)] = 400,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float, typer.Option()] = 1e-3,
    crop_size: Annotated[int, typer.Option(min=16, help="Side of the crops (as lare train --crop-size).")] = 128,
    width: Annotated[int, typer.Option(min=8, help="Channels of the first level (x2, x2, x4, x4 below).")] = 16,
    limit: Annotated[int, typer.Option(min=1, help="At most this many distinct images.")] = 2000,
) -> None:
    """A small f = 16 KL VAE (AutoencoderKL) trained from scratch on crops of the training images, for L_img where
    no pretrained VAE can be loaded (lare.vae); lare_vae.json holds its summary."""
    from latent_core.collate import row_image
    from latent_core.readers import ReadReport, read_reasoning

    from lare.vae import train_vae

    paths: dict[str, dict] = {}
    report = ReadReport("reasoning")
    for path in data:
        for row in read_reasoning(path, images, report):
            paths.setdefault(str(row.get("image")), row)
    if report.total_skipped:
        typer.echo(f"skipped {report.total_skipped} rows: {dict(report.skipped)}", err=True)
    pictures = [row_image(row) for row in list(paths.values())[:limit]]
    if not pictures:
        raise typer.BadParameter("no readable rows with an image", param_hint="--data")
    summary = train_vae(pictures, out, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                        crop_size=crop_size, width=width)  # fmt: skip
    typer.echo(json.dumps({k: summary[k] for k in ("steps", "images", "first_mse", "last_mse")}, indent=2))


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="A LaRe checkpoint (lare init, or a trained one).")],
    data: Annotated[Path, typer.Option(help="Questions: a TSV, an MMVP or V* folder, or a Visual-CoT JSONL.")],
    out: Annotated[Path, typer.Option(help="Answers JSONL (one line per question); a .summary.json beside it.")] = Path(
        "runs/lare-answers.jsonl"
    ),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    num_latents: Annotated[int | None, typer.Option(min=1, help="T (default: the checkpoint's).")] = None,
    halt: Annotated[
        str | None,
        typer.Option(help="Adaptive halting (Table 4): cos, l1 or l2; none: off (default: the checkpoint's)."),
    ] = None,
    latent_diagnostics: Annotated[
        bool, typer.Option("--latent-diagnostics", help="Also answer with the latents zeroed and shuffled.")
    ] = False,
    threshold: Annotated[float | None, typer.Option(help="Halting threshold on the distance z_t vs z_{t-1}.")] = None,
    latents: Annotated[str, typer.Option(help="real | zero | shuffle: the latent diagnostics' controls.")] = "real",
    images: Annotated[Path | None, typer.Option(help="Image root of a Visual-CoT JSONL.")] = None,
) -> None:
    """Batched, KV-cached greedy decoding: the prompt and <bot> prefilled once, T refocusing iterations (each one
    cached forward, the window chosen from that position's attention), <eot>, then the answer. Writes one JSON line
    per question (id, answer, gold, correct, generated tokens, latent steps, window corners, latent similarity, the
    controls' answers) and a summary (accuracy, tokens when correct, latent-step distribution, change rates)."""
    from functools import partial

    from latent_core.answers import answers_match
    from latent_core.diagnostics import change_rate
    from latent_core.readers import read_questions
    from rich.progress import track

    from lare.generate import generate_answers
    from lare.model import load_lare

    loaded, processor = load_lare(model, num_latents=num_latents, threshold=threshold)
    if threshold is not None and halt in (None, "none") and loaded.config.halt is None:
        raise typer.BadParameter("--threshold needs --halt cos|l1|l2", param_hint="--threshold")
    samples = read_questions(data, limit, images)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with out.open("w", encoding="utf-8") as handle:
        for start in track(range(0, len(samples), batch_size), description="lare generate"):
            chunk = samples[start : start + batch_size]
            run = partial(
                generate_answers, loaded, processor, [s["image"] for s in chunk], [s["text"] for s in chunk],
                max_new_tokens, halt=halt,
            )  # fmt: skip
            got = run(latents=latents)
            controls = {k: run(latents=k).texts for k in ("zero", "shuffle")} if latent_diagnostics else {}
            side = loaded.grid()
            for i, sample in enumerate(chunk):
                gold = sample.get("answer")
                correct = None if gold is None else answers_match(got.texts[i], str(gold))
                n = got.latent_steps[i]
                corners = [divmod(int(w[i, 0]), side) for w in got.windows[:n]]
                # generated tokens count the end of turn, as `latent eval` does (capped at the budget)
                row = {"id": sample["id"], "answer": got.texts[i], "gold": gold, "correct": correct,
                       "generated_tokens": min(got.token_counts[i] + 1, max_new_tokens), "latent_steps": n,
                       "windows": corners, "latent_similarity": got.latent_similarity[i],
                       "controls": {k: texts[i] for k, texts in controls.items()}}  # fmt: skip
                handle.write(json.dumps(row) + "\n")
                rows.append(row)
    scored = [r for r in rows if r["correct"] is not None]
    right = [r for r in scored if r["correct"]]
    steps = [r["latent_steps"] for r in rows]
    similarity = [r["latent_similarity"] for r in rows if r["latent_similarity"] == r["latent_similarity"]]
    summary = {
        "n": len(rows),
        "accuracy": len(right) / len(scored) if scored else None,
        "mean_generated_tokens": _mean([r["generated_tokens"] for r in rows]),
        "mean_generated_tokens_correct": _mean([r["generated_tokens"] for r in right]),
        "mean_latent_steps": _mean(steps),
        "latent_steps_distribution": {str(k): steps.count(k) for k in sorted(set(steps))},
        "mean_latent_similarity": _mean(similarity),
        "change_rate": {
            k: change_rate([r["answer"] for r in rows], [r["controls"][k] for r in rows])
            for k in (("zero", "shuffle") if latent_diagnostics else ())
        },
        "halt": None if halt == "none" else (halt or loaded.config.halt),
        "threshold": loaded.config.threshold if (halt or loaded.config.halt) not in (None, "none") else None,
        "latents": latents,
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def decontaminate(
    data: Annotated[list[Path], typer.Option(help="Reasoning data (Vision-R1-cold JSON arrays, JSONL), repeatable.")],
    images: Annotated[Path, typer.Option(help="Image root of the reasoning data.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/lare/decontaminated"),
    train_bench: Annotated[
        list[Path] | None, typer.Option(help="Benchmark TRAINING splits (VLMEvalKit TSV: AI2D, ScienceQA), repeatable.")
    ] = None,
    test_bench: Annotated[
        list[Path] | None, typer.Option(help="Benchmark TEST splits whose images must not recur (VLMEvalKit TSV).")
    ] = None,
    vision: Annotated[str, typer.Option(help="CLIP model for the image embeddings.")] = "clip-vit-l-14",
    threshold: Annotated[float, typer.Option(help="Cosine at or above which an image is a near duplicate.")] = 0.95,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per embedding batch (one cache shard each).")] = 64,
) -> None:
    """Drop reasoning rows whose question and answer match a benchmark training row, and rows whose image is a
    near duplicate of a benchmark test image (CLIP cosine >= --threshold); writes reasoning.jsonl (the kept rows),
    decontamination.json (every removed row with its reason and evidence, and the readers' skip counts) and a
    resumable embedding cache in <out>/embeddings."""
    from latent_core.readers import ReadReport, read_reasoning, read_vlmevalkit_tsv
    from rich.progress import MofNCompleteColumn, Progress

    from lare.decontaminate import clip_embedder
    from lare.decontaminate import decontaminate as run

    reports: dict[str, dict] = {}
    rows = []
    for path in data:
        report = ReadReport(str(path))
        rows += list(read_reasoning(path, images, report))
        reports[str(path)] = report.as_dict()
    train = []
    for path in train_bench or []:
        report = ReadReport(str(path))
        train += list(read_vlmevalkit_tsv(path, report))
        reports[str(path)] = report.as_dict()
    test = []
    for path in test_bench or []:
        report = ReadReport(str(path))
        for row in read_vlmevalkit_tsv(path, report):
            test += [(f"{path.stem}:{row['id']}:{k}", image) for k, image in enumerate(row["images"])]
        reports[str(path)] = report.as_dict()
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn()) as bar:
        task = bar.add_task("CLIP embeddings (cached ones skipped)", total=len(rows) + len(test))
        kept, summary = run(
            rows, train, test, clip_embedder(vision), out / "embeddings", threshold, batch_size,
            progress=lambda n: bar.advance(task, n),
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with (out / "reasoning.jsonl").open("w", encoding="utf-8") as handle:
        for row in kept:
            handle.write(json.dumps({**row, "image": str(row["image"])}, ensure_ascii=False) + "\n")
    summary["readers"] = reports
    (out / "decontamination.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shown = {k: summary[k] for k in ("rows", "kept", "removed", "threshold")}
    typer.echo(json.dumps(shown, indent=2))


@app.command()
def analyze(
    model: Annotated[
        list[str], typer.Option(help="NAME=PATH, repeatable: LaRe checkpoints or stages, or llava models.")
    ],
    data: Annotated[Path, typer.Option(help="Questions: a TSV, an MMVP or V* folder, or a Visual-CoT JSONL.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/lare-analysis"),
    limit: Annotated[int, typer.Option(min=2, help="Only the first N questions.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    images: Annotated[Path | None, typer.Option(help="Image root of a Visual-CoT JSONL.")] = None,
) -> None:
    """Table 5: the first answer token's attention on the image for each model on the same questions; the first
    model is compared with each other one by Welch's t-test and the Mann-Whitney U test; analysis.json and
    attention.png."""
    import torch
    from latent_core.cli import UserError
    from latent_core.hub import load_model, load_processor
    from latent_core.readers import read_questions
    from rich.progress import track

    from lare.analysis import compare_distributions, first_token_visual_attention, plot_distributions
    from lare.config import CONFIG_NAME
    from lare.model import load_lare

    specs = {}
    for spec in model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {spec!r}: expected NAME=PATH")
        specs[name] = path
    if len(specs) < 2:
        raise UserError("give at least two --model NAME=PATH to compare")
    samples = read_questions(data, limit, images)
    values = {}
    for name, path in specs.items():
        lare_like = (Path(path) / CONFIG_NAME).is_file()
        loaded, processor = load_lare(path) if lare_like else (load_model(path, family="llava"), load_processor(path))
        loaded.eval()
        parts = []
        for start in track(range(0, len(samples), batch_size), description=f"lare analyze: {name}"):
            chunk = samples[start : start + batch_size]
            parts.append(first_token_visual_attention(loaded, processor, [s["image"] for s in chunk],
                                                      [s["text"] for s in chunk]))  # fmt: skip
        values[name] = torch.cat(parts)
    out.mkdir(parents=True, exist_ok=True)
    names = list(values)
    summary = {
        "n": len(samples),
        "models": {n: {"path": specs[n], "mean": float(v.mean()), "std": float(v.std())} for n, v in values.items()},
        "comparisons": {f"{names[0]} vs {n}": compare_distributions(values[names[0]], values[n]) for n in names[1:]},
    }
    (out / "analysis.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_distributions(values, out / "attention.png")
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def probe(
    model: Annotated[str, typer.Option(help="A LaRe checkpoint or `lare train` stage.")],
    data: Annotated[list[Path], typer.Option(help="Reasoning data (JSONL, Vision-R1-cold JSON), repeatable.")],
    images: Annotated[Path, typer.Option(help="Image root of the reasoning data.")],
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/lare-probe"),
    limit: Annotated[int, typer.Option(min=4, help="Samples to represent (pairs are drawn among them).")] = 500,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    pairs: Annotated[int, typer.Option(min=10, help="Positive pairs, and as many negative ones (Table 6: 500).")] = 500,
    seeds: Annotated[int, typer.Option(min=1, help="Repetitions (fresh pairs and split) for the spread.")] = 3,
) -> None:
    """Table 6: do the pooled latents identify their sample's reasoning text and visual evidence? Linear SVM and MLP
    probes of matching vs non-matching pairs (lare.probe); probe.json."""
    from latent_core.readers import ReadReport, read_reasoning

    from lare.model import load_lare
    from lare.probe import probe_model

    loaded, processor = load_lare(model)
    rows, report = [], ReadReport("reasoning")
    for path in data:
        rows += list(read_reasoning(path, images, report))
    rows = rows[:limit]
    if len(rows) < 4:
        raise typer.BadParameter(f"{len(rows)} readable rows: the probe needs at least 4", param_hint="--data")
    probed = probe_model(loaded, processor, rows, batch_size=batch_size, pairs=pairs, seeds=seeds, show_progress=True)
    summary = {"model": model, "skipped": dict(report.skipped), **probed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shown = {k: {m: summary[k][m] for m in ("svm_accuracy", "svm_std", "mlp_accuracy", "mlp_std")}
             for k in ("text", "vision")}  # fmt: skip
    typer.echo(json.dumps(shown, indent=2))


def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    app(prog_name="lare")


if __name__ == "__main__":
    main()
