"""Load a trained stage for inference: base model + added tokens + PEFT adapter (or full-weight stage) + extra modules.

A stage directory is what :class:`latent_core.trainer.LatentTrainer` writes (``adapter_config.json``,
``adapter_model.safetensors``, ``extra_modules.safetensors`` when any, ``latent_stage.json``, the processor). An
exported checkpoint (``latent_core.lora.export_merged``: ``config.json``, no adapter) loads directly.

    >>> model, processor = load_trained("runs/heima/recover")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_trained"]


def _load_extras(
    peft_model: Any, stage_dir: Path, token_ids: list[int], skip_prefixes: Sequence[str] = ()
) -> list[str]:
    """Load ``extra_modules.safetensors`` (keys named in the trainer's model, e.g. ``backbone.base_model...``) into
    the PEFT model by matching parameter names; keys starting with one of ``skip_prefixes`` are left to the caller."""
    from latent_core.hub import load_tensors
    from latent_core.trainable_rows import TRAINABLE_ROWS_NAME, attach_trainable_rows
    from latent_core.trainer import EXTRA_MODULES_NAME, StageError

    path = stage_dir / EXTRA_MODULES_NAME
    if not path.is_file():
        return []
    saved = {k: v for k, v in load_tensors(path).items() if not k.startswith(tuple(skip_prefixes))}
    if any(f"{TRAINABLE_ROWS_NAME}." in key for key in saved):
        attach_trainable_rows(peft_model, token_ids)
    params = dict(peft_model.named_parameters())
    loaded = []
    for key, value in saved.items():
        names = [name for name in params if key == name or key.endswith("." + name) or name.endswith("." + key)]
        if len(names) != 1:
            raise StageError(
                f"{path}: cannot place {key!r} in the inference model ({'no' if not names else 'several'} matching "
                "parameters); inference knows the LoRA adapter and trainable token rows only"
            )
        param = params[names[0]]
        if param.shape != value.shape:
            raise StageError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        loaded.append(key)
    return sorted(loaded)


def load_trained(
    stage_dir: str | Path,
    base_model: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    default_tokens: Callable[[Any], Sequence[str]] | None = None,
    skip_extra_prefixes: Sequence[str] = (),
    families: Sequence[str] | None = None,
    method: str = "this method",
) -> tuple[Any, Any]:
    """Load a trained stage (or an exported checkpoint) for inference: ``(model, processor)``, eval mode.

    A stage directory (``adapter_config.json`` + ``latent_stage.json`` + saved processor): the processor saved there
    (it has the added tokens), the base model (``base_model`` if given, an alias or path, else the adapter's
    ``base_model_name_or_path``, else ``latent_stage.json``'s ``base_model`` / ``base``), the tokens of
    ``latent_stage.json`` added with the tokenizer's ids, the adapter (``PeftModel.from_pretrained``, new-token rows
    included) and the extra modules (``TrainableRows``) if any. A full-weight stage (``stage_weights.safetensors``):
    the same, with its trained weights (and those of the full-weight stages it builds on) copied into the base
    instead of an adapter; its extra modules are left to the method. A directory with ``config.json`` and no
    adapter is an exported checkpoint and loads with ``load_model``.

    Args:
        stage_dir: the stage output or exported checkpoint directory.
        base_model: the base model (alias, Hub id or path) to put the adapter on; default: the one it was trained on.
        dtype: load the base model in this dtype (default: the checkpoint's).
        device: move the model there (default: CUDA when available, else CPU).
        default_tokens: ``fn(processor) -> tokens`` to add when ``latent_stage.json`` names none.
        skip_extra_prefixes: extra-module keys (``extra_modules.safetensors``) with these prefixes are not loaded
            here: they belong to modules outside the language model (e.g. a projector) that the caller loads.
        families, method: refuse, before loading weights, a model whose family is not in ``families``
            (:func:`latent_core.families.require_family`; the message names ``method``).

    Raises:
        FileNotFoundError: ``stage_dir`` is neither a stage output nor a checkpoint.
        latent_core.StageError: the adapter or extra modules do not fit the base model.
        latent_core.families.FamilyError: the model's family is not one of ``families``.
    """

    from latent_core.families import require_family
    from latent_core.hub import load_config, load_model, load_processor
    from latent_core.tokens import add_special_tokens
    from latent_core.trainer import STAGE_WEIGHTS_NAME, StageError, load_stage, stage_info

    stage_dir = Path(stage_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    full = (stage_dir / STAGE_WEIGHTS_NAME).is_file()
    if not full and not (stage_dir / "adapter_config.json").is_file():
        if not (stage_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{stage_dir} is neither a trained stage output (no adapter_config.json or {STAGE_WEIGHTS_NAME}) nor "
                "an exported checkpoint (no config.json): pass the directory the trainer or the export wrote"
            )
        if families is not None:
            require_family(load_config(str(stage_dir)), families, method)
        model = load_model(str(stage_dir), **kwargs)
        return model.to(device).eval(), load_processor(str(stage_dir))

    processor = load_processor(str(stage_dir))
    info = stage_info(stage_dir)
    adapter_config = {} if full else json.loads((stage_dir / "adapter_config.json").read_text())
    base = base_model or adapter_config.get("base_model_name_or_path") or info.get("base_model") or info.get("base")
    if not base:
        raise StageError(f"{stage_dir}: the stage names no base model; pass base_model=<alias or path>")
    tokens = list(info.get("tokens") or (default_tokens(processor) if default_tokens is not None else []))
    if families is not None:
        require_family(load_config(str(base)), families, method)
    model = load_model(str(base), **kwargs)
    ids = add_special_tokens(model, processor, tokens) if tokens else []  # the tokenizer has them: same ids
    model = load_stage(model, stage_dir, is_trainable=False)  # checks the embedding rows and the weights' fit
    if not full:  # a full-weight stage's extra modules (heads, extractors) are the method's to attach and load
        _load_extras(model, stage_dir, ids, skip_extra_prefixes)
    return model.to(device).eval(), processor
