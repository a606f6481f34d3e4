"""attention_bias / record_attention / gate_schedule against references: the unpatched SDPA model, eager
`output_attentions`, hand computations (LaViT Eq. 4, 5, 7)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from latent_core.attention import (
    ATTENTION_IMPLEMENTATION,
    attention_bias,
    gate_bias,
    gate_schedule,
    record_attention,
)
from latent_core.families import image_token_mask, model_parts
from latent_core.testing import tiny_image, tiny_model

FAMILIES = ("causal_lm", "qwen2_5_vl", "llava", "llava_next", "mllama")
QUESTIONS = ("How many red circles are there? Answer with a number.", "Is it red?")


def _batch(family: str):
    """A left-padded batch of two prompts of different lengths (with images for the VLMs)."""
    torch.manual_seed(0)
    model, processor = tiny_model(family)
    if family == "causal_lm":
        return model, processor(list(QUESTIONS), return_tensors="pt", padding=True)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for q in QUESTIONS
    ]
    images = [[tiny_image(0)], [tiny_image(1)]] if family == "mllama" else [tiny_image(0), tiny_image(1)]
    return model, processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    family = request.param
    model, inputs = _batch(family)
    ids = inputs["input_ids"]
    batch, seq = ids.shape
    assert (inputs["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    queries = torch.zeros(batch, seq, dtype=torch.bool)
    queries[:, -seq // 4 :] = True  # the last quarter: "response" tokens
    if family == "causal_lm":
        keys = torch.zeros(batch, seq, dtype=torch.bool)
        keys[:, : seq // 2] = True
    elif family == "mllama":
        keys = "image"
    else:
        keys = image_token_mask(model, ids)
        assert keys.any(1).all()
    with torch.no_grad():
        reference = model(**inputs).logits
    return family, model, inputs, queries, keys, reference


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_zero_bias_is_identical_and_context_restores(setup):
    family, model, inputs, queries, keys, reference = setup
    text_config = model_parts(model).language_model.config
    vision = getattr(model.config, "vision_config", None)
    with attention_bias(model, queries, keys, 0.0):
        assert text_config._attn_implementation == ATTENTION_IMPLEMENTATION
        if vision is not None:
            assert vision._attn_implementation == "sdpa"  # the vision tower keeps its own
        assert torch.equal(_logits(model, inputs), reference)
        # A tiny non-zero bias takes the explicit-mask path for the gated rows: same numbers to float precision.
        with attention_bias(model, queries, keys, -1e-9):
            torch.testing.assert_close(_logits(model, inputs), reference, rtol=0, atol=1e-5)
    assert text_config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model, inputs), reference)


def test_active_gate_changes_only_gated_rows(setup):
    family, model, inputs, queries, keys, reference = setup
    with attention_bias(model, queries, keys, gate_bias(1e-3)):
        gated = _logits(model, inputs)
    first_gated = int(queries[0].nonzero()[0])
    # Rows before the first gated query see what they saw before (SDPA on the prefix: same math, float noise).
    torch.testing.assert_close(gated[:, :first_gated], reference[:, :first_gated], rtol=0, atol=1e-6)
    assert not torch.allclose(gated[:, first_gated:], reference[:, first_gated:], atol=1e-4)


def test_causality_holds_under_an_active_gate(setup):
    family, model, inputs, queries, keys, reference = setup
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][:, -2] = 300  # a later (gated, answer-side) token changes
    for bias in (gate_bias(1e-6), float("-inf"), -2.0):
        with attention_bias(model, queries, keys, bias):
            a, b = _logits(model, inputs), _logits(model, changed)
        assert torch.equal(a[:, :-2], b[:, :-2]), bias  # every earlier position is unchanged
        assert not torch.equal(a[:, -2:], b[:, -2:])


def test_gate_mass_on_gated_pairs(setup):
    """LaViT Eq. 4 by hand: with logit bias ln(gamma) on the gated keys, a head whose ungated mass on them is m
    gives them gamma*m / (gamma*m + 1 - m) (exact in layer 0, whose input the gate cannot change); -inf leaves
    exactly 0 in every layer; queries the gate does not select attend exactly as without it."""
    family, model, inputs, queries, keys, reference = setup
    everything = torch.ones_like(queries)
    all_keys = "image" if family == "mllama" else everything
    first = model_parts(model).cross_attention_layers[:1] if family == "mllama" else (0,)
    with torch.no_grad(), record_attention(model, everything, all_keys, layers=first, heads="none") as free:
        model(**inputs)
    for gamma in (1e-6, 1e-2, 0.0):
        with torch.no_grad(), attention_bias(model, queries, keys, gate_bias(gamma)):
            with record_attention(model, everything, all_keys, layers=first, heads="none") as rec:
                model(**inputs)
            with record_attention(model, everything, all_keys) as all_layers:
                model(**inputs)
        for b in range(queries.shape[0]):
            gated_q = queries[b]
            gated_k = torch.ones(rec.weights[b].shape[-1], dtype=torch.bool) if family == "mllama" else keys[b]
            m = free.weights[b][gated_q][..., gated_k].sum(-1)  # [n_gated_queries, heads]
            got = rec.weights[b][gated_q][..., gated_k].sum(-1)
            if family == "mllama":  # cross-attention has only image keys: the gate scales their mass by gamma
                expected = gamma * m
            else:
                expected = gamma * m / (gamma * m + 1 - m)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
            if gamma == 0.0:
                assert torch.count_nonzero(all_layers.weights[b][gated_q][:, gated_k]) == 0
            torch.testing.assert_close(rec.weights[b][~gated_q], free.weights[b][~gated_q], rtol=0, atol=1e-6)


def test_gamma_1e_6_leaves_at_most_1e_5_mass():
    """The spec's bound, on a causal LM whose gated keys are a minority of the visible keys (the mass left is
    about gamma * (gated / ungated attention), so it scales with how much the gated keys would otherwise get)."""
    model, inputs = _batch("causal_lm")
    ids = inputs["input_ids"]
    queries = torch.zeros_like(ids, dtype=torch.bool)
    queries[:, -4:] = True
    keys = torch.zeros_like(queries)
    keys[:, 2:8] = True
    with torch.no_grad(), attention_bias(model, queries, keys, gate_bias(1e-6)):
        with record_attention(model, queries, keys) as rec:
            model(**inputs)
    assert max(float(w.sum(-1).max()) for w in rec.weights) <= 1e-5


def _eager_rows(model, inputs, layers):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    return torch.stack([attentions[i] for i in layers]).mean(0).mean(1)  # [B, S, K]


def test_record_attention_equals_eager_output_attentions(setup):
    family, model, inputs, queries, keys, reference = setup
    parts = model_parts(model)
    rows = torch.zeros_like(queries)
    rows[:, -6:] = True
    rows[0, 3] = True  # rows differ between samples
    if family == "mllama":
        layers = parts.cross_attention_layers
        key_arg, key_sel = "image", None
    else:
        layers = tuple(i for i in range(len(parts.decoder_layers)))
        key_arg = key_sel = keys if family != "causal_lm" else torch.ones_like(queries)
    expected = _eager_rows(model, inputs, layers)
    with torch.no_grad(), record_attention(model, rows, key_arg) as rec:
        model(**inputs)
    for b in range(rows.shape[0]):
        want = expected[b][rows[b]]
        if key_sel is not None:
            want = want[:, key_sel[b]]
        assert rec.weights[b].shape == want.shape
        torch.testing.assert_close(rec.weights[b], want, rtol=0, atol=1e-5)


def test_record_attention_layers_and_reduce(setup):
    family, model, inputs, queries, keys, reference = setup
    if family == "mllama":
        pytest.skip("one cross-attention layer in the tiny mllama")
    every = torch.ones_like(queries)
    with torch.no_grad(), record_attention(model, queries, every, layers=[1], reduce="none") as one:
        model(**inputs)
    with torch.no_grad(), record_attention(model, queries, every, layers=[0, 1], reduce="sum") as both:
        model(**inputs)
    expected = _eager_rows(model, inputs, [1])
    torch.testing.assert_close(one.weights[0][0], expected[0][queries[0]], rtol=0, atol=1e-5)
    # Full softmax then restriction: each row over all keys sums to the number of summed layers.
    torch.testing.assert_close(both.weights[1].sum(-1), torch.full((int(queries[1].sum()),), 2.0))


def test_record_attention_is_differentiable():
    """L_traj backpropagates: the recorded rows carry gradients into q/k projections (with non-reentrant
    gradient checkpointing too, which recomputes the layer in backward without recording twice)."""
    model, inputs = _batch("qwen2_5_vl")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = inputs["input_ids"]
    queries = torch.zeros_like(ids, dtype=torch.bool)
    queries[:, -3:] = True
    keys = image_token_mask(model, ids)
    with record_attention(model, queries, keys) as rec:
        out = model(**inputs)
    target = [torch.full_like(w, 1.0 / w.shape[-1]) for w in rec.weights]
    loss = sum(torch.nn.functional.mse_loss(w, t) for w, t in zip(rec.weights, target, strict=True))
    (loss + 0 * out.logits.sum()).backward()
    q_proj = model_parts(model).decoder_layers[0].self_attn.q_proj.weight
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    n_rows = [len(chunks) for chunks in rec._rows.values()]
    assert n_rows == [1] * len(model_parts(model).decoder_layers)  # nothing recorded again during backward
    model.gradient_checkpointing_disable()
    model.eval()


def test_gate_and_record_during_cached_generation():
    """With the KV cache, new query positions extend the masks (extend_queries) and rows of every decoding step
    are recorded; the gated greedy continuation equals recomputing each step without a cache."""
    model, inputs = _batch("qwen2_5_vl")
    ids = inputs["input_ids"]
    keys = image_token_mask(model, ids)
    prompt = torch.zeros_like(keys)  # no prompt query is gated; every generated token is
    with torch.no_grad(), attention_bias(model, prompt, keys, gate_bias(1e-4), extend_queries=True):
        with record_attention(model, prompt, keys, extend_queries=True) as rec:
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert all(w.shape[0] == 2 for w in rec.weights)  # one row per generated token fed back (the last is not)
    assert max(w.sum(-1).max() for w in rec.weights) < 1e-3  # gated: little mass on the image
    # Reference: one full forward over prompt + generated tokens with the gate on all generated positions.
    full_mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], 3, dtype=torch.long)], 1)
    gated = torch.zeros(out.shape, dtype=torch.bool)
    gated[:, ids.shape[1] :] = True
    full_inputs = {**inputs, "input_ids": out, "attention_mask": full_mask}
    full_inputs["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(ids.shape[0], 3, dtype=inputs["mm_token_type_ids"].dtype)], 1
    )
    with torch.no_grad(), attention_bias(model, gated, keys, gate_bias(1e-4)):
        logits = model(**full_inputs).logits
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), out[:, ids.shape[1] :])


def test_gate_schedule_eq5():
    assert gate_schedule(0) == pytest.approx(1e-6)
    assert gate_schedule(200) == pytest.approx(1e-6 + (1 - 1e-6) / 2)  # half way: cos(pi/2) = 0
    assert gate_schedule(100) == pytest.approx(1e-6 + (1 - 1e-6) / 2 * (1 - math.cos(math.pi / 4)))
    assert gate_schedule(399) < 1 and gate_schedule(400) == 1.0 and gate_schedule(10_000) == 1.0
    assert [gate_schedule(s, kind="hard") for s in (0, 399, 400)] == [0.0, 0.0, 1.0]
    assert gate_schedule(0, kind="open") == 1.0
    assert gate_bias(1.0) == 0.0 and gate_bias(0.0) == float("-inf") and gate_bias(1e-6) == pytest.approx(-13.8155)
    steps = [gate_schedule(s, warmup=50) for s in range(51)]
    assert all(a < b for a, b in zip(steps, steps[1:-1], strict=False))  # monotone warm-up
    with pytest.raises(ValueError, match="unknown gate schedule"):
        gate_schedule(0, kind="linear")


def test_bad_masks_and_models_say_what_is_wrong():
    model, inputs = _batch("llava")
    ids = inputs["input_ids"]
    good = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="query_mask must be a boolean tensor"):
        with attention_bias(model, good.long(), good, -1.0):
            pass
    with pytest.raises(ValueError, match="key_mask must be a boolean tensor"):
        with attention_bias(model, good, good[0], -1.0):
            pass
    with pytest.raises(ValueError, match="key_mask has batch size 1, but query_mask has 2"):
        with record_attention(model, good, good[:1]):
            pass
    with pytest.raises(ValueError, match="key_mask='image' targets cross-attention layers"):
        with attention_bias(model, good, "image", -1.0):
            pass
    with pytest.raises(ValueError, match=r"bias must be a float or a tensor \[batch\]=2"):
        with attention_bias(model, good, good, torch.zeros(3)):
            pass
    with pytest.raises(ValueError, match=r"layers \[7\] are not self-attention layers"):
        with record_attention(model, good, good, layers=[7]):
            pass
    with pytest.raises(RuntimeError, match="recorded nothing"):
        with record_attention(model, good, good) as rec:
            pass
        rec.weights  # noqa: B018
    from transformers import BertConfig, BertModel

    with pytest.raises((ValueError, TypeError), match="bert"):
        with attention_bias(
            BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)),
            good,
            good,
            -1.0,
        ):
            pass
    assert model_parts(model).language_model.config._attn_implementation == "sdpa"  # errors restored it


def test_per_sample_bias():
    model, inputs = _batch("causal_lm")
    ids = inputs["input_ids"]
    queries = torch.zeros_like(ids, dtype=torch.bool)
    queries[:, -2:] = True
    keys = torch.zeros_like(queries)
    keys[:, :4] = True
    with attention_bias(model, queries, keys, torch.tensor([0.0, -3.0])):
        mixed = _logits(model, inputs)
    with attention_bias(model, queries, keys, -3.0):
        both = _logits(model, inputs)
    reference = _logits(model, inputs)
    torch.testing.assert_close(mixed[0], reference[0], rtol=0, atol=1e-5)
    assert torch.equal(mixed[1], both[1])


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gate_under_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Activation checkpointing recomputes each layer in backward, after the `with` block has exited: the
    recompute must still see the gate, or the gradients would silently be those of the ungated model."""
    model, inputs = _batch("causal_lm")
    ids = inputs["input_ids"]
    queries = torch.zeros_like(ids, dtype=torch.bool)
    queries[:, -3:] = True
    keys = torch.zeros_like(queries)
    keys[:, :5] = True
    model.train()

    def grads(checkpointing: bool, bias: float) -> torch.Tensor:
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        with attention_bias(model, queries, keys, bias):
            loss = model(**inputs).logits[:, -3:].pow(2).mean()
        loss.backward()
        if checkpointing:
            model.gradient_checkpointing_disable()
        return model_parts(model).decoder_layers[0].self_attn.q_proj.weight.grad.clone()

    plain_gated = grads(False, -4.0)
    assert not torch.allclose(plain_gated, grads(False, 0.0))  # the gate matters for these gradients
    torch.testing.assert_close(grads(True, -4.0), plain_gated, rtol=1e-5, atol=1e-7)
    model.eval()


@pytest.mark.parametrize("family", ["causal_lm", "qwen2_5_vl"])
def test_static_cache_gates_and_records_the_same_rows_as_a_growing_cache(family):
    """A StaticCache holds keys for its whole capacity, so the key length is not where the queries are. The gate and
    the recorder must still see the generated positions only: the same greedy continuation, the same scores and the
    same recorded rows as with the DynamicCache (whose results the cached-generation test checks against a full
    recompute). Reading the offset from the key length gated and recorded prompt rows under the static cache."""
    model, inputs = _batch(family)
    ids = inputs["input_ids"]
    if family == "causal_lm":
        keys = torch.zeros_like(ids, dtype=torch.bool)
        keys[:, : ids.shape[1] // 2] = True
    else:
        keys = image_token_mask(model, ids)
    prompt = torch.zeros_like(keys)
    results = {}
    for cache in ("dynamic", "static"):
        with torch.no_grad(), attention_bias(model, prompt, keys, gate_bias(0.05), extend_queries=True):
            with record_attention(model, prompt, keys, extend_queries=True) as rec:
                out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     cache_implementation=cache, return_dict_in_generate=True,
                                     output_scores=True)  # fmt: skip
        results[cache] = (out.sequences, torch.stack(out.scores, 1), [w.clone() for w in rec.weights])
    (seq_d, scores_d, rows_d), (seq_s, scores_s, rows_s) = results["dynamic"], results["static"]
    assert torch.equal(seq_d, seq_s)
    torch.testing.assert_close(scores_s, scores_d, rtol=1e-4, atol=1e-4)
    assert [w.shape[0] for w in rows_s] == [w.shape[0] for w in rows_d] == [3, 3]  # the 3 tokens fed back
    for static_rows, dynamic_rows in zip(rows_s, rows_d, strict=True):
        torch.testing.assert_close(static_rows, dynamic_rows[:, : static_rows.shape[1]], rtol=1e-4, atol=1e-5)
    # Without the gate the scores differ: the comparison is not vacuous.
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True, output_scores=True)  # fmt: skip
    plain_scores = torch.stack(plain.scores, 1)
    finite = torch.isfinite(plain_scores) & torch.isfinite(scores_d)  # suppressed tokens are -inf in both
    assert (plain_scores - scores_d)[finite].abs().max() > 1e-3


def test_a_sliding_window_cache_is_refused():
    """A sliding-window cache drops old keys, so key columns are no longer positions: one clear error."""
    from transformers import DynamicCache

    model, inputs = _batch("causal_lm")
    config = copy.deepcopy(model.config)
    config.sliding_window = 4
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    cache = DynamicCache(config=config)
    keys = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    with torch.no_grad(), attention_bias(model, keys, keys, -1.0):
        with pytest.raises(ValueError, match="sliding-window layers"):
            model(**inputs, past_key_values=cache, use_cache=True)
        model(**inputs)  # without that cache: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_and_recorder_equal_eager_attention_with_an_explicit_bias_matrix(dtype):
    """The independent reference: transformers' eager attention given one explicit additive 4D mask (causal +
    padding + the bias on the gated pairs), no latent_core code involved. Gated rows are not a suffix and differ
    per sample; the tiny model has grouped KV heads (4 query heads, 2 KV heads)."""
    model, tokenizer = tiny_model("causal_lm")
    model = model.to(dtype)
    tokenizer.padding_side = "left"
    enc = tokenizer(list(QUESTIONS), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batch, seq = ids.shape
    queries = torch.zeros(batch, seq, dtype=torch.bool)
    queries[0, [seq - 5, seq - 2]] = True
    queries[1, [seq - 4, seq - 3, seq - 1]] = True
    keys = torch.zeros(batch, seq, dtype=torch.bool)
    keys[0, : seq // 2] = True
    keys[1, seq // 3 : seq - 3] = True
    bias = torch.tensor([-1.3, 0.7])  # per sample
    with torch.no_grad(), attention_bias(model, queries, keys, bias):
        with record_attention(model, queries, keys, reduce="none") as rec:
            got = model(**enc).logits.float()

    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    explicit = torch.where(allowed, 0.0, torch.finfo(dtype).min)
    explicit = explicit + torch.where(queries[:, :, None] & keys[:, None, :] & allowed, bias[:, None, None], 0.0)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=explicit[:, None].to(dtype), position_ids=positions,
                    output_attentions=True)  # fmt: skip
    ref = out.logits.float()
    with torch.no_grad():
        plain = model(**enc).logits.float()
    valid = mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    error = (got - ref)[valid].abs().max()
    assert error <= tol
    assert (plain - ref)[valid].abs().max() > 4 * max(error, 1e-6)  # the gate's effect dwarfs the error: not vacuous
    # The recorded rows are the eager probabilities of the gated queries over the gated keys (mean over heads).
    for b in range(batch):
        rows, cols = queries[b].nonzero().flatten(), keys[b].nonzero().flatten()
        for layer, attentions in enumerate(out.attentions):
            expected = attentions[b].float().mean(0)[rows][:, cols]
            recorded = rec.weights[b][layer].float()
            torch.testing.assert_close(recorded, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def test_recorded_rows_with_gradients_save_little_more_than_the_rows():
    """Recording rows with gradients (LaViT's L_traj) must not keep a copy of every layer's keys: the extra memory
    saved for backward is of the order of the recorded rows (fp32 [B, H, n, kv] per layer), not of the keys
    ([B, H, kv, d] expanded to all query heads and cast to fp32, which the recorder used to save)."""
    model, tokenizer = tiny_model("causal_lm")
    model.train()
    text = " ".join(["How many red circles are there in the picture?"] * 6)
    enc = tokenizer([text, text], return_tensors="pt")
    batch, seq = enc["input_ids"].shape
    queries = torch.zeros(batch, seq, dtype=torch.bool)
    queries[:, -2:] = True
    keys = torch.ones(batch, seq, dtype=torch.bool)
    config = model.config
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = config.hidden_size // heads
    assert head_dim >= 8 and seq > 50  # keys far larger than two rows: the bound below can tell them apart

    def plain():
        model(**enc).logits.sum()

    def recorded():
        with record_attention(model, queries, keys) as rec:
            model(**enc)
        torch.stack([w.sum() for w in rec.weights]).sum()

    extra = _saved_bytes(recorded) - _saved_bytes(plain)
    rows = layers * batch * heads * 2 * seq * 4  # the fp32 probabilities of the recorded rows, every layer
    old_keys = layers * batch * heads * seq * head_dim * 4  # what one fp32 repeat_kv copy of the keys costs
    assert extra <= 4 * rows < old_keys, (extra, rows, old_keys)
    model.eval()


def test_gated_rows_are_found_once_per_forward_not_per_layer(monkeypatch):
    """The gated rows (a nonzero: a host sync on GPU) are computed by the first layer of a forward and reused by the
    others; a new forward (the next decoding step) computes them again."""
    model, inputs = _batch("causal_lm")
    layers = model.config.num_hidden_layers
    assert layers >= 2
    seq = inputs["input_ids"].shape[1]
    queries = torch.zeros(2, seq, dtype=torch.bool)
    queries[:, -3:] = True
    keys = torch.zeros(2, seq, dtype=torch.bool)
    keys[:, :4] = True
    calls = []
    original = torch.Tensor.nonzero

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "nonzero", counting)
    with torch.no_grad(), attention_bias(model, queries, keys, -2.0), record_attention(model, queries, keys):
        model(**inputs)
        first = len(calls)
        model(**inputs)
    assert first == 2 and len(calls) == 4  # gate + recorder rows, once per forward (not once per layer)


def test_recording_refuses_reentrant_checkpointing_only():
    # Reentrant checkpointing runs the layers' forward without grad: recorded rows would carry no gradient, so it is
    # refused. A model in training mode recording under no_grad without checkpointing (sampling while training) is
    # not that case and records.
    model, inputs = _batch("qwen2_5_vl")
    ids = inputs["input_ids"]
    rows = torch.zeros_like(ids, dtype=torch.bool)
    rows[:, -2:] = True
    model.train()
    with torch.no_grad(), record_attention(model, rows, image_token_mask(model, ids)) as rec:
        model(**inputs)
    assert len(rec.weights) == ids.shape[0]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant"), record_attention(model, rows, image_token_mask(model, ids)):
        model(**inputs)
