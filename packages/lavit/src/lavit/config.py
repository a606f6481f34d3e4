"""LaViT's student configuration: Table A1 defaults (METHODS.md section 2), and the ``authors`` preset.

:class:`LavitConfig` is ``LatentTrainingArguments`` (HF ``TrainingArguments``) plus LaViT's fields. Every default
cites its source:

- Table A1: lr 5e-6, linear decay, warm-up ratio 0.03 (transformers 5 has no ``warmup_ratio``: a ``warmup_steps``
  below 1 is the ratio, ``ceil(0.03 * max_steps)`` = 30 steps of 1000), AdamW (0.9, 0.999), weight decay 0, 1000
  steps (400 with the gate warming, then 600 open), batch 16, vision tower frozen, LLM trained; max_pixels
  1,003,520, min_pixels 200,704.
- Appendix C.3: the system prompt :data:`SYSTEM_PROMPT`.
- Eq. 5: the gate schedule ``cosine`` with ``T_w = 400`` and ``eps = 1e-6``; ablations ``hard`` and ``open``.
- Eq. 9: ``lambda = 0.3`` on L_concept + L_traj (``concept_weight`` / ``traj_weight``, 0 switches one off).
- K = 4 latent tokens ``<v-trace_1>..<v-trace_K>``, ``continuous`` (the paper's wording) or ``discrete`` (the
  released code).

The ``authors`` preset is what the released scripts run instead (ANCHORS.md): weight decay 0.1, max_pixels
4,194,304, discrete latents.

The system prompt and the pixel bounds are :class:`lavit.inputs.InputSettings` (:attr:`LavitConfig.inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latent_core.trainer import LatentTrainingArguments

from lavit.inputs import MAX_PIXELS, MIN_PIXELS, SYSTEM_PROMPT, InputSettings

__all__ = ["PRESETS", "LavitConfig", "latent_tokens"]

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "authors": {"weight_decay": 0.1, "max_pixels": 4_194_304, "latent_mode": "discrete"},
}


def latent_tokens(k: int) -> list[str]:
    """The K latent tokens ``<v-trace_1>..<v-trace_K>`` (METHODS.md section 2)."""
    if k < 1:
        raise ValueError(f"LaViT needs at least one latent token, got K={k}")
    return [f"<v-trace_{i}>" for i in range(1, k + 1)]


@dataclass
class LavitConfig(LatentTrainingArguments):
    """Training arguments of the LaViT student, paper defaults (see the module docstring)."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Table A1: 5e-6."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Table A1: linear decay."})
    warmup_steps: float = field(
        default=0.03,
        metadata={"help": "Table A1: warm-up ratio 0.03 (transformers 5: a value below 1 is a ratio of max_steps)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "Table A1: 0 (the released code: 0.1)."})
    max_steps: int = field(default=1000, metadata={"help": "Table A1: 1000 steps (400 gated + 600 open)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Table A1: batch 16."})
    num_latents: int = field(default=4, metadata={"help": "K latent tokens <v-trace_1>..<v-trace_K> (paper: 4)."})
    latent_mode: str = field(
        default="continuous",
        metadata={"help": "continuous (the paper: each latent is the previous step's hidden state) or discrete "
                  "(the released code: K trainable tokens in one pass)."},
    )  # fmt: skip
    gate: str = field(default="cosine", metadata={"help": "Eq. 5 schedule: cosine, hard (no curriculum) or open."})
    gate_warmup: int = field(default=400, metadata={"help": "Eq. 5: T_w = 400 steps."})
    gate_eps: float = field(default=1e-6, metadata={"help": "Eq. 5: eps = 1e-6."})
    concept_weight: float = field(default=0.3, metadata={"help": "Eq. 9: lambda = 0.3 on L_concept (0: off)."})
    traj_weight: float = field(default=0.3, metadata={"help": "Eq. 9: lambda = 0.3 on L_traj (0: off)."})
    min_pixels: int | None = field(
        default=MIN_PIXELS, metadata={"help": "Table A1: min_pixels 200,704 (None: the processor's own)."}
    )
    max_pixels: int | None = field(
        default=MAX_PIXELS, metadata={"help": "Table A1: max_pixels 1,003,520 (None: the processor's own)."}
    )
    system_prompt: str | None = field(
        default=SYSTEM_PROMPT, metadata={"help": "Appendix C.3's system prompt (None or '': the template's default)."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "0: full fine-tuning of the LLM (Table A1); r > 0: LoRA of rank r instead."}
    )
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2r)."})

    def __post_init__(self) -> None:
        if self.latent_mode not in ("continuous", "discrete"):
            raise ValueError(f"latent_mode must be 'continuous' or 'discrete', got {self.latent_mode!r}")
        if self.gate not in ("cosine", "hard", "open"):
            raise ValueError(f"gate must be 'cosine', 'hard' or 'open', got {self.gate!r}")
        latent_tokens(self.num_latents)
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive pixel count (or None: the processor's own)")
        super().__post_init__()

    @property
    def inputs(self) -> InputSettings:
        """The system prompt and pixel bounds as :class:`InputSettings`."""
        return InputSettings(self.system_prompt, self.min_pixels, self.max_pixels)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LavitConfig:
        """The ``paper`` defaults or the ``authors`` preset, with ``overrides`` on top."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
