"""The ``lavit`` command line.

lavit train --data <build-lavit-15k output> [--model qwen2.5-vl-3b] [--out runs/lavit] [--preset paper|authors]
lavit generate --stage <run>/student --data <bench> [--out answers.jsonl] [--mask-latents] [--latents real|zero|shuffle]
lavit analyze --model NAME=PATH [--model ...] --teacher NAME --data <bench> [--limit N] [--out runs/lavit-analysis]
"""

import json
from pathlib import Path
from typing import Annotated

import typer
from latent_core.cli import BF16_OPTION, method_app

import lavit

app = method_app("lavit", lavit.__doc__)

MIN_PIXELS_OPTION = Annotated[
    int | None,
    typer.Option(min=0, help="Least pixels of a resized image (Table A1: 200,704; 0: the processor's own)."),
]
MAX_PIXELS_OPTION = Annotated[
    int | None,
    typer.Option(min=0, help="Most pixels of a resized image (Table A1: 1,003,520; 0: the processor's own)."),
]
SYSTEM_PROMPT_OPTION = Annotated[
    str | None, typer.Option(help="The system turn (Appendix C.3's by default; '': the chat template's default).")
]
"""LaViT's input options (one definition; ``build-lavit-15k`` uses them too): see :class:`InputSettings`."""


def input_settings(
    min_pixels: int | None = None, max_pixels: int | None = None, system_prompt: str | None = None
) -> dict:
    """The :class:`InputSettings` fields the command-line options set (``None``: not given; ``0`` and ``''``: the
    model's own, stored as ``None``)."""
    given = {"min_pixels": min_pixels, "max_pixels": max_pixels, "system_prompt": system_prompt}
    return {name: value or None for name, value in given.items() if value is not None}


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="A build-lavit-15k output directory (its kept samples are trained on).")],
    model: Annotated[str, typer.Option(help="Student base (alias, Hub id or path; a Qwen2.5-VL).")] = "qwen2.5-vl-3b",
    out: Annotated[Path, typer.Option(help="Run directory (the stage is saved in <out>/student).")] = Path(
        "runs/lavit"
    ),
    preset: Annotated[
        str, typer.Option(help="paper (Table A1) or authors (the released scripts' settings).")
    ] = "paper",
    mode: Annotated[str | None, typer.Option(help="continuous | discrete latents (default: the preset's).")] = None,
    num_latents: Annotated[int, typer.Option(min=1, help="K latent tokens.")] = 4,
    gate: Annotated[
        str, typer.Option(help="Eq. 5 gate: cosine, hard (no curriculum) or open (single stage).")
    ] = "cosine",
    gate_warmup: Annotated[int, typer.Option(min=0, help="T_w of Eq. 5.")] = 400,
    traj: Annotated[bool, typer.Option(help="L_traj on (--no-traj: the ablation).")] = True,
    concept: Annotated[bool, typer.Option(help="L_concept on (--no-concept: the ablation).")] = True,
    max_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (Table A1: 1000).")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-device batch (Table A1: 16).")] = 16,
    learning_rate: Annotated[float, typer.Option(help="Peak learning rate (Table A1: 5e-6).")] = 5e-6,
    warmup_steps: Annotated[
        float, typer.Option(min=0, help="Warm-up steps; below 1: a ratio of --max-steps (Table A1: 0.03).")
    ] = 0.03,
    seed: Annotated[int, typer.Option(help="Data order and initialisation seed.")] = 0,
    deepspeed: Annotated[str | None, typer.Option(help="zero2, zero3, zero3_offload or a JSON config.")] = None,
    activation_checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing in the LLM.")] = False,
    lora_r: Annotated[int, typer.Option(min=0, help="0: full fine-tuning (Table A1); r > 0: LoRA of rank r.")] = 0,
    naive: Annotated[
        bool, typer.Option("--naive", help="The control: naive SFT on the same samples (no latents, no teacher).")
    ] = False,
    min_pixels: MIN_PIXELS_OPTION = None,
    max_pixels: MAX_PIXELS_OPTION = None,
    system_prompt: SYSTEM_PROMPT_OPTION = None,
    bf16: BF16_OPTION = None,
) -> None:
    """Train the LaViT student: K latent tokens aligned with the teacher (L_concept, L_traj) under the curriculum
    gate, the LLM fully fine-tuned with the vision tower frozen; the stage and lavit_train.json go to <out>/student.
    The pixel bounds and the system prompt (default: the preset's, Table A1 / Appendix C.3) must be those the
    teacher data was built with (checked)."""
    from lavit.config import LavitConfig
    from lavit.trainer import train_student

    overrides = dict(
        output_dir=str(out), num_latents=num_latents, gate=gate, gate_warmup=gate_warmup, max_steps=max_steps,
        per_device_train_batch_size=batch_size, learning_rate=learning_rate, seed=seed, warmup_steps=warmup_steps,
        deepspeed=deepspeed,
        concept_weight=0.3 if concept else 0.0, traj_weight=0.3 if traj else 0.0, logging_steps=1, report_to=[],
        remove_unused_columns=False, save_strategy="steps", save_steps=100,
        activation_checkpointing=activation_checkpointing, lora_r=lora_r, bf16=bf16,
    )  # fmt: skip
    overrides.update(input_settings(min_pixels, max_pixels, system_prompt))  # else the preset's
    if mode is not None:
        overrides["latent_mode"] = mode
    config = LavitConfig.preset(preset, **overrides)
    summary = train_student(config, data, model, out, naive=naive)
    shown = {k: summary.get(k) for k in ("steps", "first_loss", "last_loss", "samples", "output_dir")}
    typer.echo(json.dumps(shown, indent=2))


@app.command()
def generate(
    stage: Annotated[str, typer.Option(help="A lavit train stage (<run>/student, or <run>/naive for the control).")],
    data: Annotated[Path, typer.Option(help="Questions: a TSV, an MMVP or V* folder, or a Visual-CoT JSONL.")],
    out: Annotated[Path, typer.Option(help="Answers JSONL (one line per question).")] = Path(
        "runs/lavit-answers.jsonl"
    ),
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    mask_latents: Annotated[
        bool, typer.Option("--mask-latents", help="Table 3's 'w/o latent tokens': the answer cannot attend to them.")
    ] = False,
    latents: Annotated[
        str, typer.Option(help="real | zero | shuffle (continuous mode): what the latent steps feed.")
    ] = ("real"),
    images: Annotated[Path | None, typer.Option(help="Image root of a Visual-CoT JSONL.")] = None,
) -> None:
    """Batched, KV-cached greedy decoding with a trained student: prefill, the K latent steps, then the answer
    (a naive-SFT stage answers with no latent block). Writes one JSON line per question: id, answer, gold,
    correct, generated tokens, latent steps."""
    from latent_core.answers import answers_match
    from latent_core.readers import read_questions

    from lavit.generate import generate_answers, load_student

    model, processor, latent_ids, mode, system = load_student(stage, method="lavit generate")
    if mode == "plain":
        raise typer.BadParameter(f"{stage} is not a lavit train stage", param_hint="--stage")
    samples = read_questions(data, limit, images)
    out.parent.mkdir(parents=True, exist_ok=True)
    right = 0
    with out.open("w", encoding="utf-8") as handle:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            images_, texts = [s["image"] for s in chunk], [s["text"] for s in chunk]
            got = generate_answers(
                model, processor, images_, texts, latent_ids, mode, max_new_tokens, mask_latents, latents, system
            )  # a naive-SFT stage (no latent ids) answers the same prompt with no latent block
            answers, counts, steps = got.texts, got.token_counts, got.latent_steps
            for sample, answer, count, step in zip(chunk, answers, counts, steps, strict=True):
                gold = sample.get("answer")
                correct = None if gold is None else answers_match(answer, str(gold))
                right += bool(correct)
                row = {"id": sample["id"], "answer": answer, "gold": gold, "correct": correct}
                handle.write(json.dumps({**row, "generated_tokens": count, "latent_steps": step}) + "\n")
    typer.echo(f"{len(samples)} answers ({right} correct) written to {out}")


@app.command()
def analyze(
    model: Annotated[
        list[str],
        typer.Option(help="NAME=PATH, repeatable: a lavit train stage, a naive-SFT stage, a base or the teacher."),
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="Inputs: a TSV (MMStar, the shapes test split), an MMVP or V* folder, or a Visual-CoT JSONL."
        ),
    ],  # fmt: skip
    teacher: Annotated[str | None, typer.Option(help="The NAME whose map the others' KL is taken to.")] = None,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/lavit-analysis"),
    limit: Annotated[int, typer.Option(min=1, help="Only the first N samples.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer budget of each model.")] = 64,
    overlays: Annotated[int, typer.Option(min=0, help="Side-by-side PNG overlays of the first N samples.")] = 8,
    images: Annotated[Path | None, typer.Option(help="Image root of a Visual-CoT JSONL.")] = None,
) -> None:
    """Table 2 / Figure 5: each model's attention over the image while it answers (entropy, salient regions,
    coefficient of variation, KL to the teacher), side-by-side overlays, and for LaViT students the latent
    diagnostics (zeroed, shuffled, masked latents; change rates; mean pairwise cosine)."""
    from latent_core.cli import UserError
    from latent_core.readers import read_questions

    from lavit.analysis import analyze_models

    models = {}
    for spec in model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--model {spec!r}: expected NAME=PATH")
        models[name] = path
    summary = analyze_models(
        models, read_questions(data, limit, images), out, teacher, batch_size, max_new_tokens, overlays
    )
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    app(prog_name="lavit")


if __name__ == "__main__":
    main()
