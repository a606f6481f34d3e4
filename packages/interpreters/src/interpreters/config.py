"""The interpreters' configuration: training arguments with the paper's defaults (METHODS.md §1 "Interpreters").

Every default cites its source: paper 000, section 3.3 and Table A3 (LoRA r=16 / alpha=32, lr 5e-4, batch 8,
cosine schedule, 100 warm-up steps), as summarised in METHODS.md §1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from latent_core.thinking import THINKING_STAGES
from latent_core.trainer import LatentTrainingArguments

__all__ = [
    "CONDITIONS",
    "DEFAULT_PLACEHOLDER",
    "DEFAULT_TEMPLATE",
    "PROJECTORS",
    "STAGES",
    "SUPPORTED_FAMILIES",
    "UNIFIED",
    "InterpreterConfig",
    "choose_placeholder",
    "placeholder_for",
]

STAGES: tuple[str, ...] = THINKING_STAGES
"""Heima's CoT stages, one interpreter each (METHODS.md §1; defined once in :mod:`latent_core.thinking`)."""

SUPPORTED_FAMILIES: tuple[str, ...] = ("causal_lm",)
"""Interpreters are text-only LLMs (paper 000 section 3.3: Llama-3.1-8B-Instruct); a VLM is refused with a message."""

UNIFIED = "unified"
"""Output directory name of the one interpreter for all stages (Table A9 ablation)."""

DEFAULT_PLACEHOLDER = "<THOUGHT>"
"""The token added as placeholder when the interpreter's tokenizer has no reserved token (:func:`placeholder_for`)."""

_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>|<unused(\d+)>|\[unused(\d+)\]")
# Names of special tokens that have a job (turn, padding, modality and tool markers): never taken as unused.
_IN_USE = re.compile(
    r"begin|end|eos|bos|eot|pad|unk|mask|sep|cls|start|stop|im_|image|video|vision|audio|box|quad|ref|tool|fim", re.I
)


def choose_placeholder(tokenizer: Any, placeholder: str | None = None) -> tuple[str, str]:
    """The placeholder token and why it was chosen, in this order:

    1. ``placeholder`` when given (``"given"``);
    2. the tokenizer's first reserved token by number: ``<|reserved_special_token_N|>`` (Llama-3.x), ``<unusedN>``,
       ``[unusedN]`` (``"reserved"``), in the vocabulary already, as the paper reuses Llama-3's reserved tokens;
    3. an unused special token (``"unused special token"``): a special added token that is no ``bos`` / ``eos`` /
       ``pad`` / ... nor an extra special token of the tokenizer, does not occur in its chat template, and whose name
       names no job (turns, padding, images, tools: ``<repo_name>`` on SmolLM2 and StarCoder-style vocabularies);
    4. else :data:`DEFAULT_PLACEHOLDER` added as a new token (``"added"``): its embedding and ``lm_head`` rows are
       trained and saved as rows (PEFT ``trainable_token_indices`` / ``TrainableRows``), never as whole tables.

    The placeholder's input embedding is always replaced by the hidden state, so any of these works; 1-3 keep the
    vocabulary as it is.
    """
    if placeholder:
        return placeholder, "given"
    vocab = tokenizer.get_vocab()
    reserved = sorted(
        (int(next(g for g in m.groups() if g is not None)), token)
        for token in vocab
        if (m := _RESERVED.fullmatch(token))
    )
    if reserved:
        return reserved[0][1], "reserved"
    named = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    named |= {str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []}
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(map(str, dict(template).values()))
    for _, added in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items()):
        token = str(added.content)
        if getattr(added, "special", False) and token not in named and token not in template:
            if not _IN_USE.search(token):
                return token, "unused special token"
    return DEFAULT_PLACEHOLDER, "added"


def placeholder_for(tokenizer: Any, placeholder: str | None = None) -> str:
    """The placeholder token :func:`choose_placeholder` picks."""
    return choose_placeholder(tokenizer, placeholder)[0]


DEFAULT_TEMPLATE = "According to question: {question}, can you explain the thinking progress {placeholder}?"
"""The explanatory prompt of paper 000 section 3.3 (METHODS.md §1); ``{question}`` and ``{placeholder}`` are filled."""

PROJECTORS: tuple[str, ...] = ("auto", "identity", "linear", "mlp")
"""Projector kinds: ``auto`` = identity when the hidden sizes match, else ``linear``."""

CONDITIONS: tuple[str, ...] = ("real", "zero", "shuffled")
"""What the interpreter is fed: the real hidden state, a zero vector, or another sample's state (the control)."""


@dataclass
class InterpreterConfig(LatentTrainingArguments):
    """Training arguments of an interpreter (METHODS.md §1 "Interpreters", paper 000 Table A3 defaults).

    ``output_dir`` defaults to ``run_dir``; :func:`interpreters.trainer.train_interpreter` points it at
    ``run_dir/<stage>`` (or ``run_dir/unified``). ``bf16`` defaults to ``None`` = on when CUDA supports it.
    """

    # ------------------------------------------------------------------------------ the interpreters' own fields
    model: str = field(
        default="llama-3.1-8b-instruct",
        metadata={"help": "Interpreter LLM: a latent_core.hub alias or a local path (any causal LM)."},
    )
    run_dir: str = field(default="runs/interpreters", metadata={"help": "Directory of the trained interpreters."})
    template: str = field(
        default=DEFAULT_TEMPLATE,
        metadata={"help": "Explanatory prompt with {question} and {placeholder} (paper 000 section 3.3)."},
    )
    placeholder: str | None = field(
        default=None,
        metadata={
            "help": "Token whose embedding is replaced by the hidden state. Default: the tokenizer's first reserved "
            "token (<|reserved_special_token_0|> on Llama-3.x), else an unused special token of the tokenizer, else a "
            "new <THOUGHT> token whose rows are saved as rows (a few KB), never as the whole vocabulary table."
        },
    )
    projector: str = field(
        default="auto",
        metadata={"help": "Projector d_heima -> d_lm: auto (identity when equal, else linear), identity, linear, mlp."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (Table A3 / METHODS.md §1: 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (Table A3 / METHODS.md §1: 32)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_include_lm_head: bool = field(
        default=True,
        metadata={
            "help": "Also adapt lm_head where it is untied from the input embedding (Llama-3.1-8B), as Heima does: "
            "paper 000 trains the interpreters with 'the same LoRA setting' (METHODS.md §1)."
        },
    )
    max_samples: int | None = field(default=None, metadata={"help": "Train on at most this many captured states."})

    # ------------------------------------------------------------------ TrainingArguments with paper defaults
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the Trainer writes; defaults to run_dir (set per stage)."}
    )
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate (Table A3 / METHODS.md §1: 5e-4)."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Per-device batch size (Table A3 / METHODS.md §1: 8)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (Table A3: 0.01)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule (Table A3 / METHODS.md §1)."})
    warmup_steps: float = field(default=100, metadata={"help": "Warm-up steps (Table A3 / METHODS.md §1: 100)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None = on iff CUDA supports it."})
    activation_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "Activation (gradient) checkpointing, as for Heima (Table A1/A3 'same setting')."},
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"use_reentrant": False},
        metadata={"help": "Non-reentrant checkpointing: works when the inputs are frozen (PEFT)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the rows' fields: the collator needs question/target/hidden."}
    )
    report_to: None | str | list[str] = field(default="none", metadata={"help": "No tracker by default."})
    save_strategy: str = field(default="no", metadata={"help": "Only the final save by default."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N steps."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(self.run_dir)
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        for name in ("{question}", "{placeholder}"):
            if name not in self.template:
                raise ValueError(f"template must contain {name}; got {self.template!r}")
        super().__post_init__()
