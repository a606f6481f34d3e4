"""Training the LaViT student (METHODS.md section 2): ``uv run lavit train --data <build-lavit-15k output>``.

The student base (default ``qwen2.5-vl-3b``) gets the K latent tokens; its vision tower is frozen and every other
weight trains (Table A1: full fine-tuning of the LLM; a full-weight stage of :class:`latent_core.LatentTrainer`,
saved as the trainable weights plus phi; ``lora_r > 0``: LoRA adapters on the language model and the latent
tokens' rows instead, an adapter stage); the gate gamma(t) of Eq. 5 is set before every optimizer step. The run
writes ``lavit_train.json`` (steps, every loss by name per logged step, gamma per step) and ``lavit_train.png`` (the
curves) next to the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latent_core.attention import gate_schedule

from lavit.config import LavitConfig, latent_tokens
from lavit.inputs import InputSettings

__all__ = ["SUPPORTED_FAMILIES", "plot_curves", "prepare_student", "train_student"]

SUPPORTED_FAMILIES: tuple[str, ...] = ("qwen2_5_vl",)
"""The student families: image tokens in the sequence with M-RoPE (the paper's Qwen2.5-VL)."""


def train_student(
    config: LavitConfig,
    data: str | Path,
    model_name: str = "qwen2.5-vl-3b",
    out: str | Path | None = None,
    *,
    model: Any = None,
    processor: Any = None,
    naive: bool = False,
) -> dict[str, Any]:
    """Train the student on a build's kept samples; returns the summary. ``model`` / ``processor`` (or a factory)
    replace loading ``model_name`` (tests pass tiny models).

    ``naive``: the paper's control, naive SFT on the same samples (image, question -> answer, text supervision
    only: no latent tokens, no teacher signals, no gate), same optimisation; saved in ``<out>/naive``."""
    from latent_core.trainer import LatentTrainer, load_base

    from lavit.build import check_student_inputs
    from lavit.data import LavitCollator, teacher_rows

    rows = teacher_rows(data)
    if not rows:
        raise ValueError(f"{data} holds no kept samples: nothing to train on")
    base, processor = load_base(
        model_name, model, processor, bf16=config.bf16, families=SUPPORTED_FAMILIES, method="lavit train"
    )
    # Table A1's pixel bounds and Appendix C.3's system prompt, as the teacher data was built (else refused)
    inputs = config.inputs.apply(processor)
    check_student_inputs(data, inputs)
    student = prepare_student(config, base, processor, int(rows[0]["vsem_mean"].shape[-1]), naive=naive)
    if naive:
        return _train_naive(config, student, processor, rows, Path(out or config.output_dir) / "naive", inputs)

    def gate(step: int) -> None:
        student.gamma = gate_schedule(step, config.gate_warmup, config.gate_eps, config.gate)

    # gamma per optimizer step, from the schedule itself (a resumed run reports every step, not only its own)
    gammas = [gate_schedule(t, config.gate_warmup, config.gate_eps, config.gate) for t in range(config.max_steps)]

    trainer = LatentTrainer(
        model=student,
        args=config,
        train_dataset=rows,
        data_collator=LavitCollator(processor, system=inputs.system_prompt),
        processing_class=processor,
        step_schedules=[gate],
        stage_info={
            "method": "lavit",
            "tokens": latent_tokens(config.num_latents),
            "mode": config.latent_mode,
            "inputs": inputs.as_dict(),
        },  # fmt: skip
    )
    out = Path(out or config.output_dir) / "student"
    return _train_and_summarise(trainer, out, gamma=gammas, samples=len(rows))


def prepare_student(config: LavitConfig, base: Any, processor: Any, teacher_hidden: int, naive: bool = False) -> Any:
    """The model LaViT trains from a loaded ``base``: vision tower frozen (Table A1), the K latent tokens added,
    LoRA when ``config.lora_r``, wrapped as :class:`lavit.model.LavitStudent` (phi maps to ``teacher_hidden``).
    ``naive``: the control's model, the base itself (no latent tokens, no phi). ``apps/cli plan`` runs this too."""
    from latent_core.families import model_parts
    from latent_core.tokens import add_special_tokens

    from lavit.model import LavitStudent

    vision = model_parts(base).vision_tower
    if vision is not None:
        vision.requires_grad_(False)  # Table A1: vision tower frozen, LLM trained
    if naive:
        return _lora(config, base, []) if config.lora_r else base
    ids = add_special_tokens(base, processor, latent_tokens(config.num_latents))
    if config.lora_r:  # the LoRA option: adapters on the language model, the latent tokens' rows trainable
        base = _lora(config, base, ids)
    return LavitStudent(base, ids, teacher_hidden=teacher_hidden, mode=config.latent_mode)


def _lora(config: LavitConfig, base: Any, ids: list[int]) -> Any:
    from latent_core.lora import prepare_lora_model

    return prepare_lora_model(base, new_token_ids=ids, r=config.lora_r, alpha=config.lora_alpha or 2 * config.lora_r)


def _train_naive(
    config: LavitConfig, base: Any, processor: Any, rows: list[dict[str, Any]], out: Path, inputs: InputSettings
) -> dict:
    from latent_core.collate import SupervisedCollator
    from latent_core.prompts import question_text
    from latent_core.trainer import LatentTrainer

    samples = [
        {"id": row["id"], "prompt": question_text(row["question"]), "answer": row["answer"], "image": str(row["image"])}
        for row in rows
    ]
    trainer = LatentTrainer(
        model=base,
        args=config,
        train_dataset=samples,
        data_collator=SupervisedCollator(processor, system=inputs.system_prompt),
        processing_class=processor,
        stage_info={"method": "lavit", "mode": "naive", "tokens": [], "inputs": inputs.as_dict()},
    )
    return _train_and_summarise(trainer, out, samples=len(rows))


def _train_and_summarise(trainer: Any, out: Path, **facts: Any) -> dict[str, Any]:
    """Train and save the stage; ``lavit_train.json`` gets the trainer's summary plus every logged loss curve."""
    summary = trainer.train_and_save(out, "lavit_train.json", **facts)
    history = trainer.state.log_history
    names = ("loss", "ntp_loss", "concept_loss", "traj_loss")
    summary["loss_curves"] = {name: [h[name] for h in history if name in h] for name in names}
    if trainer.args.should_save:
        (out / "lavit_train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        plot_curves(summary, out / "lavit_train.png")
    return summary


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """``lavit_train.png``: every logged loss curve by name (log scale) and, for a student, gamma per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: values for name, values in summary.get("loss_curves", {}).items() if values}
    gamma = summary.get("gamma") or []
    fig, axes = plt.subplots(1, 2 if gamma else 1, figsize=(10 if gamma else 5, 3.2), squeeze=False)
    for name, values in curves.items():
        axes[0][0].plot(range(1, len(values) + 1), values, label=name)
    axes[0][0].set_yscale("log")
    axes[0][0].set_xlabel("logged step")
    axes[0][0].set_title("losses")
    axes[0][0].legend(fontsize=7)
    if gamma:
        axes[0][1].plot(range(len(gamma)), gamma)
        axes[0][1].set_xlabel("step")
        axes[0][1].set_title("gate gamma(t) (Eq. 5)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
