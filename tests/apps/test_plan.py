"""`apps/cli plan` against hand counts: every shipped ``config.json`` builds on the meta device at its published size,
and each method's real preparation on the paper's models trains exactly what a count by hand from the config says
(LoRA r * (in + out) on every target of every layer kind, new token rows, phi), nothing of a frozen vision tower.
The references are formulas over the raw JSON fields and the parameter counts the model cards publish, never the
plan's own output."""

from __future__ import annotations

import json
import math

import pytest
from latent_apps.plan import GIB, Workload, build_plan, memory_estimate
from latent_core.configs import SHIPPED, count_parameters, meta_model, published_config_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The parameter counts of the released safetensors (model cards / Hub "params"), and for LLaVA-NeXT-Vicuna-7B the
# hand count of its file (CLIP-L/336 + 2-layer projector + Vicuna-7B with 32,064 rows + image_newline; see below).
PUBLISHED = {
    "llava-cot-11b": 10_670_220_835,
    "llama-3.2-11b-vision": 10_670_220_835,
    "llava-next-vicuna-7b": 7_063_431_168,
    "llama-3.1-8b-instruct": 8_030_261_248,
    "vicuna-7b": 6_738_415_616,
    "qwen2.5-vl-3b": 3_754_622_976,
    "qwen2.5-vl-7b": 8_292_166_656,
    "qwen2.5-vl-32b": 33_452_718_336,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "clip-vit-l-14": 427_616_513,
}

# LlamaConfig's defaults (= Llama-2-7B / Vicuna-7B): llava-hf's LLaVA-NeXT file leaves them out of its text_config.
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
R = 16  # Heima Table A1 and Table A3: LoRA r


def _text(raw: dict, defaults: dict | None = None) -> dict:
    t = {**(defaults or {}), **raw.get("text_config", raw)}
    t.setdefault("num_key_value_heads", t["num_attention_heads"])
    t.setdefault("head_dim", t["hidden_size"] // t["num_attention_heads"])
    return t


def _dims(t: dict) -> tuple[int, int, int, int, int]:
    """hidden, attention heads, key/value heads, head dim, MLP width of a text config."""
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    return tuple(t[k] for k in keys)


def _decoder(t: dict, *, bias: bool, tied: bool, vocab: int | None = None) -> dict[str, int]:
    """A Llama / Qwen2 decoder by hand: per layer q, k, v, o (+ q/k/v biases for Qwen2), gate / up / down, 2 RMSNorms;
    the final norm; the embedding and (untied) lm_head of ``vocab`` rows."""
    h, n, kv, d, i = _dims(t)
    attn = h * n * d + 2 * h * kv * d + n * d * h + ((n + 2 * kv) * d if bias else 0)
    layers = t["num_hidden_layers"] * (attn + 3 * h * i + 2 * h) + h
    v = vocab or t["vocab_size"]
    return {"layers": layers, "tables": v * h * (1 if tied else 2)}


def _clip_vision(v: dict) -> int:
    """CLIPVisionModel by hand: class token, patch conv (no bias), positions, pre-LN, per layer 4 biased projections,
    the biased MLP and 2 LayerNorms, post-LN."""
    d, i, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    n = (v["image_size"] // p) ** 2 + 1
    layer = 4 * (d * d + d) + 2 * d * i + i + d + 4 * d
    return d + 3 * p * p * d + n * d + 2 * d + v["num_hidden_layers"] * layer + 2 * d


def _lora(t: dict, layers: int, modules: str) -> int:
    """r * (in + out) summed over ``modules`` ("attn": q, k, v, o; "mlp": gate, up, down) of ``layers`` layers."""
    h, n, kv, d, i = _dims(t)
    per = (h + n * d) + 2 * (h + kv * d) + (n * d + h) if modules == "attn" else 3 * (h + i)
    return R * per * layers


@pytest.mark.parametrize("alias", list(SHIPPED))
def test_every_shipped_config_builds_at_its_published_size(alias):
    assert count_parameters(meta_model(alias)) == PUBLISHED[alias]


def test_the_hand_counts_agree_with_the_published_ones():
    """The formulas the plans are checked with are themselves right: they give the published totals."""
    llama = _decoder(_text(published_config_dict("llama-3.1-8b-instruct")), bias=False, tied=False)
    assert sum(llama.values()) == PUBLISHED["llama-3.1-8b-instruct"]
    qwen = _decoder(_text(published_config_dict("qwen2.5-0.5b")), bias=True, tied=True)
    assert sum(qwen.values()) == PUBLISHED["qwen2.5-0.5b"]
    raw = published_config_dict("llava-next-vicuna-7b")
    text = _decoder(_text(raw, LLAMA_DEFAULTS), bias=False, tied=False)
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert (
        _clip_vision(raw["vision_config"]) + projector + sum(text.values()) + 4096 == PUBLISHED["llava-next-vicuna-7b"]
    )
    assert _clip_vision(published_config_dict("clip-vit-l-14")["vision_config"]) == 303_179_776


def test_heima_on_mllama_adapts_self_and_cross_attention_and_every_mlp_and_trains_no_vision():
    plan = build_plan("heima", "llama-3.2-11b-vision")
    t = _text(published_config_dict("llama-3.2-11b-vision"))
    cross = len(t["cross_attention_layers"])
    self_layers = t["num_hidden_layers"] - cross
    assert (self_layers, cross) == (32, 8)
    # three thinking tokens after the 128,257 entries: lm_head 128,256 -> 128,260 rows; each new row trains in the
    # embedding and the untied head
    head_rows = 128_260
    lora = (
        _lora(t, self_layers, "attn") + _lora(t, cross, "attn") + _lora(t, t["num_hidden_layers"], "mlp")
        + R * (t["hidden_size"] + head_rows)
    )  # fmt: skip
    rows = 3 * 2 * t["hidden_size"]
    assert plan.tokens["ids"] == [128_257, 128_258, 128_259]
    assert plan.tokens["lm_head_rows"] == [128_256, head_rows]
    assert plan.parts["LoRA"]["trainable"] == lora
    assert plan.parts["new token rows"]["trainable"] == rows
    assert plan.trainable == lora + rows
    assert {g["pattern"]: g["layers"] for g in plan.lora["targets"]} == {
        "model.language_model.layers.*.self_attn.{q,k,v,o}_proj": 32,
        "model.language_model.layers.*.cross_attn.{q,k,v,o}_proj": 8,
        "model.language_model.layers.*.mlp.{gate,up,down}_proj": 40,
        "lm_head": 1,
    }
    for part in ("vision tower", "projector", "language model", "embeddings / lm_head"):
        assert plan.parts[part]["trainable"] == 0, part
    # the base after surgery: the published count + 4 rows in lm_head and 4 in embed_tokens (its 8 extra rows kept)
    assert plan.base_parameters == PUBLISHED["llama-3.2-11b-vision"] + 8 * t["hidden_size"]


def test_heima_on_llava_next_adapts_every_decoder_layer_and_keeps_clip_frozen():
    plan = build_plan("heima", "llava-next-vicuna-7b")
    t = _text(published_config_dict("llava-next-vicuna-7b"), LLAMA_DEFAULTS)
    lora = _lora(t, 32, "attn") + _lora(t, 32, "mlp") + R * (4096 + 32_064)  # ids 32,002-32,004 fit the 32,064 rows
    assert plan.tokens["ids"] == [32_002, 32_003, 32_004] and plan.tokens["lm_head_rows"] == [32_064, 32_064]
    assert plan.trainable == lora + 3 * 2 * 4096
    assert plan.base_parameters == PUBLISHED["llava-next-vicuna-7b"]
    assert plan.parts["vision tower"] == {"total": _clip_vision(published_config_dict("llava-next-vicuna-7b")[
        "vision_config"]), "trainable": 0}  # fmt: skip
    assert plan.parts["projector"]["trainable"] == 0
    # 1,024 text tokens + anyres at 672x672: 24x24 base + 48 rows of 48 patches and a newline
    assert plan.workload["image"] == 576 + 48 * 49


@pytest.mark.parametrize(
    ("student", "teacher"), [("qwen2.5-vl-3b", "qwen2.5-vl-32b"), ("qwen2.5-vl-32b", "qwen2.5-vl-32b")]
)
def test_lavit_fine_tunes_the_whole_llm_and_phi_and_not_the_vision_tower(student, teacher):
    plan = build_plan("lavit", student, teacher=teacher)
    t = _text(published_config_dict(student))
    llm = _decoder(t, bias=True, tied=bool(published_config_dict(student).get("tie_word_embeddings")))
    h, d_teacher = t["hidden_size"], _text(published_config_dict(teacher))["hidden_size"]
    phi = h * h + h + h * d_teacher + d_teacher  # Linear(d, d), GELU, Linear(d, d_T) (Eq. 6)
    assert plan.parts["phi"] == {"total": phi, "trainable": phi}
    assert plan.trainable == sum(llm.values()) + phi
    assert plan.base_parameters == PUBLISHED[student]  # the K latents fit Qwen's 271 spare rows
    assert plan.parts["vision tower"]["total"] == PUBLISHED[student] - sum(llm.values())
    assert plan.parts["vision tower"]["trainable"] == 0 and plan.lora["targets"] == []
    # the recorder keeps K rows over the whole sequence, per head, in every layer, fp32
    s = plan.workload["sequence"]
    assert plan.memory["attention_rows"] == 16 * 4 * s * t["num_attention_heads"] * t["num_hidden_layers"] * 4


@pytest.mark.parametrize("stage", [1, 2, 4])
def test_lare_trains_the_groups_of_its_stage_on_clip_l_and_qwen_0_5b(stage):
    plan = build_plan("lare", "clip-vit-l-14+qwen2.5-0.5b", stage=stage)
    vision = _clip_vision(published_config_dict("clip-vit-l-14")["vision_config"])
    llm = _decoder(_text(published_config_dict("qwen2.5-0.5b")), bias=True, tied=True)
    projector = 1024 * 896 + 896 + 896 * 896 + 896
    parts = plan.parts
    assert parts["vision tower"] == {"total": vision, "trainable": 0}
    assert parts["projector"]["total"] == projector
    assert parts["language model"]["total"] + parts["embeddings / lm_head"]["total"] == sum(llm.values())
    assert plan.base_parameters == vision + projector + sum(llm.values())  # <image>, <bot>, <eot>: spare rows
    assert plan.tokens["ids"] == [151_665, 151_666, 151_667]
    extractor = parts["extractor"]["total"]
    reconstructor = parts.get("reconstructor", {"total": 0})["total"]
    expected = {
        1: projector,
        2: extractor + reconstructor,
        4: projector + sum(llm.values()) + extractor + reconstructor,
    }
    assert plan.trainable == expected[stage]
    assert (reconstructor > 0) == (stage > 1)
    assert plan.workload["batch"] == (256 if stage == 1 else 128)


def test_interpreters_on_llama_3_1_8b_use_a_reserved_token_and_lora_with_lm_head():
    plan = build_plan("interpreters", "llama-3.1-8b-instruct", heima_model="llava-cot-11b")
    t = _text(published_config_dict("llama-3.1-8b-instruct"))
    lora = _lora(t, 32, "attn") + _lora(t, 32, "mlp") + R * (4096 + 128_256)
    assert plan.trainable == lora  # a 4096 -> 4096 "auto" projector adds nothing; the reserved row is not trained
    assert plan.base_parameters == PUBLISHED["llama-3.1-8b-instruct"]
    assert plan.tokens["ids"] == [128_002] and plan.tokens["new"] == []
    assert plan.parts["embeddings / lm_head"]["trainable"] == 0


def test_an_interpreter_projector_is_an_added_module_not_the_base():
    plan = build_plan("interpreters", "qwen2.5-0.5b", heima_model="llava-cot-11b")
    assert plan.base_parameters == PUBLISHED["qwen2.5-0.5b"]  # <THOUGHT> takes one of Qwen's spare rows
    linear = 4096 * 896 + 896
    assert plan.parts["projector (added)"]["total"] >= linear
    assert plan.total - plan.base_parameters == plan.trainable


def test_the_memory_estimate_by_zero_stage_by_hand():
    w = Workload(batch=2, text=10, image=5, latents=1, cross_keys=7)
    layers = [False, True, False]  # one cross-attention layer
    common = dict(total=1000, trainable=100, gpus=4, layers=layers, hidden=8, heads=2, vocab=50, workload=w)
    s, b, h, a = 16, 2, 8, 2
    per = [34 * s * b * h + 5 * a * s * kv * b for kv in (s, 7, s)]
    for zero, (weights, grads, optim) in {0: (2000, 200, 1200), 1: (2000, 200, 300), 2: (2000, 50, 300),
                                          3: (500, 50, 300)}.items():  # fmt: skip
        m = memory_estimate(zero=zero, recorder_layers=2, **common)
        assert (m["weights"], m["gradients"], m["optimizer"]) == (weights, grads, optim), zero
        assert m["activations"] == sum(per)
        assert m["activations_checkpointed"] == 3 * 2 * s * b * h + max(per)
        assert m["logits"] == b * s * 50 * 6
        assert m["attention_rows"] == b * 1 * s * a * 2 * 4
        fixed = weights + grads + optim + m["logits"] + m["attention_rows"]
        assert (m["total"], m["total_checkpointed"]) == (fixed + sum(per), fixed + m["activations_checkpointed"])


def test_the_cli_prints_a_plan_and_its_json_and_refuses_bad_input_in_one_line():
    from latent_apps.cli import app
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["plan", "--method", "heima", "--deepspeed", "zero3", "--gpus", "8", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["model"] == "llava-cot-11b" and record["deepspeed"] == "zero3" and record["gpus"] == 8
    assert record["total"] == PUBLISHED["llava-cot-11b"] + 8 * 4096 + record["trainable"]  # + surgery, LoRA, rows
    assert record["memory"]["weights"] == math.ceil(2 * record["total"] / 8)  # ZeRO-3 shards the bf16 weights
    assert record["memory"]["optimizer"] == math.ceil(12 * record["trainable"] / 8)
    assert "cross_attn.{q,k,v,o}_proj: 8 layers" in result.stdout
    assert record["memory_gib"]["weights"] == round(record["memory"]["weights"] / GIB, 3)
    for args, words in [
        (["--method", "heima", "--model", "nope"], "shipped aliases"),
        (["--method", "lavit", "--model", "llama-3.1-8b-instruct"], "text-only"),
        (["--method", "coconut"], "unknown method"),
        (["--method", "heima", "--deepspeed", "zero4"], "unknown --deepspeed"),
    ]:
        result = runner.invoke(app, ["plan", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, result.output)
