"""The tiny model zoo: real classes, real processors, small, and a lossless save/load round trip."""

from __future__ import annotations

import pytest
import torch
from latent_core.testing import TINY_FAMILIES, tiny_image, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

EXPECTED_CLASSES = {
    "mllama": ("MllamaForConditionalGeneration", "MllamaProcessor"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "causal_lm": ("LlamaForCausalLM", "TokenizersBackend"),
}
# Special tokens each family's real tokenizer carries, which must stay single tokens.
FAMILY_TOKENS = {
    "mllama": ["<|begin_of_text|>", "<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "llava_next": ["<s>", "</s>", "<image>"],
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"],
    "llava": ["<|im_start|>", "<|im_end|>", "<image>"],
    "causal_lm": ["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"],
}
QUESTION = "How many red circles are there?"


def _inputs(processor, family: str):
    if family == "causal_lm":
        text = processor.apply_chat_template(
            [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
        )
        return text, processor([text], return_tensors="pt", add_special_tokens=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, processor(images=[tiny_image()], text=[text], return_tensors="pt", add_special_tokens=False)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_real_classes_and_size(family):
    model, processor = tiny_model(family)
    assert (type(model).__name__, type(processor).__name__) == EXPECTED_CLASSES[family]
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert not model.training


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tokenizer_has_family_tokens_and_template(family):
    tokenizer = tiny_tokenizer(family)
    for token in FAMILY_TOKENS[family]:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token, token
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    assert QUESTION in text
    assert tokenizer.decode(tokenizer.encode(QUESTION, add_special_tokens=False)) == QUESTION
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_chat_templates_match_the_real_shapes():
    """Hand-written expectations of the real formats (Llama-3, ChatML, Vicuna) with the image marker."""
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    render = {
        f: tiny_tokenizer(f).apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        for f in ("mllama", "qwen2_5_vl", "llava_next", "llava")
    }
    assert render["mllama"] == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Q?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render["qwen2_5_vl"] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render["llava_next"] == "USER: <image>\nQ? ASSISTANT:"
    assert render["llava"].endswith("<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n")


def test_deterministic_for_a_seed():
    a, _ = tiny_model("qwen2_5_vl", seed=3)
    b, _ = tiny_model("qwen2_5_vl", seed=3)
    c, _ = tiny_model("qwen2_5_vl", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_load_round_trip_gives_identical_logits(family, tmp_path):
    model, processor = tiny_model(family)
    text, inputs = _inputs(processor, family)
    if family != "causal_lm":
        # The image really reaches the model: image tokens expanded (or the mllama cross-attention mask present).
        assert "pixel_values" in inputs
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    auto_model = AutoModelForCausalLM if family == "causal_lm" else AutoModelForImageTextToText
    auto_processor = AutoTokenizer if family == "causal_lm" else AutoProcessor
    loaded = auto_model.from_pretrained(tmp_path).eval()
    loaded_processor = auto_processor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    _, loaded_inputs = _inputs(loaded_processor, family)
    assert loaded_inputs.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(loaded_inputs[key], inputs[key]), key
    with torch.no_grad():
        got = loaded(**loaded_inputs).logits
    assert torch.equal(got, expected)
    # Greedy generation agrees as well, and produces new tokens.
    with torch.no_grad():
        g1 = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        g2 = loaded.generate(**loaded_inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert torch.equal(g1, g2) and g1.shape[1] == inputs["input_ids"].shape[1] + 4


def test_image_changes_the_output():
    """The vision path is wired: a different image gives different logits (every VLM family)."""
    for family in ("mllama", "llava_next", "qwen2_5_vl", "llava"):
        model, processor = tiny_model(family)
        _, inputs = _inputs(processor, family)
        with torch.no_grad():
            a = model(**inputs).logits
            inputs["pixel_values"] = torch.randn_like(inputs["pixel_values"])
            b = model(**inputs).logits
        assert not torch.allclose(a[:, -1], b[:, -1]), family


def test_unknown_family():
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        tiny_model("gpt5")
