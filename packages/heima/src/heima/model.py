"""Heima's trainable model: thinking tokens added to a base MLLM, then LoRA with the new rows trainable.

- :func:`add_thinking_tokens` adds the thinking tokens (METHODS.md §1 "Thinking tokens") as special tokens with
  rows in the input embedding and ``lm_head`` (:func:`latent_core.tokens.add_special_tokens`). Initialisation is a
  **choice** (the paper reuses Llama-3's reserved tokens, whose rows are untrained; ANCHORS.md): by default
  (``init="text"``) each token's rows start as the mean of the rows of its stage's name, so
  ``<THINKING_OF_SUMMARY>`` (and the numbered ``<THINKING_OF_SUMMARY_2>``..) start at the rows of the text
  ``"summary"``. ``"mean"`` / ``"random"`` use the vocabulary mean / a matched normal for all tokens.
- :func:`prepare_model` freezes the model and wraps it with LoRA r=16 / alpha=32 / dropout 0 on attention q/k/v/o +
  MLP of every language layer and mllama's cross-attention layers (Table A1), plus ``lm_head`` for families whose
  head is untied (mllama, LLaVA-NeXT). For tied heads (Qwen2.5-VL) ``lm_head`` is left out: LoRA on a tied head
  would adapt only one of the two tables (see :mod:`latent_core.lora`). The thinking-token rows train through
  PEFT's ``trainable_token_indices`` (METHODS.md §1), or latent_core's ZeRO-3-safe ``TrainableRows`` under ZeRO-3
  without CUDA (``rows_route="auto"``).
- The vision-to-text projector (``multi_modal_projector``) is a **choice**: the paper fine-tunes "the fusion
  components", which METHODS.md §1 / Table A1 read as mllama's cross-attention layers (adapted by LoRA above) and no
  projector, so it stays frozen by default; ``HeimaConfig.train_projector`` trains it in full (PEFT
  ``modules_to_save``: saved with the adapter, merged by export).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latent_core.families import _unwrap_peft
from latent_core.lora import prepare_lora_model
from latent_core.thinking import stage_of_token as _stage_of_token
from latent_core.tokens import add_special_tokens
from peft import PeftModel
from torch import nn

__all__ = ["PROJECTOR", "add_thinking_tokens", "head_is_tied", "prepare_model", "projector_name", "stage_of_token"]

PROJECTOR = "multi_modal_projector"
"""The vision-to-text projector of mllama / llava / llava_next (:attr:`heima.config.HeimaConfig.train_projector`)."""


def stage_of_token(token: str) -> str:
    """The stage a thinking token belongs to: ``"<THINKING_OF_SUMMARY_2>"`` -> ``"summary"``
    (:func:`latent_core.thinking.stage_of_token`).

    Raises:
        ValueError: ``token`` is not of the form ``<THINKING_OF_NAME>`` or ``<THINKING_OF_NAME_i>``.
    """
    try:
        return _stage_of_token(token)
    except ValueError as err:
        raise ValueError(f"{err}; initialise other tokens with init='mean' or init='random'") from None


def add_thinking_tokens(
    model: nn.Module,
    processor: Any,
    tokens: Sequence[str],
    init: str = "text",
    seed: int | None = None,
) -> list[int]:
    """Add ``tokens`` (e.g. ``heima_prepare.json``'s ``"tokens"``) to ``processor``'s tokenizer and ``model``.

    Idempotent (as :func:`latent_core.tokens.add_special_tokens`): calling it again on a model that has the tokens
    changes nothing and returns the same ids, so every stage can add the tokens to a freshly loaded base model and
    gets the ids of the previous stages as long as ``tokens`` come in the same order.

    Args:
        model: the transformers model, not yet PEFT-wrapped.
        processor: its processor (the tokenizer is changed in place) or tokenizer.
        tokens: the thinking tokens, in order.
        init: ``"text"`` (default: each token's rows = mean rows of its stage name, e.g. ``"summary"``),
            ``"mean"`` or ``"random"`` (see :mod:`latent_core.tokens`).
        seed: seed for ``init="random"``.

    Returns:
        The token ids, in the order of ``tokens``.
    """
    tokens = list(tokens)
    if init != "text":
        return add_special_tokens(model, processor, tokens, init=init, seed=seed)
    # One call per stage, in token order, so that ids follow the order of ``tokens``.
    ids: dict[str, int] = {}
    groups: list[tuple[str, list[str]]] = []
    for token in tokens:
        stage = stage_of_token(token)
        if groups and groups[-1][0] == stage:
            groups[-1][1].append(token)
        else:
            groups.append((stage, [token]))
    for stage, group in groups:
        ids.update(zip(group, add_special_tokens(model, processor, group, init="text", init_text=stage), strict=True))
    return [ids[token] for token in tokens]


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``model``'s ``lm_head`` shares its weight with the input embedding (Qwen2.5-VL: yes; mllama: no)."""
    base = _unwrap_peft(model)
    head = base.get_output_embeddings()
    return head is None or head.weight is base.get_input_embeddings().weight


def prepare_model(config: Any, model: nn.Module, processor: Any, tokens: Sequence[str]) -> PeftModel:
    """Add the thinking tokens to ``model`` and wrap it with Heima's LoRA (METHODS.md §1, Table A1).

    LoRA r / alpha / dropout come from ``config.lora_r`` / ``lora_alpha`` / ``lora_dropout`` (16 / 32 / 0);
    ``lm_head`` is adapted when ``config.lora_include_lm_head`` (default) *and* the head is untied. The rows of the
    thinking tokens are trainable (``trainable_token_indices``); everything else, the vision tower included, is
    frozen.

    Args:
        config: a :class:`heima.config.HeimaConfig` (any object with those fields; missing ones take the defaults).
        model: the base transformers model (fresh: not PEFT-wrapped). Changed in place.
        processor: its processor; the thinking tokens are added to its tokenizer.
        tokens: the thinking tokens, in order.

    Returns:
        The ``PeftModel`` to train (or to load a previous stage's adapter into: use the base model then, see
        :func:`heima.trainer.train_stage`).
    """
    extra = {}
    if getattr(config, "train_projector", False):
        extra["modules_to_save"] = [projector_name(model)]
    ids = add_thinking_tokens(model, processor, tokens)
    include_head = bool(getattr(config, "lora_include_lm_head", True)) and not head_is_tied(model)
    return prepare_lora_model(
        model,
        new_token_ids=ids,
        r=int(getattr(config, "lora_r", 16)),
        alpha=int(getattr(config, "lora_alpha", 32)),
        dropout=float(getattr(config, "lora_dropout", 0.0)),
        include_lm_head=include_head,
        rows_route=str(getattr(config, "rows_route", "auto")),
        **extra,
    )


def projector_name(model: nn.Module) -> str:
    """The name of ``model``'s vision-to-text projector, trained in full with ``HeimaConfig.train_projector``:
    ``multi_modal_projector`` (mllama, llava, llava_next).

    Raises:
        ValueError: the model has none outside its vision tower (Qwen2.5-VL's merger is part of ``model.visual``,
            which stays frozen).
    """
    names = [name for name, _ in _unwrap_peft(model).named_modules() if name.rsplit(".", 1)[-1] == PROJECTOR]
    if not names:
        raise ValueError(
            f"train_projector: {type(_unwrap_peft(model)).__name__} has no {PROJECTOR} outside its vision tower "
            "(Qwen2.5-VL's merger belongs to the frozen vision tower); leave train_projector off for this family"
        )
    return PROJECTOR
