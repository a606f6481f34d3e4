"""A tiny model zoo: random models of the real transformers classes, with real processors, built offline.

No weights can be downloaded on our CI machines, so every test in the toolkit runs on these. Each family gets
a model of the *same class* as the paper's checkpoint (well under 2M parameters, a forward in milliseconds on
a CPU) and a processor of the family's real class: a byte-level BPE tokenizer trained here with `tokenizers`
on a fixed corpus, carrying the family's special tokens and a chat template shaped like the real one, plus
the family's image processor set for small images.

    >>> model, processor = tiny_model("qwen2_5_vl")
    >>> model.save_pretrained(d); processor.save_pretrained(d)   # loads back with AutoModel*/AutoProcessor
    >>> save_tiny_model("mllama", d)                             # the same, in one call: a checkpoint directory

Everything is deterministic: the same family and seed give the same weights and the same tokenizer.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

__all__ = ["TINY_FAMILIES", "exit_distributed", "save_tiny_model", "tiny_model", "tiny_tokenizer", "tiny_image"]

TINY_FAMILIES: tuple[str, ...] = ("mllama", "llava_next", "qwen2_5_vl", "llava", "causal_lm")

# Text dimensions shared by every tiny language model.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_VOCAB = 1024

# A fixed corpus: the words of chat templates, of the staged chain-of-thought answers (LLaVA-CoT tags), and of
# the synthetic shapes task, so that tokenized prompts stay short.
_CORPUS = """
system user assistant human gpt You are a helpful assistant. A chat between a curious human and an artificial
intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: ASSISTANT: Question: Answer: Options: Hint: Please answer with the letter of the correct option.
<SUMMARY> </SUMMARY> <CAPTION> </CAPTION> <REASONING> </REASONING> <CONCLUSION> </CONCLUSION>
I will count the shapes in the image and answer the question. The image shows a grid of coloured shapes.
There is a red circle at row 1 column 2. There is a blue square at row 2 column 1. There is a green triangle.
How many red circles are there? Is there a yellow star? What colour is the shape at row 3 column 3?
Are there more squares than circles? yes no zero one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 A B C D E (A) (B) (C) (D) the a an of in on at is are and or to with what which how many
red green blue yellow purple orange black white circle square triangle star shape shapes row column cell grid
left right top bottom above below count counts more fewer than same colour color image picture photo question
answer reasoning summary caption conclusion therefore so because first then finally step think explain.
According to question: can you explain the thinking progress? The latent thoughts refocus on the region.
row 1 column 1: empty. row 2 column 3: red circle, 1 0. So the count is 2, and the answer is yes. I will look at the
shape. So there are 3 yellow shapes and 2 blue shapes. 3 is more than 2. The answer yes is option B.
Target: any circle. Targets: red shape and blue shape.
"""


def _special_tokens(family: str) -> dict[str, Any]:
    """The family's special tokens: (bos, eos, pad, unk, extra), named as in the real checkpoints."""
    llama3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]
    qwen = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    table = {
        # Llama-3.2-11B-Vision / LLaVA-CoT: Llama-3 tokenizer, <|image|> marks the cross-attended image.
        "mllama": dict(
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
            unk=None,
            extra=["<|end_of_text|>", *llama3, "<|image|>"],
        ),
        # llava-v1.6-vicuna-7b: Llama/Vicuna tokenizer, <image> expanded to the image features.
        "llava_next": dict(bos="<s>", eos="</s>", pad="<unk>", unk="<unk>", extra=["<image>"]),
        # Qwen2.5-VL: <|image_pad|> tokens between <|vision_start|> and <|vision_end|>.
        "qwen2_5_vl": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, extra=["<|endoftext|>", *qwen]),
        # LaRe's LLaVA: Qwen2.5 tokenizer plus LLaVA's <image> token.
        "llava": dict(
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            unk=None,
            extra=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
        ),
        # Llama-3.1-8B-Instruct: the interpreters' default text LLM.
        "causal_lm": dict(
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|finetune_right_pad_id|>",
            unk=None,
            extra=["<|end_of_text|>", *llama3],
        ),
    }
    return table[family]


# Chat templates shaped like the real ones (structure and special tokens), simplified to what tests need.
# Messages are {"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}.
# Newlines are written as {{ '\\n' }} because transformers renders templates with trim_blocks.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>{{ '\\n\\n' }}" + _CONTENT + "<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>"
    "{{ '\\n' }}{% endif %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}" + _CONTENT + "<|im_end|>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)
_VICUNA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: " + _CONTENT + " "
    "{% else %}ASSISTANT: " + _CONTENT + "</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_IMAGE_MARK = {
    "mllama": "<|image|>",
    "llava_next": "<image>{{ '\\n' }}",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>{{ '\\n' }}",
    "causal_lm": "",
}
_TEMPLATE = {
    "mllama": _LLAMA3_TEMPLATE,
    "llava_next": _VICUNA_TEMPLATE,
    "qwen2_5_vl": _QWEN_TEMPLATE,
    "llava": _QWEN_TEMPLATE,
    "causal_lm": _LLAMA3_TEMPLATE,
}


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


@functools.cache
def _trained_bpe(family: str) -> str:
    """Train the byte-level BPE once per family; returns its JSON (a fresh Tokenizer is built from it per call)."""
    spec = _special_tokens(family)
    specials = [t for t in (spec["unk"], spec["bos"], spec["eos"], spec["pad"]) if t] + spec["extra"]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    if spec["bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A real fast tokenizer for ``family``: byte-level BPE (1024 tokens) with the family's special tokens and
    a chat template of the family's shape (Llama-3, Qwen2.5/ChatML or Vicuna)."""
    _check_family(family)
    spec = _special_tokens(family)
    named = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(family)),
        **{f"{k}_token": v for k, v in named.items()},
        chat_template=_TEMPLATE[family].replace("IMAGE", _IMAGE_MARK[family]),
        padding_side="left",
    )
    return tokenizer


def tiny_image(seed: int = 0, size: int = 56) -> Image.Image:
    """A small deterministic RGB test image: coloured shapes on a grey background."""
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    colours = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 210, 40)]
    for _ in range(3):
        x, y = (int(v) for v in torch.randint(0, size - size // 4, (2,), generator=g))
        c = colours[int(torch.randint(0, len(colours), (1,), generator=g))]
        draw.ellipse([x, y, x + size // 4, y + size // 4], fill=c)
    return img


def tiny_model(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerFast]:
    """Build ``(model, processor)`` for ``family`` (one of :data:`TINY_FAMILIES`).

    The model is a randomly initialised instance of the family's real transformers class (eval mode, fp32);
    the processor is the family's real processor class (a tokenizer alone for ``causal_lm``).
    """
    _check_family(family)
    tokenizer = tiny_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer)
    model.eval()
    return model, processor


def save_tiny_model(family: str, out: str | os.PathLike, seed: int = 0) -> Path:
    """:func:`tiny_model` saved like a real checkpoint (``save_pretrained`` of the model and the processor) in
    ``out``, which every loader and command line takes as ``--model``; returns ``Path(out)``."""
    model, processor = tiny_model(family, seed=seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def _text_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build_causal_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_TEXT, **_text_ids(tokenizer), max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config), tokenizer


def _build_qwen2_5_vl(tokenizer):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **_TEXT,
            **_text_ids(tokenizer),
            max_position_embeddings=1024,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, head_dim // 2 - 5]),
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            out_hidden_size=_TEXT["hidden_size"],
            fullatt_block_indexes=[1],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **pixels),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _build_mllama(tokenizer):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    config = MllamaConfig(
        text_config=dict(
            **{**_TEXT, "num_hidden_layers": 3},
            **_text_ids(tokenizer),
            cross_attention_layers=[1],
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        # 28 px tiles of 14 px patches, up to 4 tiles (the real aspect-ratio set), one intermediate layer.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[0],
            vision_output_dim=64,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    model = MllamaForConditionalGeneration(config)
    # Mllama initialises its tanh gates at zero (vision tiles and cross-attention), which would leave a random model
    # blind to the image; a trained checkpoint has them open. Open them so that the image reaches the text.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate") or name.endswith("_gate"):
                param.fill_(1.0)
    return model, processor


def _clip_vision(image_size: int, patch_size: int) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _build_llava_next(tokenizer):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    # AnyRes on 28 px tiles: a 28 px base view plus up to 2x2 tiles, each 2x2 patches of 14 px.
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = LlavaNextConfig(
        text_config=dict(
            model_type="llama", **_TEXT, **_text_ids(tokenizer), max_position_embeddings=512, tie_word_embeddings=False
        ),
        vision_config=_clip_vision(image_size=28, patch_size=14),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=4,
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _build_llava(tokenizer):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    # LaRe's layout: CLIP ViT (here 64 px, 4 px patches) gives a 16x16 grid = 256 visual tokens, as ViT-L/14 at
    # 224 px does; an MLP projector; a Qwen2 language model with tied embeddings (as Qwen2.5-0.5B).
    config = LlavaConfig(
        text_config=dict(
            model_type="qwen2", **_TEXT, **_text_ids(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True
        ),
        vision_config=_clip_vision(image_size=64, patch_size=4),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=256,
        tie_word_embeddings=True,
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return LlavaForConditionalGeneration(config), processor


_BUILDERS = {
    "llava_next": _build_llava_next,
    "llava": _build_llava,
    "mllama": _build_mllama,
    "causal_lm": _build_causal_lm,
    "qwen2_5_vl": _build_qwen2_5_vl,
}


def exit_distributed(code: int = 0) -> None:
    """End a multi-process test worker (``torch.distributed.run``) once its results are written: a barrier, the
    process group destroyed, then ``os._exit`` without the interpreter's teardown, where gloo's threads
    intermittently abort a finished worker ("terminate called without an active exception", exit -6) and fail a
    run whose results are complete. The tests check those results, not the teardown."""
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
