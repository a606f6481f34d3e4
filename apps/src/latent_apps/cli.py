"""The ``latent`` command line (``uv run apps/cli <command>``): the demo, and later the dataset builders,
evaluation and benchmarks."""

import time
from pathlib import Path
from typing import Annotated

import typer
from latent_core.cli import BF16_OPTION, MethodTyper, UserError, method_app
from lavit.cli import MAX_PIXELS_OPTION, MIN_PIXELS_OPTION, SYSTEM_PROMPT_OPTION
from lavit.inputs import MAX_PIXELS, MIN_PIXELS, SYSTEM_PROMPT

app = method_app("latent-apps", "Latent reasoning for VLMs: demo, dataset builders, evaluation and benchmarks.")


@app.command()
def demo(
    family: Annotated[
        list[str] | None,
        typer.Option("--family", "-f", help="Family to run (repeatable); default: all of the tiny model zoo."),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Demo questions.jsonl (default: data/demo/questions.jsonl of the checkout).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Where summary.json is written.")] = Path("runs/demo"),
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy generation length.")] = 16,
    heima: Annotated[
        bool, typer.Option(help="Also evaluate the shipped base (CoT) against the shipped Heima on shapes questions.")
    ] = True,
    questions_n: Annotated[
        int, typer.Option("--questions", min=1, help="Shapes test questions for the shipped-model comparison.")
    ] = 48,
    lavit: Annotated[
        bool, typer.Option(help="Also run LaViT's pipeline briefly: teacher data, a few student steps, overlays.")
    ] = True,
    lavit_questions: Annotated[
        int, typer.Option(min=1, help="Train questions the LaViT section's teacher answers.")
    ] = 32,
    lare: Annotated[
        bool, typer.Option(help="Also run LaRe's pipeline briefly: stages I-II on the llava base, halting decode.")
    ] = True,
    proving_ground: Annotated[
        bool, typer.Option(help="Also the proving ground: the shipped mixed base and Coconut on multi-hop questions.")
    ] = True,
) -> None:
    """Build every tiny model family, save and load it back, and run processor -> forward -> greedy generate on
    the demo image and question; then the shipped base (CoT) against the shipped Heima (from `reproduce heima`) on
    shapes test questions, with the blank-image and majority controls; LaViT's and LaRe's pipelines in brief; and
    the proving ground (`reproduce all`): the shipped mixed base's CoT and direct answers and the shipped Coconut on
    multi-hop test questions (blank images, zeroed / shuffled thoughts), then the headline of the shipped table with
    its targets. Prints tables and writes summary.json."""
    from latent_core.testing import TINY_FAMILIES
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from latent_apps.demo import find_demo_data, load_demo_question, run_family, write_summary

    hf_logging.disable_progress_bar()  # per-file weight bars would drown the table
    families = family or list(TINY_FAMILIES)
    unknown = [f for f in families if f not in TINY_FAMILIES]
    if unknown:
        raise typer.BadParameter(f"unknown family {', '.join(unknown)}; choose from {', '.join(TINY_FAMILIES)}")
    start = time.perf_counter()
    questions = find_demo_data(data)
    image, question = load_demo_question(questions)
    records = [run_family(f, image, question, max_new_tokens) for f in track(families, description="families")]
    seconds = time.perf_counter() - start

    table = Table(title=f"latent demo: {question!r}")
    for column in ("family", "class", "params", "prompt tok", "generated tok", "forward ms", "generate ms"):
        table.add_column(column, justify="left" if column in ("family", "class") else "right")
    for r in records:
        table.add_row(
            r.family,
            r.model_class,
            f"{r.params:,}",
            str(r.prompt_tokens),
            str(r.generated_tokens),
            f"{r.forward_ms:.1f}",
            f"{r.generate_ms:.1f}",
        )
    console = Console(width=max(Console().width, 110))
    console.print(table)
    extra = {}
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="latent-demo-")  # one shapes data set for both sections
    work = Path(scratch.name)
    if heima:
        from latent_apps.demo import SHIPPED_FAMILY, run_shipped

        extra["heima"] = h = run_shipped(work, n=questions_n)
        table = Table(
            title=f"shipped {SHIPPED_FAMILY} base (CoT) vs shipped Heima: first {h['n']} shapes test questions; "
            "blank = images blanked, majority = most common answer per question kind"
        )
        columns = ("model", "accuracy", "blank", "majority", "gen tok", "thinking tok", "truncated", "unanswered")
        for column in columns:
            table.add_column(column, justify="left" if column == "model" else "right")
        for label, r in h["rows"].items():
            table.add_row(
                label,
                f"{100 * r['accuracy']:.1f}%",
                f"{100 * r['blank_accuracy']:.1f}%",
                f"{100 * r['majority_baseline']:.1f}%",
                f"{r['generated_tokens']:.1f}",
                f"{r['thinking_tokens'] or 0:.1f}",
                str(r["truncated"]),
                str(r["unanswered"]),
            )
        console.print(table)
        console.print(
            f"every Heima stage, the one-shot ablation and the interpreters: "
            f"data/reproduced/heima-{SHIPPED_FAMILY}/results.md (README: Results at CPU scale)"
        )
    if lavit:
        from latent_apps.demo import run_lavit

        extra["lavit"] = v = run_lavit(work, out / "lavit", build_questions=lavit_questions)
        b, t = v["build"], v["train"]
        dropped = ", ".join(f"{k} {n}" for k, n in b["rejected"].items())
        console.print(
            f"LaViT (pipeline check, {v['seconds']:.0f} s): the small base as teacher kept {b['kept']} of "
            f"{b['samples']} train questions (dropped {dropped}); a student from the tiny base trained {t['steps']} "
            f"steps (loss {t['first_loss']:.2f} -> {t['last_loss']:.2f})"
        )
        table = Table(title="LaViT demo: answers on shapes test questions; attention overlays in " + v["overlays"])
        for column in ("model", "question", "answer", "correct", "attention entropy", "KL to teacher"):
            table.add_column(column, justify="left" if column in ("model", "question", "answer") else "right")
        for row in v["answers"]:
            table.add_row(
                row["model"], row["id"], row["final"], str(row.get("correct")),
                f"{row['response_entropy']:.2f}", f"{row.get('kl_to_teacher', 0):.3f}",
            )  # fmt: skip
        console.print(table)
        console.print("the claim, against naive SFT and with its controls: uv run apps/cli reproduce lavit (README)")
    if lare:
        from latent_apps.demo import run_lare

        extra["lare"] = r = run_lare(work)
        two = r["train"][2]
        console.print(
            f"LaRe (pipeline check, {r['seconds']:.0f} s): the shipped llava base with <bot>/<eot> and a fresh "
            f"extractor; stage I {r['train'][1]['steps']} steps, stage II {two['steps']} steps with "
            f"{', '.join(two['terms'])} (loss {two['first_loss']:.2f} -> {two['last_loss']:.2f})"
        )
        table = Table(title=f"LaRe demo: decoding with adaptive halting (cosine distance < {r['threshold']})")
        for column in ("question", "gold", "latent steps", "answer (first tokens)"):
            table.add_column(column, justify="right" if column == "latent steps" else "left")
        for row in r["answers"]:
            table.add_row(row["id"], str(row["gold"]), str(row["latent_steps"]), row["answer"][:60])
        console.print(table)
        console.print(
            "the claim, against CoT, the no-latent control and Table 3's ablations: uv run apps/cli reproduce lare "
            "(README)"
        )
    if proving_ground:
        from latent_apps.demo import PROVING_GROUND, run_proving_ground

        extra["proving_ground"] = g = run_proving_ground(work, n=questions_n)
        _print_proving_ground(console, g, PROVING_GROUND)
    scratch.cleanup()
    seconds = time.perf_counter() - start
    path = write_summary(records, out, seconds, extra)
    shown = "".join(f" + {name}" for name in ("heima", "lavit", "lare", "proving_ground") if name in extra)
    console.print(f"{len(records)} families{shown} in {seconds:.1f} s; summary: {path}")


def _print_proving_ground(console, g: dict, ground: Path) -> None:
    """The demo's proving-ground section: the live rows on the first questions, then the shipped table's headline."""
    from rich.table import Table

    def p(value) -> str:
        return "" if value is None else f"{100 * value:.1f}%"

    def control(row: dict, kind: str):
        return ((row.get("latent_controls") or {}).get(kind) or {}).get("accuracy")

    table = Table(
        title=f"proving ground, now: first {g['n']} multi-hop shapes test questions, shipped mixed base and Coconut; "
        "blank = images blanked, zeroed / shuffled = Coconut's thoughts replaced"
    )
    for column in ("model", "accuracy", "hop 2-3", "blank", "zeroed", "shuffled", "majority", "gen tok", "truncated"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, r in g["rows"].items():
        table.add_row(label, p(r["accuracy"]), p(r["hop23_accuracy"]), p(r.get("blank_accuracy")),
                      p(control(r, "zero")), p(control(r, "shuffle")), p(r["majority_baseline"]),
                      f"{r['generated_tokens']:.1f}", str(r["truncated"]))  # fmt: skip
    console.print(table)

    def ms(entry: dict) -> str:
        if entry.get("mean") is None:
            return ""
        return p(entry["mean"]) + (f" ± {100 * entry['std']:.1f}" if entry["n"] > 1 else "")

    first = next(iter(g["table"].values()))
    table = Table(
        title=f"proving ground, shipped ({ground}/results.md): {first['n']} test questions, seed mean ± spread; "
        f"majority {p(first['majority_baseline'])}"
        + (f"; hop 2-3 answered from the moves alone {p(g['hop_shortcut']['hop23'])}"
           if g["hop_shortcut"].get("hop23") is not None else "")
    )  # fmt: skip
    for column in ("model", "seeds", "accuracy", "today's kinds", "hop 2-3", "blank", "zeroed", "shuffled", "tok"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, e in g["table"].items():
        table.add_row(name, str(len(e["seeds"]) or "-"), ms(e["accuracy"]), ms(e["today_accuracy"]),
                      ms(e["hop23_accuracy"]), ms(e["blank_accuracy"]), ms(e["zero_accuracy"]),
                      ms(e["shuffle_accuracy"]), f"{e['generated_tokens']['mean']:.1f}")  # fmt: skip
    console.print(table)
    from latent_apps.reproduce.all import verdict

    for t in g["targets"]:
        console.print(f"target {verdict(t, 'met', 'NOT met')}: {t['target']}")
    for made, rows in (g.get("made_by") or {g["command"]: ["every row"]}).items():
        console.print(f"made by: {made} ({', '.join(rows)})")


@app.command("make-shapes")
def make_shapes_command(
    n: Annotated[int, typer.Option(min=1, help="Number of images (each gets one question of every kind).")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/shapes"),
    test_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of images in the test split.")] = 0.2,
    grid: Annotated[int, typer.Option(min=2, max=9, help="Cells per side.")] = 3,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
    tint: Annotated[
        bool, typer.Option("--tint/--no-tint", help="Pale per-cell background tints marking rows and columns.")
    ] = True,
    hops: Annotated[
        str,
        typer.Option(
            help="Multi-hop questions as well: the hop counts, comma-separated (e.g. 1,2,3); one question of kind "
            "hop{h} per image and h, everything else unchanged. Empty: none."
        ),
    ] = "",
    anchor_needed: Annotated[
        bool,
        typer.Option(
            "--anchor-needed/--any-anchor",
            help="Hop questions only where the answer needs the anchor: following the moves from any other shape "
            "would reach another colour too (--any-anchor: every path, as data sets before it; their answers "
            "mostly follow from the moves alone). summary.json's hop_shortcut gives that shortcut's accuracy.",
        ),
    ] = True,
) -> None:
    """Synthetic staged-CoT visual task: grids of coloured shapes with count / exists / colour / compare questions
    (and with --hops, multi-hop colour questions), 4-stage LLaVA-CoT answers, bboxes and reasoning texts, in
    LLaVA-CoT, Visual-CoT, reasoning JSONL and VLMEvalKit TSV formats, with disjoint train/test splits."""
    import json

    from latent_apps.shapes import MAX_HOPS, make_shapes

    try:
        hop_counts = tuple(int(h) for h in hops.replace(" ", "").split(",") if h)
    except ValueError:
        raise UserError(f"--hops takes comma-separated hop counts such as 1,2,3, got {hops!r}") from None
    if any(not 1 <= h <= MAX_HOPS for h in hop_counts):
        raise UserError(f"--hops: each hop count must be in 1..{MAX_HOPS}, got {hops!r}")
    summary = make_shapes(
        n, seed, out, test_fraction=test_fraction, grid=grid, image_size=image_size, tint=tint, hops=hop_counts,
        anchor_needed=anchor_needed,
    )  # fmt: skip
    typer.echo(json.dumps(summary, indent=2))


@app.command("make-base")
def make_base_command(
    family: Annotated[
        str, typer.Option(help="mllama | qwen2_5_vl | llava | llava_next (the real transformers class).")
    ],
    shapes: Annotated[Path, typer.Option(help="A make-shapes directory (train/, test/, images/).")] = Path(
        "data/shapes"
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (default: data/base/<family>, <family>-small for --size small)."),
    ] = None,
    size: Annotated[
        str,
        typer.Option(
            help="tiny (the shipped bases), small (a larger one: LaViT's teacher) or deep (tiny's width, 8 layers)."
        ),
    ] = "tiny",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (batches of --batch-size questions).")] = 2500,
    seed: Annotated[int, typer.Option(help="Initialisation and data-order seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="AdamW peak learning rate (warm-up, then cosine to 0).")] = 3e-3,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: the usable cores, <= 8).")] = None,
    eval_samples: Annotated[
        int, typer.Option(min=0, help="Test questions evaluated at the end (0: none), with the blank-image control.")
    ] = 400,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the last checkpoint.")] = True,
    mix: Annotated[
        str,
        typer.Option(
            help="cot (staged answers only), cot+direct (each question also asked directly and answered with its "
            "conclusion; evaluated with --method direct as well) or cot+direct+partial (also asked for short "
            "reasoning: the reasoning alone, a counting scan cut to one running count per row; --method partial)."
        ),
    ] = "cot",
    group_by_length: Annotated[
        bool,
        typer.Option(
            "--group-by-length/--no-group-by-length",
            help="Batch rows of similar length together (cheaper steps; in our runs the grouped mixed bases never "
            "learned to read the image: see data/base/README.md).",
        ),
    ] = False,
) -> None:
    """Train a small VLM of the family's real class from scratch (every weight trainable) on the shapes train split
    with full staged-CoT answers; save it (save_pretrained + processor, loadable by every method CLI) with
    make_base.json and an evaluation on the test split (accuracy, blank images, majority baseline)."""
    import json

    from latent_apps.base import BASE_FAMILIES, MIXES, SIZES, make_base

    if family not in BASE_FAMILIES:
        raise typer.BadParameter(f"choose one of {', '.join(BASE_FAMILIES)}", param_hint="--family")
    if size not in SIZES:
        raise typer.BadParameter(f"choose one of {', '.join(SIZES)}", param_hint="--size")
    if mix not in MIXES:
        raise typer.BadParameter(f"choose one of {', '.join(MIXES)}", param_hint="--mix")
    out = out or Path("data/base") / (family if size == "tiny" else f"{family}-{size}")
    command = (
        f"uv run apps/cli make-base --family {family} --shapes {shapes} --out {out} --size {size} --steps {steps} "
        f"--seed {seed} --batch-size {batch_size} --learning-rate {learning_rate}"
        + (f" --mix {mix}" if mix != "cot" else "")
        + (" --group-by-length" if group_by_length else "")
    )
    summary = make_base(
        family, shapes, out, size=size, steps=steps, seed=seed, batch_size=batch_size,
        learning_rate=learning_rate, threads=threads, eval_samples=eval_samples, resume=resume, command=command,
        mix=mix, group_by_length=group_by_length,
    )  # fmt: skip
    shown = {k: summary[k] for k in ("family", "size", "mix", "params", "steps", "train_seconds", "train_loss")}
    typer.echo(json.dumps({**shown, "eval": summary.get("eval"), "eval_direct": summary.get("eval_direct")}, indent=2))
    typer.echo(f"saved to {out}")


@app.command("build-lavit-15k")
def build_lavit_15k(
    teacher: Annotated[str, typer.Option(help="Teacher (alias, Hub id or path): the paper's is qwen2.5-vl-32b.")],
    data: Annotated[Path, typer.Option(help="Visual-CoT file: metadata JSONL (bboxs) or a benchmark JSON array.")],
    images: Annotated[Path, typer.Option(help="Root the rows' image paths are relative to.")],
    out: Annotated[Path, typer.Option(help="Output directory (shards, index.jsonl, manifest, stats, overlays).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N rows (after --sources).")] = None,
    sources: Annotated[
        list[str] | None, typer.Option("--sources", help="Keep rows of these Visual-CoT sources (repeatable).")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="paper (answer / all / post) or authors (after-image / last:8 / pre).")
    ] = "paper",
    queries: Annotated[str | None, typer.Option(help="answer | after-image (default: the preset's).")] = None,
    layers: Annotated[str | None, typer.Option(help="all | last:N (default: the preset's).")] = None,
    vsem_norm: Annotated[str | None, typer.Option(help="post | pre the final norm (default: the preset's).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Top-K of A_traj (Eq. 3).")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest teacher answer.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per fused teacher pass.")] = 8,
    min_alignment: Annotated[float, typer.Option(help="Alignment filter: least A_traj mass inside the bbox.")] = 0.2,
    difficulty: Annotated[
        bool, typer.Option(help="Difficulty filter: drop what is answered right without the image.")
    ] = True,
    text_model: Annotated[
        str | None, typer.Option(help="Text model for the difficulty filter (default: the teacher, no image).")
    ] = None,
    keep_rejected: Annotated[bool, typer.Option(help="Also store the rejected samples' signals.")] = False,
    vsem_tokens: Annotated[
        bool, typer.Option(help="Store V_sem per image token (bf16) besides its mean (what training uses).")
    ] = True,
    overlays: Annotated[int, typer.Option(min=0, help="PNG overlays of the first N kept and N rejected.")] = 8,
    judge_model: Annotated[
        str | None, typer.Option(help="Correctness judge model on an OpenAI-compatible endpoint (optional).")
    ] = None,
    judge_base_url: Annotated[str | None, typer.Option(help="The judge endpoint's base URL.")] = None,
    judge_key_env: Annotated[str, typer.Option(help="Environment variable holding the judge's API key.")] = (
        "OPENAI_API_KEY"
    ),
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.")] = "auto",
    device_map: Annotated[
        str | None, typer.Option(help="'auto' splits a teacher too large for one GPU (transformers' device_map).")
    ] = None,
    min_pixels: MIN_PIXELS_OPTION = MIN_PIXELS,
    max_pixels: MAX_PIXELS_OPTION = MAX_PIXELS,
    system_prompt: SYSTEM_PROMPT_OPTION = SYSTEM_PROMPT,
) -> None:
    """LaViT's teacher data (METHODS.md section 2): one fused teacher pass per batch (answer, attention rows of the
    answer over the image, V_sem), three counted filters, safetensors shards + index.jsonl + manifest + stats;
    resumable (rerun the same command)."""
    import json

    import torch
    from latent_core.families import require_family
    from latent_core.hub import load_config, load_model, load_processor
    from lavit.build import BuildConfig, build, check_settings
    from lavit.cli import input_settings
    from lavit.filters import JudgeSettings
    from lavit.inputs import InputSettings
    from lavit.teacher import TeacherOptions

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in ("auto", *dtypes):
        raise typer.BadParameter("choose auto, bf16, fp16 or fp32", param_hint="--dtype")
    chosen = dtypes.get(dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    options = TeacherOptions.preset(
        preset, queries=queries, layers=layers, vsem_norm=vsem_norm, top_k=top_k, max_new_tokens=max_new_tokens
    )
    config = BuildConfig(
        data=str(data), images=str(images), out=str(out), teacher=teacher, options=options, batch_size=batch_size,
        limit=limit, sources=tuple(sources) if sources else None, min_alignment=min_alignment, difficulty=difficulty,
        text_model=text_model, keep_rejected=keep_rejected, overlays=overlays, vsem_tokens=vsem_tokens,
        judge=JudgeSettings(judge_model, judge_base_url, judge_key_env) if judge_model else None,
        inputs=InputSettings(**input_settings(min_pixels, max_pixels, system_prompt)),
    )  # fmt: skip
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():  # torchrun: one teacher replica per rank
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0 or world == 1:
        check_settings(config)  # a resume with other settings fails before the teacher loads
    # A_traj and the bbox filter live on the merged 2-D patch grid of a Qwen2.5-VL processor (image_grid_thw)
    require_family(load_config(teacher), ("qwen2_5_vl",), "build-lavit-15k (the teacher's merged patch grid)")
    model = load_model(teacher, dtype=chosen, device_map=device_map).eval()
    if device_map is None:
        model = model.to(device)
    processor = load_processor(teacher)
    text, text_processor = None, None
    if text_model:
        text = load_model(text_model, dtype=chosen, device_map=device_map).eval().to(model.device)
        text_processor = load_processor(text_model)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prefix = f"rank {torch.distributed.get_rank()}: " if torch.distributed.is_initialized() else ""
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip
    task = bar.add_task(f"{prefix}batches", total=None)

    def progress(j: int, counts: dict[str, int], remaining: int) -> None:
        kept = counts.get("kept", 0)
        rejected = sum(counts.values()) - kept
        if j < 0:
            bar.update(task, total=remaining, completed=0)
        else:
            bar.advance(task)
        bar.update(task, description=f"{prefix}kept {kept}, rejected {rejected}")

    try:
        with bar:
            manifest = build(
                config, model, processor, text_model=text, text_processor=text_processor, on_batch=progress
            )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if "counts" in manifest:  # rank 0 (or the only process) reports the whole build
        typer.echo(json.dumps(manifest["counts"], indent=2))
        typer.echo(f"written to {out}")


def _register_eval() -> None:
    from latent_apps.eval.runner import eval_command

    app.command(
        "eval",
        help="Evaluate a model with a method (plain, cot, direct, coconut, heima, lavit, lare) on benchmarks "
        "(VLMEvalKit TSV, LLaVA-CoT JSONL, BLINK, MMVP or V* folder; repeat --bench): accuracy per category, "
        "generated tokens, latency; resumable.",
    )(eval_command)


_register_eval()


coconut_app = MethodTyper(
    help="Coconut (Hao et al. 2024): continuous thoughts replacing CoT steps by a curriculum, from a CoT model; the "
    "baseline of every latent method. Evaluate a stage with `latent eval --method coconut`.",
    no_args_is_help=True,
)
app.add_typer(coconut_app, name="coconut")


@coconut_app.command("train")
def coconut_train(
    model: Annotated[str, typer.Option(help="The CoT model the curriculum starts from (alias, Hub id or path).")],
    data: Annotated[Path, typer.Option(help="LLaVA-CoT JSONL (or JSON list) with staged answers.")],
    images: Annotated[Path, typer.Option(help="Image root the records' `image` paths are relative to.")],
    out: Annotated[Path, typer.Option(help="Run directory: stage_1 .. stage_M (each a checkpoint + coconut.json).")],
    steps_per_stage: Annotated[int, typer.Option(min=1, help="Optimizer steps of each curriculum stage.")] = 300,
    c_thought: Annotated[int, typer.Option(min=1, help="Continuous thoughts per replaced step (c).")] = 1,
    max_latent_stage: Annotated[
        int, typer.Option(min=1, help="Last stage M: it replaces every step by M * c thoughts.")
    ] = 3,
    unit: Annotated[
        str, typer.Option(help="One step: stage (SUMMARY / CAPTION / REASONING) or sentence (of the REASONING).")
    ] = "stage",
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per device and step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (constant, reset every stage).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Data-order seed (stage k uses seed + k).")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N rows.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: the usable cores, <= 8).")] = None,
    bf16: BF16_OPTION = None,
    deepspeed: Annotated[str | None, typer.Option(help="zero2 | zero3 | zero3_offload or a DeepSpeed JSON.")] = None,
) -> None:
    """Train Coconut's stages 1..M (every weight; a fresh optimizer per stage); a finished stage is skipped and a
    killed one resumes from its checkpoint. Prints the data's skip report and one JSON line per stage."""
    import json

    import torch
    from latent_core.coconut import CoconutConfig, read_coconut_rows, train_coconut
    from latent_core.readers import ReadReport

    if threads:
        torch.set_num_threads(threads)
    config = CoconutConfig(c_thought=c_thought, max_latent_stage=max_latent_stage, unit=unit)
    report = ReadReport(str(data))
    rows = read_coconut_rows(data, images, config, report)[:limit]
    typer.echo(str(report))
    if not rows:
        raise UserError(f"{data}: no row with staged reasoning to train on")
    extra = {"deepspeed": deepspeed} if deepspeed else {}
    result = train_coconut(model, rows, out, config, steps_per_stage, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, bf16=bf16, **extra)  # fmt: skip
    for stage in result["stages"]:
        keys = ("stage", "num_latents", "steps", "first_loss", "last_loss", "seconds")
        typer.echo(json.dumps({k: stage.get(k) for k in keys}))
    typer.echo(f"final stage: {result['final']}")


reproduce_app = MethodTyper(
    help="Reproductions of the papers' claims at CPU scale on the shapes task, from the shipped bases: results.json, "
    "a markdown table, a plot, and one JSON record on the last stdout line.",
    no_args_is_help=True,
)
app.add_typer(reproduce_app, name="reproduce")


def _show_reproduction(out: Path, results: dict) -> None:
    """A reproduction's table, then its JSON record as the last stdout line."""
    import json

    typer.echo((out / "results.md").read_text())
    typer.echo(json.dumps(results["record"]))


def _ablations(value: str) -> tuple[str, ...]:
    """``--ablations a,b`` -> ``("a", "b")``; ``none`` (or empty) -> ``()``."""
    return tuple(a.strip() for a in value.split(",") if a.strip() and a.strip() != "none")


@reproduce_app.command("heima")
def reproduce_heima_command(
    family: Annotated[str, typer.Option(help="Base family (data/base/<family>): mllama, qwen2_5_vl or llava.")] = (
        "mllama"
    ),
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("runs/reproduce/heima"),
    base: Annotated[Path | None, typer.Option(help="The base (default: data/base/<family>).")] = None,
    interpreter_base: Annotated[
        Path | None, typer.Option(help="Text LM the interpreters adapt (default: data/base/causal_lm).")
    ] = None,
    shapes: Annotated[
        Path | None, typer.Option(help="The base's shapes data (default: regenerated into <out>/shapes).")
    ] = None,
    stage_steps: Annotated[int, typer.Option(min=1, help="Steps of each progressive stage 0..K-1.")] = 400,
    last_stage_steps: Annotated[
        int | None, typer.Option(min=1, help="Steps of the last stage K (default: --stage-steps).")
    ] = None,
    recover_steps: Annotated[int, typer.Option(min=1, help="Steps of the recovering stage.")] = 150,
    one_shot_steps: Annotated[
        int | None, typer.Option(min=1, help="Steps of the one-shot ablation (default: those of stages 1..K).")
    ] = None,
    direct_steps: Annotated[
        int | None,
        typer.Option(min=1, help="Steps of the direct-answer control (no CoT; default: the one-shot ablation's)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Progressive stages' learning rate.")] = 3e-3,
    recover_learning_rate: Annotated[float, typer.Option(help="Recovering stage's learning rate.")] = 3e-4,
    eval_samples: Annotated[int, typer.Option(min=1, help="Test questions evaluated per model.")] = 200,
    capture_records: Annotated[int, typer.Option(min=1, help="Train answers whose states train interpreters.")] = 2000,
    interpreter_steps: Annotated[int, typer.Option(min=1, help="Steps per interpreter.")] = 400,
    decode_samples: Annotated[int, typer.Option(min=1, help="Test answers decoded by the interpreters.")] = 200,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: the usable cores, <= 8).")] = None,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
) -> None:
    """Heima in one run from a shipped base: stage 0 -> 1..K -> recover and the one-shot ablation, evaluated on the
    test split against the CoT base (with blank-image and majority controls); interpreters per stage with zero /
    shuffled controls. Writes results.json, results.md, accuracy_vs_tokens.png; prints the table and a JSON line."""

    from latent_apps.reproduce.heima import HeimaRun, reproduce_heima

    run = HeimaRun(
        family=family, out=out, base=base, interpreter_base=interpreter_base, shapes=shapes, stage_steps=stage_steps,
        last_stage_steps=last_stage_steps, recover_steps=recover_steps, one_shot_steps=one_shot_steps,
        direct_steps=direct_steps,
        batch_size=batch_size, learning_rate=learning_rate, recover_learning_rate=recover_learning_rate,
        eval_samples=eval_samples, capture_records=capture_records, interpreter_steps=interpreter_steps,
        decode_samples=decode_samples, threads=threads, seed=seed,
    )  # fmt: skip
    command = (
        f"uv run apps/cli reproduce heima --family {family} --out {out} --stage-steps {stage_steps} "
        f"--last-stage-steps {last_stage_steps or stage_steps} --recover-steps {recover_steps} "
        f"--learning-rate {learning_rate} --recover-learning-rate {recover_learning_rate} --seed {seed}"
        + (f" --one-shot-steps {one_shot_steps}" if one_shot_steps else "")
        + (f" --direct-steps {direct_steps}" if direct_steps else "")
    )
    results = reproduce_heima(run, command=command)
    _show_reproduction(out, results)


@reproduce_app.command("lavit")
def reproduce_lavit_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("runs/reproduce/lavit"),
    teacher: Annotated[Path | None, typer.Option(help="Teacher (default: data/base/qwen2_5_vl-small).")] = None,
    student: Annotated[Path | None, typer.Option(help="Student base (default: data/base/qwen2_5_vl).")] = None,
    shapes: Annotated[
        Path | None, typer.Option(help="The bases' shapes data (default: regenerated into <out>/shapes).")
    ] = None,
    teacher_data: Annotated[
        Path | None, typer.Option(help="A build-lavit-15k output to reuse (default: built into <out>/teacher-data).")
    ] = None,
    build_samples: Annotated[int, typer.Option(min=1, help="Train questions the teacher answers.")] = 4000,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of every student.")] = 1500,
    gate_warmup: Annotated[int, typer.Option(min=0, help="T_w of Eq. 5.")] = 600,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float, typer.Option(help="Every student's peak learning rate.")] = 1e-3,
    num_latents: Annotated[int, typer.Option(min=2, help="K latent tokens.")] = 4,
    ablations: Annotated[
        str, typer.Option(help="Table 3's ablations to train, comma-separated; none: only naive SFT and LaViT.")
    ] = "no-ltraj,no-lconcept,no-curriculum,single-stage",
    eval_samples: Annotated[int, typer.Option(min=1, help="Test questions evaluated per model.")] = 800,
    analysis_samples: Annotated[int, typer.Option(min=1, help="Test questions of the attention analysis.")] = 200,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
) -> None:
    """LaViT in one run from the shipped bases: teacher data from the small Qwen2.5-VL, then naive SFT, LaViT and
    its ablations from the tiny one with the same steps, evaluated on the test split (blank-image, masked-latent
    and majority controls) and analysed (attention entropy, KL to the teacher, latent diagnostics). Writes
    results.json and results.md; prints the table and a JSON line."""

    from latent_apps.reproduce.lavit import LavitRun, reproduce_lavit

    run = LavitRun(
        out=out, teacher=teacher, student=student, shapes=shapes, teacher_data=teacher_data,
        build_samples=build_samples, steps=steps, gate_warmup=gate_warmup, batch_size=batch_size,
        learning_rate=learning_rate, num_latents=num_latents, ablations=_ablations(ablations),
        eval_samples=eval_samples, analysis_samples=analysis_samples, seed=seed,
    )  # fmt: skip
    command = (
        f"uv run apps/cli reproduce lavit --out {out} --build-samples {build_samples} --steps {steps} "
        f"--gate-warmup {gate_warmup} --batch-size {batch_size} --learning-rate {learning_rate} --seed {seed}"
        + (f" --teacher-data {teacher_data}" if teacher_data else "")
        + f" --ablations {ablations}"
    )
    results = reproduce_lavit(run, command=command)
    _show_reproduction(out, results)


@reproduce_app.command("lare")
def reproduce_lare_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("runs/reproduce/lare"),
    base: Annotated[Path | None, typer.Option(help="The llava base (default: data/base/llava).")] = None,
    shapes: Annotated[
        Path | None, typer.Option(help="The base's shapes data (default: regenerated into <out>/shapes).")
    ] = None,
    stage_steps: Annotated[str, typer.Option(help="Steps of stages I,II,III (Appendix A: one epoch each).")] = (
        "10,200,1000"
    ),
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate of every stage.")] = 1e-3,
    num_latents: Annotated[int, typer.Option(min=1, help="T refocusing iterations (paper: 4).")] = 4,
    extractor_hidden: Annotated[int, typer.Option(min=8, help="Extractor width (Appendix B: 1536).")] = 128,
    extractor_heads: Annotated[int, typer.Option(min=1, help="Extractor heads (Appendix B: 12).")] = 4,
    img_weight: Annotated[float, typer.Option(help="L_img's weight (0: no VAE, no L_img anywhere).")] = 0.5,
    vae_steps: Annotated[int, typer.Option(min=1, help="Steps of the shapes-scale KL VAE.")] = 200,
    crop_size: Annotated[int, typer.Option(min=16, help="Side of L_img's window crops (4x4 VAE latents at 64).")] = 64,
    ablations: Annotated[
        str, typer.Option(help="Table 3's ablations to train, comma-separated; none: only LaRe and the controls.")
    ] = "no-extractor,no-sliding-window,no-alignment,no-image-reconstruction,no-text-reconstruction",
    jobs: Annotated[int, typer.Option(min=1, help="Variants trained at a time, each in its own process.")] = 1,
    eval_samples: Annotated[int, typer.Option(min=1, help="Test questions evaluated per model.")] = 400,
    halting: Annotated[
        str, typer.Option(help="Table 4's halting rows: METRIC:THRESHOLD,... (cos, l1, l2).")
    ] = "cos:0.02,cos:0.05,cos:0.1",
    probe_samples: Annotated[int, typer.Option(min=4, help="Train rows of Table 6's probe.")] = 500,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
) -> None:
    """LaRe in one run from the shipped llava base: the CoT base against LaRe, the no-latent SFT control and Table
    3's ablations (same stages, steps and seed), Table 4's halting rows and Table 6's probe, with the blank-image,
    zeroed / shuffled-latent and majority controls. Writes results.json and results.md; prints the table and a
    JSON line."""

    from latent_apps.reproduce.lare import LareRun, reproduce_lare

    try:
        steps = tuple(int(x) for x in stage_steps.split(","))
    except ValueError:
        steps = ()
    if len(steps) != 3 or min(steps) < 1:
        raise typer.BadParameter(
            f"expected three positive step counts, got {stage_steps!r}", param_hint="--stage-steps"
        )
    run = LareRun(
        out=out, base=base, shapes=shapes, stage_steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        num_latents=num_latents, extractor_hidden=extractor_hidden, extractor_heads=extractor_heads,
        img_weight=img_weight, vae_steps=vae_steps, crop_size=crop_size, jobs=jobs, eval_samples=eval_samples,
        ablations=_ablations(ablations),
        halting=tuple(h for h in halting.split(",") if h), probe_samples=probe_samples, seed=seed,
    )  # fmt: skip
    command = (
        f"uv run apps/cli reproduce lare --out {out} --stage-steps {stage_steps} --batch-size {batch_size} "
        f"--learning-rate {learning_rate} --num-latents {num_latents} --extractor-hidden {extractor_hidden} "
        f"--extractor-heads {extractor_heads} --img-weight {img_weight} --vae-steps {vae_steps} "
        f"--crop-size {crop_size} --ablations {ablations} --jobs {jobs} --eval-samples {eval_samples} "
        f"--halting {halting} --probe-samples {probe_samples} --seed {seed}"
        + (f" --base {base}" if base else "")
        + (f" --shapes {shapes}" if shapes else "")
    )
    results = reproduce_lare(run, command=command)
    _show_reproduction(out, results)


@reproduce_app.command("coconut")
def reproduce_coconut_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("runs/reproduce/coconut"),
    base: Annotated[
        Path | None, typer.Option(help="A make-base --mix cot+direct base (default: data/base/mllama-mix).")
    ] = None,
    shapes: Annotated[
        Path | None, typer.Option(help="The base's shapes data (default: regenerated into <out>/shapes).")
    ] = None,
    steps_per_stage: Annotated[int, typer.Option(min=1, help="Optimizer steps of each curriculum stage.")] = 200,
    c_thought: Annotated[int, typer.Option(min=1, help="Continuous thoughts per replaced step (c).")] = 2,
    max_latent_stage: Annotated[int, typer.Option(min=1, help="Last stage M (M * c thoughts).")] = 3,
    unit: Annotated[str, typer.Option(help="One step: stage or sentence.")] = "stage",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (constant, reset every stage).")] = 1e-3,
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated (one Coconut run each).")] = "0,1,2",
    kinds: Annotated[
        str, typer.Option(help="Train and evaluate on these question kinds only, comma-separated (default: all).")
    ] = "",
    eval_stages: Annotated[
        str, typer.Option(help="Also evaluate the first seed's curriculum stages k (comma-separated, < M).")
    ] = "",
    eval_samples: Annotated[int, typer.Option(min=1, help="Test questions evaluated per model.")] = 400,
) -> None:
    """Coconut on the proving ground: from a base trained on CoT and direct answers, one Coconut run per seed,
    evaluated with the base's CoT and direct answers on the same test questions (per kind and per hop), with the
    blank-image, zeroed / shuffled-thought and majority controls. Writes results.json, results.md and
    accuracy_vs_hops.png; prints the table and a JSON line."""
    from latent_apps.reproduce.coconut import CoconutRun, reproduce_coconut

    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        stage_list = tuple(int(x) for x in eval_stages.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r} / {eval_stages!r}",
                                 param_hint="--seeds / --eval-stages") from None  # fmt: skip
    if not seed_list:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
    run = CoconutRun(
        out=out, base=base, shapes=shapes, steps_per_stage=steps_per_stage, c_thought=c_thought,
        max_latent_stage=max_latent_stage, unit=unit, batch_size=batch_size, learning_rate=learning_rate,
        seeds=seed_list, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()), eval_stages=stage_list,
        eval_samples=eval_samples,
    )  # fmt: skip
    command = (
        f"uv run apps/cli reproduce coconut --out {out} --steps-per-stage {steps_per_stage} --c-thought {c_thought} "
        f"--max-latent-stage {max_latent_stage} --unit {unit} --batch-size {batch_size} --learning-rate "
        f"{learning_rate} --seeds {seeds} --eval-samples {eval_samples}"
        + (f" --base {base}" if base else "")
        + (f" --shapes {shapes}" if shapes else "")
        + (f" --kinds {kinds}" if kinds else "")
        + (f" --eval-stages {eval_stages}" if eval_stages else "")
    )
    results = reproduce_coconut(run, command=command)
    _show_reproduction(out, results)


@reproduce_app.command("all")
def reproduce_all_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("runs/reproduce/all"),
    base: Annotated[
        Path | None, typer.Option(help="Mixed mllama base: CoT, direct, Heima, Coconut (default data/base/mllama-mix).")
    ] = None,
    lavit_student: Annotated[
        Path | None, typer.Option(help="Qwen2.5-VL mixed base (default: data/base/qwen2_5_vl-mix).")
    ] = None,
    lavit_teacher: Annotated[
        Path | None, typer.Option(help="LaViT's teacher (default: data/base/qwen2_5_vl-small-mix).")
    ] = None,
    lare_base: Annotated[Path | None, typer.Option(help="llava mixed base (default: data/base/llava-mix).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: heima, coconut, lavit, lare.")] = ",".join(
        ("heima", "coconut", "lavit", "lare")
    ),
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated (every method runs each).")] = "0,1,2",
    steps: Annotated[int, typer.Option(min=120, help="Optimizer steps of every trained variant (split per stage).")] = (
        1200
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Questions per step, every variant.")] = 16,
    eval_samples: Annotated[int, typer.Option(min=1, help="Test questions evaluated per model.")] = 400,
) -> None:
    """Every method on the proving ground in one table: from mixed CoT + direct bases trained on the same shapes
    data with multi-hop questions, the base's CoT and direct answers, Heima (progressive, one-shot), Coconut,
    LaViT (naive SFT, w/o L_traj), LaRe (no-latent, w/o extractor), each seed-repeated with the same step budget,
    with blank-image, zeroed / shuffled-latent and majority controls and the issue's targets checked. Writes
    results.json, results.md, accuracy_vs_tokens_hops.png; prints the table and a JSON line."""
    from latent_apps.reproduce.all import AllRun, reproduce_all

    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
    except ValueError:
        seed_list = ()
    if not seed_list:
        raise typer.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds")
    run = AllRun(
        out=out, base=base, lavit_student=lavit_student, lavit_teacher=lavit_teacher, lare_base=lare_base,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), seeds=seed_list, steps=steps,
        batch_size=batch_size, eval_samples=eval_samples,
    )  # fmt: skip
    command = (
        f"uv run apps/cli reproduce all --out {out} --methods {methods} --seeds {seeds} --steps {steps} "
        f"--batch-size {batch_size} --eval-samples {eval_samples}"
        + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("base", base), ("lavit_student", lavit_student),
                  ("lavit_teacher", lavit_teacher), ("lare_base", lare_base)) if v)
    )  # fmt: skip
    results = reproduce_all(run, command=command)
    _show_reproduction(out, results)


@app.command("plan")
def plan_command(
    method: Annotated[str, typer.Option(help="heima | lavit | lare | interpreters.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Model alias (or Hub id / path). Default: heima llava-cot-11b, lavit qwen2.5-vl-3b, lare "
            "clip-vit-l-14+qwen2.5-0.5b (CLIP + LLM composed as llava), interpreters llama-3.1-8b-instruct."
        ),
    ] = None,
    deepspeed: Annotated[str, typer.Option(help="ZeRO stage the memory estimate shards by: zero0..zero3.")] = "zero0",
    gpus: Annotated[int, typer.Option(min=1, help="GPUs the ZeRO shards (and LaRe's global batch) spread over.")] = 1,
    teacher: Annotated[str, typer.Option(help="lavit: the teacher whose hidden size phi maps to.")] = "qwen2.5-vl-32b",
    heima_model: Annotated[
        str, typer.Option(help="interpreters: the Heima model whose hidden states it reads.")
    ] = "llava-cot-11b",
    stage: Annotated[int, typer.Option(min=1, max=4, help="lare: the training stage (Appendix A).")] = 4,
    vae_channels: Annotated[
        int, typer.Option(min=1, help="lare: latent channels of the KL-f16 VAE of L_img (choice).")
    ] = 16,
    batch: Annotated[int | None, typer.Option(min=1, help="Per-device micro-batch (default: the method's).")] = None,
    text_tokens: Annotated[
        int | None, typer.Option(min=1, help="Text tokens per sample (default: the method's choice, printed).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the plan as one JSON object, last line.")] = False,
) -> None:
    """A training plan at real size without weights: the base from its published config.json on the meta device, the
    method's own preparation run on it (token surgery with a stand-in tokenizer of the real length, LoRA, extra
    modules); parameters by part, LoRA targets, frozen parts, and a memory estimate per GPU (weights, gradients,
    optimizer state by ZeRO stage; activations with and without checkpointing)."""
    import json

    from latent_apps.plan import build_plan, render

    plan = build_plan(
        method, model, deepspeed=deepspeed, gpus=gpus, teacher=teacher, heima_model=heima_model, stage=stage,
        vae_channels=vae_channels, batch=batch, text_tokens=text_tokens,
    )  # fmt: skip
    typer.echo(render(plan))
    if as_json:
        typer.echo(json.dumps(plan.as_dict()))


bench_app = MethodTyper(
    help="Benchmarks: the fast path and its naive baseline side by side in one process; a table, and with --json "
    "one JSON record on the last line.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object with the metrics on the last line.")]


DeviceFlag = Annotated[
    str, typer.Option(help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N: model and inputs go there.")
]


@bench_app.command("latent-loop")
def bench_latent_loop(
    as_json: JsonFlag = False,
    threads: Annotated[int, typer.Option(help="torch intra-op threads while timing (0: torch's default).")] = 1,
    device: DeviceFlag = "auto",
) -> None:
    """KV-cached latent loop (generate_with_latents) vs Coconut-style full recompute per latent step."""
    from latent_apps.bench.latent_loop import run

    run(as_json, threads=threads or None, device=device)


@bench_app.command("latent-train")
def bench_latent_train(as_json: JsonFlag = False, device: DeviceFlag = "auto") -> None:
    """One training step of K=4 latents with the gate and recorder: our cached loop vs Coconut's K+1 full passes."""
    from latent_apps.bench.latent_train import run

    run(as_json, device=device)


@bench_app.command("lare-loop")
def bench_lare_loop(as_json: JsonFlag = False, device: DeviceFlag = "auto") -> None:
    """LaRe's T=4 refocusing iterations (256 image tokens, the extractor) on the KV cache vs recomputing the prefix
    at every iteration; also the halting path's cost per iteration."""
    from latent_apps.bench.lare_loop import run

    run(as_json, device=device)


@bench_app.command("lavit-teacher")
def bench_lavit_teacher(as_json: JsonFlag = False, device: DeviceFlag = "auto") -> None:
    """build-lavit-15k's fused teacher pass vs the authors' three passes (generate; features; eager attention)."""
    from latent_apps.bench.lavit_teacher import run

    run(as_json, device=device)


@bench_app.command("attention-capture")
def bench_attention_capture(as_json: JsonFlag = False, device: DeviceFlag = "auto") -> None:
    """record_attention of 32 query rows vs eager output_attentions=True (2048 tokens, 8 layers)."""
    from latent_apps.bench.attention_capture import run

    run(as_json, device=device)


@bench_app.command("gating")
def bench_gating(as_json: JsonFlag = False, device: DeviceFlag = "auto") -> None:
    """A forward under attention_bias (half the keys gated for the last quarter of queries) vs plain causal SDPA."""
    from latent_apps.bench.gating import run

    run(as_json, device=device)


@bench_app.command("gpu")
def bench_gpu(
    as_json: JsonFlag = False,
    device: DeviceFlag = "auto",
    scale: Annotated[
        str, typer.Option(help="real: the published sizes in bf16 (needs CUDA); tiny: the zoo's configs (a dry run).")
    ] = "real",
    case: Annotated[
        list[str] | None,
        typer.Option(help="Case (repeatable): heima-stage, lavit-student, lare-step, lavit-teacher; default: all."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per case, after one warm-up step.")] = 3,
) -> None:
    """One training step of Heima (11B mllama + LoRA), LaViT (Qwen2.5-VL-3B, K=4, gate + recorder) and LaRe (CLIP-L +
    Qwen2.5-1.5B, T=4), and LaViT's teacher pass (Qwen2.5-VL-7B), random weights at real size: peak memory, step
    time, tokens/s; one JSON line per case. Exit status 1 when a case failed."""
    from latent_apps.bench.gpu import run

    summary = run(as_json, device=device, scale=scale, cases=case, steps=steps)
    if summary["failed"]:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="latent")


if __name__ == "__main__":
    main()
