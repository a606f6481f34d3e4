"""The ``heima`` command line: prepare, train (progressive stages, recover), generate, export.

heima prepare --data train.jsonl --images DIR --out data/heima
heima train --stage 0|1|2|3|recover [--one-shot] --prepared data/heima [--model llava-cot-11b] [--deepspeed zero3]
heima generate --stage-dir runs/heima/recover --data questions.jsonl --images DIR --out runs/heima/generate
heima export --stage-dir runs/heima/recover --out runs/heima/merged
"""

import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import typer
from latent_core.cli import BF16_OPTION, method_app

import heima

app = method_app("heima", heima.__doc__)


@app.command()
def prepare(
    data: Annotated[Path, typer.Option(help="LLaVA-CoT-100k JSONL (train.jsonl) or JSON list.")],
    images: Annotated[Path, typer.Option(help="Image root the records' `image` paths are relative to.")],
    out: Annotated[Path, typer.Option(help="Output directory (a datasets dataset + heima_prepare.json).")] = Path(
        "data/heima"
    ),
    tokens_per_stage: Annotated[int, typer.Option(min=1, help="Thinking tokens per stage (ablation: 1..32).")] = 1,
    retention_ratio: Annotated[
        float | None, typer.Option(help="n_k = max(1, floor(ratio * len(tokens(CoT_k)))) per stage; needs --model.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Tokenizer for --retention-ratio (alias or path).")] = None,
    drop_tags: Annotated[
        bool, typer.Option(help="Drop the <SUMMARY>..</SUMMARY> tags around thinking tokens.")
    ] = False,
) -> None:
    """LLaVA-CoT -> one record per sample (and turn) holding every stage variant; prints the skip report."""
    from heima.data import prepare as run_prepare

    tokenizer = None
    if retention_ratio is not None:
        if model is None:
            raise typer.BadParameter("--retention-ratio counts tokens: pass --model (alias or path) for its tokenizer")
        from latent_core.hub import load_processor

        processor = load_processor(model)
        tokenizer = getattr(processor, "tokenizer", processor)
    dataset, report = run_prepare(
        data,
        images,
        out,
        tokens_per_stage=tokens_per_stage,
        retention_ratio=retention_ratio,
        drop_tags=drop_tags,
        tokenizer=tokenizer,
    )
    typer.echo(str(report))
    typer.echo(f"{len(dataset)} records written to {out}")


@app.command()
def train(
    stage: Annotated[str, typer.Option(help="0 (plain CoT), 1..K (first N stages replaced) or recover.")],
    prepared: Annotated[Path, typer.Option(help="Output of `heima prepare`.")] = Path("data/heima"),
    model: Annotated[str, typer.Option(help="Base model: alias or path (a model that takes images).")] = (
        "llava-cot-11b"
    ),
    run_dir: Annotated[Path, typer.Option(help="Stages are written (and chained) here.")] = Path("runs/heima"),
    one_shot: Annotated[bool, typer.Option(help="The 'w/o progressive' ablation: straight to all replaced.")] = False,
    deepspeed: Annotated[str | None, typer.Option(help="zero2 | zero3 | zero3_offload | a JSON config.")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: the configured epochs).")] = -1,
    learning_rate: Annotated[
        float | None, typer.Option(help="Progressive stages' learning rate (Table A2: 1e-4).")
    ] = None,
    recover_learning_rate: Annotated[
        float | None,
        typer.Option(help="Recovering stage's learning rate (Table A2: 1e-5; default: --learning-rate / 10)."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Per-device batch size of every stage.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help="Warm-up steps (Table A1: 100).")] = None,
    epochs: Annotated[float | None, typer.Option(min=0, help="Epochs per stage (Table A1: 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = 42,
    save_total_limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Intermediate checkpoint-N folders kept while training (default 2); the stage "
            "deletes them once its final save is written (they hold optimizer state, only for resuming a killed "
            "run; --keep-checkpoints keeps them).",
        ),
    ] = None,
    keep_checkpoints: Annotated[
        bool, typer.Option(help="Keep the checkpoint-N folders after the stage is saved (default: deleted).")
    ] = False,
    report_to: Annotated[
        str, typer.Option(help="Trainer loggers: none, tensorboard, trackio, wandb, ... (comma list).")
    ] = "none",
    train_projector: Annotated[
        bool, typer.Option(help="Also train the multi_modal_projector in full (a choice; off as in Table A1).")
    ] = False,
    bf16: BF16_OPTION = None,
) -> None:
    """Train one Heima stage; stage N starts from stage N-1's output in --run-dir (Tables A1/A2 defaults)."""
    from heima.config import HeimaConfig
    from heima.trainer import train_stage

    _say_progress()
    parsed: int | str = stage if stage == "recover" else _stage_number(stage)
    overrides: dict = {}
    if learning_rate is not None:
        overrides["learning_rate"] = learning_rate
        overrides["recover_learning_rate"] = learning_rate / 10  # Table A2's ratio (1e-4 -> 1e-5)
        if parsed == "recover" and recover_learning_rate is None:
            typer.echo(
                f"note: --learning-rate sets the progressive stages' rate; the recovering stage trains at a tenth of "
                f"it, {learning_rate / 10:g} (Table A2's ratio). Pass --recover-learning-rate to set it directly.",
                err=True,
            )
    if recover_learning_rate is not None:
        overrides["recover_learning_rate"] = recover_learning_rate
    if epochs is not None and epochs <= 0:
        raise typer.BadParameter(f"must be > 0, got {epochs}", param_hint="--epochs")
    if batch_size is not None:
        overrides["per_device_train_batch_size"] = overrides["recover_batch_size"] = batch_size
    if warmup_steps is not None:
        overrides["warmup_steps"] = warmup_steps
    if epochs is not None:
        overrides["num_train_epochs"] = epochs
    if save_total_limit is not None:
        overrides["save_total_limit"] = save_total_limit
    config = HeimaConfig(
        output_dir=str(run_dir),
        model=model,
        run_dir=str(run_dir),
        prepared=str(prepared),
        stage=str(parsed),
        one_shot=one_shot,
        deepspeed=deepspeed,
        max_steps=max_steps,
        seed=seed,
        report_to=[r.strip() for r in report_to.split(",") if r.strip()],
        train_projector=train_projector,
        keep_checkpoints=keep_checkpoints,
        bf16=bf16,
        **overrides,
    )
    out = train_stage(config, parsed)
    typer.echo(f"stage {parsed} saved to {out}")


def _say_progress() -> None:
    """Show heima's INFO messages (which stage starts from which directory, where it was saved)."""
    logger = logging.getLogger("heima")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _stage_number(stage: str) -> int:
    try:
        return int(stage)
    except ValueError:
        raise typer.BadParameter(f"--stage must be a number 0..K or 'recover', got {stage!r}") from None


@app.command()
def generate(
    stage_dir: Annotated[Path, typer.Option(help="A trained stage (adapter) or an exported checkpoint.")],
    data: Annotated[Path, typer.Option(help="JSONL with id, question, image (LLaVA-CoT rows also work).")],
    images: Annotated[Path, typer.Option(help="Image root.")],
    out: Annotated[Path, typer.Option(help="Output directory: generations.jsonl (+ hidden states).")],
    base_model: Annotated[str | None, typer.Option(help="Base model if the stage does not name one.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    capture: Annotated[
        bool,
        typer.Option(
            help="Save each generated thinking token's hidden state to <out>/hidden_states (the format "
            "`interpreters decode --capture` reads)."
        ),
    ] = False,
    position: Annotated[
        Literal["predictor", "token"],
        typer.Option(help="Which state --capture keeps: predictor (t-1, as released) or token (t)."),
    ] = "predictor",
) -> None:
    """Batched greedy generation: text, generated / reasoning tokens, answer, latency per sample."""
    from heima.generate import generate as run_generate
    from heima.generate import load_for_inference, save_hidden_states

    model, processor = load_for_inference(stage_dir, base_model=base_model)
    samples = _read_questions(data, images)
    records = run_generate(
        model,
        processor,
        samples,
        max_new_tokens=max_new_tokens,
        capture=capture,
        position=position,
        batch_size=batch_size,
    )
    out.mkdir(parents=True, exist_ok=True)
    if capture:
        save_hidden_states(records, out / "hidden_states")
    with open(out / "generations.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if k != "hidden_states"}) + "\n")
    n = len(records)
    summary = {
        "n": n,
        "mean_generated_tokens": sum(r["generated_tokens"] for r in records) / max(n, 1),
        "mean_reasoning_tokens": sum(r["reasoning_tokens"] for r in records) / max(n, 1),
        "mean_latency_s": sum(r["latency_s"] for r in records) / max(n, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary))


def _read_questions(path: Path, images: Path) -> list[dict]:
    """Rows with id/question/image, or LLaVA-CoT rows (the first human turn is the question)."""
    samples = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise typer.BadParameter(f"{path}:{number}: malformed JSON ({err})") from None
            question = row.get("question")
            if question is None and row.get("conversations"):
                question = row["conversations"][0]["value"].replace("<image>", "").strip()
            if question is None or "image" not in row:
                raise typer.BadParameter(f"{path}:{number}: a row needs `question` (or conversations) and `image`")
            samples.append({"id": str(row.get("id", number)), "question": question, "image": images / row["image"]})
    return samples


@app.command()
def export(
    stage_dir: Annotated[Path, typer.Option(help="A trained stage directory (adapter).")],
    out: Annotated[Path, typer.Option(help="Where the merged standalone checkpoint is written.")],
    base_model: Annotated[str | None, typer.Option(help="Base model if the stage does not name one.")] = None,
) -> None:
    """Merge the adapter and thinking-token rows into a standalone checkpoint (loads with from_pretrained)."""
    from heima.generate import export as run_export

    path = run_export(stage_dir, out, base_model=base_model)
    typer.echo(f"exported to {path}")


def main() -> None:
    app(prog_name="heima")


if __name__ == "__main__":
    main()
