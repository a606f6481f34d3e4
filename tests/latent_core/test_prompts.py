"""The one prompt builder: user texts, options written and read back, chat turns, and batched encoding that
matches encoding each chat alone."""

from __future__ import annotations

import pytest
import torch
from latent_core.prompts import (
    MC_INSTRUCTION,
    SHORT_INSTRUCTION,
    chat_messages,
    encode_chats,
    parse_options,
    question_text,
    render_prompts,
)
from latent_core.testing import tiny_image, tiny_model


def test_question_text_open_and_multiple_choice():
    assert question_text("How many circles are there?") == "How many circles are there?"
    assert question_text("Is it red?", instruction=SHORT_INSTRUCTION) == f"Is it red?\n{SHORT_INSTRUCTION}"
    text = question_text("What colour?", ["red", "blue"], hint="Look closely.", instruction=SHORT_INSTRUCTION)
    # Written out by hand: the hint, the question, the options after "Options:", the MC instruction (not the short one).
    assert text == f"Look closely.\nWhat colour?\nOptions:\nA. red\nB. blue\n{MC_INSTRUCTION}"
    assert question_text("What colour?", {"A": "red", "B": "blue"}, hint="Look closely.") == text


@pytest.mark.parametrize(
    "options", [{"A": "red", "B": "blue"}, {"A": "1", "B": "2", "C": "3", "D": "4"}, {"A": "a dog. b", "B": "x"}]
)
def test_parse_options_reads_back_what_question_text_wrote(options):
    assert parse_options(question_text("Which one?", options)) == options


def test_parse_options_of_text_without_options():
    assert parse_options("How many circles are there?") == {}
    assert parse_options("A. not after an Options line") == {}


def test_chat_messages_shape():
    assert chat_messages("hi", 2, "yes") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "yes"},
    ]
    assert chat_messages("hi", 0) == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat_messages("hi", 1, text_only=True) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("family", ["mllama", "qwen2_5_vl"])
def test_encode_chats_batch_equals_each_alone(family):
    """Left-padded batch rows hold exactly the ids of each chat encoded alone (mllama's nested image lists too)."""
    _, processor = tiny_model(family)
    texts = ["How many circles are there?", question_text("What colour is the shape?", ["red", "blue", "green"])]
    chats = render_prompts(processor, texts, [1, 1])
    images = [[tiny_image(0)], [tiny_image(1)]]
    batch = encode_chats(processor, chats, images, padding_side="left")
    for i, chat in enumerate(chats):
        alone = encode_chats(processor, [chat], [images[i]])
        n = int(alone["attention_mask"].sum())
        assert torch.equal(batch["input_ids"][i, -n:], alone["input_ids"][0])
        assert int(batch["attention_mask"][i].sum()) == n
    with pytest.raises(ValueError, match="mixes"):
        encode_chats(processor, chats, [images[0], []])
