"""LaRe's decoding against the naive definition (Section 3.1; issue 15): at every iteration recompute the whole
prefix ``[V, X_q, <bot>, z_1..z_{t-1}]`` with eager attention, read the last position's attention over the image
tokens and every layer's hidden state, search the window by brute force, run the extractor; then recompute the
whole sequence for every answer token. The cached, batched, left-padded loop must give the same latents, windows,
final logits and answers; a batch whose samples halt at different steps must equal each sample run alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lare import generate_answers
from latent_core.testing import tiny_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is it?", "How many red circles are in the picture? Count them all."]


def _images(n: int):
    return [tiny_image(i, 64) for i in range(n)]


def _brute_window(saliency: torch.Tensor, window: int) -> list[int]:
    side = saliency.shape[-1]
    best, where = None, None
    for r in range(side - window + 1):
        for c in range(side - window + 1):
            total = float(saliency[r : r + window, c : c + window].sum())
            if best is None or total > best:
                best, where = total, (r, c)
    r0, c0 = where
    return [r * side + c for r in range(r0, r0 + window) for c in range(c0, c0 + window)]


@torch.no_grad()
def _naive(model, processor, image, question, num_latents, max_new_tokens):
    """One sample, no cache, eager attention, everything recomputed (the definition)."""
    from lare.generate import encode_questions

    vlm = copy.deepcopy(model.vlm)
    vlm.set_attn_implementation("eager")
    inputs = encode_questions(processor, [image], [question])
    ids = inputs["input_ids"][0]
    image_positions = (ids == vlm.config.image_token_index).nonzero().flatten()
    features = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    embed = vlm.get_input_embeddings()
    prompt = embed(ids).clone()
    prompt[image_positions] = features
    seq = torch.cat([prompt, embed(torch.tensor([model.bot_id]))])
    window = model.config.window_for(model.grid())
    extractor = model.extractor
    states, latents, windows = [], [], []
    for _ in range(num_latents):
        out = vlm.model.language_model(inputs_embeds=seq[None], output_attentions=True, output_hidden_states=True)
        row = torch.stack(out.attentions).mean((0, 2))[0, -1]  # mean over layers and heads, last position
        saliency = row[image_positions].reshape(model.grid(), model.grid())
        cells = _brute_window(saliency, window)
        hidden_states = [h[:, -1] for h in out.hidden_states]
        states.append(extractor.query(hidden_states, out.last_hidden_state[:, -1]))
        z = extractor(torch.stack(states, 1), features[cells][None])[0]
        latents.append(z)
        windows.append(cells)
        seq = torch.cat([seq, z[None]])
    seq = torch.cat([seq, embed(torch.tensor([model.eot_id]))])
    logits, answer = [], []
    for _ in range(max_new_tokens):
        out = vlm(inputs_embeds=seq[None])
        logits.append(out.logits[0, -1])
        token = int(out.logits[0, -1].argmax())
        answer.append(token)
        if token == processor.tokenizer.eos_token_id:
            break
        seq = torch.cat([seq, embed(torch.tensor([token]))])
    return torch.stack(latents) if latents else None, windows, torch.stack(logits), answer


def test_cached_batched_loop_equals_the_naive_recompute(tiny_lare):
    model, processor = tiny_lare
    images = _images(2)
    got = generate_answers(
        model, processor, images, QUESTIONS, max_new_tokens=4, output_logits=True, return_dict_in_generate=True
    )
    assert got.latent_steps == [4, 4] and got.latents.shape == (2, 4, 48)
    from lare.generate import encode_questions

    assert int((encode_questions(processor, images, QUESTIONS)["attention_mask"] == 0).sum()) > 0  # left padded
    logits = torch.stack(got.generate_output.logits, 1)  # [B, steps, V]
    for b in range(2):
        latents, windows, naive_logits, answer = _naive(model, processor, images[b], QUESTIONS[b], 4, 4)
        torch.testing.assert_close(got.latents[b], latents, atol=1e-5, rtol=0, msg=f"latents of sample {b}")
        assert [w[b].tolist() for w in got.windows] == windows
        n = len(answer)
        torch.testing.assert_close(logits[b, :n], naive_logits, atol=1e-4, rtol=0, msg=f"logits of sample {b}")
        assert got.sequences[b] == [t for t in answer if t != processor.tokenizer.eos_token_id]
    # the windows move between iterations and differ between samples (refocusing, not a fixed crop)
    corners = torch.stack([w[:, 0] for w in got.windows], 1)  # [B, T] top-left token of each window
    assert len(set(corners[0].tolist())) > 1 and not torch.equal(corners[0], corners[1])


def _cos_distances(latents: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]``: 1 - cos(z_t, z_{t-1}) for t = 2..T."""
    return 1 - F.cosine_similarity(latents[:, 1:], latents[:, :-1], dim=-1)


def test_halting_per_sample_equals_each_sample_alone(tiny_lare):
    model, processor = tiny_lare
    questions = [*QUESTIONS, "Is there a blue shape?", "Which colour is the largest shape?"]
    images = _images(4)
    full = generate_answers(model, processor, images, questions, max_new_tokens=3)
    distances = _cos_distances(full.latents)[:, :2]  # halting is checked after z_2 and z_3 (T = 4)

    def steps_for(threshold: float) -> list[int]:
        steps = []
        for row in distances.tolist():
            steps.append(next((t + 2 for t, d in enumerate(row) if d < threshold), 4))
        return steps

    values = sorted(distances.flatten().tolist())
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False) if b - a > 1e-4]
    threshold = next((c for c in candidates if len(set(steps_for(c))) >= 2), None)
    assert threshold is not None, f"no threshold separates the samples: {distances}"
    expected = steps_for(threshold)

    batched = generate_answers(model, processor, images, questions, max_new_tokens=3, halt="cos", threshold=threshold)
    assert batched.latent_steps == expected
    for b in range(4):
        alone = generate_answers(
            model, processor, images[b : b + 1], questions[b : b + 1], max_new_tokens=3, halt="cos",
            threshold=threshold,
        )  # fmt: skip
        steps = expected[b]
        assert alone.latent_steps == [steps]
        torch.testing.assert_close(batched.latents[b, :steps], alone.latents[0, :steps], atol=1e-5, rtol=0)
        assert bool((batched.latents[b, steps:] == 0).all())
        assert batched.sequences[b] == alone.sequences[0], b
        # ... and it equals a run with T = its own step count and no halting
        fixed = generate_answers(model, processor, images[b : b + 1], questions[b : b + 1], 3, num_latents=steps)
        torch.testing.assert_close(fixed.latents[0], alone.latents[0, :steps], atol=1e-5, rtol=0)
        assert fixed.sequences[0] == alone.sequences[0]


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_other_halting_metrics_stop_everyone_with_a_huge_threshold(tiny_lare, metric):
    model, processor = tiny_lare
    got = generate_answers(model, processor, _images(2), QUESTIONS, 2, halt=metric, threshold=1e9)
    assert got.latent_steps == [2, 2]


def test_zeroed_and_shuffled_latent_controls(tiny_lare):
    model, processor = tiny_lare
    images = _images(3)
    questions = [*QUESTIONS, "Is there a blue shape?"]
    real = generate_answers(model, processor, images, questions, 3)
    zero = generate_answers(model, processor, images, questions, 3, latents="zero")
    assert bool((zero.latents == 0).all())
    shuffled = generate_answers(model, processor, images, questions, 3, latents="shuffle")
    # the first latent is computed from the same prefix: shuffling feeds another sample's z_1
    from latent_core.diagnostics import _shuffle_order

    order = _shuffle_order(3)
    torch.testing.assert_close(shuffled.latents[:, 0], real.latents[order, 0], atol=1e-5, rtol=0)


def test_one_step_object_serves_several_runs(tiny_lare):
    # A RefocusStep keeps the latent-state sequence of its run; a second run starts afresh (not on the first's).
    from latent_core.latents import generate_with_latents

    model, processor = tiny_lare
    from lare.generate import encode_questions

    inputs = encode_questions(processor, _images(2), QUESTIONS)
    step = model.step()

    def run(step_fn):
        return generate_with_latents(
            model.vlm, inputs, 3, step_fn=step_fn, max_new_tokens=1, do_sample=False,
            **step_fn.loop_kwargs(inputs["input_ids"]),
        ).latents  # fmt: skip

    first, second, fresh = run(step), run(step), run(model.step())
    assert len(step.states) == 3 and len(step.windows) == 3
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh, first, atol=1e-6, rtol=0)


def test_halt_none_switches_a_checkpoints_halting_off(tiny_lare):
    import dataclasses

    model, processor = tiny_lare
    halting = copy.copy(model)
    halting.config = dataclasses.replace(model.config, halt="l2", threshold=1e9)
    assert generate_answers(halting, processor, _images(2), QUESTIONS, 2).latent_steps == [2, 2]
    assert generate_answers(halting, processor, _images(2), QUESTIONS, 2, halt="none").latent_steps == [4, 4]


def test_table3_ablations_in_the_loop(tiny_lare):
    # w/o Extractor: z_t is the hidden state itself, i.e. latent-core's Coconut loop between <bot> and <eot>;
    # w/o Sliding Window: V_local is every image token, which is what a window as large as the grid gives.
    import dataclasses

    from lare.generate import encode_questions
    from latent_core.latents import generate_with_latents

    model, processor = tiny_lare
    images = _images(2)
    inputs = encode_questions(processor, images, QUESTIONS)

    no_extractor = copy.copy(model)
    no_extractor.config = dataclasses.replace(model.config, extractor=False)
    got = generate_answers(no_extractor, processor, images, QUESTIONS, 3)
    want = generate_with_latents(model.vlm, inputs, 4, start_ids=[model.bot_id], end_ids=[model.eot_id],
                                 max_new_tokens=3, do_sample=False)  # fmt: skip
    torch.testing.assert_close(got.latents, want.latents, atol=1e-6, rtol=0)
    assert got.windows == []

    no_window = copy.copy(model)
    no_window.config = dataclasses.replace(model.config, sliding_window=False)
    whole = copy.copy(model)
    whole.config = dataclasses.replace(model.config, window=16)
    a = generate_answers(no_window, processor, images, QUESTIONS, 3)
    b = generate_answers(whole, processor, images, QUESTIONS, 3)
    torch.testing.assert_close(a.latents, b.latents, atol=1e-6, rtol=0)
    assert all(w.shape == (2, 256) for w in a.windows)
    assert not torch.allclose(a.latents, generate_answers(model, processor, images, QUESTIONS, 3).latents)


def test_no_latent_control_answers_straight_after_the_delimiters(tiny_lare):
    # num_latents = 0 (reproduce lare's no-latent SFT control): [V, X_q, <bot>, <eot>, answer], no iteration; each
    # sample of the padded batch equals the naive recompute with no latent step.
    import dataclasses

    model, processor = tiny_lare
    images = _images(2)
    control = copy.copy(model)
    control.config = dataclasses.replace(model.config, num_latents=0)
    got = generate_answers(control, processor, images, QUESTIONS, 3, output_logits=True, return_dict_in_generate=True)
    assert got.latent_steps == [0, 0] and got.windows == [] and got.latents.shape[1] == 0
    assert all(s != s for s in got.latent_similarity)  # nan: nothing to compare
    for b, (image, question) in enumerate(zip(images, QUESTIONS, strict=True)):
        _, _, logits, answer = _naive(model, processor, image, question, 0, 3)
        assert got.sequences[b] == [t for t in answer if t != processor.tokenizer.eos_token_id]
        mine = torch.stack([step[b] for step in got.generate_output.logits[: len(answer)]])
        torch.testing.assert_close(mine, logits, atol=1e-4, rtol=0)
