"""Heima's training stages: progressive distillation (Eq. 5), the recovering stage (Eq. 3) and the one-shot ablation.

One function, :func:`train_stage`, trains one stage with :class:`latent_core.trainer.LatentTrainer` (next-token loss on
the answer only, :class:`latent_core.collate.SupervisedCollator`). With K CoT stages (``heima_prepare.json``'s
``num_stages``, 3 by default) the prepared record of a sample has ``answers[0..K]``; ``answers[s]`` has the first ``s``
CoT stages replaced by their thinking tokens (METHODS.md §1).

===================  ==================  ====================================  ====================================
stage                trains on           starts from                           writes
===================  ==================  ====================================  ====================================
``0``                ``answers[0]``      base model + thinking tokens + fresh  ``run_dir/stage-0`` (plain CoT SFT)
                                         LoRA
``s`` in ``1..K``    ``answers[s]``      ``run_dir/stage-{s-1}``               ``run_dir/stage-{s}``
``"recover"``        ``answers[K]``      ``run_dir/stage-K``                   ``run_dir/recover``
one-shot, ``K``      ``answers[K]``      base model + fresh LoRA               ``run_dir/one-shot``
one-shot, recover    ``answers[K]``      ``run_dir/one-shot``                  ``run_dir/one-shot-recover``
===================  ==================  ====================================  ====================================

"Starts from" a stage directory means: the base model is loaded fresh (``load_model(config.model)``), the thinking
tokens are added (same tokens, same order, so the same ids), the previous stage's adapter is loaded as trainable
(``latent_core.trainer.load_stage``: the *same* LoRA adapter and token rows keep training, METHODS.md §1), and any
extra trainable modules it saved are loaded (``load_extra_modules``). The thinking-token rows continue under this
run's route (``HeimaConfig.rows_route``) whichever route trained them, so stages chain whatever launched them: one
process (PEFT's ``trainable_token_indices``) after N processes under ZeRO-3 without CUDA (``TrainableRows``) and back.
The recovering stage uses ``recover_learning_rate`` / ``recover_batch_size`` (Table A2: 1e-5 / 8), the others
``learning_rate`` / ``per_device_train_batch_size`` (1e-4 / 6). All thinking tokens are added from stage 0 on, so every
stage has the same vocabulary (stage 0 simply never sees them in its targets).

Each stage directory holds the adapter, ``extra_modules.safetensors`` (when any), the processor with the thinking
tokens, ``latent_stage.json`` (``{"method": "heima", "stage": s, "tokens": [...], "starts_from": ..., ...}``) and
``heima_train.json`` (a machine-readable summary: steps, losses, samples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from datasets import Dataset
from latent_core.collate import SupervisedCollator
from latent_core.trainer import LatentTrainer, StageError, load_base, load_extra_modules, load_stage, stage_info
from torch import nn

from heima.config import RECOVER, SUPPORTED_FAMILIES, HeimaConfig
from heima.data import load_prepared, samples_for_stage
from heima.model import PROJECTOR, add_thinking_tokens, prepare_model

__all__ = ["ONE_SHOT", "ONE_SHOT_RECOVER", "SUMMARY_NAME", "stage_output_dir", "train_stage"]

logger = logging.getLogger(__name__)

ONE_SHOT = "one-shot"
"""Output directory name (under ``run_dir``) of the 'w/o progressive' ablation: stage K from the base model."""
ONE_SHOT_RECOVER = "one-shot-recover"
"""Output directory name of the recovering stage that follows the one-shot run."""
SUMMARY_NAME = "heima_train.json"
"""The per-stage training summary written next to the adapter."""

ModelFactory = Callable[[], tuple[nn.Module, Any]]


def _num_stages(meta: dict[str, Any]) -> int:
    return int(meta.get("num_stages", 3))


def _parse_stage(stage: int | str | None, config: HeimaConfig) -> int | str:
    if stage is None:
        stage = config.stage
    if stage is None:
        raise ValueError("no stage given: pass stage=0..K or 'recover' (or set config.stage)")
    if str(stage) == RECOVER:
        return RECOVER
    try:
        value = int(stage)
    except (TypeError, ValueError):
        raise ValueError(f"stage must be an integer 0..K or {RECOVER!r}, got {stage!r}") from None
    if value < 0:
        raise ValueError(f"stage must be an integer 0..K or {RECOVER!r}, got {stage!r}")
    return value


def stage_output_dir(config: HeimaConfig, stage: int | str) -> Path:
    """Where ``stage`` writes: ``run_dir/stage-{s}``, ``run_dir/recover``, or with ``config.one_shot``
    ``run_dir/one-shot`` (stage K) / ``run_dir/one-shot-recover``."""
    if config.one_shot:
        return Path(config.run_dir) / (ONE_SHOT_RECOVER if str(stage) == RECOVER else ONE_SHOT)
    return config.stage_dir(stage)


def _previous_dir(config: HeimaConfig, stage: int | str, num_stages: int) -> Path | None:
    """The stage directory ``stage`` continues from (``None``: the base model)."""
    if stage == RECOVER:
        return Path(config.run_dir) / ONE_SHOT if config.one_shot else config.stage_dir(num_stages)
    if config.one_shot or stage == 0:
        return None
    return config.stage_dir(int(stage) - 1)


def _command_for(directory: Path) -> str:
    name = directory.name
    if name == ONE_SHOT:
        return "heima train --stage <K> --one-shot (train_stage(config, K) with one_shot=True)"
    if name.startswith("stage-"):
        return f"heima train --stage {name.removeprefix('stage-')} (train_stage(config, {name.removeprefix('stage-')}))"
    return f"the stage that writes {directory}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_projector(config: HeimaConfig, previous: Path) -> None:
    """A later stage keeps training what the previous one trained: ``train_projector`` must agree with it."""
    try:
        saved = json.loads((previous / "adapter_config.json").read_text()).get("modules_to_save") or []
    except (OSError, ValueError):
        return  # load_stage reports an unreadable adapter, naming the file
    trained = PROJECTOR in saved
    if trained != bool(config.train_projector):
        raise StageError(
            f"{previous} was trained {'with' if trained else 'without'} the projector (train_projector={trained}); "
            f"every stage of a run keeps that choice: {'pass' if trained else 'drop'} --train-projector"
        )


def _load_prepared(config: HeimaConfig) -> tuple[Dataset, dict[str, Any]]:
    if config.prepared is None:
        raise ValueError("config.prepared is not set: run `heima prepare` (heima.data.prepare) and pass its output")
    return load_prepared(Path(config.prepared))


def _stage_args(config: HeimaConfig, stage: int | str, out: Path) -> HeimaConfig:
    args = config.for_stage(stage if stage == RECOVER else int(stage))
    return dataclasses.replace(args, output_dir=str(out), remove_unused_columns=False)


def train_stage(
    config: HeimaConfig,
    stage: int | str | None = None,
    *,
    model: nn.Module | ModelFactory | None = None,
    processor: Any = None,
) -> Path:
    """Train one Heima stage (see the module docstring for what each stage trains on and starts from).

    Args:
        config: the run's :class:`~heima.config.HeimaConfig` (``prepared``, ``run_dir``, ``model``, ``one_shot``,
            hyper-parameters; ``--deepspeed zero3`` etc. pass through it to the Trainer).
        stage: ``0..K`` or ``"recover"``; ``None`` takes ``config.stage``. With ``config.one_shot`` only ``K`` (the
            'w/o progressive' ablation) and ``"recover"`` are valid.
        model: the *base* model to use instead of ``load_model(config.model)`` (must be fresh: not PEFT-wrapped,
            no previous training), or a zero-argument factory returning ``(model, processor)``.
        processor: the processor for a given ``model`` (default: ``load_processor(config.model)``).

    Returns:
        The stage's output directory.

    Raises:
        StageError: the stage to start from is missing or does not fit (its message names the directory and the
            command that writes it).
        ValueError: a bad stage number, no prepared data, or no samples.
    """
    dataset, meta = _load_prepared(config)
    num_stages = _num_stages(meta)
    stage = _parse_stage(stage, config)
    if stage != RECOVER and stage > num_stages:
        raise ValueError(f"stage {stage} is out of range: the data has K={num_stages} CoT stages (stages 0..K)")
    if config.one_shot and stage != RECOVER and stage != num_stages:
        raise ValueError(
            f"one_shot ('w/o progressive') trains stage K={num_stages} straight from the base model, then "
            f"'recover'; got stage {stage}"
        )
    tokens = list(meta["tokens"])
    out = stage_output_dir(config, stage)
    previous = _previous_dir(config, stage, num_stages)
    answer_index = num_stages if stage == RECOVER else int(stage)

    if previous is not None:
        if not (previous / "adapter_model.safetensors").is_file():
            raise StageError(
                f"stage {stage} starts from {previous}, which is missing or unfinished: run "
                f"{_command_for(previous)} first"
            )
        _check_projector(config, previous)
        saved_tokens = stage_info(previous).get("tokens")
        if saved_tokens is not None and list(saved_tokens) != tokens:
            raise StageError(
                f"{previous} was trained with thinking tokens {saved_tokens}, the prepared data {config.prepared} has "
                f"{tokens}: prepare the data with the same options as the earlier stages"
            )

    transformers.set_seed(config.seed)
    base, processor = load_base(
        config.model, model, processor, bf16=bool(config.bf16), families=SUPPORTED_FAMILIES, method="heima train"
    )
    if previous is None:
        logger.info("heima stage %s starts from the base model %s (fresh LoRA adapter)", stage, config.model)
        peft_model = prepare_model(config, base, processor, tokens)
    else:
        logger.info("heima stage %s starts from %s", stage, previous)
        ids = add_thinking_tokens(base, processor, tokens)
        # The rows continue under this run's route, whichever route trained them (1 process <-> N processes).
        peft_model = load_stage(base, previous, is_trainable=True, token_ids=ids, rows_route=config.rows_route)
        load_extra_modules(peft_model, previous, skip_token_rows=True)

    rows = samples_for_stage(dataset, stage, one_shot=config.one_shot)
    image_root = dataset[0]["images_root"] if len(dataset) else None
    if not rows:
        raise ValueError(f"the prepared data {config.prepared} has no samples to train stage {stage} on")
    args = _stage_args(config, stage, out)
    info = {
        "method": "heima",
        "stage": stage,
        "tokens": tokens,
        "num_stages": num_stages,
        "one_shot": bool(config.one_shot),
        "starts_from": str(previous) if previous is not None else None,
        # which weights it starts from: a checkpoint made on top of other ones is not resumed (LatentTrainer)
        "starts_from_sha256": _sha256(previous / "adapter_model.safetensors") if previous is not None else None,
        "base": str(config.model),
        "answers_index": answer_index,
        "prepared": str(config.prepared),
    }
    trainer = LatentTrainer(
        model=peft_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=SupervisedCollator(processor, image_root=image_root),
        processing_class=processor,
        stage_info=info,
    )
    trainer.train_and_save(out, SUMMARY_NAME, samples=len(rows))
    logger.info("heima stage %s saved to %s", stage, out)
    return out
