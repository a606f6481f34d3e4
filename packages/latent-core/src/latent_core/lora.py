"""LoRA with trainable new-token rows: the adapter config, the prepared model, and a standalone merged export.

Heima's defaults (METHODS.md section 1, Tables A1/A2): LoRA r=16, alpha=32, dropout 0 on attention q/k/v/o and the
MLP of every language layer, mllama's cross-attention layers, and ``lm_head``; the vision encoder frozen; the rows of
the new tokens trainable. :func:`default_lora_config` builds that ``LoraConfig`` (``lm_head`` only when asked:
``include_lm_head=True``), :func:`prepare_lora_model` freezes the model and wraps it, :func:`export_merged` writes a
plain Hugging Face checkpoint with everything merged.

Two routes train the new rows; both give the same model (tested to float precision):

- ``"peft"``: PEFT's ``trainable_token_indices`` (the paper-faithful, adapter-sized route; PEFT saves the rows in the
  adapter). PEFT 0.21.2 cannot *start* it under DeepSpeed ZeRO-3 without CUDA: its ZeRO-3 initialisation
  (``TrainableTokensLayer._collect_token_weights``) hard-codes a CUDA device. Upstream also has an open report of a
  KeyError saving trainable tokens under ZeRO-3 (peft #2946).
- ``"rows"``: :class:`latent_core.trainable_rows.TrainableRows`, a module of ours with the same math that works on any
  device (see that module for why it is ZeRO-3 safe). The rows are parameters named
  ``...latent_trainable_rows.rows`` (and ``head_rows`` / ``head_bias``); PEFT's ``save_pretrained`` does not save them,
  the trainer saves them next to the adapter.
- ``"auto"`` (default of :func:`prepare_lora_model`): ``"rows"`` when ZeRO-3 is enabled and CUDA is not available
  (the one setting where PEFT's route cannot start), else ``"peft"``.

LoRA on ``lm_head`` together with trainable rows (PEFT 0.21 quirks, handled here):

- Untied head: PEFT refuses ``trainable_token_indices`` on a LoRA-wrapped ``lm_head`` (TypeError). The config names
  ``lm_head.base_layer`` instead, so the token wrapper sits *inside* the LoRA layer: LoRA's update is added on top of
  the trained columns (what the ``"rows"`` route does too).
- Tied head (Qwen2.5-VL, LaRe's LLaVA): LoRA on ``lm_head`` adapts only one of the two tied tables. PEFT warns about
  ``ensure_weight_tying``; setting it would turn the embedding into a LoRA embedding, which rejects
  ``trainable_token_indices``, so we keep it off and silence that one warning. Training is well defined (the new rows
  stay shared, LoRA adds to the head only), but the merged model no longer has tied tables: :func:`export_merged`
  unties ``lm_head`` (``tie_word_embeddings=False``, one extra vocab x d matrix on disk). ``include_lm_head`` is
  therefore off by default; pass it for Heima's untied families (mllama, LLaVA-NeXT), or knowingly for tied ones.
- PEFT's own ``merge_and_unload`` mis-merges a token wrapper nested in a LoRA layer (it leaves the wrapper in place and
  gives other logits); :func:`export_merged` merges the token rows itself first.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from latent_core.families import _unwrap_peft, lora_target_modules, model_parts
from latent_core.tokens import trainable_token_indices
from latent_core.trainable_rows import attach_trainable_rows, get_trainable_rows, merge_trainable_rows

__all__ = ["ROWS_ROUTES", "default_lora_config", "export_merged", "prepare_lora_model", "resolve_rows_route"]

ROWS_ROUTES: tuple[str, ...] = ("auto", "peft", "rows")
"""How the new token rows are trained: PEFT's ``trainable_token_indices``, our ``TrainableRows``, or chosen by setup."""

# Emitted by PEFT when LoRA targets a tied lm_head; see the module docstring for why we keep ensure_weight_tying off.
_TIED_WARNING = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"


def resolve_rows_route(route: str = "auto") -> str:
    """``"peft"`` or ``"rows"`` for ``route``; ``"auto"`` is ``"rows"`` under ZeRO-3 without CUDA, else ``"peft"``.

    Raises:
        ValueError: ``route`` is not one of :data:`ROWS_ROUTES`.
    """
    if route not in ROWS_ROUTES:
        raise ValueError(
            f"unknown rows route {route!r}; choose one of {', '.join(ROWS_ROUTES)} ('peft': PEFT's "
            "trainable_token_indices, 'rows': latent_core's TrainableRows, 'auto': 'rows' under ZeRO-3 without CUDA)"
        )
    if route != "auto":
        return route
    from latent_core.zero3 import zero3_enabled

    return "rows" if zero3_enabled() and not torch.cuda.is_available() else "peft"


def _peft_token_indices(model: nn.Module, ids: list[int], include_lm_head: bool) -> list[int] | dict[str, list[int]]:
    value = trainable_token_indices(model, ids)
    if isinstance(value, dict) and include_lm_head:  # untied head adapted by LoRA: nest the token wrapper inside it
        head_name = next(name for name, module in _unwrap_peft(model).named_modules() if module is _head(model))
        value = {(f"{name}.base_layer" if name == head_name else name): v for name, v in value.items()}
    return value


def _head(model: nn.Module) -> nn.Module | None:
    return _unwrap_peft(model).get_output_embeddings()


def default_lora_config(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    include_lm_head: bool = False,
    new_token_ids: Sequence[int] = (),
    route: str = "peft",
    **overrides: Any,
) -> LoraConfig:
    """Heima's LoRA config for ``model`` (METHODS.md section 1): r=16, alpha=32, dropout 0 on the language layers.

    Targets are :func:`latent_core.families.lora_target_modules`: attention q/k/v/o and MLP gate/up/down of every
    decoder layer, mllama's cross-attention q/k/v/o, and ``lm_head`` if ``include_lm_head`` (see the module docstring
    for tied heads). Never the vision tower or the projector.

    Args:
        model: the transformers model the adapter is for (not yet PEFT-wrapped).
        r, alpha, dropout: LoRA rank, ``lora_alpha`` and ``lora_dropout``.
        include_lm_head: also adapt ``lm_head`` (Heima's default; off here because of tied heads).
        new_token_ids: ids of new tokens whose rows train; with ``route="peft"`` they become
            ``trainable_token_indices`` (:func:`latent_core.tokens.trainable_token_indices`; for an untied head adapted
            by LoRA the head entry is named ``<lm_head>.base_layer``). With ``route="rows"`` the config leaves them out
            (:func:`prepare_lora_model` attaches ``TrainableRows``).
        route: ``"peft"``, ``"rows"`` or ``"auto"`` (see :func:`resolve_rows_route`).
        **overrides: any other ``LoraConfig`` field (they win over the values above).
    """
    route = resolve_rows_route(route)
    fields: dict[str, Any] = dict(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model, include_lm_head=include_lm_head),
        bias="none",
    )
    ids = [int(i) for i in new_token_ids]
    if ids and route == "peft":
        fields["trainable_token_indices"] = _peft_token_indices(model, ids, include_lm_head)
    fields.update(overrides)
    return LoraConfig(**fields)


def prepare_lora_model(
    model: transformers.PreTrainedModel,
    lora_config: LoraConfig | None = None,
    new_token_ids: Sequence[int] = (),
    rows_route: str = "auto",
    **config_kwargs: Any,
) -> PeftModel:
    """Freeze ``model``, wrap it with LoRA and make the new token rows trainable.

    Everything is frozen first (the vision tower explicitly), then ``get_peft_model`` adds the adapter; the trainable
    parameters are the LoRA matrices and the rows of ``new_token_ids`` only. The rows train through PEFT's
    ``trainable_token_indices`` (``rows_route="peft"``) or :class:`~latent_core.trainable_rows.TrainableRows`
    (``"rows"``); ``"auto"`` picks ``"rows"`` under ZeRO-3 without CUDA, where PEFT's route cannot start (module
    docstring).

    Args:
        model: a transformers model with the new tokens already added (:func:`latent_core.tokens.add_special_tokens`).
            It is changed in place (frozen, LoRA layers injected) and returned wrapped.
        lora_config: a ready ``LoraConfig``; ``None`` builds :func:`default_lora_config` from ``config_kwargs``.
            With the ``"peft"`` route and no ``trainable_token_indices`` in it, they are filled in.
        new_token_ids: ids of the new tokens whose rows train.
        rows_route: ``"auto"``, ``"peft"`` or ``"rows"``.
        **config_kwargs: arguments of :func:`default_lora_config` (``r``, ``alpha``, ``include_lm_head``, ...).

    Raises:
        ValueError: an unknown ``rows_route``; both ``lora_config`` and ``config_kwargs``; a ``lora_config`` with
            ``trainable_token_indices`` on the ``"rows"`` route.
        TypeError: ``model`` is already a PEFT model.
    """
    route = resolve_rows_route(rows_route)
    if _unwrap_peft(model) is not model:
        raise TypeError("model is already PEFT-wrapped; pass the transformers model (prepare_lora_model wraps it)")
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    ids = [int(i) for i in new_token_ids]
    if "route" in config_kwargs:
        raise ValueError("prepare_lora_model takes rows_route=..., not route=... (default_lora_config's name)")
    if lora_config is None:
        lora_config = default_lora_config(model, new_token_ids=ids, route=route, **config_kwargs)
    else:
        if config_kwargs:
            raise ValueError(
                f"pass either lora_config or default_lora_config arguments, not both (got {sorted(config_kwargs)})"
            )
        has_tokens = lora_config.trainable_token_indices is not None
        if route == "rows" and has_tokens:
            raise ValueError(
                "lora_config sets trainable_token_indices but the rows route trains the new rows with TrainableRows; "
                "drop trainable_token_indices or use rows_route='peft'"
                + (" (rows_route='auto' chose 'rows': ZeRO-3 without CUDA)" if rows_route == "auto" else "")
            )
        if route == "peft" and ids and not has_tokens:
            lora_config = copy.deepcopy(lora_config)
            head_adapted = _lora_targets_head(model, lora_config)
            lora_config.trainable_token_indices = _peft_token_indices(model, ids, head_adapted)

    parts = model_parts(model)
    model.requires_grad_(False)
    if parts.vision_tower is not None:
        parts.vision_tower.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TIED_WARNING)
        peft_model = get_peft_model(model, lora_config)
    if route == "rows" and ids:
        attach_trainable_rows(peft_model, ids)
    if parts.vision_tower is not None and any(p.requires_grad for p in parts.vision_tower.parameters()):
        raise RuntimeError("the LoRA config made vision-tower parameters trainable; target language modules only")
    return peft_model


def _lora_targets_head(model: nn.Module, config: LoraConfig) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    head = _head(model)
    name = next((n for n, m in _unwrap_peft(model).named_modules() if m is head), None)
    return name is not None and bool(check_target_module_exists(config, name))


def _merge_peft_token_rows(model: nn.Module) -> None:
    """Write PEFT's trainable token rows into their base weights and put the base modules back in place."""
    from peft.utils.other import TrainableTokensWrapper

    wrapped = [
        (name, module)
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, TrainableTokensWrapper)
    ]
    with torch.no_grad():
        for _, wrapper in wrapped:
            adapter = wrapper.token_adapter
            if adapter.tied_adapter is not None or adapter.disable_adapters:
                continue  # a tied wrapper shares the owner's rows and table: the owner writes them
            weight = adapter.base_layer.weight
            for name in adapter.active_adapters:
                if name in adapter.trainable_tokens_delta:
                    index = torch.tensor(adapter.token_indices[name], device=weight.device)
                    weight.data.index_copy_(0, index, adapter.trainable_tokens_delta[name].data.to(weight))
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper.token_adapter.base_layer)


def _untie_lm_head(base: transformers.PreTrainedModel) -> None:
    """Give ``lm_head`` its own copy of the tied table and mark the config untied (also in the text config)."""
    head = base.get_output_embeddings()
    inner = head
    while "base_layer" in inner._modules:
        inner = inner._modules["base_layer"]
    inner.weight = nn.Parameter(inner.weight.detach().clone(), requires_grad=inner.weight.requires_grad)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False


def export_merged(
    model: nn.Module,
    processor: Any,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    *,
    copy_model: bool = True,
) -> Path:
    """Save a standalone Hugging Face checkpoint (safetensors) with LoRA and the new rows merged into the weights.

    ``latent_core.hub.load_model(out_dir)`` then gives the same logits as the adapter model, with no PEFT and no
    latent_core module needed; the processor (or tokenizer) saved next to it carries the added tokens.

    Order of merging: the new rows (``TrainableRows`` or PEFT's token wrappers) are written into the embedding and
    ``lm_head`` tables; a tied ``lm_head`` that LoRA adapted is untied (``tie_word_embeddings=False``, module
    docstring); then ``merge_and_unload`` folds LoRA in.

    Args:
        model: a ``PeftModel`` from :func:`prepare_lora_model` (either route), or a transformers model with
            ``TrainableRows`` attached or nothing to merge.
        processor: the processor or tokenizer to save with the weights.
        out_dir: the output directory (created).
        dtype: cast the merged weights to this dtype before saving (e.g. ``torch.bfloat16``); ``None`` keeps them.
        copy_model: ``True`` (default) merges a deep copy, so ``model`` is left untouched (needs memory for a second
            copy). ``False`` merges in place and *consumes* ``model``: afterwards it is the merged transformers model's
            former wrapper and must not be used again.

    Returns:
        ``Path(out_dir)``.

    Raises:
        ValueError: the model holds ZeRO-3 partitioned parameters (export from a consolidated checkpoint in one
            process instead).
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "export_merged needs full parameters, but the model holds DeepSpeed ZeRO-3 partitions; save the adapter "
            "and trainable rows, then load base model + adapter + rows in one process and export there"
        )
    work = copy.deepcopy(model) if copy_model else model
    base = _unwrap_peft(work)
    if not isinstance(base, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers model (or a PEFT model around one), got {type(model).__name__}")
    tied = model_parts(base).lm_head_tied

    if get_trainable_rows(base) is not None:
        merge_trainable_rows(base)
    _merge_peft_token_rows(base)
    head = base.get_output_embeddings()
    if tied and "base_layer" in head._modules:  # LoRA on a tied head: the merged head differs from the embedding
        _untie_lm_head(base)

    merged = work.merge_and_unload(progressbar=False) if isinstance(work, PeftModel) else base
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    left = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    if left:
        raise RuntimeError(f"PEFT layers left after merging: {left[:5]}; this model layout is not supported")
    if dtype is not None:
        merged = merged.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
