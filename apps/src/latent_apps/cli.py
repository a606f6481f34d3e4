"""The ``latent`` command line (``uv run apps/cli <command>``): the demo, and later the dataset builders,
evaluation and benchmarks."""

import time
from pathlib import Path
from typing import Annotated

import typer
from latent_core.cli import method_app

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
    heima: Annotated[bool, typer.Option(help="Also run Heima end to end on the fixtures (tiny mllama).")] = True,
) -> None:
    """Build every tiny model family, save and load it back, and run processor -> forward -> greedy generate on
    the demo image and question; then Heima end to end on the fixtures (prepare, stages 0-3 and recover for a few
    steps each, generate with hidden-state capture). Prints tables and writes summary.json."""
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
    try:
        questions = find_demo_data(data)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from None
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
    if heima:
        import tempfile

        from latent_apps.demo import run_heima

        with tempfile.TemporaryDirectory(prefix="latent-demo-heima-") as work:
            extra["heima"] = run_heima(Path(work))
        h = extra["heima"]
        table = Table(title="heima on data/fixtures/llava_cot (tiny mllama)")
        for column in ("records", "stages", "last losses", "train s", "generated tok", "thinking tok", "states"):
            table.add_column(column)
        table.add_row(
            str(h["records"]),
            " -> ".join(h["stages"]),
            " ".join(f"{v:.2f}" for v in h["final_losses"].values()),
            f"{h['train_seconds']:.1f}",
            str(h["generated_tokens"]),
            str(h["thinking_tokens"]),
            str(h["captured_states"]),
        )
        console.print(table)
        interp = h["interpreters"]
        table = Table(title="interpreters on the tiny Heima's thinking tokens (unified tiny interpreter)")
        for column in ("stage", "condition", *interp["metrics"]):
            table.add_column(column)
        for stage, conditions in interp["scores"].items():
            for condition, values in conditions.items():
                table.add_row(stage, condition, *(f"{values.get(m, float('nan')):.1f}" for m in interp["metrics"]))
        console.print(table)
    seconds = time.perf_counter() - start
    path = write_summary(records, out, seconds, extra)
    console.print(f"{len(records)} families{' + heima' if heima else ''} in {seconds:.1f} s; summary: {path}")


@app.command("make-shapes")
def make_shapes_command(
    n: Annotated[int, typer.Option(min=1, help="Number of images (each gets one question of every kind).")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data/shapes"),
    test_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of images in the test split.")] = 0.2,
    grid: Annotated[int, typer.Option(min=2, max=9, help="Cells per side.")] = 3,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 96,
) -> None:
    """Synthetic staged-CoT visual task: grids of coloured shapes with count / exists / colour / compare questions,
    4-stage LLaVA-CoT answers, bboxes and reasoning texts, in LLaVA-CoT, Visual-CoT, reasoning JSONL and VLMEvalKit
    TSV formats, with disjoint train/test splits."""
    import json

    from latent_apps.shapes import make_shapes

    summary = make_shapes(n, seed, out, test_fraction=test_fraction, grid=grid, image_size=image_size)
    typer.echo(json.dumps(summary, indent=2))


def _register_eval() -> None:
    from latent_apps.eval.runner import eval_command

    app.command(
        "eval",
        help="Evaluate a model with a method (plain, heima; lavit and lare when they land) on benchmarks "
        "(VLMEvalKit TSV, BLINK folder, MMVP folder; repeat --bench): accuracy per category, generated tokens, "
        "latency; resumable.",
    )(eval_command)


_register_eval()


bench_app = typer.Typer(
    help="Benchmarks: the fast path and its naive baseline side by side in one process; a table, and with --json "
    "one JSON record on the last line.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object with the metrics on the last line.")]


@bench_app.command("latent-loop")
def bench_latent_loop(
    as_json: JsonFlag = False,
    threads: Annotated[int, typer.Option(help="torch intra-op threads while timing (0: torch's default).")] = 1,
) -> None:
    """KV-cached latent loop (generate_with_latents) vs Coconut-style full recompute per latent step."""
    from latent_apps.bench.latent_loop import run

    run(as_json, threads=threads or None)


@bench_app.command("attention-capture")
def bench_attention_capture(as_json: JsonFlag = False) -> None:
    """record_attention of 32 query rows vs eager output_attentions=True (2048 tokens, 8 layers)."""
    from latent_apps.bench.attention_capture import run

    run(as_json)


@bench_app.command("gating")
def bench_gating(as_json: JsonFlag = False) -> None:
    """A forward under attention_bias (half the keys gated for the last quarter of queries) vs plain causal SDPA."""
    from latent_apps.bench.gating import run

    run(as_json)


def main() -> None:
    app(prog_name="latent")


if __name__ == "__main__":
    main()
