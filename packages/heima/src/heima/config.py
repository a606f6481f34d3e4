"""Heima's configuration: the thinking tokens and the training arguments with the paper's defaults.

Every default cites where it comes from: the Heima paper's Table A1 (LoRA and optimisation hyper-parameters) and
Table A2 (per-stage learning rate and batch size), as summarised in METHODS.md section 1.

- :data:`STAGES` and :func:`thinking_token`: one new special token per CoT stage (METHODS.md §1 "Thinking tokens").
- :class:`HeimaConfig`: ``LatentTrainingArguments`` (HF ``TrainingArguments``) plus Heima's fields; the progressive
  stages use ``learning_rate``/``per_device_train_batch_size``, the recovering stage ``recover_learning_rate``/
  ``recover_batch_size``; :meth:`HeimaConfig.for_stage` returns the arguments of one stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latent_core.families import VISION_FAMILIES
from latent_core.thinking import THINKING_STAGES, thinking_token, thinking_tokens
from latent_core.trainer import LatentTrainingArguments

__all__ = ["RECOVER", "STAGES", "SUPPORTED_FAMILIES", "HeimaConfig", "stage_name", "thinking_token", "thinking_tokens"]

STAGES: tuple[str, ...] = THINKING_STAGES
"""The CoT stages that Heima replaces by thinking tokens, in answer order (METHODS.md §1); the conclusion stays.
Defined once in :data:`latent_core.thinking.THINKING_STAGES`, like the token names (:func:`thinking_token`)."""

SUPPORTED_FAMILIES: tuple[str, ...] = VISION_FAMILIES
"""The model families Heima trains and generates with: every family that takes images (the paper: mllama, as
LLaVA-CoT). A text-only model is refused with a message naming its family (:func:`latent_core.require_family`)."""

RECOVER = "recover"
"""Name of the recovering stage (METHODS.md §1 "Progressive distillation", paper Eq. 3)."""


def stage_name(stage: int | str) -> str:
    """Output directory name of a stage: ``stage-0``, ``stage-1``, .. or ``recover``."""
    if str(stage) == RECOVER:
        return RECOVER
    try:
        s = int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"stage must be an integer >= 0 or {RECOVER!r}, got {stage!r}") from None
    if s < 0:
        raise ValueError(f"stage must be an integer >= 0 or {RECOVER!r}, got {stage!r}")
    return f"stage-{s}"


@dataclass
class HeimaConfig(LatentTrainingArguments):
    """Training arguments for Heima's progressive distillation (METHODS.md §1), paper defaults.

    ``learning_rate`` and ``per_device_train_batch_size`` are those of the progressive stages (Table A2);
    the recovering stage uses ``recover_learning_rate`` and ``recover_batch_size`` (:meth:`for_stage`).
    ``output_dir`` defaults to ``run_dir``; :meth:`for_stage` points it at ``run_dir/stage-{s}`` or
    ``run_dir/recover``. ``bf16`` defaults to ``None`` = on when CUDA supports it, off otherwise (CPU tests).
    """

    # ----------------------------------------------------------------------------------- Heima's own fields
    model: str = field(
        default="llava-cot-11b",
        metadata={"help": "Base model: a latent_core.hub alias or a local path (paper: LLaVA-CoT, Llama-3.2-11B-V)."},
    )
    run_dir: str = field(
        default="runs/heima",
        metadata={"help": "Directory holding every stage's output: stage-0, stage-1, .., recover."},
    )
    prepared: str | None = field(
        default=None,
        metadata={"help": "Directory written by `heima.data.prepare` (datasets save_to_disk + heima_prepare.json)."},
    )
    stage: str | None = field(
        default=None,
        metadata={"help": "Stage to train: 0..K (progressive, METHODS.md §1), 'recover', or None for all in order."},
    )
    one_shot: bool = field(
        default=False,
        metadata={"help": "Ablation 'w/o progressive' (METHODS.md §1): train stage K directly from the base model."},
    )
    recover_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Learning rate of the recovering stage (Table A2 / METHODS.md §1: 1e-5)."},
    )
    recover_batch_size: int = field(
        default=8,
        metadata={"help": "Per-device batch size of the recovering stage (Table A2 / METHODS.md §1: 8)."},
    )
    tokens_per_stage: int = field(
        default=1,
        metadata={"help": "Thinking tokens per stage (ablation: 1, 2, 4, .. 32 numbered tokens; default 1, §1)."},
    )
    retention_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Ablation: n_k = max(1, floor(ratio * len(tokens(CoT_k)))) tokens per stage (METHODS.md §1); "
            "overrides tokens_per_stage."
        },
    )
    drop_tags: bool = field(
        default=False,
        metadata={"help": "Drop the stage tags around the thinking tokens (default keeps them, as the authors did)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (Table A1 / METHODS.md §1: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (Table A1 / METHODS.md §1: 32)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (Table A1 / METHODS.md §1: 0)."})
    train_projector: bool = field(
        default=False,
        metadata={
            "help": "A choice: also train the vision-to-text multi_modal_projector in full (mllama, llava, "
            "llava_next; saved with the adapter). Off by default: METHODS.md §1 / Table A1 adapt the cross-attention "
            "(fusion) layers with LoRA and name no projector; the vision tower is always frozen."
        },
    )
    lora_include_lm_head: bool = field(
        default=True,
        metadata={"help": "Also adapt the output projection lm_head (Table A1 / METHODS.md §1: yes)."},
    )
    rows_route: str = field(
        default="auto",
        metadata={
            "help": "How the thinking-token rows train: 'peft' (PEFT's trainable_token_indices, METHODS.md §1), "
            "'rows' (latent_core's TrainableRows) or 'auto' ('rows' under ZeRO-3 without CUDA, where PEFT's route "
            "cannot start). A stage continues a stage trained under either route."
        },
    )

    # ------------------------------------------------------------------ TrainingArguments with paper defaults
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the Trainer writes; defaults to run_dir (for_stage sets it)."}
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the progressive stages (Table A2 / METHODS.md §1: 1e-4)."}
    )
    per_device_train_batch_size: int = field(
        default=6, metadata={"help": "Per-device batch of the progressive stages (Table A2 / METHODS.md §1: 6)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (Table A1 / METHODS.md §1)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule (Table A1 / METHODS.md §1)."})
    warmup_steps: float = field(default=100, metadata={"help": "Warm-up steps (Table A1 / METHODS.md §1: 100)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (Table A1 / METHODS.md §1)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs per stage (Table A1 / METHODS.md §1)."})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (Table A1 / METHODS.md §1); None = on iff CUDA supports bf16."},
    )
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={
            "help": "Activation (gradient) checkpointing (Table A1 / METHODS.md §1: on). transformers 5 name of "
            "`gradient_checkpointing`, which mirrors it."
        },
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Non-reentrant checkpointing: works when the inputs are frozen (PEFT)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the rows' columns: the collator needs prompt/answer/image."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "No tracker by default."})
    save_strategy: str = field(
        default="steps",
        metadata={"help": "Intermediate checkpoints for resuming (the stage's final save is separate)."},
    )
    save_steps: float = field(default=500, metadata={"help": "Steps between intermediate checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep only the latest intermediate checkpoints."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss terms every N steps."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(self.run_dir)
        if self.tokens_per_stage < 1:
            raise ValueError(f"tokens_per_stage must be >= 1, got {self.tokens_per_stage}")
        if self.retention_ratio is not None and not 0 < self.retention_ratio <= 1:
            raise ValueError(f"retention_ratio must be in (0, 1], got {self.retention_ratio}")
        if self.stage is not None:
            self.stage = str(self.stage)
            stage_name(self.stage)  # validates
        super().__post_init__()

    # ---------------------------------------------------------------------------------------- per stage
    def stage_dir(self, stage: int | str) -> Path:
        """Output directory of ``stage`` (int >= 0 or ``"recover"``): ``run_dir/stage-{s}`` or ``run_dir/recover``."""
        return Path(self.run_dir) / stage_name(stage)

    def hyperparameters(self, stage: int | str) -> dict[str, Any]:
        """``{"learning_rate", "per_device_train_batch_size"}`` for ``stage``: the progressive values for an integer
        stage, the recovering ones for ``"recover"`` (Table A2 / METHODS.md §1: 1e-4 / 6 vs 1e-5 / 8)."""
        if stage_name(stage) == RECOVER:
            return {"learning_rate": self.recover_learning_rate, "per_device_train_batch_size": self.recover_batch_size}
        return {"learning_rate": self.learning_rate, "per_device_train_batch_size": self.per_device_train_batch_size}

    def for_stage(self, stage: int | str) -> HeimaConfig:
        """A copy of these arguments for one stage: its learning rate and batch size (:meth:`hyperparameters`),
        ``output_dir`` = :meth:`stage_dir`, ``stage`` set. Call it on the run's config, not on another stage's copy
        (a recover copy's ``learning_rate`` is already the recover one)."""
        values = self.hyperparameters(stage)
        return dataclasses.replace(
            self,
            output_dir=str(self.stage_dir(stage)),
            stage=str(stage),
            **values,
        )
