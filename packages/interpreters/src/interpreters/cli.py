"""The ``interpreters`` command line: capture, train, decode, score.

interpreters capture --heima runs/heima/recover --data data/heima --out runs/interp/capture [--position predictor]
interpreters train --capture runs/interp/capture --stage summary|caption|reasoning|all [--unified]
interpreters decode --interpreter runs/interpreters --capture runs/interp/capture --out runs/interp/decode
interpreters score --decoded runs/interp/decode/decoded.jsonl --out runs/interp/score [--judge-model NAME]
"""

import enum
import functools
import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from latent_core.cli import BF16_OPTION, method_app
from latent_core.thinking import THINKING_STAGES as STAGES

import interpreters

app = method_app("interpreters", interpreters.__doc__)
_Stage = enum.Enum("_Stage", {stage: stage for stage in STAGES}, type=str)  # a repeatable choice (typer: an Enum)


@app.command()
def capture(
    heima: Annotated[Path, typer.Option(help="A trained Heima stage (adapter) or an exported checkpoint.")],
    data: Annotated[Path, typer.Option(help="Output of `heima prepare` (the fully replaced answers are used).")],
    out: Annotated[Path, typer.Option(help="Capture directory: safetensors shards + index.jsonl (resumable).")],
    position: Annotated[
        Literal["predictor", "token"], typer.Option(help="predictor (t-1, as released; default) or token (t).")
    ] = "predictor",
    base_model: Annotated[str | None, typer.Option(help="Heima's base model if the stage does not name one.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    shard_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Prepared records per safetensors shard (each gives one state per thinking "
            "token); fixed for a capture: resume with the same value.",
        ),
    ] = 256,
) -> None:
    """The frozen Heima, teacher-forced on the fully replaced answers: each thinking token's hidden state."""
    from interpreters.capture import capture as run_capture

    summary = run_capture(
        heima, data, out, position=position, batch_size=batch_size, shard_size=shard_size, base_model=base_model
    )
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def train(
    capture_dir: Annotated[Path, typer.Option("--capture", help="Output of `interpreters capture`.")],
    stage: Annotated[
        Literal["summary", "caption", "reasoning", "all"], typer.Option(help="The stage(s) to train on.")
    ] = "all",
    unified: Annotated[bool, typer.Option(help="One interpreter for all stages (Table A9 ablation).")] = False,
    model: Annotated[str, typer.Option(help="Interpreter LLM (text-only): alias or path.")] = "llama-3.1-8b-instruct",
    run_dir: Annotated[Path, typer.Option(help="Interpreters are written here, one directory per stage.")] = Path(
        "runs/interpreters"
    ),
    projector: Annotated[
        Literal["auto", "identity", "linear", "mlp"],
        typer.Option(help="auto: identity when the hidden sizes match, else linear."),
    ] = "auto",
    placeholder: Annotated[
        str | None,
        typer.Option(
            help="Token whose embedding becomes the hidden state (default: the tokenizer's first reserved "
            "token, e.g. <|reserved_special_token_0|>, else an unused special token, else a new <THOUGHT> whose "
            "rows are saved as rows)."
        ),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(help="Explanatory prompt with {question} and {placeholder} (default: paper 000 section 3.3's)."),
    ] = None,
    deepspeed: Annotated[str | None, typer.Option(help="zero2 | zero3 | zero3_offload | a JSON config.")] = None,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: the configured epochs).")] = -1,
    learning_rate: Annotated[float, typer.Option(help="Table A3: 5e-4.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Table A3: 8.")] = 8,
    activation_checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing (on, as for Heima).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and the data order.")] = 42,
    bf16: BF16_OPTION = None,
) -> None:
    """Train interpreters: the placeholder's embedding is replaced by (a projection of) the thinking token's state."""
    from interpreters.config import InterpreterConfig
    from interpreters.trainer import train_interpreter

    config = InterpreterConfig(
        output_dir=str(run_dir),
        run_dir=str(run_dir),
        model=model,
        projector=projector,
        placeholder=placeholder,
        **({"template": template} if template is not None else {}),
        activation_checkpointing=activation_checkpointing,
        seed=seed,
        deepspeed=deepspeed,
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        bf16=bf16,
    )
    out = train_interpreter(config, capture_dir, stage=stage, unified=unified)
    typer.echo(f"interpreter(s) saved to {out}")


@app.command()
def decode(
    interpreter: Annotated[Path, typer.Option(help="An interpreter directory or the run dir of `train`.")],
    capture_dir: Annotated[
        Path,
        typer.Option(
            "--capture",
            help="States: `interpreters capture`'s output or `heima generate --capture`'s <out>/hidden_states.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output directory (decoded.jsonl).")],
    stage: Annotated[
        list[_Stage] | None,
        typer.Option(help="Stages to decode (repeat; default all)."),
    ] = None,
    conditions: Annotated[str, typer.Option(help="Comma list of real, zero, shuffled (the controls).")] = (
        "real,zero,shuffled"
    ),
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
) -> None:
    """Greedy decoding of every captured state (from `interpreters capture`, or the states `heima generate --capture`
    recorded while answering), with the zero and shuffled-state controls."""
    from interpreters.decode import decode as run_decode

    path = run_decode(
        interpreter,
        capture_dir,
        out,
        stages=tuple(s.value for s in stage) if stage else STAGES,
        conditions=tuple(c.strip() for c in conditions.split(",") if c.strip()),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    typer.echo(f"decoded: {path}")


@app.command()
def score(
    decoded: Annotated[Path, typer.Option(help="decoded.jsonl of `interpreters decode`.")],
    out: Annotated[Path, typer.Option(help="Output directory: scores.json, scores.md (+ judge.jsonl).")],
    metrics: Annotated[str, typer.Option(help="Comma list of bleu, meteor, rouge, bertscore.")] = (
        "bleu,meteor,rouge,bertscore"
    ),
    bertscore_model: Annotated[str, typer.Option(help="BERTScore model id or path ('minilm': the shipped one).")] = (
        "roberta-large"
    ),
    bertscore_layers: Annotated[int | None, typer.Option(help="Layer for models bert-score does not know.")] = None,
    judge_model: Annotated[str | None, typer.Option(help="LLM judge model name (Appendix C); off when absent.")] = None,
    judge_base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (or OPENAI_BASE_URL).")] = None,
    judge_text_only: Annotated[
        bool,
        typer.Option(
            help="The judge endpoint takes no images: send a text note instead of the image (departs from Appendix "
            "C, whose judge sees the image)."
        ),
    ] = False,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder the relative `image` paths of decoded.jsonl resolve against (default: the cwd)."),
    ] = None,
) -> None:
    """BLEU-4, METEOR, ROUGE-L, BERTScore F1 (+ the LLM judge, shown the image as in Appendix C) per stage, like
    Table A5, with the control gaps. The judge's API key comes from OPENAI_API_KEY only."""
    from interpreters.score import score as run_score

    model, layers = bertscore_model, bertscore_layers
    if bertscore_model == "minilm":
        from interpreters.metrics import shipped_minilm_path

        model, layers = str(shipped_minilm_path()), layers or 6
    judge = None
    if judge_model is not None:
        from interpreters.judge import JudgeConfig, judge_many, make_client

        judge = functools.partial(
            judge_many,
            client=make_client(base_url=judge_base_url),
            config=JudgeConfig(model=judge_model, text_only=judge_text_only),
            image_root=image_root,
        )
    result = run_score(
        decoded,
        out,
        metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()),
        bertscore_model=model,
        bertscore_num_layers=layers,
        judge=judge,
    )
    typer.echo((out / "scores.md").read_text() if (out / "scores.md").is_file() else json.dumps(result))


def main() -> None:
    app(prog_name="interpreters")


if __name__ == "__main__":
    main()
