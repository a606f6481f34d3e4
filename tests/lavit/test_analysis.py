"""LaViT's attention statistics and latent diagnostics against hand computations, and the zeroed / shuffled latents
of the decoding loop."""

from __future__ import annotations

import math

import pytest
import torch
from latent_core.testing import tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from lavit.analysis import attention_stats, change_rate, map_kl, mean_pairwise_cosine
from lavit.config import latent_tokens
from lavit.generate import generate_answers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attention_stats_by_hand():
    stats = attention_stats(torch.tensor([2.0, 1.0, 1.0, 0.0]))  # renormalised: 0.5, 0.25, 0.25, 0
    assert stats["entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert stats["salient"] == 1  # only 0.5 > 1.5 x 0.25
    std = math.sqrt(((0.5 - 0.25) ** 2 + 0 + 0 + 0.25**2) / 4)
    assert stats["cv"] == pytest.approx(std / 0.25)
    flat = attention_stats(torch.ones(8))
    assert flat["entropy"] == pytest.approx(math.log(8)) and flat["salient"] == 0 and flat["cv"] == 0


def test_kl_cosine_and_change_rate_by_hand():
    assert map_kl(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])) == pytest.approx(
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    )
    assert map_kl(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(0.0)
    same = torch.ones(3, 2, 4)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    opposite = torch.stack([torch.ones(2, 4), -torch.ones(2, 4)])
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0)
    assert change_rate(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    with pytest.raises(ValueError):
        change_rate(["a"], [])


def test_zeroed_and_shuffled_latents_feed_what_they_say():
    model, processor = tiny_model("qwen2_5_vl")
    ids = add_special_tokens(model, processor, latent_tokens(3))
    model.eval()
    images = [tiny_image(i, size=84) for i in range(3)]
    questions = ["How many red circles are there?", "Is there a star?", "What colour is the square?"]

    def run(kind):
        return generate_answers(model, processor, images, questions, ids, max_new_tokens=3, latents=kind)

    real, zero, shuffled = run("real"), run("zero"), run("shuffle")
    assert real.latents.shape[:2] == (3, 2) and real.latents.abs().sum() > 0
    assert zero.latents.abs().sum() == 0
    # The first continuous latent is the hidden state of <v-trace_1>, the same in both runs: shuffled, it is another
    # sample's, and no sample keeps its own.
    order = [int((real.latents[:, 0] - row).abs().sum(-1).argmin()) for row in shuffled.latents[:, 0]]
    torch.testing.assert_close(shuffled.latents[:, 0], real.latents[order, 0])
    assert sorted(order) == [0, 1, 2] and all(o != i for i, o in enumerate(order))
    with pytest.raises(ValueError, match="continuous mode"):
        generate_answers(model, processor, images, questions, ids, mode="discrete", latents="zero")


def _eager_response_rows(model, processor, image, question, latent_ids, latents, answer_ids):
    """One sample alone (no padding), prompt + latent block + answer in one eager forward with output_attentions;
    the continuous latent positions take the fed latents as input embeddings. Returns the attention of every
    position from the last prompt one on over the image keys, mean over heads and layers ([rows, n_image]), and the
    prompt length."""
    import copy

    from latent_core.families import image_token_mask, model_parts
    from latent_core.prompts import encode_chats, render_prompts

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    parts = model_parts(eager)
    prompt = dict(encode_chats(processor, render_prompts(processor, [question], [1]), [[image]]))
    ids = torch.cat([prompt["input_ids"][0], torch.tensor(list(latent_ids) + list(answer_ids), dtype=torch.long)])
    extra = len(ids) - prompt["input_ids"].shape[1]
    full = {
        "input_ids": ids[None],
        "attention_mask": torch.ones_like(ids)[None],
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"][0], torch.zeros(extra, dtype=torch.long)])[None],
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
    }
    captured: dict = {}
    hook = parts.language_model.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        eager(**full)
    hook.remove()
    embeds = captured["inputs_embeds"].clone()
    start = prompt["input_ids"].shape[1]
    if latents is not None:
        embeds[0, start + 1 : start + len(latent_ids)] = latents
    with torch.no_grad():
        out = parts.language_model(
            inputs_embeds=embeds, position_ids=captured["position_ids"], output_attentions=True, use_cache=False
        )
    att = torch.stack(out.attentions)[:, 0].mean((0, 1))  # [S, S]
    return att[start - 1 :][:, image_token_mask(eager, full["input_ids"])[0]], start


@pytest.mark.parametrize("kind", ["plain", "continuous", "discrete"])
def test_response_maps_equal_eager_attention_from_the_response_queries(kind):
    """Each map equals a hand computation from eager attention over the model's own greedy response, sample by
    sample (the batch is left padded: the questions differ in length)."""
    from lavit.analysis import response_maps

    model, processor = tiny_model("qwen2_5_vl", seed=4)
    k = 3
    latent_ids = None if kind == "plain" else add_special_tokens(model, processor, latent_tokens(k))
    mode = "continuous" if kind == "plain" else kind
    images = [tiny_image(0, size=84), tiny_image(1, size=84)]
    questions = ["How many red circles are there?", "Is there a star?"]
    maps = response_maps(model, processor, images, questions, latent_ids, mode, max_new_tokens=4)
    fed = None
    if kind == "continuous":
        fed = generate_answers(model, processor, images, questions, latent_ids, mode, max_new_tokens=4).latents
    for b, got in enumerate(maps):
        assert 1 <= len(got.answer_ids) <= 4
        block = list(latent_ids or [])
        rows, _ = _eager_response_rows(
            model, processor, images[b], questions[b], block, None if fed is None else fed[b], got.answer_ids
        )
        if kind == "plain":  # the last prompt position and every answer token fed
            torch.testing.assert_close(got.response_map, rows.mean(0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.answer_map, rows.mean(0), atol=1e-5, rtol=1e-4)
            assert got.latent_map is None
        else:  # rows[0] is the last prompt position: not a response query of a student
            response = rows[1:]
            torch.testing.assert_close(got.response_map, response.mean(0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.latent_map, response[:k].mean(0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.answer_map, response[k - 1 :].mean(0), atol=1e-5, rtol=1e-4)
        assert got.grid[0] * got.grid[1] == got.response_map.numel() == rows.shape[1]


def test_analyze_models_summary_kl_and_diagnostics(tmp_path):
    """The summary is the mean of the per-sample rows; each row's KL is KL(teacher's response map || the model's),
    recomputed here from response_maps; the student's diagnostics are the accuracies and change rates of
    generate_answers with zeroed / shuffled / masked latents; the overlays are written."""
    import json

    from lavit.analysis import analyze_models, response_maps
    from lavit.filters import answers_match
    from lavit.teacher import trajectory_target

    teacher, t_proc = tiny_model("qwen2_5_vl", seed=5)
    student, s_proc = tiny_model("qwen2_5_vl", seed=6)
    ids = add_special_tokens(student, s_proc, latent_tokens(3))
    loaded = {"teacher": (teacher, t_proc, None, "plain", None), "student": (student, s_proc, ids, "continuous", None)}
    samples = [
        {"id": str(i), "image": tiny_image(i, size=84), "text": f"Is there a star {i}?", "answer": "yes"}
        for i in range(3)
    ]
    summary = analyze_models(
        {"teacher": "teacher", "student": "student"}, samples, tmp_path, teacher="teacher", batch_size=2,
        max_new_tokens=2, overlays=2, loader=lambda path: loaded[path],
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["model"], r["id"]) for r in rows] == [(m, str(i)) for m in ("teacher", "student") for i in range(3)]
    images, texts = [s["image"] for s in samples], [s["text"] for s in samples]
    ref_t = response_maps(teacher, t_proc, images, texts, max_new_tokens=2)
    ref_s = response_maps(student, s_proc, images, texts, ids, max_new_tokens=2)
    student_rows = [r for r in rows if r["model"] == "student"]
    for row, t, s in zip(student_rows, ref_t, ref_s, strict=True):
        assert row["kl_to_teacher"] == pytest.approx(map_kl(t.response_map, s.response_map), rel=1e-5)
        assert row["kl_to_teacher_latent"] == pytest.approx(map_kl(t.response_map, s.latent_map), rel=1e-5)
        target = trajectory_target(t.response_map)["target"]
        assert row["kl_to_traj_target_latent"] == pytest.approx(map_kl(target, s.latent_map), rel=1e-4)
    entry = summary["models"]["student"]
    assert entry["kl_to_teacher"] == pytest.approx(sum(r["kl_to_teacher"] for r in student_rows) / 3)
    assert summary["models"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    real = [s.answer for s in ref_s]
    for kind, kwargs in (("zero", {"latents": "zero"}), ("masked", {"mask_latents": True})):
        other = []
        for start in (0, 2):  # the same batches as the analysis
            chunk = slice(start, start + 2)
            got = generate_answers(student, s_proc, images[chunk], texts[chunk], ids, "continuous", 2, **kwargs)
            other += got.texts
        assert entry["diagnostics"][kind]["change_rate"] == pytest.approx(change_rate(real, other))
        assert entry["diagnostics"][kind]["accuracy"] == pytest.approx(sum(answers_match(a, "yes") for a in other) / 3)
    assert -1.0 <= entry["diagnostics"]["mean_pairwise_cosine"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["000.png", "001.png"]
