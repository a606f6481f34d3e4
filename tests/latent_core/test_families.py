"""Family registry on full-size configs (meta device) and tiny random models (CPU)."""

from __future__ import annotations

import re

import pytest
import torch
from latent_core.families import (
    FAMILIES,
    family_of,
    get_family,
    image_token_id,
    image_token_mask,
    lora_target_modules,
    model_parts,
)
from latent_core.testing import TINY_FAMILIES, tiny_model, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import AutoConfig, BertConfig, SiglipConfig

# ---------------------------------------------------------------------------------------------------------------
# Full-size configs, as in the checkpoints' config.json (unused keys kept where the real file has them).
# ---------------------------------------------------------------------------------------------------------------

QWEN2_5_VL_3B = {  # Qwen/Qwen2.5-VL-3B-Instruct: flat text fields, tied embeddings
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

LLAMA_3_2_11B_VISION = {  # meta-llama/Llama-3.2-11B-Vision(-Instruct), also Xkev/Llama-3.2V-11B-cot
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,
    "text_config": {
        "model_type": "mllama_text_model",
        "bos_token_id": 128000,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "dropout": 0,
        "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "pad_token_id": 128004,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "attention_heads": 16,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "intermediate_size": 5120,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "num_channels": 3,
        "num_global_layers": 8,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "vision_output_dim": 7680,
    },
}

LLAVA_V1_6_VICUNA_7B = {  # llava-hf/llava-v1.6-vicuna-7b-hf: text dims are the llama defaults (7B)
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

LLAVA_CLIP_L14_QWEN2_5_0_5B = {  # LaRe: CLIP ViT-L/14 (224 px) + MLP projector + Qwen2.5-0.5B
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 151646,
    "image_seq_length": 256,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "full",
    "vision_config": {  # openai/clip-vit-large-patch14
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "text_config": {  # Qwen/Qwen2.5-0.5B-Instruct
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}

LLAMA_3_1_8B = {  # meta-llama/Llama-3.1-8B(-Instruct)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}

# family -> (config.json, expected: tied lm_head, image token id, text hidden size, text layers, vocab)
FULL_SIZE = {
    "qwen2_5_vl": (QWEN2_5_VL_3B, dict(tied=True, image_token=151655, hidden=2048, layers=36, vocab=151936)),
    "mllama": (LLAMA_3_2_11B_VISION, dict(tied=False, image_token=128256, hidden=4096, layers=40, vocab=128256)),
    "llava_next": (LLAVA_V1_6_VICUNA_7B, dict(tied=False, image_token=32000, hidden=4096, layers=32, vocab=32064)),
    "llava": (LLAVA_CLIP_L14_QWEN2_5_0_5B, dict(tied=True, image_token=151646, hidden=896, layers=24, vocab=151936)),
    "causal_lm": (LLAMA_3_1_8B, dict(tied=False, image_token=None, hidden=4096, layers=32, vocab=128256)),
}

_LORA_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(config_json: dict) -> AutoConfig:
    kwargs = dict(config_json)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _build(family: str, config) -> nn.Module:
    spec = get_family(family)
    return spec.model_class.from_config(config) if family == "causal_lm" else spec.model_class(config)


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    """Full-size models on the meta device: real module tree and shapes, no memory."""
    models = {}
    with torch.device("meta"):
        for family, (config_json, _) in FULL_SIZE.items():
            models[family] = _build(family, _config(config_json))
    return models


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_model_parts_full_size(meta_models, family):
    model = meta_models[family]
    expected = FULL_SIZE[family][1]
    spec = FAMILIES[family]
    text_config = model.config.get_text_config()
    parts = model_parts(model)

    assert family_of(model) is spec and family_of(model.config) is spec and parts.family is spec
    if family != "causal_lm":  # AutoModelForCausalLM is a factory, not a base class
        assert isinstance(model, spec.model_class)
    assert len(parts.decoder_layers) == text_config.num_hidden_layers == expected["layers"]
    assert parts.decoder_layers is model.get_submodule(spec.decoder_layers_path)
    assert parts.decoder_layers is parts.language_model.layers
    assert parts.final_norm is parts.language_model.norm
    assert parts.final_norm.weight.shape == (expected["hidden"],)
    assert isinstance(parts.input_embeddings, nn.Embedding)
    assert parts.input_embeddings is parts.language_model.embed_tokens
    assert parts.input_embeddings.embedding_dim == expected["hidden"]
    assert parts.lm_head is model.lm_head
    assert parts.lm_head.weight.shape == (expected["vocab"], expected["hidden"])
    assert parts.lm_head_tied is expected["tied"]
    assert (parts.lm_head.weight is parts.input_embeddings.weight) is expected["tied"]
    assert image_token_id(model) == expected["image_token"]
    assert image_token_id(model.config) == expected["image_token"]

    if spec.vision_tower_path is None:
        assert parts.vision_tower is None
    else:
        assert parts.vision_tower is model.get_submodule(spec.vision_tower_path)
        language_params = {id(p) for p in parts.language_model.parameters()}
        assert not language_params & {id(p) for p in parts.vision_tower.parameters()}

    if family == "mllama":
        assert parts.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
        assert parts.cross_attention_layers == tuple(text_config.cross_attention_layers)
        # Mllama's embedding table has 8 extra rows (the <|image|> id == vocab_size is one of them).
        assert parts.input_embeddings.num_embeddings == text_config.vocab_size + 8
        assert image_token_id(model) < parts.input_embeddings.num_embeddings
    else:
        assert parts.cross_attention_layers == ()


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_lora_targets_match_only_language_model(meta_models, family):
    model = meta_models[family]
    spec = FAMILIES[family]
    parts = model_parts(model)
    n_layers = len(parts.decoder_layers)
    regex = lora_target_modules(model)
    assert regex == lora_target_modules(spec) == lora_target_modules(family)

    config = LoraConfig(r=16, lora_alpha=32, target_modules=regex)
    matched = {name for name, _ in model.named_modules() if check_target_module_exists(config, name)}
    language_linears = {
        f"{spec.decoder_layers_path}.{name}"
        for name, module in parts.decoder_layers.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in _LORA_LEAVES
    }
    # every layer has 4 attention (self or cross) + 3 MLP projections
    assert matched == language_linears
    assert len(matched) == 7 * n_layers
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in matched)
    assert not any(name.startswith(spec.vision_tower_path or "<none>") for name in matched)
    cross = {name for name in matched if ".cross_attn." in name}
    assert len(cross) == 4 * len(parts.cross_attention_layers)

    # The bare suffixes would also hit the vision tower in every VLM: that is why the regex is anchored.
    if spec.vision_tower_path is not None:
        by_suffix = LoraConfig(target_modules=list(spec.lora_targets))
        assert any(
            check_target_module_exists(by_suffix, f"{spec.vision_tower_path}.{name}")
            for name, _ in parts.vision_tower.named_modules()
        )

    with_head = LoraConfig(target_modules=lora_target_modules(model, include_lm_head=True))
    assert {name for name, _ in model.named_modules() if check_target_module_exists(with_head, name)} == matched | {
        "lm_head"
    }


def test_peft_wraps_only_language_layers_mllama_meta():
    """PEFT itself, on the full-size Llama-3.2-11B-Vision layout: 40 layers x 7 + 8 cross-attn layers."""
    with torch.device("meta"):
        model = _build("mllama", _config(LLAMA_3_2_11B_VISION))
        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_modules(model)))
    wrapped = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert len(wrapped) == 280
    assert all(re.match(r"base_model\.model\.model\.language_model\.layers\.\d+\.", name) for name in wrapped)
    assert sum(".cross_attn." in name for name in wrapped) == 32
    parts = model_parts(peft_model)
    assert parts.decoder_layers is peft_model.get_base_model().model.language_model.layers
    assert isinstance(parts.decoder_layers[3].cross_attn.q_proj, LoraLayer)
    assert parts.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models (CPU): image-token masks, forward semantics of the parts, PEFT wrapping.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nn.Module]:
    return {family: tiny_model(family)[0] for family in TINY_FAMILIES}


def _input_ids(model: nn.Module) -> tuple[torch.Tensor, list[list[bool]]]:
    """A hand-built batch with image tokens at known places (no processor involved)."""
    image = image_token_id(model) if family_of(model).images_via != "none" else None
    img = image if image is not None else 400
    ids = torch.tensor([[300, img, img, 301, 302], [img, 303, 304, 305, 306]])  # 300+: ordinary text tokens
    positions = [[False, True, True, False, False], [True, False, False, False, False]]
    return ids, positions


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_image_token_mask_tiny(tiny_models, family):
    model = tiny_models[family]
    input_ids, positions = _input_ids(model)
    mask = image_token_mask(model, input_ids)
    assert mask.dtype == torch.bool and mask.shape == input_ids.shape
    if family == "causal_lm":
        assert image_token_id(model) is None
        assert not mask.any()
    else:
        marker = {"mllama": "<|image|>", "qwen2_5_vl": "<|image_pad|>"}.get(family, "<image>")
        assert image_token_id(model) == tiny_tokenizer(family).convert_tokens_to_ids(marker)
        assert mask.tolist() == positions
        assert image_token_mask(model.config, input_ids).tolist() == positions
    expected_via = {"mllama": "cross_attention", "causal_lm": "none"}.get(family, "tokens")
    assert FAMILIES[family].images_via == expected_via


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_final_norm_feeds_lm_head_tiny(tiny_models, family):
    """The "hidden state" is the final norm's output: lm_head applied to it gives the logits."""
    model = tiny_models[family]
    parts = model_parts(model)
    captured = {}
    handle = parts.final_norm.register_forward_hook(lambda module, args, output: captured.update(h=output))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[1, 3, 4, 5]]))
    finally:
        handle.remove()
    assert captured["h"].shape == (1, 4, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(parts.lm_head(captured["h"]), out.logits)


# peft 0.21 warns that a tied lm_head is adapted without `ensure_weight_tying`; setting it makes PEFT turn the
# tied embedding into a LoRA Embedding, which then rejects `trainable_token_indices` (TypeError).
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_model_parts_through_peft_tiny(family):
    model, _ = tiny_model(family)
    before = model_parts(model)
    config = LoraConfig(
        r=2,
        target_modules=lora_target_modules(model, include_lm_head=True),
        trainable_token_indices=[5, 6],
    )
    peft_model = get_peft_model(model, config)
    after = model_parts(peft_model)
    assert after.family is before.family
    assert after.decoder_layers is before.decoder_layers
    assert after.final_norm is before.final_norm
    assert after.vision_tower is before.vision_tower
    assert after.lm_head_tied is before.lm_head_tied  # seen through LoRA / trainable-token wrappers
    assert isinstance(after.lm_head, LoraLayer)
    assert after.input_embeddings is peft_model.get_input_embeddings()
    assert lora_target_modules(peft_model) == lora_target_modules(model)
    wrapped = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert len(wrapped) == 7 * len(before.decoder_layers) + 1


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_get_family_unknown_lists_families():
    with pytest.raises(ValueError, match="unknown model family 'nope'") as info:
        get_family("nope")
    for name in FAMILIES:
        assert name in str(info.value)


def test_family_of_unsupported_vision_model():
    with pytest.raises(ValueError, match="'siglip'.*vision model") as info:
        family_of(SiglipConfig())
    for name in FAMILIES:
        assert name in str(info.value)


def test_family_of_encoder_model():
    with pytest.raises(ValueError, match="'bert'.*not a decoder-only") as info:
        family_of(BertConfig())
    assert "qwen2_5_vl" in str(info.value)


def test_family_of_other_causal_lm_falls_back():
    assert family_of(AutoConfig.for_model("mistral")).name == "causal_lm"
    assert family_of(AutoConfig.for_model("qwen2")).name == "causal_lm"


def test_family_of_rejects_non_models():
    with pytest.raises(TypeError, match="expected a transformers model or config"):
        family_of("llama")


def test_model_missing_a_module_says_which():
    from latent_core.attention import attention_bias
    from latent_core.capture import capture_hidden_states, select_tokens

    model, _ = tiny_model("causal_lm")
    del model.model.norm
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="cannot find the final norm of LlamaModel"):
        model_parts(model)
    with pytest.raises(ValueError, match="cannot find the final norm"):
        with attention_bias(model, mask, mask, -1.0):
            pass
    with pytest.raises(ValueError, match="cannot find the final norm"):
        with capture_hidden_states(model, select_tokens([5])):
            pass
