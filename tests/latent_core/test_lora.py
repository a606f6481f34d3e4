"""LoRA helpers and TrainableRows on the tiny zoo: targets, freezing, PEFT-vs-rows equivalence, merge, save, export."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from latent_core.families import lora_target_modules, model_parts
from latent_core.hub import load_model
from latent_core.lora import default_lora_config, export_merged, prepare_lora_model, resolve_rows_route
from latent_core.testing import TINY_FAMILIES, tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from latent_core.trainable_rows import (
    TrainableRows,
    attach_trainable_rows,
    detach_trainable_rows,
    get_trainable_rows,
    merge_trainable_rows,
)
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# PEFT 0.21 still calls transformers' deprecated `is_gradient_checkpointing`.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

NEW = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>"]
TIED = {"qwen2_5_vl": True, "llava": True, "causal_lm": False, "mllama": False, "llava_next": False}


def _with_tokens(family):
    model, processor = tiny_model(family)
    ids = add_special_tokens(model, processor, NEW)
    return model, processor, ids


def _prepared(family, route, include_lm_head=False, dtype=torch.float32):
    model, processor = tiny_model(family)
    model.to(dtype)
    ids = add_special_tokens(model, processor, NEW)
    torch.manual_seed(0)  # LoRA's A matrices: the same draws on both routes
    peft_model = prepare_lora_model(model, new_token_ids=ids, rows_route=route, r=4, include_lm_head=include_lm_head)
    return peft_model, processor, ids


def _batch(ids):
    """Text with the new tokens as inputs and as targets, so both the embedding and the lm_head rows get gradients."""
    return torch.tensor([[3, ids[0], 7, ids[1], 9, ids[0], 11], [ids[1], 4, 5, ids[0], 8, 2, ids[1]]])


def _train(model, ids, steps=3, optimizer="adamw"):
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    x = _batch(ids)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=_batch(ids)).logits


def _row_params(model):
    """Trainable parameters that are not LoRA matrices: the new rows, whatever the route."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def _tables(model):
    """The embedding and lm_head tables the model computes with ([vocab, d] each), new rows included, LoRA excluded."""
    parts = model_parts(model)
    d = model.config.get_text_config().hidden_size
    head = parts.lm_head
    if "lora_A" in head._modules:  # LoRA on lm_head: look underneath (PEFT's token wrapper or our hooked Linear)
        head = head.base_layer
    with torch.no_grad():
        vocab = torch.arange(model.get_input_embeddings().weight.shape[0])
        return parts.input_embeddings(vocab), head(torch.eye(d, dtype=model.dtype)).T


# ---------------------------------------------------------------------------------------------------------------
# Config and freezing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_default_config_targets_language_modules_only(family):
    model, _, ids = _with_tokens(family)
    layers = "model.layers." if family == "causal_lm" else "model.language_model.layers."
    for include_lm_head in (False, True):
        config = default_lora_config(model, include_lm_head=include_lm_head)
        assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.0)  # Heima, Table A1/A2
        assert config.trainable_token_indices is None
        matched = [n for n, _ in model.named_modules() if check_target_module_exists(config, n)]
        in_layers = [n for n in matched if n.startswith(layers)]
        assert set(matched) - set(in_layers) == ({"lm_head"} if include_lm_head else set())
        # 7 per layer: q/k/v/o + gate/up/down (mllama's cross-attention layers: cross_attn q/k/v/o + the MLP)
        assert len(in_layers) == 7 * model.config.get_text_config().num_hidden_layers
        assert any(".cross_attn." in n for n in in_layers) == (family == "mllama")

    config = default_lora_config(model, r=8, new_token_ids=ids, lora_alpha=4, target_modules=["q_proj"])
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 4, {"q_proj"})  # overrides win
    assert config.trainable_token_indices == (ids if TIED[family] else {_emb_name(family): ids, "lm_head": ids})
    with_head = default_lora_config(model, new_token_ids=ids, include_lm_head=True)
    expected = ids if TIED[family] else {_emb_name(family): ids, "lm_head.base_layer": ids}  # nested inside LoRA
    assert with_head.trainable_token_indices == expected
    assert default_lora_config(model, new_token_ids=ids, route="rows").trainable_token_indices is None


def _emb_name(family):
    return "model.embed_tokens" if family == "causal_lm" else "model.language_model.embed_tokens"


@pytest.mark.parametrize("route", ["peft", "rows"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_prepare_trains_only_lora_and_new_rows(family, route):
    model, _, ids = _with_tokens(family)
    vision = model_parts(model).vision_tower
    for p in model.parameters():
        p.requires_grad_(True)  # prepare must freeze everything itself
    peft_model = prepare_lora_model(model, new_token_ids=ids, rows_route=route, r=2)

    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    rows = _row_params(peft_model)
    assert all("lora_A" in n or "lora_B" in n for n in trainable if n not in rows)
    assert sum("lora_" in n for n in trainable) == 2 * 7 * model.config.get_text_config().num_hidden_layers
    if route == "peft":
        assert len(rows) == (1 if TIED[family] else 2)
        assert all("trainable_tokens_delta" in n for n in rows)
    else:
        prefix = "base_model.model.latent_trainable_rows."
        assert set(rows) == {prefix + "rows"} | (set() if TIED[family] else {prefix + "head_rows"})
    assert all(p.shape == (len(ids), model.config.get_text_config().hidden_size) for p in rows.values())
    if vision is not None:
        assert not any(p.requires_grad for p in vision.parameters())
        assert not any(
            n.startswith(("base_model.model.model.visual", "base_model.model.model.vision")) for n in trainable
        )


# ---------------------------------------------------------------------------------------------------------------
# PEFT route == rows route
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "family, include_lm_head",
    [("qwen2_5_vl", False), ("llava", True), ("causal_lm", False), ("causal_lm", True), ("mllama", True)],
)
def test_rows_route_equals_peft_route_after_training(family, include_lm_head, dtype):
    """Same seed, data and optimizer: after 3 steps both routes give the same logits and the same rows, and only the
    new rows of the embedding / lm_head tables moved.

    float64 with AdamW: the two routes agree to rounding (~1e-16), i.e. the same math. float32 uses SGD: Adam's first
    steps divide g by |g|, which blows float32 rounding in near-zero LoRA gradients up to ~1e-5 in the logits.
    """
    optimizer, atol = ("adamw", 1e-12) if dtype == torch.float64 else ("sgd", 1e-5)
    results = {}
    for route in ("peft", "rows"):
        model, _, ids = _prepared(family, route, include_lm_head, dtype)
        emb0, head0 = _tables(model)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        rows0 = {n: p.detach().clone() for n, p in _row_params(model).items()}
        _train(model, ids, optimizer=optimizer)
        emb, head = _tables(model)
        for table, table0 in ((emb, emb0), (head, head0)):
            moved = (table != table0).any(-1).nonzero().flatten().tolist()
            assert moved == ids, f"{route}: rows {moved} moved, expected only {ids}"
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
        assert all(not torch.equal(p, rows0[n]) for n, p in _row_params(model).items())
        results[route] = (_logits(model, ids), emb[ids], head[ids])

    (peft_logits, peft_emb, peft_head), (rows_logits, rows_emb, rows_head) = results["peft"], results["rows"]
    assert rows_logits.dtype == dtype
    torch.testing.assert_close(rows_logits, peft_logits, rtol=0, atol=atol)
    torch.testing.assert_close(rows_emb, peft_emb, rtol=0, atol=atol)
    torch.testing.assert_close(rows_head, peft_head, rtol=0, atol=atol)
    assert torch.equal(rows_emb, rows_head) == TIED[family]  # a tied head shares the rows


def test_rows_route_with_an_image_and_generate():
    """The hooks see what the model embeds: image tokens untouched, new tokens replaced; cached generate works."""
    model, processor, ids = _prepared("qwen2_5_vl", "rows")
    with torch.no_grad():
        model.base_model.model.latent_trainable_rows.rows.add_(1.0)
    text = f"<|vision_start|><|image_pad|><|vision_end|>How many red circles? {NEW[0]}{NEW[1]}"
    inputs = processor(text=[text], images=[tiny_image()], return_tensors="pt")
    embedded = model.get_input_embeddings()(inputs["input_ids"])
    plain = model.get_input_embeddings().weight[inputs["input_ids"]]
    moved = (embedded != plain).any(-1)[0]
    assert moved.tolist() == [i in ids for i in inputs["input_ids"][0].tolist()]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# ---------------------------------------------------------------------------------------------------------------
# TrainableRows: merge, detach, save/load, ZeRO-3 path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "causal_lm"])
def test_merge_trainable_rows_keeps_logits(family):
    model, _, ids = _prepared(family, "rows", include_lm_head=True)
    _train(model, ids, steps=2)
    before = _logits(model, ids)
    trainable = get_trainable_rows(model)
    rows = trainable.rows.detach().clone()
    head_rows = rows if trainable.tied else trainable.head_rows.detach().clone()

    merge_trainable_rows(model)

    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-6)
    assert get_trainable_rows(model) is None
    assert not any("latent_trainable_rows" in n for n in model.state_dict())
    assert not any(m._forward_hooks for m in model.modules())
    parts = model_parts(model)
    assert torch.equal(parts.input_embeddings.weight[ids], rows)
    assert torch.equal(parts.lm_head.base_layer.weight[ids], head_rows)
    with pytest.raises(ValueError, match="no trainable rows attached"):
        merge_trainable_rows(model)


def test_detach_restores_the_base_model():
    model, _, ids = _with_tokens("llava_next")
    reference = _logits(model, ids)
    trainable = attach_trainable_rows(model, ids)
    assert model.latent_trainable_rows is trainable and trainable.head_rows is not None
    with torch.no_grad():
        trainable.rows.add_(1.0)
        trainable.head_rows.add_(1.0)
    assert not torch.allclose(_logits(model, ids), reference)
    assert detach_trainable_rows(model) is trainable
    assert torch.equal(_logits(model, ids), reference)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["causal_lm", "llava"])
def test_rows_save_and_load_by_name(family, tmp_path):
    """A trainer saves every trainable non-LoRA parameter by name (safetensors); loading them into a freshly prepared
    model (same tokens) gives the trained model back."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, _, ids = _prepared(family, "rows")
    _train(model, ids, steps=2)
    rows = {n: p.detach() for n, p in _row_params(model).items()}
    names = {"rows"} | (set() if TIED[family] else {"head_rows"})
    assert set(rows) == {f"base_model.model.latent_trainable_rows.{n}" for n in names}
    save_file(rows, str(tmp_path / "rows.safetensors"))
    save_file(get_peft_model_state_dict(model), str(tmp_path / "adapter.safetensors"))

    fresh, _, fresh_ids = _prepared(family, "rows")
    assert fresh_ids == ids
    result = fresh.load_state_dict(load_file(str(tmp_path / "rows.safetensors")), strict=False)
    assert not result.unexpected_keys and not any("latent_trainable_rows" in k for k in result.missing_keys)
    set_peft_model_state_dict(fresh, load_file(str(tmp_path / "adapter.safetensors")))
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids), rtol=0, atol=0)

    # The module's own state dict: exactly the parameters, under their short names.
    module_state = get_trainable_rows(model).state_dict()
    assert set(module_state) == names
    other, _, _ = _prepared(family, "rows")
    get_trainable_rows(other).load_state_dict(module_state)
    set_peft_model_state_dict(other, get_peft_model_state_dict(model))
    torch.testing.assert_close(_logits(other, ids), _logits(model, ids), rtol=0, atol=0)


# Reloading LoRA on a tied lm_head warns like get_peft_model (prepare_lora_model silences it; see lora.py).
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.parametrize("family", ["causal_lm", "qwen2_5_vl"])
def test_peft_route_adapter_saves_and_reloads(family, tmp_path):
    """PEFT's save/load round-trips the adapter, also with the token wrapper nested in LoRA (`lm_head.base_layer`)."""
    from peft import PeftModel

    model, _, ids = _prepared(family, "peft", include_lm_head=True)
    _train(model, ids, steps=2)
    model.save_pretrained(tmp_path)
    base, _, _ = _with_tokens(family)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_head_bias_rows():
    """An lm_head with a bias: the new columns get trainable bias entries that merge into the bias."""
    model, _, ids = _with_tokens("causal_lm")
    head = model.lm_head
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(head.weight)
    reference = _logits(model, ids)
    trainable = attach_trainable_rows(model, ids)
    assert torch.equal(trainable.head_bias, model.lm_head.bias[ids])
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=1e-6)  # starts as the model
    with torch.no_grad():
        trainable.head_bias.add_(2.0)
    shifted = _logits(model, ids)
    torch.testing.assert_close(shifted[..., ids], reference[..., ids] + 2.0, rtol=0, atol=1e-5)
    merge_trainable_rows(model)
    torch.testing.assert_close(_logits(model, ids), shifted, rtol=0, atol=1e-6)


def test_zero3_path_gathers_rows(monkeypatch):
    """ZeRO-3 needs several processes; check that reads gather without a writer and writes gather with rank 0."""
    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            calls.append((len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    model, _, ids = _with_tokens("causal_lm")  # the tokens added before ZeRO-3 is faked (one definition of it)
    import latent_core.zero3 as zero3_module

    monkeypatch.setattr(zero3_module, "zero3_enabled", lambda: True)
    trainable = attach_trainable_rows(model, ids)
    assert calls == [(2, None)]  # embedding and lm_head weights, read on every rank
    merge_trainable_rows(model)
    assert calls[1] == (4, 0)  # both tables and both row parameters; rank 0 writes
    assert torch.equal(model.lm_head.weight[ids], trainable.head_rows)


def test_hooks_call_the_module():
    """ZeRO-3 gathers a module's parameters in its own forward pre-hook: the rows must be read inside its forward."""
    model, _, ids = _prepared("causal_lm", "rows")
    called = []
    get_trainable_rows(model).register_forward_pre_hook(
        lambda module, args, kwargs: called.append(kwargs["kind"]), with_kwargs=True
    )
    _logits(model, torch.tensor([5, 6]))  # no new token in the batch: the rows still enter the graph
    assert called == ["embed", "head"]


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, route, include_lm_head",
    [
        ("qwen2_5_vl", "peft", False),
        ("qwen2_5_vl", "rows", True),
        ("causal_lm", "rows", True),
        ("mllama", "peft", True),
    ],
)
def test_export_merged_loads_as_a_plain_model(family, route, include_lm_head, tmp_path):
    model, processor, ids = _prepared(family, route, include_lm_head)
    _train(model, ids, steps=2)
    expected = _logits(model, ids)

    out = export_merged(model, processor, tmp_path / "merged")

    loaded = load_model(str(out)).eval()
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=1e-5)
    # The caller's adapter model is untouched (export merged a copy).
    assert (get_trainable_rows(model) is not None) == (route == "rows")
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    # Standalone: no adapter or TrainableRows weights; the tokenizer knows the new tokens.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k or "latent_trainable_rows" in k or "token_adapter" in k for k in keys)
    from latent_core.hub import load_processor

    tokenizer = getattr(load_processor(str(out)), "tokenizer", None) or load_processor(str(out))
    assert tokenizer.convert_tokens_to_ids(NEW) == ids
    # A tied head stays tied unless LoRA adapted it (then it is exported untied).
    assert model_parts(loaded).lm_head_tied == (TIED[family] and not include_lm_head)

    if family == "qwen2_5_vl":  # with an image, through the processor (M-RoPE positions, image features)
        text = f"<|vision_start|><|image_pad|><|vision_end|>How many? {NEW[0]}{NEW[1]}"
        inputs = processor(text=[text], images=[tiny_image()], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


def test_export_dtype_and_consuming(tmp_path):
    model, processor, ids = _prepared("causal_lm", "peft")
    _train(model, ids, steps=1)
    expected = _logits(model, ids)
    out = export_merged(model, processor, tmp_path, dtype=torch.bfloat16, copy_model=False)
    loaded = load_model(str(out))
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(loaded.float().eval(), ids), expected, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Routes and errors
# ---------------------------------------------------------------------------------------------------------------


def test_auto_route_picks_rows_only_under_zero3_without_cuda(monkeypatch):
    import transformers.integrations

    for zero3, cuda, expected in ((False, False, "peft"), (True, True, "peft"), (True, False, "rows")):
        monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda z=zero3: z)
        monkeypatch.setattr(torch.cuda, "is_available", lambda c=cuda: c)
        assert resolve_rows_route("auto") == expected
        assert resolve_rows_route("peft") == "peft" and resolve_rows_route("rows") == "rows"


def test_bad_inputs_say_what_is_wrong():
    model, _, ids = _with_tokens("causal_lm")
    with pytest.raises(ValueError, match=r"unknown rows route 'zero3'.*auto, peft, rows"):
        prepare_lora_model(model, new_token_ids=ids, rows_route="zero3")
    with pytest.raises(ValueError, match="unknown rows route"):
        default_lora_config(model, route="trainable_tokens")
    with pytest.raises(ValueError, match="takes rows_route"):
        prepare_lora_model(model, new_token_ids=ids, route="rows")
    with pytest.raises(ValueError, match="not both"):
        prepare_lora_model(model, LoraConfig(target_modules=["q_proj"]), new_token_ids=ids, r=4)
    with pytest.raises(ValueError, match="drop trainable_token_indices"):
        prepare_lora_model(model, default_lora_config(model, new_token_ids=ids), new_token_ids=ids, rows_route="rows")
    for bad, message in (([], "empty"), ([ids[0], ids[0]], "more than once"), ([10_000], "need rows")):
        with pytest.raises(ValueError, match=message):
            attach_trainable_rows(model, bad)
    with pytest.raises(ValueError, match="no trainable rows attached"):
        detach_trainable_rows(model)
    with pytest.raises(ValueError, match="must be"):
        TrainableRows(ids, torch.zeros(3, 4))

    peft_model = get_peft_model(model, default_lora_config(model, new_token_ids=ids))  # rows already trained by PEFT
    with pytest.raises(ValueError, match="already trained by PEFT"):
        attach_trainable_rows(peft_model, ids)
    with pytest.raises(TypeError, match="already PEFT-wrapped"):
        prepare_lora_model(peft_model, new_token_ids=ids)

    model, _, ids = _with_tokens("causal_lm")
    attach_trainable_rows(model, ids)
    with pytest.raises(ValueError, match="already has trainable rows"):
        attach_trainable_rows(model, ids)


def test_given_config_gets_token_indices_on_the_peft_route():
    model, _, ids = _with_tokens("causal_lm")
    config = LoraConfig(r=2, target_modules=lora_target_modules(model, include_lm_head=True))
    peft_model = prepare_lora_model(model, config, new_token_ids=ids, rows_route="peft")
    assert config.trainable_token_indices is None  # the caller's config is not changed
    assert peft_model.peft_config["default"].trainable_token_indices == {
        "model.embed_tokens": ids,
        "lm_head.base_layer": ids,
    }
    assert len(_row_params(peft_model)) == 2
