"""Heima inference: thinking-state capture during generation, token accounting, hidden-state files, export, eval.

Untrained tiny models rarely emit a new token greedily, so :func:`_likely_thinking` makes the three thinking tokens
likely by hand: it gives the language model untied, larger random output rows (Qwen2.5-VL's tiny model is tied and
otherwise repeats one token) and scales the thinking rows of ``lm_head`` up, so that greedy decoding mixes thinking
tokens with ordinary ones. The tests assert that thinking tokens did appear before checking anything about them.
"""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
import torch
from heima.generate import (
    count_tokens,
    export,
    generate,
    load_for_inference,
    load_hidden_states,
    save_hidden_states,
    thinking_token_ids,
)
from latent_core.capture import capture_hidden_states, select_predictors, select_tokens
from latent_core.hub import load_model
from latent_core.lora import prepare_lora_model
from latent_core.testing import tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from latent_core.trainer import EXTRA_MODULES_NAME, STAGE_INFO_NAME, extra_state_dict
from safetensors.torch import save_file
from torch import nn

TOKENS = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>", "<THINKING_OF_REASONING>"]
# Different question lengths: the batch of 2 is left-padded.
SAMPLES = [
    {"id": "a", "question": "How many red circles are there?", "image": tiny_image(0)},
    {
        "id": "b",
        "question": "What colour is the shape at row 1 column 2? Answer with one word.",
        "image": tiny_image(1),
    },
]


def _likely_thinking(model: nn.Module, ids: list[int], scale: float = 3.0) -> None:
    """Untie and randomise ``lm_head`` (unit-normal rows) and scale the thinking rows by ``scale``."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.get_output_embeddings()
        model.get_input_embeddings().weight.normal_(0, 1.0, generator=g)
        head.weight = nn.Parameter(torch.randn(head.weight.shape, generator=g))
        head.weight[ids] *= scale
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False


def _thinking_model(family: str):
    model, processor = tiny_model(family)
    ids = add_special_tokens(model, processor, TOKENS)
    _likely_thinking(model, ids)
    return model, processor, ids


def _teacher_forced_states(model, processor, inputs, sequences, ids, mode):
    """One forward over prompt + generated tokens (same left padding), states captured at the same selection."""
    length = sequences.shape[1]
    extra = length - inputs["input_ids"].shape[1]
    batch = {k: v for k, v in inputs.items()}
    batch["input_ids"] = sequences
    batch["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(len(sequences), extra, dtype=inputs["attention_mask"].dtype)], 1
    )
    if "mm_token_type_ids" in batch:  # Qwen2.5-VL: 3-D positions need it (ANCHORS.md)
        batch["mm_token_type_ids"] = nn.functional.pad(batch["mm_token_type_ids"], (0, extra))
    if "cross_attention_mask" in batch:  # mllama: generated tokens attend to the image like the last prompt token
        last = batch["cross_attention_mask"][:, -1:]
        batch["cross_attention_mask"] = torch.cat([batch["cross_attention_mask"], last.expand(-1, extra, -1, -1)], 1)
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    select = select_predictors(ids) if mode == "predictor" else select_tokens(ids)
    with torch.no_grad(), capture_hidden_states(model, select) as recorder:
        model(**batch)
    return recorder


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mllama"])
def test_captured_states_equal_teacher_forced_forward(family):
    model, processor, ids = _thinking_model(family)
    assert thinking_token_ids(processor) == dict(zip(TOKENS, ids, strict=True))
    from heima.generate import _prompt_inputs

    inputs = _prompt_inputs(processor, SAMPLES, None)
    assert (inputs["attention_mask"] == 0).any()  # really left-padded
    for mode in ("predictor", "token"):
        records = generate(model, processor, SAMPLES, max_new_tokens=10, capture=True, position=mode)
        prompt_len = inputs["input_ids"].shape[1]
        sequences = torch.stack(
            [torch.cat([inputs["input_ids"][b], torch.tensor(r["token_ids"])]) for b, r in enumerate(records)]
        )
        assert sequences.shape[1] == prompt_len + 10  # no EOS in these outputs: nothing to pad
        forced = _teacher_forced_states(model, processor, inputs, sequences, ids, mode)
        for b, record in enumerate(records):
            generated = [(p, t) for p, t in enumerate(record["token_ids"]) if t in ids]
            assert record["thinking_tokens"] == len(generated) > 0, "the test needs thinking tokens in the output"
            states = record["hidden_states"]
            if mode == "token" and generated[-1][0] == len(record["token_ids"]) - 1:
                generated = generated[:-1]  # the last generated token is never fed back: no state at it
            assert [s["position"] for s in states] == [p for p, _ in generated]
            assert [s["token"] for s in states] == [TOKENS[ids.index(t)] for _, t in generated]
            assert {s["stage"] for s in states} <= {"summary", "caption", "reasoning"}
            shift = 1 if mode == "predictor" else 0
            assert [s["column"] for s in states] == [prompt_len + p - shift for p, _ in generated]
            # the forward's rows at the same columns (generated-token columns only)
            by_column = dict(zip(forced.positions[b], forced.states[b], strict=True))
            for s in states:
                torch.testing.assert_close(s["hidden"], by_column[s["column"]], atol=1e-5, rtol=0)


def test_counts_on_handcrafted_ids():
    _, processor = tiny_model("mllama")
    tokenizer = processor.tokenizer
    model, _ = tiny_model("mllama")
    ids = add_special_tokens(model, processor, TOKENS)
    eos = tokenizer.eos_token_id

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    reasoning = enc("<SUMMARY>") + [ids[0]] + enc("</SUMMARY>\n\n<CAPTION>") + [ids[1]] + enc("</CAPTION>\n\n")
    conclusion = enc("<CONCLUSION>") + enc("B") + enc("</CONCLUSION>")
    seq = reasoning + conclusion + [eos] + [eos, ids[2]]  # after the first EOS: ignored
    counts = count_tokens(seq, tokenizer, ids, {eos})
    assert counts["generated_tokens"] == len(reasoning) + len(conclusion) + 1
    assert counts["reasoning_tokens"] == len(reasoning)
    assert counts["thinking_tokens"] == 2
    # no conclusion: every generated token is reasoning; no EOS: all tokens count
    counts = count_tokens(reasoning, tokenizer, ids, {eos})
    assert counts["generated_tokens"] == counts["reasoning_tokens"] == len(reasoning)
    # a tag glued to the preceding text in one token still counts from that token
    glued = enc("yes<CONCLUSION>no</CONCLUSION>")
    first = next(k for k in range(1, len(glued) + 1) if "<" in tokenizer.decode(glued[:k]))
    assert count_tokens(glued, tokenizer, ids, {eos})["reasoning_tokens"] == first - 1


def test_save_hidden_states_round_trip(tmp_path):
    records = [
        {
            "id": "s1",
            "question": "q1",
            "hidden_states": [
                {
                    "stage": "summary",
                    "token": TOKENS[0],
                    "position": 1,
                    "column": 9,
                    "mode": "predictor",
                    "hidden": torch.randn(8),
                },
                {
                    "stage": "caption",
                    "token": TOKENS[1],
                    "position": 4,
                    "column": 12,
                    "mode": "predictor",
                    "hidden": torch.randn(8),
                },
            ],
        },  # fmt: skip
        {"id": "s2", "question": "q2", "hidden_states": []},
        {
            "id": "s3",
            "question": "q3",
            "hidden_states": [
                {
                    "stage": "reasoning",
                    "token": TOKENS[2],
                    "position": 0,
                    "column": 7,
                    "mode": "predictor",
                    "hidden": torch.randn(8),
                }
            ],
        },  # fmt: skip
    ]
    index = save_hidden_states(records, tmp_path, shard_bytes=64)  # 2 states (2 x 32 bytes) per shard
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    assert [(x["id"], x["stage"], x["token"], x["position"], x["question"]) for x in lines] == [
        ("s1", "summary", TOKENS[0], 1, "q1"),
        ("s1", "caption", TOKENS[1], 4, "q1"),
        ("s3", "reasoning", TOKENS[2], 0, "q3"),
    ]
    assert len({x["file"] for x in lines}) == 2
    loaded = load_hidden_states(tmp_path)
    expected = [s["hidden"] for r in records for s in r["hidden_states"]]
    for line, tensor in zip(loaded, expected, strict=True):
        assert torch.equal(line["hidden"], tensor)
    with pytest.raises(ValueError, match="capture=True"):
        save_hidden_states([{"id": "x"}], tmp_path / "bad")


def _make_stage(tmp_path, family: str, route: str):
    """A stage output as the trainer writes it: adapter (perturbed), extra rows, latent_stage.json, processor."""
    base_dir = tmp_path / f"base-{family}"
    model, processor = tiny_model(family)
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    base = load_model(str(base_dir))
    ids = add_special_tokens(base, processor, TOKENS)
    peft_model = prepare_lora_model(base, new_token_ids=ids, rows_route=route, include_lm_head=family == "mllama")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path / f"stage-{family}"
    peft_model.save_pretrained(out)
    extras = extra_state_dict(peft_model)
    assert bool(extras) == (route == "rows")
    if extras:
        save_file(extras, str(out / EXTRA_MODULES_NAME), metadata={"format": "pt"})
    info = {"method": "heima", "stage": 3, "tokens": TOKENS, "base": str(base_dir), "extra_keys": sorted(extras)}
    info["embedding_rows"] = int(peft_model.get_input_embeddings().weight.shape[0])
    (out / STAGE_INFO_NAME).write_text(json.dumps(info))
    processor.save_pretrained(out)
    return out, peft_model.eval(), processor


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """``stages(family, route) -> (stage_dir, adapter model, processor, exported dir)``, built once per module."""
    cache: dict = {}

    def get(family: str, route: str):
        if (family, route) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{route}")
            stage, model, processor = _make_stage(root, family, route)
            cache[family, route] = (stage, model, processor, export(stage, root / "merged"))
        return cache[family, route]

    return get


@pytest.mark.parametrize(("family", "route"), [("qwen2_5_vl", "peft"), ("mllama", "rows")])
def test_load_and_export_reproduce_the_adapter_model(stages, family, route):
    stage, trained, processor, merged_dir = stages(family, route)
    reference = generate(trained, processor, SAMPLES, max_new_tokens=8)
    model, loaded_processor = load_for_inference(stage)
    assert not model.training
    assert thinking_token_ids(loaded_processor) == thinking_token_ids(processor)
    loaded = generate(model, loaded_processor, SAMPLES, max_new_tokens=8)
    assert [r["token_ids"] for r in loaded] == [r["token_ids"] for r in reference]

    merged = load_model(str(merged_dir)).eval()
    assert "peft" not in type(merged).__module__
    model2, processor2 = load_for_inference(merged_dir)  # an exported checkpoint loads transparently too
    assert type(model2) is type(merged) and thinking_token_ids(processor2) == thinking_token_ids(processor)
    out = generate(merged, processor2, SAMPLES, max_new_tokens=8)
    assert [r["token_ids"] for r in out] == [r["token_ids"] for r in reference]


def _png_b64(seed: int) -> str:
    buf = io.BytesIO()
    tiny_image(seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_heima_eval_method_records_reasoning_tokens(tmp_path, stages):
    from latent_apps.eval.heima_method import HeimaMethod  # importing it registers "heima"
    from latent_apps.eval.runner import run_eval

    bench = tmp_path / "mini.tsv"
    with open(bench, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "answer", "category", "image"])
        writer.writerow(["1", "What colour is the square?", "red", "blue", "B", "colour", _png_b64(0)])
        writer.writerow(["2", "Is there a red circle?", "", "", "Yes", "colour", _png_b64(1)])
        writer.writerow(["3", "How many circles are there?", "", "", "3", "count", _png_b64(2)])
    stage, _, _, merged = stages("qwen2_5_vl", "peft")
    model, processor = HeimaMethod.load(str(stage))  # what the runner should call for a stage directory
    out = tmp_path / "eval"
    run_eval(model, "heima", [bench], out, batch_size=2, max_new_tokens=6, processor=processor, show_progress=False)
    records = [json.loads(line) for line in (out / "mini" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    for r in records:
        assert r["reasoning_tokens"] is not None and 0 <= r["reasoning_tokens"] <= r["generated_tokens"] <= 6

    # --model pointing at an exported checkpoint goes through the runner's own loading
    run_eval(str(merged), "heima", [bench], tmp_path / "eval2", batch_size=2, max_new_tokens=6, show_progress=False)
    again = [json.loads(line) for line in (tmp_path / "eval2" / "mini" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["reasoning_tokens"]) for r in again] == [
        (r["prediction"], r["reasoning_tokens"]) for r in records
    ]
