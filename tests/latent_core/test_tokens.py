"""Token surgery on the tiny zoo: rows reused or grown, initialised as asked, idempotent, trainable with PEFT."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from latent_core.testing import TINY_FAMILIES, tiny_model
from latent_core.tokens import add_special_tokens, trainable_token_indices
from latent_core.zero3 import num_rows
from transformers import AutoModelForImageTextToText

NEW = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>"]
TIED = {"qwen2_5_vl": True, "llava": True, "causal_lm": False, "mllama": False, "llava_next": False}


def _tok(processor):
    return getattr(processor, "tokenizer", processor)


def _weights(model):
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mean_init_rows_and_model_still_runs(family):
    model, processor = tiny_model(family)
    tokenizer = _tok(processor)
    n_before = len(tokenizer)
    emb0, head0 = (w.detach().clone() for w in _weights(model))

    ids = add_special_tokens(model, processor, NEW)

    assert ids == [n_before, n_before + 1]
    for token, token_id in zip(NEW, ids, strict=True):
        assert tokenizer.encode(f"a {token} b", add_special_tokens=False).count(token_id) == 1
        assert tokenizer.decode([token_id], skip_special_tokens=True) == ""  # registered as special
    emb, head = _weights(model)
    assert (head is emb) == TIED[family]
    # New rows: the mean of the real vocabulary rows (spare rows excluded), in both tables.
    for token_id in ids:
        torch.testing.assert_close(emb[token_id], emb0[:n_before].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(head[token_id], head0[: min(n_before, len(head0))].mean(0), rtol=0, atol=1e-6)
    # Existing rows untouched, bit for bit.
    assert torch.equal(emb[:n_before], emb0[:n_before]) and torch.equal(head[: len(head0)][:n_before], head0[:n_before])
    assert model.config.get_text_config().vocab_size == head.shape[0] > max(ids)

    # The model reads the new tokens and can predict and generate them.
    prompt = torch.tensor([tokenizer.encode(f"How many red circles? {NEW[0]} {NEW[1]}", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=prompt).logits
        out = model.generate(input_ids=prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert logits.shape[-1] == head.shape[0] and torch.isfinite(logits).all()
    assert out.shape == (1, prompt.shape[1] + 2)


@pytest.mark.parametrize("family", ["causal_lm", "qwen2_5_vl"])
def test_spare_rows_are_reused_without_resize(family):
    model, processor = tiny_model(family)
    n_before = len(_tok(processor))
    model.resize_token_embeddings(n_before + 8, mean_resizing=False)  # a table larger than the vocabulary
    emb, head = _weights(model)
    with torch.no_grad():
        emb[n_before:] = 100.0  # garbage in the spare rows must not enter the mean
        head[n_before:] = 100.0
    emb0, head0 = emb.detach().clone(), head.detach().clone()

    ids = add_special_tokens(model, processor, NEW + ["<x>"])

    assert ids == [n_before, n_before + 1, n_before + 2]
    assert model.get_input_embeddings().weight is emb and model.get_output_embeddings().weight is head  # no resize
    assert emb.shape[0] == head.shape[0] == model.config.get_text_config().vocab_size == n_before + 8
    for w, w0 in ((emb, emb0), (head, head0)):
        torch.testing.assert_close(w[ids], w0[:n_before].mean(0).expand(3, -1), rtol=0, atol=1e-6)
        assert torch.equal(w[:n_before], w0[:n_before]) and torch.equal(w[n_before + 3 :], w0[n_before + 3 :])


def test_mllama_lm_head_grows_and_the_model_loads_back(tmp_path):
    """Mllama: embedding = vocab_size + 8 rows, lm_head = vocab_size. New ids fall in spare embedding rows, but lm_head
    needs rows to generate them; the head grows and the embedding keeps its + 8, so save/load round-trips."""
    model, processor = tiny_model("mllama")
    tokenizer = _tok(processor)
    # As in the real checkpoint, the tokenizer has one token (<|image|> = 128256 there) without an lm_head row.
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|no_head_row|>"]}, replace_extra_special_tokens=False)
    filler = len(tokenizer) - 1
    emb0, head0 = (w.detach().clone() for w in _weights(model))
    assert (emb0.shape[0], head0.shape[0]) == (filler + 8, filler)

    ids = add_special_tokens(model, processor, NEW, init="text", init_text="red circle")

    assert ids == [filler + 1, filler + 2]
    emb, head = _weights(model)
    assert head.shape[0] == model.config.text_config.vocab_size == filler + 3
    assert emb.shape[0] == head.shape[0] + 8
    text_ids = tokenizer.encode("red circle", add_special_tokens=False)
    for token_id in ids:
        torch.testing.assert_close(emb[token_id], emb0[text_ids].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(head[token_id], head0[text_ids].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(head[filler], head0.mean(0), rtol=0, atol=1e-6)  # filler row: mean, not garbage
    assert torch.equal(emb[: filler + 1], emb0[: filler + 1]) and torch.equal(head[:filler], head0)

    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    x = torch.tensor([[5, 9, ids[0], 17, ids[1]]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_resize_path_grows_both_tables():
    model, processor = tiny_model("causal_lm")
    n_before = len(_tok(processor))
    emb0, head0 = (w.detach().clone() for w in _weights(model))
    ids = add_special_tokens(model, processor, NEW, init="random", seed=0)
    emb, head = _weights(model)
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == n_before + 2 == max(ids) + 1
    assert torch.equal(emb[:n_before], emb0) and torch.equal(head[:n_before], head0)


def test_idempotent_and_only_new_tokens_initialised():
    model, processor = tiny_model("llava_next")
    ids = add_special_tokens(model, processor, NEW, init="random", seed=0)
    state = _snapshot(model)
    assert add_special_tokens(model, processor, NEW, init="random", seed=1) == ids
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    more = add_special_tokens(model, processor, [NEW[1], "<THINKING_OF_REASONING>", NEW[0]], init="mean")
    assert more == [ids[1], ids[1] + 1, ids[0]]
    emb, head = _weights(model)
    assert torch.equal(emb[ids], state["model.language_model.embed_tokens.weight"][ids])  # old rows kept
    assert torch.equal(head[ids], state["lm_head.weight"][ids])


def test_random_init_is_seeded_with_the_rows_std():
    rows = []
    for seed in (0, 0, 1):
        model, processor = tiny_model("causal_lm")
        n_before = len(_tok(processor))
        ref_emb, ref_head = (w[:n_before].detach().clone() for w in _weights(model))
        ids = add_special_tokens(model, processor, [f"<latent_{i}>" for i in range(64)], init="random", seed=seed)
        emb, head = _weights(model)
        rows.append((emb[ids].detach().clone(), head[ids].detach().clone()))
    (e0, h0), (e1, h1), (e2, _) = rows
    assert torch.equal(e0, e1) and torch.equal(h0, h1) and not torch.equal(e0, e2)
    for new, ref in ((e0, ref_emb), (h0, ref_head)):  # 64 x 64 draws: std within 5 %, mean near zero
        assert abs(float(new.std()) / float(ref.std()) - 1) < 0.05
        assert abs(float(new.mean())) < 0.1 * float(ref.std())
    assert not torch.equal(e0, h0)  # the untied head gets its own draws


def test_zero3_path_gathers_and_writes_on_rank_zero(monkeypatch):
    """ZeRO-3 cannot run here; check that the row writes go through GatheredParameters(modifier_rank=0)."""
    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            calls.append(([id(p) for p in params], modifier_rank))

        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    import latent_core.zero3 as zero3_module

    monkeypatch.setattr(zero3_module, "zero3_enabled", lambda: True)

    model, processor = tiny_model("mllama")  # spare embedding rows: the head grows with transformers (no ZeRO there)
    n_before = len(_tok(processor))
    ids = add_special_tokens(model, processor, NEW)
    emb, head = _weights(model)
    assert calls == [([id(emb), id(head)], 0), "enter", "exit"]
    torch.testing.assert_close(emb[ids[0]], emb[:n_before].mean(0), rtol=0, atol=1e-6)

    # On another rank the gathered copy is not written (rank 0's rows are broadcast on exit).
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    model, processor = tiny_model("causal_lm")
    model.resize_token_embeddings(len(_tok(processor)) + 4, mean_resizing=False)
    before = _snapshot(model)
    add_special_tokens(model, processor, NEW)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    partitioned = torch.empty(0)
    partitioned.ds_shape = torch.Size([10, 4])
    assert num_rows(partitioned) == 10


# PEFT 0.21 still calls transformers' deprecated `is_gradient_checkpointing`.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "causal_lm", "mllama", "llava_next"])
def test_trainable_token_indices_with_peft(family):
    from latent_core.families import lora_target_modules, model_parts
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_model(family)
    ids = add_special_tokens(model, processor, NEW)
    value = trainable_token_indices(model, ids)
    if TIED[family]:
        assert value == ids
    else:
        emb_name = "model.embed_tokens" if family == "causal_lm" else "model.language_model.embed_tokens"
        assert value == {emb_name: ids, "lm_head": ids}
    emb0, head0 = (w.detach().clone() for w in _weights(model))
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=lora_target_modules(model), trainable_token_indices=value)
    )
    extra = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert len(extra) == (1 if TIED[family] else 2)
    assert all("trainable_tokens_delta" in n and p.shape == (2, emb0.shape[1]) for n, p in extra.items())

    with torch.no_grad():  # move the trainable rows: only the new ids may change, in the embedding and in lm_head
        for p in extra.values():
            p.add_(1.0)
        parts = model_parts(peft_model)
        x = torch.tensor([[3, ids[0], 7, ids[1]]])
        changed = (parts.input_embeddings(x) != emb0[x]).any(-1)[0]
        assert changed.tolist() == [False, True, False, True]
        h = torch.randn(3, emb0.shape[1])
        moved = (parts.lm_head(h) != h @ head0.T).any(0)
        assert moved.nonzero().flatten().tolist() == ids


def test_bad_inputs_say_what_is_wrong():
    model, processor = tiny_model("causal_lm")
    with pytest.raises(ValueError, match="tokens is empty"):
        add_special_tokens(model, processor, [])
    with pytest.raises(TypeError, match="non-empty string.*3"):
        add_special_tokens(model, processor, ["<a>", 3])
    with pytest.raises(TypeError, match="list of strings"):
        add_special_tokens(model, processor, "<a>")
    with pytest.raises(ValueError, match="more than once"):
        add_special_tokens(model, processor, ["<a>", "<a>"])
    with pytest.raises(ValueError, match="unknown init 'zeros'"):
        add_special_tokens(model, processor, ["<a>"], init="zeros")
    with pytest.raises(ValueError, match="needs init_text"):
        add_special_tokens(model, processor, ["<a>"], init="text")
    with pytest.raises(ValueError, match="only used with init='text'"):
        add_special_tokens(model, processor, ["<a>"], init_text="red")
    with pytest.raises(ValueError, match="contains the tokens being added"):
        add_special_tokens(model, processor, ["<a>"], init="text", init_text="red <a>")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        add_special_tokens(torch.nn.Linear(2, 2), processor, ["<a>"])
    model.get_input_embeddings = lambda: None
    with pytest.raises(ValueError, match="no input embeddings"):
        add_special_tokens(model, processor, ["<a>"])
    assert "<a>" not in _tok(processor).get_vocab()  # nothing was added by the failed calls

    model, processor = tiny_model("mllama")
    with pytest.raises(ValueError, match="no row in the lm_head"):
        trainable_token_indices(model, [len(_tok(processor)) + 1])
    with pytest.raises(ValueError, match="empty"):
        trainable_token_indices(model, [])
