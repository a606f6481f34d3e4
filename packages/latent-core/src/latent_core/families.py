"""Model families: which transformers class a checkpoint loads with and where its parts live.

A *family* (METHODS.md section 0) is a transformers model class plus the answers every method needs:
how images enter the language model, where the text decoder, its layers, final norm, embeddings,
``lm_head`` and vision tower are, and which Linear layers LoRA adapts by default.

Supported families and their module layout in transformers 5.x (``.`` = the loaded model)::

    family      class                               decoder (get_decoder())  vision tower
    mllama      MllamaForConditionalGeneration      .model.language_model    .model.vision_model
    llava_next  LlavaNextForConditionalGeneration   .model.language_model    .model.vision_tower
    qwen2_5_vl  Qwen2_5_VLForConditionalGeneration  .model.language_model    .model.visual
    llava       LlavaForConditionalGeneration       .model.language_model    .model.vision_tower
    causal_lm   AutoModelForCausalLM (Llama, Qwen2)  .model                   -

The decoder holds ``layers`` (the decoder layers), ``norm`` (the final norm: its output is the
"hidden state" that feeds ``lm_head``) and ``embed_tokens``; ``lm_head`` sits on the top-level model.
Everything is read from the model or its config, never from hard-coded sizes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

__all__ = [
    "FAMILIES",
    "VISION_FAMILIES",
    "FamilyError",
    "FamilySpec",
    "ModelParts",
    "backbone_of",
    "family_of",
    "family_of_processor",
    "get_family",
    "image_token_id",
    "image_token_mask",
    "lora_target_modules",
    "model_parts",
    "require_family",
]

# Per-layer Linear layers LoRA adapts: attention q/k/v/o and the gated MLP of every decoder layer.
_SELF_ATTN_AND_MLP = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Mllama's cross-attention (fusion) layers use `cross_attn` instead of `self_attn`.
_CROSS_ATTN = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj")


@dataclass(frozen=True)
class FamilySpec:
    """What latent_core knows about one model family.

    Attributes:
        name: ``"mllama"``, ``"llava_next"``, ``"qwen2_5_vl"``, ``"llava"`` or ``"causal_lm"``.
        model_types: ``config.model_type`` values of this family. ``causal_lm`` lists the text layouts we
            test (``llama``, ``qwen2``) and is also the fallback for any other text-only ``model_type``
            that ``AutoModelForCausalLM`` maps (see :func:`family_of`).
        class_name: name of the transformers class used to load it; :attr:`model_class` is the class
            itself (imported on first use, so importing this module stays cheap).
        images_via: ``"tokens"`` (image features replace image-token embeddings in the sequence),
            ``"cross_attention"`` (image features reach the text through cross-attention layers; one
            ``<|image|>`` token only marks where) or ``"none"``.
        lora_targets: default LoRA targets as module paths *relative to one decoder layer* (attention
            q/k/v/o and MLP gate/up/down; for mllama also the cross-attention q/k/v/o). These suffixes
            alone would also match vision-tower layers (CLIP and Mllama's vision encoder use
            ``self_attn.q_proj`` too, Qwen2.5-VL's vision blocks use ``mlp.gate_proj``), so do not pass
            them to PEFT as a list: pass :func:`lora_target_modules`, a regex anchored at
            ``decoder_layers_path``.
        decoder_layers_path: dotted path of the decoder-layer ``nn.ModuleList`` in the loaded model.
        vision_tower_path: dotted path of the vision encoder in the loaded model, ``None`` for text models.
        processor_class: name of the transformers processor class of the family (``None``: a tokenizer only);
            :func:`family_of_processor` reads it.
        nested_images: the processor takes images as one list per sample (mllama), not one flat list.
    """

    name: str
    model_types: tuple[str, ...]
    class_name: str
    images_via: str
    lora_targets: tuple[str, ...]
    decoder_layers_path: str
    vision_tower_path: str | None
    processor_class: str | None = None
    nested_images: bool = False

    @property
    def model_class(self) -> type:
        """The transformers class used to load it (``AutoModelForCausalLM`` for ``causal_lm``)."""
        return getattr(transformers, self.class_name)


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="mllama",
            model_types=("mllama",),
            class_name="MllamaForConditionalGeneration",
            images_via="cross_attention",
            lora_targets=_SELF_ATTN_AND_MLP + _CROSS_ATTN,
            decoder_layers_path="model.language_model.layers",
            vision_tower_path="model.vision_model",
            processor_class="MllamaProcessor",
            nested_images=True,
        ),
        FamilySpec(
            name="llava_next",
            model_types=("llava_next",),
            class_name="LlavaNextForConditionalGeneration",
            images_via="tokens",
            lora_targets=_SELF_ATTN_AND_MLP,
            decoder_layers_path="model.language_model.layers",
            vision_tower_path="model.vision_tower",
            processor_class="LlavaNextProcessor",
        ),
        FamilySpec(
            name="qwen2_5_vl",
            model_types=("qwen2_5_vl",),
            class_name="Qwen2_5_VLForConditionalGeneration",
            images_via="tokens",
            lora_targets=_SELF_ATTN_AND_MLP,
            decoder_layers_path="model.language_model.layers",
            vision_tower_path="model.visual",
            processor_class="Qwen2_5_VLProcessor",
        ),
        FamilySpec(
            name="llava",
            model_types=("llava",),
            class_name="LlavaForConditionalGeneration",
            images_via="tokens",
            lora_targets=_SELF_ATTN_AND_MLP,
            decoder_layers_path="model.language_model.layers",
            vision_tower_path="model.vision_tower",
            processor_class="LlavaProcessor",
        ),
        FamilySpec(
            name="causal_lm",
            model_types=("llama", "qwen2"),
            class_name="AutoModelForCausalLM",
            images_via="none",
            lora_targets=_SELF_ATTN_AND_MLP,
            decoder_layers_path="model.layers",
            vision_tower_path=None,
        ),
    )
}


VISION_FAMILIES: tuple[str, ...] = tuple(name for name, spec in FAMILIES.items() if spec.images_via != "none")
"""The families whose models take images (every one but ``causal_lm``)."""


class FamilyError(ValueError):
    """A model of a family the method does not support (e.g. a text-only LM given to a method that needs images)."""


def require_family(model_or_config: Any, supported: tuple[str, ...] | list[str], method: str) -> FamilySpec:
    """The family of ``model_or_config`` if ``method`` supports it, else :class:`FamilyError` naming the model's
    family and the supported ones. Call it on the config before loading weights (``latent_core.load_config``).

    Raises:
        FamilyError: the family is not in ``supported`` (or the model is of no family latent_core knows).
    """
    config = _config_of(model_or_config)
    try:
        spec = family_of(config)
    except ValueError as err:
        raise FamilyError(f"{method}: {err}") from None
    if spec.name not in supported:
        kind = "a text-only model: it cannot take images" if spec.images_via == "none" else "not supported here"
        names = ", ".join(f"{name} ({FAMILIES[name].class_name})" for name in supported)
        raise FamilyError(
            f"{method} cannot use {getattr(config, '_name_or_path', '') or 'this model'}: its family is {spec.name} "
            f"({type(config).__name__}, model_type {config.model_type!r}), {kind}. Supported families: {names}"
        )
    return spec


def _known_families() -> str:
    return ", ".join(f"{spec.name} ({spec.class_name})" for spec in FAMILIES.values())


def get_family(name: str) -> FamilySpec:
    """Return the :class:`FamilySpec` called ``name``; raise ``ValueError`` listing the known families."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known families: {_known_families()}") from None


def family_of_processor(processor: Any) -> FamilySpec | None:
    """The family whose processor class ``processor`` is (or subclasses), ``None`` for a tokenizer or an unknown
    processor."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    return next((spec for spec in FAMILIES.values() if spec.processor_class in names), None)


def _config_of(model_or_config: Any) -> transformers.PretrainedConfig:
    if isinstance(model_or_config, transformers.PretrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)  # PeftModel forwards `.config` to the base model
    if not isinstance(config, transformers.PretrainedConfig):
        raise TypeError(f"expected a transformers model or config, got {type(model_or_config).__name__}")
    return config


def _is_multimodal(config: transformers.PretrainedConfig) -> bool:
    model_type = config.model_type
    return (
        getattr(config, "vision_config", None) is not None
        or model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or "vision" in model_type
    )


def family_of(model_or_config: Any) -> FamilySpec:
    """Return the family of a loaded model (a PEFT-wrapped one too) or of its config.

    Decided by ``config.model_type``: a model type listed in a family's ``model_types`` gives that family;
    any other text-only decoder that ``AutoModelForCausalLM`` maps gives ``causal_lm``.

    Raises:
        ValueError: for a vision/multimodal model type we do not support (e.g. ``siglip``, ``gemma3``) or a
            model that is not a decoder LM (e.g. ``bert``); the message names it and the supported families.
    """
    config = _config_of(model_or_config)
    model_type = config.model_type
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    what = f"model_type {model_type!r} ({type(config).__name__})"
    if _is_multimodal(config):
        raise ValueError(
            f"{what} is a vision model latent_core does not support. Supported families: {_known_families()}. "
            "Convert the checkpoint to one of these classes or add a FamilySpec for it in latent_core.families."
        )
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return FAMILIES["causal_lm"]
    raise ValueError(
        f"{what} is not a decoder-only language model that latent_core supports. Supported families: "
        f"{_known_families()}; any text-only model_type that AutoModelForCausalLM maps is accepted as causal_lm."
    )


@dataclass
class ModelParts:
    """The parts of a loaded model that methods hook into (see :func:`model_parts`).

    Attributes:
        family: the model's :class:`FamilySpec`.
        language_model: the text decoder without head (``model.get_decoder()``).
        decoder_layers: its decoder layers, in order.
        final_norm: the decoder's final norm; its output is the "hidden state" that feeds ``lm_head``.
        input_embeddings: the module that embeds token ids (``model.get_input_embeddings()``): an
            ``nn.Embedding``, or PEFT's wrapper around it when an adapter trains new token rows.
            Mllama's table has ``vocab_size + 8`` rows, more than ``lm_head`` has outputs.
        lm_head: the output projection (``model.get_output_embeddings()``).
        lm_head_tied: ``lm_head.weight is input_embeddings.weight`` (tied word embeddings).
        vision_tower: the vision encoder (``model.get_encoder(modality="image")``), ``None`` for text models.
        cross_attention_layers: indices into ``decoder_layers`` of the cross-attention layers (mllama),
            ``()`` otherwise.
    """

    family: FamilySpec
    language_model: nn.Module
    decoder_layers: nn.ModuleList
    final_norm: nn.Module
    input_embeddings: nn.Module
    lm_head: nn.Module
    lm_head_tied: bool
    vision_tower: nn.Module | None
    cross_attention_layers: tuple[int, ...]


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """PeftModel -> the transformers model inside it; LoraModel (a BaseTuner) -> its ``.model``."""
    peft = sys.modules.get("peft")  # a model can only be PEFT-wrapped if peft was imported
    if peft is None:
        return model
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _weight_of(module: nn.Module) -> torch.Tensor | None:
    """The weight a (possibly PEFT-wrapped) Linear/Embedding holds, ``None`` if it has none."""
    for _ in range(8):  # unwrap PEFT layers: LoRA/TrainableTokensLayer (.base_layer), wrappers (.original_module)
        inner = module.__dict__.get("_modules", {}).get("base_layer") or getattr(module, "original_module", None)
        if not isinstance(inner, nn.Module) or inner is module:
            break
        module = inner
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(
        f"cannot find the {what} of {type(module).__name__}: none of the attributes {names} exists. "
        "latent_core supports decoders laid out like Llama/Qwen2 (`layers`, `norm`, `embed_tokens`)."
    )


def backbone_of(model: nn.Module) -> nn.Module:
    """The model without its LM head (``.model`` of the transformers model, inside a PEFT wrapper when there is
    one): a forward returns ``last_hidden_state`` and never computes vocabulary logits."""
    return _unwrap_peft(model).model


def model_parts(model: nn.Module) -> ModelParts:
    """Find the decoder, its layers, final norm, embeddings, ``lm_head`` and vision tower of ``model``.

    Works on any model of a supported family, also when wrapped by PEFT (``PeftModel`` / ``LoraModel``):
    the parts returned are the modules inside the wrapper (LoRA layers included), so hooks on them see
    what the adapted model computes.
    """
    base = _unwrap_peft(model)
    if not isinstance(base, transformers.PreTrainedModel):
        raise TypeError(f"expected a transformers model (or a PEFT model around one), got {type(model).__name__}")
    family = family_of(base.config)
    decoder = base.get_decoder()
    if decoder is base:
        raise ValueError(f"{type(base).__name__}.get_decoder() found no text decoder inside the model")
    layers = _child(decoder, ("layers", "h"), "decoder layers")
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__}.layers is a {type(layers).__name__}, expected nn.ModuleList")
    final_norm = _child(decoder, ("norm", "ln_f", "final_layernorm"), "final norm")
    input_embeddings = base.get_input_embeddings()
    lm_head = base.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head); load it with a LM head class")
    head_weight, embed_weight = _weight_of(lm_head), _weight_of(input_embeddings)
    tied = head_weight is not None and head_weight is embed_weight

    vision_tower = None
    if family.vision_tower_path is not None:
        vision_tower = base.get_encoder(modality="image")
        if vision_tower is base or vision_tower is base.base_model:
            raise ValueError(f"{type(base).__name__}.get_encoder(modality='image') found no vision tower")

    cross = ()
    if family.images_via == "cross_attention":
        cross = tuple(i for i, layer in enumerate(layers) if hasattr(layer, "cross_attn"))
    return ModelParts(
        family=family,
        language_model=decoder,
        decoder_layers=layers,
        final_norm=final_norm,
        input_embeddings=input_embeddings,
        lm_head=lm_head,
        lm_head_tied=tied,
        vision_tower=vision_tower,
        cross_attention_layers=cross,
    )


def lora_target_modules(model_or_family: nn.Module | FamilySpec | str, *, include_lm_head: bool = False) -> str:
    """A PEFT ``target_modules`` regex that matches only the language model's LoRA targets.

    PEFT full-matches a string ``target_modules`` against module names of the transformers model
    (``model.language_model.layers.3.self_attn.q_proj``), so anchoring the family's ``lora_targets`` at
    the decoder-layer path keeps every vision-tower and projector Linear out. For mllama the cross-attention
    projections are included (``cross_attn.*``). ``include_lm_head`` also adapts ``lm_head`` (Heima's default).

    Args:
        model_or_family: a loaded model (the decoder-layer path is read from the model itself, so any
            ``causal_lm`` layout works), a :class:`FamilySpec`, or a family name (uses
            ``spec.decoder_layers_path``).
        include_lm_head: add the output projection ``lm_head``.
    """
    if isinstance(model_or_family, nn.Module):
        base = _unwrap_peft(model_or_family)
        parts = model_parts(base)
        spec = parts.family
        layers_path = next(name for name, module in base.named_modules() if module is parts.decoder_layers)
    else:
        spec = get_family(model_or_family) if isinstance(model_or_family, str) else model_or_family
        layers_path = spec.decoder_layers_path
    targets = "|".join(re.escape(t) for t in spec.lora_targets)
    pattern = rf"{re.escape(layers_path)}\.\d+\.(?:{targets})"
    return rf"(?:{pattern}|lm_head)" if include_lm_head else pattern


def image_token_id(model_or_config: Any) -> int | None:
    """The id of the image token: ``config.image_token_id`` (``image_token_index`` in llava/llava_next/mllama).

    For mllama this is the ``<|image|>`` marker (image features enter through cross-attention, not at it);
    for qwen2_5_vl ``<|image_pad|>``. ``None`` for ``causal_lm``.
    """
    config = _config_of(model_or_config)
    if family_of(config).images_via == "none":
        return None
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ValueError(f"{type(config).__name__} has neither image_token_id nor image_token_index")
    return int(token_id)


def image_token_mask(model_or_config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask, shaped like ``input_ids`` (``[batch, seq]``), True at image-token positions.

    For ``tokens`` families these are the positions whose embeddings the image features replace. For
    mllama they are the ``<|image|>`` markers only: the image features themselves are reached through the
    cross-attention layers (``spec.images_via == "cross_attention"``), not at these positions. All False for
    ``causal_lm``.
    """
    token_id = image_token_id(model_or_config)
    if token_id is None:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    return input_ids == token_id
