"""The KV-cached latent loop (generate_with_latents / forward_with_latents) on every family of the tiny zoo.

The reference is Coconut's loop, written here independently of latent_core.latents: capture what the language model
receives for the prompt in a plain forward (merged image embeddings, M-RoPE positions, mllama's cross-attention
states), then at every latent step and every answer token run the language model over the WHOLE sequence again,
without a cache.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from latent_core.families import model_parts
from latent_core.latents import (
    LatentState,
    _CachedLayerCheckpoint,
    distance_halt,
    forward_with_latents,
    generate_with_latents,
)
from latent_core.testing import TINY_FAMILIES, tiny_image, tiny_model

QUESTIONS = ["How many red circles are there?", "Is there a small yellow star?", "What colour is the shape at row 3?"]
START, END = [5, 9], [6, 7]  # arbitrary vocabulary ids standing in for <bot> / <eot>
NEW = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _model(family: str):
    return tiny_model(family)


def _inputs(family: str, questions: list[str], padding_side: str = "left") -> dict:
    _, processor = _model(family)
    tokenizer = processor if family == "causal_lm" else processor.tokenizer
    tokenizer.padding_side = padding_side
    try:
        if family == "causal_lm":
            texts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
                for q in questions
            ]
            return dict(processor(texts, return_tensors="pt", add_special_tokens=False, padding=True))
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
        texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        images = [tiny_image(i) for i in range(len(questions))]
        if family == "mllama":
            images = [[image] for image in images]
        out = processor(images=images, text=texts, return_tensors="pt", add_special_tokens=False, padding=True)
        return dict(out)
    finally:
        tokenizer.padding_side = "left"


def _select(inputs: dict, i: int, family: str) -> dict:
    """Sample i of a batch built by `_inputs`, re-made on its own (no padding)."""
    return _inputs(family, [QUESTIONS[i]]) if family == "causal_lm" else _single_vlm(family, i)


def _single_vlm(family: str, i: int) -> dict:
    _, processor = _model(family)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[i]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = [tiny_image(i)] if family == "mllama" else tiny_image(i)
    return processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)  # a BatchFeature


def _naive(model, inputs, num_latents, new_tokens, start=(), end=(), step_fn=None):
    """Coconut-style reference for one sample: full recompute (no cache) for every latent and answer token."""
    parts = model_parts(model)
    decoder, embed = parts.language_model, parts.input_embeddings
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    handle = decoder.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    seq = captured["inputs_embeds"]
    if seq is None:
        seq = embed(captured["input_ids"])
    positions = captured.get("position_ids")
    if positions is None:
        positions = torch.arange(seq.shape[1])[None]
    extras = {}
    if captured.get("cross_attention_states") is not None:  # mllama
        extras = {k: captured[k] for k in ("cross_attention_states", "cross_attention_mask")}
        extras["full_text_row_masked_out_mask"] = captured["full_text_row_masked_out_mask"]

    def append(vectors):
        nonlocal seq, positions
        n = vectors.shape[1]
        seq = torch.cat([seq, vectors], 1)
        positions = torch.cat([positions, positions[..., -1:] + torch.arange(1, n + 1)], -1)
        for key in ("cross_attention_mask", "full_text_row_masked_out_mask"):
            if key in extras:
                mask = extras[key]
                extras[key] = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, n, -1)], 2)

    def last_hidden():
        out = decoder(inputs_embeds=seq, position_ids=positions, use_cache=False, **extras)
        return out.last_hidden_state[:, -1]

    latents, tokens, logits = [], [], []
    with torch.no_grad():
        if start:
            append(embed(torch.tensor([list(start)])))
        for _ in range(num_latents):
            z = last_hidden() if step_fn is None else step_fn(last_hidden())
            latents.append(z)
            append(z[:, None])
        if end:
            append(embed(torch.tensor([list(end)])))
        for _ in range(new_tokens):
            step_logits = parts.lm_head(last_hidden())
            logits.append(step_logits)
            token = step_logits.argmax(-1)
            tokens.append(token)
            append(embed(token)[:, None])
    return torch.stack(latents, 1) if latents else None, torch.stack(tokens, 1), torch.stack(logits, 1)


def _greedy(n=NEW):
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)


# "bare" (no end ids): the last latent reaches generate as inputs_embeds instead of an end token.
NAIVE_CASES = [(f, delimiters) for f in TINY_FAMILIES for delimiters in (True, False)]
HALT_CASES = [(f, end) for f in TINY_FAMILIES for end in (END, [])]


@pytest.mark.parametrize(("family", "delimiters"), NAIVE_CASES)
def test_cached_loop_equals_naive_recompute(family, delimiters):
    model, _ = _model(family)
    inputs = _inputs(family, QUESTIONS[:1])
    start, end = (START, END) if delimiters else ((), ())
    ref_latents, ref_tokens, ref_logits = _naive(model, inputs, 3, NEW, start, end)
    got = generate_with_latents(
        model, inputs, 3, start_ids=start, end_ids=end, return_dict_in_generate=True, output_logits=True, **_greedy()
    )
    assert got.latents.shape == ref_latents.shape and got.num_steps.tolist() == [3]
    torch.testing.assert_close(got.latents, ref_latents, atol=1e-4, rtol=0)
    assert torch.equal(got.sequences, ref_tokens)
    torch.testing.assert_close(torch.stack(got.generate_output.logits, 1), ref_logits, atol=1e-4, rtol=0)


def test_no_latents_equals_plain_generate():
    model, _ = _model("qwen2_5_vl")
    inputs = _inputs("qwen2_5_vl", QUESTIONS)
    with torch.no_grad():
        plain = model.generate(**inputs, **_greedy())[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(generate_with_latents(model, inputs, 0, **_greedy()).sequences, plain)
    # Sampling kwargs reach generate: the same seed gives the same samples.
    sampling = dict(do_sample=True, temperature=1.5, top_k=50, max_new_tokens=6, min_new_tokens=6)
    torch.manual_seed(7)
    with torch.no_grad():
        sampled = model.generate(**inputs, **sampling)[:, inputs["input_ids"].shape[1] :]
    torch.manual_seed(7)
    ours = generate_with_latents(model, inputs, 0, **sampling).sequences
    assert torch.equal(ours, sampled) and not torch.equal(sampled, plain[:, :6])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_left_padded_batch_equals_single_runs(family):
    model, _ = _model(family)
    batch = _inputs(family, QUESTIONS)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == 3, "the prompts must differ in length"
    got = generate_with_latents(model, batch, 3, start_ids=START, end_ids=END, **_greedy())
    for i in range(3):
        alone = generate_with_latents(model, _select(batch, i, family), 3, start_ids=START, end_ids=END, **_greedy())
        torch.testing.assert_close(got.latents[i : i + 1], alone.latents, atol=1e-4, rtol=0)
        assert torch.equal(got.sequences[i : i + 1], alone.sequences), i


def _schedule(stops: list[int | None]):
    """halt_fn stopping sample b after step stops[b] (None: never)."""
    calls = []

    def halt(latent, previous, step):
        calls.append(step)
        assert latent.shape == previous.shape
        return torch.tensor([s is not None and step >= s for s in stops])

    return halt, calls


@pytest.mark.parametrize(("family", "end"), HALT_CASES)
def test_halted_sample_equals_running_alone_with_fewer_steps(family, end):
    model, _ = _model(family)
    batch = _inputs(family, QUESTIONS)
    halt, calls = _schedule([2, None, 4])
    got = generate_with_latents(model, batch, 5, halt_fn=halt, start_ids=START, end_ids=end, **_greedy())
    assert got.num_steps.tolist() == [2, 5, 4]
    assert calls == [2, 3, 4]  # called for 2 <= t < K
    for i, steps in enumerate([2, 5, 4]):
        alone = generate_with_latents(
            model, _select(batch, i, family), steps, start_ids=START, end_ids=end, **_greedy()
        )
        torch.testing.assert_close(got.latents[i : i + 1, :steps], alone.latents, atol=1e-4, rtol=0)
        assert not got.latents[i, steps:].any()  # zeros beyond a halted sample's steps
        assert torch.equal(got.sequences[i : i + 1], alone.sequences), i


def test_all_halted_stops_early_and_equals_fewer_steps():
    model, _ = _model("qwen2_5_vl")
    batch = _inputs("qwen2_5_vl", QUESTIONS)
    halt, calls = _schedule([2, 2, 2])
    got = generate_with_latents(model, batch, 6, halt_fn=halt, end_ids=END, **_greedy())
    short = generate_with_latents(model, batch, 2, end_ids=END, **_greedy())
    assert calls == [2] and got.num_steps.tolist() == [2, 2, 2]
    torch.testing.assert_close(got.latents[:, :2], short.latents, atol=1e-5, rtol=0)
    assert torch.equal(got.sequences, short.sequences)


def test_distance_halt():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.1]])
    assert distance_halt(1e-3, "cosine")(a, b, 2).tolist() == [True, False, False]
    assert distance_halt(0.1, "l1")(a, b, 2).tolist() == [False, False, True]
    assert distance_halt(0.1, "l2")(a, b, 2).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="metric"):
        distance_halt(0.1, "kl")


def test_step_fn_is_applied_with_its_state():
    model, _ = _model("causal_lm")
    inputs = _inputs("causal_lm", QUESTIONS[:1])
    d = model.config.hidden_size
    proj = torch.nn.Linear(d, d)
    states: list[LatentState] = []

    def step_fn(hidden, state):
        states.append(state)
        return 2 * proj(hidden)

    got = generate_with_latents(model, inputs, 3, step_fn=step_fn, step_hidden_states=True, **_greedy(2))
    # By hand: h_0 is the final-norm output at the last prompt position, h_1 the one after feeding z_1.
    with torch.no_grad():
        h0 = model.model(**inputs).last_hidden_state[:, -1]
        z1 = 2 * proj(h0)
        embeds = torch.cat([model.get_input_embeddings()(inputs["input_ids"]), z1[:, None]], 1)
        h1 = model.model(inputs_embeds=embeds).last_hidden_state[:, -1]
    torch.testing.assert_close(got.latents[:, 0], z1, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.latents[:, 1], 2 * proj(h1).detach(), atol=1e-5, rtol=0)
    assert [s.step for s in states] == [1, 2, 3]
    assert [s.latents.shape[1] for s in states] == [0, 1, 2]
    assert len(states[0].hidden_states) == model.config.num_hidden_layers + 1
    assert states[1].hidden_states[-1].shape == (1, d)
    assert states[2].attention_mask.shape[1] == inputs["input_ids"].shape[1] + 2
    # The naive loop with the same step_fn agrees too.
    ref_latents, ref_tokens, _ = _naive(model, inputs, 3, 2, step_fn=lambda h: 2 * proj(h))
    torch.testing.assert_close(got.latents, ref_latents, atol=1e-4, rtol=0)
    assert torch.equal(got.sequences, ref_tokens)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forward_with_latents_matches_generate_and_trains(family):
    model, _ = _model(family)
    inputs = _inputs(family, QUESTIONS[:2])
    d = model_parts(model).input_embeddings.weight.shape[1]
    torch.manual_seed(0)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(d) + 0.05 * torch.randn(d, d))

    def step_fn(hidden, state):
        return proj(hidden)

    gen = generate_with_latents(
        model, inputs, 3, step_fn=step_fn, start_ids=START, end_ids=END, return_dict_in_generate=True,
        output_logits=True, **_greedy(4),
    )  # fmt: skip
    model.zero_grad(set_to_none=True)
    labels = gen.sequences.clone()
    labels[1, -1] = -100
    fwd = forward_with_latents(
        model, inputs, 3, labels=labels, step_fn=step_fn, start_ids=START, end_ids=END, answer_ids=gen.sequences
    )
    torch.testing.assert_close(fwd.latents.detach(), gen.latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(fwd.logits.detach(), torch.stack(gen.generate_output.logits, 1), atol=1e-4, rtol=0)
    assert fwd.latent_hidden.shape == (2, 3, model.config.get_text_config().hidden_size)
    fwd.loss.backward()
    parts = model_parts(model)
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0  # through the latents only
    layer = parts.decoder_layers[0]
    for name, param in [("q_proj", layer.self_attn.q_proj.weight), ("lm_head", parts.lm_head.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_forward_gradient_reaches_every_latent():
    model, _ = _model("causal_lm")
    inputs = _inputs("causal_lm", QUESTIONS[:1])
    scales = torch.ones(3, requires_grad=True)

    def step_fn(hidden, state):
        return scales[state.step - 1] * hidden

    answer = torch.tensor([[11, 12, 13]])
    fwd = forward_with_latents(model, inputs, 3, labels=answer, step_fn=step_fn, answer_ids=answer)
    fwd.loss.backward()
    assert (scales.grad.abs() > 0).all()
    model.zero_grad(set_to_none=True)


def test_forward_batch_equals_single_and_no_delimiters():
    model, _ = _model("qwen2_5_vl")
    batch = _inputs("qwen2_5_vl", QUESTIONS)
    answer = torch.tensor([[11, 12, 13, 14]] * 3)
    with torch.no_grad():
        got = forward_with_latents(model, batch, 2, answer_ids=answer)
        for i in range(3):
            alone = forward_with_latents(model, _select(batch, i, "qwen2_5_vl"), 2, answer_ids=answer[:1])
            torch.testing.assert_close(got.logits[i : i + 1], alone.logits, atol=1e-4, rtol=0)
        # No latents: the answer logits equal a plain teacher-forced forward.
        plain_inputs = dict(batch)
        plain_inputs["input_ids"] = torch.cat([batch["input_ids"], answer], 1)
        plain_inputs["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(answer)], 1)
        plain_inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], 1)
        plain = model(**plain_inputs).logits[:, -answer.shape[1] - 1 : -1]
        none = forward_with_latents(model, batch, 0, answer_ids=answer)
    torch.testing.assert_close(none.logits, plain, atol=1e-4, rtol=0)


def test_peft_wrapped_model_trains_its_adapter():
    from latent_core.families import lora_target_modules
    from peft import LoraConfig, get_peft_model

    base, _ = tiny_model("qwen2_5_vl")
    inputs = _inputs("qwen2_5_vl", QUESTIONS[:2])
    plain = generate_with_latents(base, inputs, 2, end_ids=END, **_greedy(3))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=lora_target_modules(base), init_lora_weights=False))
    adapted = generate_with_latents(model, inputs, 2, end_ids=END, **_greedy(3))
    assert not torch.allclose(adapted.latents, plain.latents)  # the adapter is in the loop
    answer = adapted.sequences
    fwd = forward_with_latents(model, inputs, 2, labels=answer, end_ids=END, answer_ids=answer)
    fwd.loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_bad_inputs_say_what_is_wrong():
    model, _ = _model("causal_lm")
    inputs = _inputs("causal_lm", QUESTIONS[:2])
    with pytest.raises(ValueError, match="num_latents"):
        generate_with_latents(model, inputs, -1)
    with pytest.raises(ValueError, match=r"step_fn returned \(2, 32\)"):
        generate_with_latents(model, inputs, 2, step_fn=lambda h, s: h[:, :32])
    with pytest.raises(ValueError, match="halt_fn"):
        generate_with_latents(model, inputs, 4, halt_fn=lambda z, p, t: True)
    with pytest.raises(ValueError, match="left padded"):
        generate_with_latents(model, _inputs("causal_lm", QUESTIONS[:2], padding_side="right"), 2)
    with pytest.raises(ValueError, match="past_key_values"):
        generate_with_latents(model, inputs, 2, past_key_values=None)
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate_with_latents(model, inputs, 2, num_return_sequences=2, do_sample=True)
    with pytest.raises(ValueError, match="answer_ids"):
        forward_with_latents(model, inputs, 2, labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="step_fn"):
        forward_with_latents(model, inputs, 2, step_fn=lambda h, s: "nope")


def _latent_loss_and_grads(family, checkpointing, use_reentrant=False, gate=False, record=False):
    """Loss and every gradient of a K=3 latent training step (step_fn with its own weights, delimiters, answer)."""
    from latent_core.attention import attention_bias, record_attention
    from latent_core.families import image_token_mask

    model, _ = tiny_model(family, seed=1)
    if family == "mllama":  # two cross-attention layers: the image states go into two checkpointed layers
        config = model.config
        config.text_config.cross_attention_layers = [1, 2]
        torch.manual_seed(1)
        model = type(model)(config)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    inputs = _inputs(family, QUESTIONS[:2])
    d = model_parts(model).input_embeddings.weight.shape[1]
    torch.manual_seed(0)
    proj = torch.nn.Linear(d, d)
    answer = torch.tensor([[11, 12, 13], [14, 15, 16]])
    labels = answer.clone()
    labels[1, -1] = -100
    ids = inputs["input_ids"]
    total = ids.shape[1] + len(START) + 3 + len(END) + answer.shape[1]
    queries = torch.zeros(2, total, dtype=torch.bool)
    queries[:, ids.shape[1] + len(START) :] = True  # latents, end ids and answer
    keys = "image" if family == "mllama" else torch.nn.functional.pad(image_token_mask(model, ids), (0, total))
    keys = keys if isinstance(keys, str) else keys[:, :total]
    calls = []
    attention = model_parts(model).decoder_layers[0].self_attn
    hook = attention.register_forward_hook(lambda *args: calls.append(1))
    with contextlib.ExitStack() as stack:
        stack.callback(hook.remove)
        if gate:
            stack.enter_context(attention_bias(model, queries, keys, math.log(0.3)))
        recorder = stack.enter_context(record_attention(model, queries, keys)) if record else None
        fwd = forward_with_latents(
            model, inputs, 3, labels=labels, step_fn=lambda h, s: proj(h), start_ids=START, end_ids=END,
            answer_ids=answer,
        )  # fmt: skip
        loss = fwd.loss + (sum(w.square().sum() for w in recorder.weights) if record else 0)
        forwards = len(calls)
        loss.backward()
    # Checkpointed: every language-model forward (prefill, K - 1 latent steps, the tail) ran each layer again in
    # backward; and the layers' own checkpoint set-up is back as transformers left it.
    assert forwards == 4 and len(calls) == (8 if checkpointing else 4)
    for layer in model_parts(model).decoder_layers:
        assert "_can_checkpoint_with_cache" not in layer.__dict__
        assert not isinstance(layer.__dict__.get("_gradient_checkpointing_func"), _CachedLayerCheckpoint)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"proj.{n}": p.grad.clone() for n, p in proj.named_parameters()})
    return loss.detach(), grads


CHECKPOINT_CASES = [
    ("causal_lm", True, False, False),
    ("causal_lm", False, True, True),
    ("qwen2_5_vl", True, True, False),
    ("qwen2_5_vl", False, True, True),
    ("mllama", True, False, False),
    ("mllama", False, True, True),
]


@pytest.mark.parametrize(("family", "use_reentrant", "gate", "record"), CHECKPOINT_CASES)
def test_latent_training_under_activation_checkpointing_equals_the_plain_loop(family, use_reentrant, gate, record):
    # The reference is the same step without checkpointing (issue 12, item 3): same loss, every gradient within
    # 1e-5, including the step_fn's (through the latents) and, with a gate and recorded rows, the attention's.
    loss, grads = _latent_loss_and_grads(family, False, gate=gate, record=record)
    got_loss, got = _latent_loss_and_grads(family, True, use_reentrant, gate=gate, record=record)
    torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=0)
    assert got.keys() == grads.keys() and any("proj" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=0, msg=name)


def _naive_step_attention(model, inputs, latents, start):
    """Reference for one unpadded sample: at every latent step t, an eager full forward (no cache) over prompt +
    start + z_1..z_{t-1}; the last row of the attention probabilities, mean over heads and every layer, at the
    prompt's image positions."""
    import copy

    from latent_core.families import image_token_mask

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    parts = model_parts(eager)
    captured = {}
    handle = parts.language_model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        eager(**inputs)
    handle.remove()
    seq = torch.cat([captured["inputs_embeds"], parts.input_embeddings(torch.tensor([list(start)]))], 1)
    positions = captured.get("position_ids")
    if positions is None:
        positions = torch.arange(captured["inputs_embeds"].shape[1])[None]
    positions = torch.cat([positions, positions[..., -1:] + torch.arange(1, len(start) + 1)], -1)
    image = image_token_mask(model, inputs["input_ids"])[0]
    rows = []
    with torch.no_grad():
        for t in range(latents.shape[0]):
            if t:
                seq = torch.cat([seq, latents[None, t - 1 : t]], 1)
                positions = torch.cat([positions, positions[..., -1:] + 1], -1)
            out = parts.language_model(
                inputs_embeds=seq, position_ids=positions, use_cache=False, output_attentions=True
            )
            row = torch.stack(out.attentions).mean((0, 2))[0, -1]  # layers and heads -> [S]
            rows.append(row[: len(image)][image])
    return rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_step_fn_gets_this_steps_attention_over_the_image_and_the_projector_features(family):
    # LaRe's loop (issue 12, item 6): every step hands step_fn the attention of the current position over the image
    # tokens (this step's row only) and the image features after the projector; both checked against references
    # computed without the loop (eager full recompute; the model's own get_image_features), per sample of a
    # left-padded batch, and the forward path's attention carries gradients.
    from latent_core.families import image_token_mask

    model, _ = _model(family)
    batch = _inputs(family, QUESTIONS[:2])
    keys = image_token_mask(model, batch["input_ids"])
    seen = []

    def step_fn(hidden, state):
        seen.append((state.attention, state.image_features))
        return hidden

    gen = generate_with_latents(
        model, batch, 3, step_fn=step_fn, start_ids=START, end_ids=END, step_attention=keys,
        step_image_features=True, **_greedy(2),
    )  # fmt: skip
    assert len(seen) == 3
    for i in range(2):
        single = _select(batch, i, family)
        want = _naive_step_attention(model, single, gen.latents[i], START)
        for t, (attention, _) in enumerate(seen):
            assert attention[i].shape == want[t].shape
            torch.testing.assert_close(attention[i], want[t], atol=1e-5, rtol=0, msg=f"sample {i} step {t + 1}")
        kwargs = {k: v for k, v in single.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
        with torch.no_grad():
            projected = model.model.get_image_features(**kwargs).pooler_output[0]
        torch.testing.assert_close(seen[0][1][i], projected, atol=1e-6, rtol=0)

    from_generate = [attention for attention, _ in seen]
    seen.clear()
    forward_with_latents(
        model, batch, 3, labels=gen.sequences, step_fn=step_fn, start_ids=START, end_ids=END,
        answer_ids=gen.sequences, step_attention=keys,
    )  # fmt: skip
    assert [features for _, features in seen] == [None] * 3
    for t, (attention, _) in enumerate(seen):
        for i in range(2):
            torch.testing.assert_close(attention[i].detach(), from_generate[t][i], atol=1e-5, rtol=0)
    model.zero_grad(set_to_none=True)
    sum(a.sum() for attention, _ in seen for a in attention).backward()  # the attention alone carries gradients
    q_proj = model_parts(model).decoder_layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_mllama_step_attention_covers_its_cross_attended_image():
    # mllama reaches the image through cross-attention: step_attention="image" gives each step's row over the image
    # keys of the cross-attention layers (a softmax over the image only: each row sums to 1 over the sample's
    # unmasked tiles), one key per projector-output feature row.
    model, _ = _model("mllama")
    batch = _inputs("mllama", QUESTIONS[:2])
    seen = []

    def step_fn(hidden, state):
        seen.append((state.attention, state.image_features))
        return hidden

    generate_with_latents(
        model, batch, 2, step_fn=step_fn, step_attention="image", step_image_features=True, **_greedy(1)
    )
    tiles = batch["aspect_ratio_mask"].sum(-1)  # [B, images] tiles in use
    for attention, features in seen:
        for i in range(2):
            assert attention[i].shape == (features[i].shape[0],)
            torch.testing.assert_close(attention[i].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
            per_tile = features[i].shape[0] // batch["aspect_ratio_mask"].shape[-1]
            assert bool((attention[i][int(tiles[i].sum()) * per_tile :] == 0).all())
