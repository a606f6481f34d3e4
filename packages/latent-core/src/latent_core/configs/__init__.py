"""The published ``config.json`` of every model alias, shipped with latent-core, and models built from them without
weights (on the meta device).

``configs/<alias>.json`` holds the ``config.json`` each Hub repository of :data:`latent_core.hub.ALIASES` released,
quirks included (Qwen2.5-VL-3B/7B written with ``"transformers_version": "4.41.2"``, older than Qwen2.5-VL; the 32B's
short ``vision_config`` that relies on the class defaults and an ``intermediate_size`` of 3456; mllama's and CLIP's
full ``PretrainedConfig.to_dict()`` dumps of transformers 4.45 / 4.16, CLIP's ``text_config_dict`` /
``vision_config_dict``; llava-hf's partial ``text_config`` that names ``lmsys/vicuna-7b-v1.5`` and fills the rest
from the Llama defaults). Nothing is downloaded: :func:`published_config` reads the shipped file.

Where each file comes from (:data:`PROVENANCE`): most were compared with copies vendored in public repositories; the
rest were written from the released files as known. Every one is checked by building it on the meta device: the total
parameter count equals the published one (tests/apps/test_plan.py), which pins every shape-bearing field; a key that
carries no shape (a version string, ``use_cache``) could still differ from the Hub's bytes where the provenance says
"not compared".

- :func:`published_config` ``(alias or Hub id) -> PretrainedConfig``: the shipped file; any other Hub id or a local
  path goes to :func:`latent_core.hub.load_config`.
- :func:`meta_model` builds the family's class (:func:`latent_core.families.family_of`, as
  :func:`latent_core.hub.load_model` picks it; ``AutoModel`` for a config of no family, e.g. CLIP) under
  ``torch.device("meta")`` in bf16: real shapes, no memory, in a fraction of a second.
- :func:`count_parameters`: parameters counted once each (tied tables are one tensor).
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from typing import Any

import torch
from torch import nn

from latent_core.hub import _HUB_ID, ALIASES, UnknownAliasError, load_config

__all__ = [
    "PROVENANCE",
    "SHIPPED",
    "count_parameters",
    "meta_model",
    "published_config",
    "published_config_dict",
    "shipped_alias",
]

SHIPPED: dict[str, str] = dict(ALIASES)
"""Alias -> Hub id of every shipped ``config.json`` (all of :data:`latent_core.hub.ALIASES`; file ``<alias>.json``)."""

PROVENANCE: dict[str, str] = {
    "llava-cot-11b": "not compared (no public copy found): LLaVA-CoT is a full fine-tune of "
    "Llama-3.2-11B-Vision-Instruct, written as that release's file; parameter count verified",
    "llama-3.2-11b-vision": "compared with vendored copies of the text_config / vision_config dumps (transformers "
    "4.45.0.dev0); parameter count verified",
    "llava-next-vicuna-7b": "written from the release (llava-hf 4.39.0.dev0 layout, compared with the llava-1.5-hf and "
    "v1.6-mistral-hf copies); parameter count verified",
    "llama-3.1-8b-instruct": "compared with vendored copies; parameter count verified",
    "vicuna-7b": "written from the release; parameter count verified",
    "qwen2.5-vl-3b": "compared with a vendored copy; parameter count verified",
    "qwen2.5-vl-7b": "written from the release (the 3B's layout); parameter count verified",
    "qwen2.5-vl-32b": "written from the release; parameter count verified",
    "qwen2.5-0.5b": "compared with vendored copies (max_window_layers, sliding_window, 4.43.1); parameter count "
    "verified",
    "qwen2.5-1.5b": "written from the release; parameter count verified",
    "qwen2.5-7b": "written from the release; parameter count verified",
    "clip-vit-l-14": "text half compared with a vendored copy (4.16.0.dev0 dump), vision half written in the same "
    "layout; parameter count verified",
}
"""Per alias: where the shipped file's content was checked (see the module docstring)."""

_BY_HUB_ID = {hub_id.lower(): alias for alias, hub_id in SHIPPED.items()}


def _known() -> str:
    return ", ".join(SHIPPED)


def shipped_alias(name: str) -> str | None:
    """The shipped alias ``name`` stands for (an alias, case-insensitive, or its Hub id), ``None`` if none."""
    key = str(name).strip().lower()
    if key in SHIPPED:
        return key
    return _BY_HUB_ID.get(key)


def published_config_dict(alias: str) -> dict[str, Any]:
    """The shipped ``config.json`` of ``alias`` (or its Hub id) as a plain dict, exactly as released.

    Raises:
        UnknownAliasError: ``alias`` is not shipped (the message lists the shipped aliases).
    """
    key = shipped_alias(alias)
    if key is None:
        raise UnknownAliasError(f"{alias!r} has no shipped config.json; shipped aliases: {_known()}")
    return json.loads(files(__name__).joinpath(f"{key}.json").read_text(encoding="utf-8"))


def published_config(name: str, **kwargs: Any) -> Any:
    """The ``transformers.PretrainedConfig`` of ``name``: an alias or Hub id of :data:`SHIPPED` reads the shipped
    ``config.json`` (no network); a local path or another Hub id (``org/name``) goes to
    :func:`latent_core.hub.load_config` (``kwargs`` too). A fresh object on every call.

    Raises:
        UnknownAliasError: ``name`` is neither shipped, nor a local path, nor of the form ``org/name`` (one line that
            lists the shipped aliases).
    """
    from transformers import CONFIG_MAPPING

    key = shipped_alias(name)
    if key is None:
        text = str(name).strip()
        if os.path.exists(os.path.expanduser(text)) or _HUB_ID.fullmatch(text):
            return load_config(text, **kwargs)
        raise UnknownAliasError(
            f"{name!r} is not a model alias with a shipped config, a local path, or a Hub id 'org/name'; shipped "
            f"aliases: {_known()}"
        )
    raw = published_config_dict(key)
    config = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    config._name_or_path = SHIPPED[key]
    return config


def _model_class(config: Any) -> Any:
    """The class :func:`latent_core.hub.load_model` loads ``config`` with; ``AutoModel`` for a config of no family."""
    import transformers

    from latent_core.families import family_of

    try:
        return family_of(config).model_class
    except ValueError:
        return transformers.AutoModel


def _build(model_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    if hasattr(model_class, "from_config") and not hasattr(model_class, "_from_config"):  # Auto* classes
        return model_class.from_config(config, dtype=dtype)
    return model_class._from_config(config, dtype=dtype)


def meta_model(
    name_or_config: Any, *, dtype: torch.dtype = torch.bfloat16, model_class: Any = None, **kwargs: Any
) -> nn.Module:
    """The model of ``name_or_config`` (an alias, Hub id, path or a config) with no weights: every tensor on the meta
    device, in ``dtype`` (bf16 by default, as the methods load their bases). ``model_class`` overrides the family's
    class. Built under ``torch.device("meta")``; a class that fails there is built under accelerate's
    ``init_empty_weights`` instead.

    Raises:
        UnknownAliasError: see :func:`published_config`.
    """
    config = published_config(name_or_config, **kwargs) if isinstance(name_or_config, str) else name_or_config
    model_class = model_class or _model_class(config)
    try:
        with torch.device("meta"):
            model = _build(model_class, config, dtype)
    except (NotImplementedError, RuntimeError):  # an op of the class's __init__ that the meta device lacks
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = _build(model_class, config, dtype)
    return model.eval()


def count_parameters(module: nn.Module, trainable: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable``). Each tensor is
    counted once: ``parameters()`` skips repeats, so a tied ``lm_head`` (the input embedding's tensor) adds nothing."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
