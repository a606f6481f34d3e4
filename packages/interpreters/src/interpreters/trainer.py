"""Train interpreters: one per stage, or one unified interpreter for all stages (Table A9 ablation).

Training tuple (METHODS.md §1): (explanatory prompt, question, placeholder, hidden state H_k, target CoT_k); the loss
is the next-token loss on the target only. :class:`latent_core.LatentTrainer` saves the LoRA adapter, the projector
(``extra_modules.safetensors``, keys ``projector.*``) and ``latent_stage.json`` with an ``interpreter`` entry
(placeholder, hidden size, projector kind, template) that :func:`interpreters.model.load_interpreter` reads.

Layout: ``run_dir/<stage>`` (``summary``, ``caption``, ``reasoning``) or ``run_dir/unified``, each with
``interpreters_train.json`` (a machine-readable summary).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from latent_core.families import model_parts
from latent_core.trainer import LatentTrainer, load_base
from torch import nn

from interpreters.config import STAGES, SUPPORTED_FAMILIES, UNIFIED, InterpreterConfig, choose_placeholder
from interpreters.data import InterpreterCollator, load_captures
from interpreters.model import InterpreterModel, build_interpreter

__all__ = ["TRAIN_SUMMARY_NAME", "prepare_interpreter", "train_interpreter"]

logger = logging.getLogger(__name__)

TRAIN_SUMMARY_NAME = "interpreters_train.json"

ModelFactory = Callable[[], tuple[nn.Module, Any]]


def _stages(stage: str) -> list[str]:
    if stage == "all":
        return list(STAGES)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)} or 'all', got {stage!r}")
    return [stage]


def _load_base(config: InterpreterConfig, model: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    base, processor = load_base(
        config.model, model, tokenizer, bf16=bool(config.bf16), families=SUPPORTED_FAMILIES, method="interpreters"
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:  # Llama-3.1 has none; padding is masked out of the loss anyway
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def prepare_interpreter(
    config: InterpreterConfig, base: nn.Module, tokenizer: Any, hidden_size: int
) -> tuple[InterpreterModel, str]:
    """The model an interpreter trains from a loaded ``base``: the placeholder :func:`choose_placeholder` picks (added
    when new), LoRA r / alpha / dropout of ``config`` (Table A3: 16 / 32 / 0) with ``lm_head`` when it is untied, and
    the projector ``hidden_size`` -> the LM's width. Returns ``(interpreter, why the placeholder was chosen)``.
    ``apps/cli plan`` runs this too."""
    placeholder, origin = choose_placeholder(tokenizer, config.placeholder)
    if placeholder not in tokenizer.get_vocab():
        origin += ": new vocabulary, its embedding and lm_head rows are saved as rows"
    logger.info("placeholder %s (%s)", placeholder, origin)
    interpreter = build_interpreter(
        base,
        tokenizer,
        hidden_size,
        placeholder=placeholder,
        template=config.template,
        projector=config.projector,
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        include_lm_head=config.lora_include_lm_head and not model_parts(base).lm_head_tied,
    )
    return interpreter, origin


def _train_one(
    config: InterpreterConfig, capture_dir: Path, stages: list[str], name: str, model: Any, tokenizer: Any
) -> Path:
    rows = load_captures(capture_dir, stages)
    if config.max_samples is not None:
        rows = rows[: config.max_samples]
    if not rows:
        raise ValueError(f"{capture_dir} has no captured states of stage(s) {stages}: nothing to train on")
    untargeted = sum(r.get("target") is None for r in rows)
    if untargeted:
        raise ValueError(
            f"{untargeted} of the {len(rows)} states in {capture_dir} have no target text (states recorded by "
            "`heima generate --capture` can be decoded, not trained on): train on `interpreters capture` output"
        )
    out = Path(config.run_dir) / name
    transformers.set_seed(config.seed)
    base, tokenizer = _load_base(config, model, tokenizer)
    hidden_size = int(rows[0]["hidden"].shape[-1])
    interpreter, origin = prepare_interpreter(config, base, tokenizer, hidden_size)
    placeholder = interpreter.placeholder
    info = {
        "method": "interpreters",
        "tokens": [placeholder],
        "stages": stages,
        "base": str(config.model),
        "capture": str(capture_dir),
        "interpreter": {**interpreter.info(), "placeholder_origin": origin},
    }
    args = dataclasses.replace(config, output_dir=str(out), remove_unused_columns=False)
    trainer = LatentTrainer(
        model=interpreter,
        args=args,
        train_dataset=rows,
        data_collator=InterpreterCollator(tokenizer, config.template, placeholder),
        processing_class=tokenizer,
        stage_info=info,
    )
    trainer.train_and_save(out, TRAIN_SUMMARY_NAME, samples=len(rows))
    logger.info("interpreter for %s saved to %s", stages, out)
    return out


def train_interpreter(
    config: InterpreterConfig,
    capture_dir: str | Path,
    stage: str = "summary",
    unified: bool = False,
    model: nn.Module | ModelFactory | None = None,
    tokenizer: Any = None,
) -> Path:
    """Train the interpreter(s) of ``stage`` on the states captured in ``capture_dir``.

    Args:
        config: :class:`~interpreters.config.InterpreterConfig` (``model``, ``run_dir``, Table A3 defaults).
        capture_dir: the output of :func:`interpreters.capture.capture`.
        stage: ``summary``, ``caption``, ``reasoning`` or ``all``. ``all`` without ``unified`` trains one
            interpreter per stage.
        unified: one interpreter for the stage(s) (Table A9), written to ``run_dir/unified``.
        model: the base LM to use instead of ``load_model(config.model)`` (fresh, not PEFT-wrapped), or a
            zero-argument factory returning ``(model, tokenizer)`` (needed when several interpreters are trained).
        tokenizer: the tokenizer for a given ``model`` (default: ``load_processor(config.model)``).

    Returns:
        The interpreter's directory (``run_dir/<stage>`` or ``run_dir/unified``); ``run_dir`` when one interpreter
        per stage was trained for ``stage="all"``.
    """
    stages = _stages(stage)
    capture_dir = Path(capture_dir)
    if unified or len(stages) == 1:
        return _train_one(config, capture_dir, stages, UNIFIED if unified else stages[0], model, tokenizer)
    if isinstance(model, nn.Module):
        raise ValueError("training one interpreter per stage needs a fresh model each: pass a factory, not a model")
    for name in stages:
        _train_one(config, capture_dir, [name], name, model, tokenizer)
    return Path(config.run_dir)
