"""LaViT's teacher signals: the fused pass against a naive teacher-forced eager pass, Eq. 2-3 by hand, and the bbox
on the merged patch grid against hand computations of the Qwen2.5-VL processor's resize."""

from __future__ import annotations

import copy

import pytest
import torch
from latent_core.families import image_token_mask, model_parts
from latent_core.prompts import encode_chats, render_prompts
from latent_core.testing import tiny_image, tiny_model
from lavit.teacher import (
    TeacherOptions,
    bbox_cell_weights,
    layer_indices,
    merged_grid,
    resized_size,
    teacher_pass,
    trajectory_target,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["How many red circles are there?", "Is there a small yellow star in the picture?"]


def _naive(model, processor, image, question, answer_ids, options):
    """One sample alone, teacher-forced on prompt + the answer tokens that were fed, eager attention with
    output_attentions: S_j over the chosen layers, heads and queries; V_sem from a plain prompt forward."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    inputs = dict(encode_chats(processor, render_prompts(processor, [question], [1]), [[image]]))
    ids = inputs["input_ids"]
    prompt_len = ids.shape[1]
    image_pos = image_token_mask(model, ids)[0].nonzero().flatten()
    answer = torch.tensor([answer_ids])
    forced = dict(inputs)
    forced["input_ids"] = torch.cat([ids, answer], 1)
    forced["attention_mask"] = torch.ones_like(forced["input_ids"])
    forced["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    with torch.no_grad():
        attentions = eager(**forced, output_attentions=True).attentions
    layers = layer_indices(options.layers, len(attentions))
    first = prompt_len if options.queries == "answer" else int(image_pos[-1]) + 1
    rows = torch.stack([attentions[i][0] for i in layers])[:, :, first:, :]  # [layers, heads, queries, S]
    scores = rows[..., image_pos].mean((0, 1, 2))
    captured = {}
    last = model_parts(model).decoder_layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: captured.setdefault("pre", out))
    with torch.no_grad():
        post = model.model(**inputs).last_hidden_state[0, image_pos]
    handle.remove()
    pre = captured["pre"][0][0, image_pos] if isinstance(captured["pre"], tuple) else captured["pre"][0, image_pos]
    return scores, (post if options.vsem_norm == "post" else pre)


@pytest.mark.parametrize(
    ("queries", "layers", "norm"),
    [("answer", "all", "post"), ("after-image", "last:1", "pre"), ("answer", "last:1", "pre")],
)
def test_fused_pass_equals_a_naive_teacher_forced_eager_pass(queries, layers, norm):
    model, processor = tiny_model("qwen2_5_vl")
    model.eval()
    options = TeacherOptions(queries=queries, layers=layers, vsem_norm=norm, max_new_tokens=5)
    images = [tiny_image(0), tiny_image(1, size=84)]
    got = teacher_pass(model, processor, images, QUESTIONS, options)
    assert len(got) == 2
    for b, out in enumerate(got):
        fed = out.answer_ids[: len(out.answer_ids) - (1 if out.truncated else 0)]
        scores, v_sem = _naive(model, processor, images[b], QUESTIONS[b], fed, options)
        assert out.scores.shape == scores.shape and out.grid[0] * out.grid[1] * out.grid[2] == scores.numel()
        torch.testing.assert_close(out.scores, scores, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.v_sem, v_sem, atol=1e-5, rtol=0)


def test_presets_and_option_errors():
    assert TeacherOptions.preset("authors") == TeacherOptions(queries="after-image", layers="last:8", vsem_norm="pre")
    assert TeacherOptions.preset("paper", top_k=4).top_k == 4
    assert layer_indices("last:8", 36) == tuple(range(28, 36)) and layer_indices("last:8", 3) == (0, 1, 2)
    for bad in (dict(queries="all"), dict(layers="first:2"), dict(vsem_norm="mid"), dict(top_k=0)):
        with pytest.raises(ValueError):
            TeacherOptions(**bad)
    with pytest.raises(ValueError, match="unknown preset"):
        TeacherOptions.preset("mine")


def test_trajectory_target_by_hand():
    out = trajectory_target(torch.tensor([0.1, 0.5, 0.3, 0.1, 0.9]), top_k=2)
    torch.testing.assert_close(out["dense"], torch.tensor([0.0, 0.5, 0.25, 0.0, 1.0]))
    assert out["indices"].tolist() == [4, 1]
    torch.testing.assert_close(out["values"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out["target"], torch.tensor([0.0, 1 / 3, 0.0, 0.0, 2 / 3]))
    flat = trajectory_target(torch.ones(4), top_k=2)
    assert float(flat["target"].sum()) == pytest.approx(1.0) and flat["dense"].abs().sum() == 0


# (w, h), min_pixels, max_pixels -> the processor's resized (w, h), computed by hand from Qwen2-VL's smart_resize:
# round to multiples of 28, or scale by beta = sqrt(area ratio) then floor (too big) / ceil (too small).
RESIZES = [
    ((100, 60), 3136, 1_003_520, (112, 56)),  # not multiples of 28: 100/28 = 3.6 -> 4, 60/28 = 2.1 -> 2
    ((1200, 900), 3136, 200_704, (504, 364)),  # clamped by max: beta 2.3197; 517.3/28 -> 18, 388.0/28 -> 13
    ((30, 40), 200_704, 1_003_520, (392, 532)),  # clamped by min: beta 12.933; 388.0/28 -> 14, 517.3/28 -> 19
    ((56, 56), 3136, 1_003_520, (56, 56)),
]


@pytest.mark.parametrize(("size", "low", "high", "expected"), RESIZES)
def test_resize_by_hand(size, low, high, expected):
    assert resized_size(size, low, high) == expected


def test_bbox_on_the_merged_grid_by_hand():
    # A 100 x 60 image resized to 112 x 56: a 2 x 4 merged grid of 28 px cells; x scales by 1.12, y by 56/60.
    weights = bbox_cell_weights([0, 0, 50, 30], (100, 60), (112, 56), (2, 4)).reshape(2, 4)
    # x: 0..56 covers cells 0 and 1 fully; y: 0..28 covers row 0 fully.
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # x0 = 25 -> 28 (cell 1 starts); x1 = 75 -> 84 (cell 2 ends); y 15..45 -> 14..42: half of row 0, half of row 1.
    weights = bbox_cell_weights([25, 15, 75, 45], (100, 60), (112, 56), (2, 4)).reshape(2, 4)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]]))
    # The processor's grid agrees with resized_size / 28 on the tiny Qwen2.5-VL.
    _, processor = tiny_model("qwen2_5_vl")
    image = tiny_image(0, size=84)
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    size = processor.image_processor.size
    w, h = resized_size(image.size, size["shortest_edge"], size["longest_edge"])
    assert merged_grid(grid) == (1, h // 28, w // 28)
