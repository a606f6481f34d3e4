"""Hidden-state capture on the tiny zoo: selected rows only, equal to hook-free references, in forward and generate."""

from __future__ import annotations

import pytest
import torch
from latent_core.capture import capture_hidden_states, select_mask, select_predictors, select_tokens
from latent_core.families import model_parts
from latent_core.testing import tiny_image, tiny_model

FAMILIES = ["causal_lm", "qwen2_5_vl", "mllama", "llava"]
QUESTIONS = ["How many?", "Is there a yellow star in the image at row 3 column 2?", "What colour is the shape?"]


def _batch(family, processor, questions):
    """Left-padded processor inputs, one image per prompt for the VLM families."""
    if family == "causal_lm":
        texts = [
            processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in questions
        ]
        return processor(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    images = [[tiny_image(i)] if family == "mllama" else tiny_image(i) for i in range(len(questions))]
    return processor(images=images, text=texts, return_tensors="pt", add_special_tokens=False, padding=True)


def _teacher_forced(inputs, sequences):
    """Inputs for one forward over prompt + generated tokens, extended the way generate extends them."""
    n_new = sequences.shape[1] - inputs["input_ids"].shape[1]
    full = dict(inputs, input_ids=sequences)
    mask = inputs["attention_mask"]
    full["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], n_new)], 1)
    if "mm_token_type_ids" in inputs:  # Qwen2.5-VL: text tokens after the prompt
        types = inputs["mm_token_type_ids"]
        full["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], n_new)], 1)
    if "cross_attention_mask" in inputs:  # mllama: generated tokens see the images the last prompt token saw
        cam = inputs["cross_attention_mask"]
        full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].repeat(1, n_new, 1, 1)], 1)
    return full


def _own_storage(rows):
    """The stored rows are copies, not views holding the whole [batch, seq, hidden] output alive."""
    return all(r.untyped_storage().nbytes() == r.numel() * r.element_size() for r in rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_by_token_mask_and_predictor(family):
    model, processor = tiny_model(family)
    inputs = _batch(family, processor, QUESTIONS[:2])
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    assert not valid.all()  # left padding present
    eos = _tokenizer(processor).eos_token_id  # in the prompt of every template (end of the user turn)
    target = int(ids[0, -3])  # a token near the end of the prompt
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    n = len(model_parts(model).decoder_layers)

    with torch.no_grad():
        with (
            capture_hidden_states(model, [eos, target]) as by_token,
            capture_hidden_states(model, select_mask(mask)) as by_mask,
            capture_hidden_states(model, select_predictors(target)) as by_pred,
            capture_hidden_states(model, select_tokens(eos), layer=0) as layer0,
            capture_hidden_states(model, select_tokens(eos), layer=n - 1) as last_layer,
        ):
            out = model(**inputs, output_hidden_states=True)

    # In transformers 5.23 hidden_states[-1] is the final-norm output (= lm_head input); hidden_states[i + 1] is
    # decoder layer i's output for every layer but the last, whose raw output is not in the tuple.
    ref = out.hidden_states[-1]
    torch.testing.assert_close(model.get_output_embeddings()(ref), out.logits, rtol=0, atol=1e-5)
    for b in range(ids.shape[0]):
        expected = {
            "token": [t for t in range(ids.shape[1]) if valid[b, t] and int(ids[b, t]) in (eos, target)],
            "mask": [t for t in range(ids.shape[1]) if valid[b, t] and mask[b, t]],
            "pred": [t for t in range(ids.shape[1] - 1) if valid[b, t] and int(ids[b, t + 1]) == target],
            "eos": [t for t in range(ids.shape[1]) if valid[b, t] and int(ids[b, t]) == eos],
        }
        assert expected["token"] and expected["mask"] and expected["pred"]
        for rec, key in ((by_token, "token"), (by_mask, "mask"), (by_pred, "pred")):
            pos = expected[key]
            assert rec.positions[b] == pos
            assert rec.states[b].shape == (len(pos), ref.shape[-1])  # only the selected rows are stored
            assert _own_storage(rec._rows[b])
            torch.testing.assert_close(rec.states[b], ref[b, pos], rtol=0, atol=1e-6)
            # Independent of output_hidden_states: the captured rows are what lm_head turns into the logits.
            torch.testing.assert_close(
                model.get_output_embeddings()(rec.states[b]), out.logits[b, pos], rtol=0, atol=1e-5
            )
        assert by_token.token_ids[b] == [int(ids[b, t]) for t in expected["token"]]
        assert by_pred.token_ids[b] == [target] * len(expected["pred"])
        assert by_mask.token_ids[b] == [int(ids[b, t]) for t in expected["mask"]]
        torch.testing.assert_close(layer0.states[b], out.hidden_states[1][b, expected["eos"]], rtol=0, atol=1e-6)
        assert last_layer.positions[b] == expected["eos"]
        assert not torch.allclose(last_layer.states[b], ref[b, expected["eos"]])  # before the final norm


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_matches_teacher_forced_forward(family):
    model, processor = tiny_model(family)
    inputs = _batch(family, processor, QUESTIONS if family == "causal_lm" else QUESTIONS[:2])
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    # Select the most frequent generated token that is fed back (all but the last generated column).
    values, counts = sequences[:, prompt_len:-1].unique(return_counts=True)
    chosen = int(values[counts.argmax()])

    with torch.no_grad():
        with (
            capture_hidden_states(model, select_tokens(chosen)) as at,
            capture_hidden_states(model, select_predictors(chosen)) as before,
        ):
            again = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        n_pending = len(before._pending)
        before.finalize(again)
        reference = model(**_teacher_forced(inputs, sequences), output_hidden_states=True).hidden_states[-1]
    assert torch.equal(again, sequences) and n_pending == len(QUESTIONS[: sequences.shape[0]])

    valid = _teacher_forced(inputs, sequences)["attention_mask"].bool()
    length = sequences.shape[1]
    assert len(at) == len(before) == sequences.shape[0]
    for b in range(sequences.shape[0]):
        fed = [t for t in range(length - 1) if valid[b, t] and int(sequences[b, t]) == chosen]
        predicting = [t for t in range(length - 1) if valid[b, t] and int(sequences[b, t + 1]) == chosen]
        assert at.positions[b] == fed and before.positions[b] == predicting
        assert at.token_ids[b] == [chosen] * len(fed) and before.token_ids[b] == [chosen] * len(predicting)
        assert at.states[b].shape == (len(fed), reference.shape[-1])
        torch.testing.assert_close(at.states[b], reference[b, fed], rtol=0, atol=1e-5)
        torch.testing.assert_close(before.states[b], reference[b, predicting], rtol=0, atol=1e-5)


def test_finalize_settles_the_last_predicted_token():
    model, processor = tiny_model("causal_lm")
    inputs = _batch("causal_lm", processor, QUESTIONS[:1])
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        last = int(sequences[0, -1])
        with capture_hidden_states(model, select_predictors(last)) as rec:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        before_finalize = list(rec.positions[0])
        rec.finalize(sequences)
        reference = model(input_ids=sequences, output_hidden_states=True).hidden_states[-1][0]
    end = sequences.shape[1] - 2  # the last fed position, which predicted the last generated token
    assert end not in before_finalize and rec.positions[0] == [*before_finalize, end]
    assert rec.token_ids[0][-1] == last
    torch.testing.assert_close(rec.states[0][-1], reference[end], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="generated sequences"):
        rec.finalize([1, 2])


def test_hooks_removed_after_the_context_even_on_error():
    model, processor = tiny_model("causal_lm")
    parts = model_parts(model)
    modules = [model, parts.final_norm, parts.decoder_layers[1]]

    def counts():
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules]

    empty = counts()
    with capture_hidden_states(model, [5], layer=1):
        assert counts() != empty
    assert counts() == empty
    with pytest.raises(KeyError), capture_hidden_states(model, [5]):
        raise KeyError("body failed")
    assert counts() == empty
    inputs = _batch("causal_lm", processor, QUESTIONS[:1])
    with (
        pytest.raises(ValueError, match="mask has shape"),
        capture_hidden_states(model, select_mask(torch.ones(1, 2, dtype=torch.bool))),
    ):
        model(**inputs)
    assert counts() == empty


def test_bad_selections_say_what_is_wrong():
    model, processor = tiny_model("causal_lm")
    inputs = _batch("causal_lm", processor, QUESTIONS[:2])
    seq = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\) but .*\[2, " + str(seq)):
        with capture_hidden_states(model, select_mask(torch.ones(2, 3, dtype=torch.bool))):
            model(**inputs)
    with pytest.raises(ValueError, match="during generate"):
        with torch.no_grad(), capture_hidden_states(model, select_mask(torch.ones(2, seq, dtype=torch.bool))):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="boolean tensor"):
        select_mask(torch.ones(2, seq))
    for layer in (2, -2, 1.0):
        with pytest.raises(ValueError, match=r"layer must be -1 \(the final norm\) or a decoder layer index 0\.\.1"):
            with capture_hidden_states(model, [5], layer=layer):
                pass
    with pytest.raises(TypeError, match="non-empty list of token ids"):
        select_tokens([])
    with pytest.raises(TypeError, match="non-empty list of token ids"):
        select_predictors(["<a>"])
    with pytest.raises(TypeError, match="select_mask"):
        with capture_hidden_states(model, torch.ones(2, seq, dtype=torch.bool)):
            pass

    # Mllama skips its cross-attention layer without an image: capturing it says so instead of recording nothing.
    mllama, mllama_processor = tiny_model("mllama")
    text = _batch("causal_lm", mllama_processor.tokenizer, QUESTIONS[:1])
    with pytest.raises(RuntimeError, match="decoder layer 1 did not run"), torch.no_grad():
        with capture_hidden_states(mllama, [5], layer=1):
            mllama(**text)


# PEFT 0.21 still calls transformers' deprecated `is_gradient_checkpointing`.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_runs_grad_checkpointing_and_peft():
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_model("causal_lm")
    a = _batch("causal_lm", processor, QUESTIONS[:2])
    b = _batch("causal_lm", processor, QUESTIONS[2:])
    eos = processor.eos_token_id
    with torch.no_grad(), capture_hidden_states(model, [eos], device="cpu") as rec:
        model(**a)
        model(**b)  # a second sequence: a new run, its sample numbered after the first two
    assert len(rec) == 3 and all(len(p) == 1 for p in rec.positions)
    assert rec.positions[2] == (b["input_ids"][0] == eos).nonzero().flatten().tolist()
    assert all(s.device.type == "cpu" for s in rec.states)

    # keep_grad: the rows stay in the graph. Backward with activation checkpointing records nothing more (transformers
    # 5.23 checkpoints `forward`, so hooks do not re-run), and a module called outside a model call is ignored.
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    with (
        capture_hidden_states(model, [eos], layer=0, keep_grad=True) as rec,
        capture_hidden_states(model, [eos], keep_grad=True) as final,
    ):
        out = model(**a)
        (rec.states[0].sum() + final.states[1].sum() + out.logits.sum()).backward()
        model_parts(model).final_norm(torch.randn(2, 3, 64))
    assert rec.states[0].requires_grad and final.states[1].grad_fn is not None
    assert [len(p) for p in rec.positions] == [len(p) for p in final.positions] == [1, 1]
    model.activation_checkpointing_disable()
    model.eval()

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad(), capture_hidden_states(peft_model, [eos]) as rec:
        out = peft_model(**a)
    assert not rec.states[0].requires_grad
    logits = model_parts(peft_model).lm_head(rec.states[0])
    torch.testing.assert_close(logits, out.logits[0, rec.positions[0]], rtol=0, atol=1e-5)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)
