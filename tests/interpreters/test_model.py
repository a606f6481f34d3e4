"""The interpreter's injection: the placeholder embedding replaced after the embedding layer (METHODS.md §1)."""

from __future__ import annotations

import pytest
import torch
from interpreters.data import InterpreterCollator, prompt_batch
from interpreters.model import InterpreterModel, apply_condition, build_interpreter
from latent_core.testing import tiny_model
from torch import nn

QUESTIONS = ["How many red circles are there?", "Is there a yellow star?"]
TARGETS = ["There is a red circle.", "There is a blue square at row 2 column 1."]


def _rows(hidden):
    return [
        {"id": str(i), "question": q, "target": t, "hidden": h}
        for i, (q, t, h) in enumerate(zip(QUESTIONS, TARGETS, hidden, strict=True))
    ]


def _hand_embeds(model: InterpreterModel, input_ids, projected):
    embeds = model.backbone.get_input_embeddings()(input_ids).clone()
    for b in range(len(input_ids)):
        (col,) = (input_ids[b] == model.placeholder_id).nonzero().flatten().tolist()
        embeds[b, col] = projected[b]
    return embeds


def test_injected_forward_equals_inputs_embeds_forward():
    base, tokenizer = tiny_model("causal_lm")
    model = build_interpreter(base, tokenizer, hidden_size=64).eval()  # 64 = tiny LM size: identity projector
    assert isinstance(model.projector, nn.Identity)
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    batch = InterpreterCollator(tokenizer)(_rows(hidden))
    assert (batch["input_ids"] == model.placeholder_id).sum(1).tolist() == [1, 1]
    assert (batch["labels"] != -100).sum() > 0
    with torch.no_grad():
        out = model(**batch)
        embeds = _hand_embeds(model, batch["input_ids"], hidden)
        ref = model.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        plain = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["loss"], ref.loss, atol=1e-6, rtol=0)
    assert not torch.allclose(out["logits"], plain.logits)  # the state really changed the output
    # the hook is gone after the call: the backbone alone is the plain model again
    with torch.no_grad():
        again = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(again.logits, plain.logits, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_for_mismatched_sizes(kind):
    base, tokenizer = tiny_model("causal_lm")
    model = build_interpreter(base, tokenizer, hidden_size=48, projector=kind if kind == "mlp" else "auto")
    if kind == "linear":
        assert isinstance(model.projector, nn.Linear)
        assert tuple(model.projector.weight.shape) == (64, 48)
    hidden = torch.randn(2, 48, generator=torch.Generator().manual_seed(1))
    batch = InterpreterCollator(tokenizer)(_rows(hidden))
    out = model(**batch)
    out["loss"].backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.requires_grad for p in model.projector.parameters())
    model.eval()
    with torch.no_grad():
        out = model(**batch)
        projected = model.projector(hidden)
        if kind == "linear":
            torch.testing.assert_close(projected, hidden @ model.projector.weight.T + model.projector.bias)
        embeds = _hand_embeds(model, batch["input_ids"], projected)
        ref = model.backbone(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out["logits"], ref.logits, atol=1e-6, rtol=0)
    # the trainer saves the projector as an extra module (trainable, not held by PEFT)
    from latent_core.trainer import extra_state_dict

    assert set(extra_state_dict(model)) == {f"projector.{n}" for n, _ in model.projector.named_parameters()}


def test_generate_injects_at_prefill_only_and_conditions():
    base, tokenizer = tiny_model("causal_lm")
    model = build_interpreter(base, tokenizer, hidden_size=64, lora=False).eval()
    hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)) * 5
    inputs = prompt_batch(tokenizer, ["How many?", "What colour is the shape at row 3 column 3?"])
    assert (inputs["attention_mask"] == 0).any()  # left-padded
    out = model.generate(
        inputs["input_ids"],
        hidden,
        attention_mask=inputs["attention_mask"],
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
    twice = torch.cat([inputs["input_ids"], torch.full((2, 1), model.placeholder_id)], 1)
    with pytest.raises(ValueError, match="exactly once"):
        model(input_ids=twice, hidden=hidden)
    with pytest.raises(RuntimeError, match="not replaced"):
        model(input_ids=inputs["input_ids"][:, -3:], hidden=hidden)
    # controls
    assert torch.equal(apply_condition(hidden, "real"), hidden)
    assert torch.equal(apply_condition(hidden, "zero"), torch.zeros_like(hidden))
    many = torch.arange(10.0)[:, None].expand(10, 3)
    shuffled = apply_condition(many, "shuffled", seed=3)
    assert sorted(shuffled[:, 0].tolist()) == list(range(10))  # a permutation ...
    assert (shuffled[:, 0] != many[:, 0]).all()  # ... with no fixed point
    assert torch.equal(shuffled, apply_condition(many, "shuffled", seed=3))  # seeded
