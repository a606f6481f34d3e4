"""Heima inference: thinking-state capture during generation, token accounting, hidden-state files, export, eval.

Untrained tiny models rarely emit a new token greedily, so :func:`_likely_thinking` makes the three thinking tokens
likely by hand: it gives the language model untied, larger random output rows (Qwen2.5-VL's tiny model is tied and
otherwise repeats one token) and scales the thinking rows of ``lm_head`` up, so that greedy decoding mixes thinking
tokens with ordinary ones. The tests assert that thinking tokens did appear before checking anything about them.

References computed here, not by the code under test: a naive greedy loop (one full forward over the whole sequence
per new token, no KV cache, a plain torch hook on the final norm) for the tokens and hidden states, counts and text
worked out by hand from its tokens, and a model forced (:func:`_force`) to emit scripted tokens whose counts are
written literally in the test.
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


def _final_norm(model: nn.Module) -> nn.Module:
    """The language model's final norm (what feeds ``lm_head``) of the tiny Qwen2.5-VL / mllama models."""
    return dict(model.named_modules())["model.language_model.norm"]


def _full_inputs(inputs, sequences):
    """Prompt inputs (left-padded) extended by the new columns of ``sequences``, for one forward without cache."""
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
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
    return batch


def _forward(model, inputs, sequences):
    """One forward over ``sequences`` without KV cache: ``(logits, final-norm output)``, ``[B, L, ...]`` each."""
    seen = {}
    handle = _final_norm(model).register_forward_hook(lambda module, args, out: seen.update(out=out))
    try:
        with torch.no_grad():
            logits = model(**_full_inputs(inputs, sequences), use_cache=False).logits
    finally:
        handle.remove()
    return logits, seen["out"]


def _naive_greedy(model, inputs, steps: int, eos: set[int], pad: int):
    """Greedy decoding the slow way: a full forward over prompt + tokens so far for every new token; a finished row
    (EOS) continues with ``pad``. Returns the new tokens ``[B, steps]`` and the last column's final-norm output of
    each of the ``steps + 1`` forwards ``[B, steps + 1, hidden]``: entry k is the state that predicts new token k and
    the state *at* new token k - 1."""
    sequences = inputs["input_ids"]
    done = torch.zeros(len(sequences), dtype=torch.bool)
    states = []
    for step in range(steps + 1):
        logits, normed = _forward(model, inputs, sequences)
        states.append(normed[:, -1])
        if step == steps:
            break
        nxt = torch.where(done, pad, logits[:, -1].argmax(-1))
        done |= torch.tensor([int(t) in eos for t in nxt])
        sequences = torch.cat([sequences, nxt[:, None]], 1)
    return sequences[:, inputs["input_ids"].shape[1] :], torch.stack(states, 1)


def _by_hand(tokenizer, new: list[int], thinking: list[int], eos: set[int], pad: int) -> dict:
    """generate()'s documented record fields, worked out from the new tokens with a plain scan."""
    kept = []
    for token in new:  # up to and including the first EOS
        kept.append(token)
        if token in eos:
            break
    ended = kept[-1] in eos
    body = kept[:-1] if ended else kept
    shown = [t for t in body if t != pad]
    text = tokenizer.decode(shown, skip_special_tokens=False).strip()
    full = tokenizer.decode(body, skip_special_tokens=False)
    start = full.find("<CONCLUSION>")
    if start < 0:
        reasoning = len(kept)  # no conclusion: every generated token, EOS included
    else:  # the first token whose text reaches the tag's first character
        reasoning = next(k for k in range(len(body)) if len(tokenizer.decode(body[: k + 1])) > start)
    if "<CONCLUSION>" in text:
        answer = text.split("<CONCLUSION>", 1)[1].split("</CONCLUSION>", 1)[0].strip()
    else:
        answer = tokenizer.decode(shown, skip_special_tokens=True).strip()
    return {
        "token_ids": kept,
        "generated_tokens": len(kept),
        "reasoning_tokens": reasoning,
        "thinking_tokens": sum(t in thinking for t in kept),
        "truncated": not ended,
        "text": text,
        "answer": answer,
    }


STAGES = {
    "<THINKING_OF_SUMMARY>": "summary",
    "<THINKING_OF_CAPTION>": "caption",
    "<THINKING_OF_REASONING>": "reasoning",
}


@pytest.mark.parametrize(("family", "eos_scale", "ends"), [("qwen2_5_vl", 1.5, True), ("mllama", 1.0, False)])
def test_generate_equals_naive_greedy_decoding(family, eos_scale, ends):
    """Tokens, counts, text, answer and the captured states (both positions) of a left-padded batch against the
    naive greedy loop. The EOS row of Qwen's ``lm_head`` is scaled up so that its outputs end with EOS; mllama's
    run to the budget."""
    model, processor, ids = _thinking_model(family)
    tokenizer = processor.tokenizer
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= eos_scale
    assert thinking_token_ids(processor) == dict(zip(TOKENS, ids, strict=True))
    from heima.generate import _prompt_inputs

    inputs = _prompt_inputs(processor, SAMPLES, None)
    assert (inputs["attention_mask"] == 0).any()  # really left-padded
    prompt_len = inputs["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    eos = {tokenizer.eos_token_id}
    steps = 10
    new, states = _naive_greedy(model, inputs, steps, eos, tokenizer.pad_token_id)
    expected = [_by_hand(tokenizer, row.tolist(), ids, eos, tokenizer.pad_token_id) for row in new]
    assert [e["truncated"] for e in expected] == [not ends] * len(SAMPLES)

    plain = generate(model, processor, SAMPLES, max_new_tokens=steps)
    for record, sample, exp in zip(plain, SAMPLES, expected, strict=True):
        assert (record["id"], record["question"]) == (sample["id"], sample["question"])
        assert {k: record[k] for k in exp} == exp
        assert "hidden_states" not in record
    for mode in ("predictor", "token"):
        records = generate(model, processor, SAMPLES, max_new_tokens=steps, capture=True, position=mode)
        assert [r["token_ids"] for r in records] == [e["token_ids"] for e in expected]  # capture changes nothing
        for b, (record, exp) in enumerate(zip(records, expected, strict=True)):
            generated = [(p, t) for p, t in enumerate(exp["token_ids"]) if t in ids]
            assert exp["thinking_tokens"] == len(generated) > 0, "the test needs thinking tokens in the output"
            if mode == "token" and generated[-1][0] == len(exp["token_ids"]) - 1:
                generated = generated[:-1]  # the last generated token is never fed back: no state at it
            assert generated, "the test needs a thinking state to compare"
            got = record["hidden_states"]
            assert [s["position"] for s in got] == [p for p, _ in generated]
            assert [s["token"] for s in got] == [TOKENS[ids.index(t)] for _, t in generated]
            assert [s["stage"] for s in got] == [STAGES[TOKENS[ids.index(t)]] for _, t in generated]
            assert {s["mode"] for s in got} == {mode}
            shift = 1 if mode == "predictor" else 0
            assert [s["column"] for s in got] == [prompt_len + p - shift for p, _ in generated]
            for s, (p, _) in zip(got, generated, strict=True):
                # predictor of token p: the forward that ends at column p - 1; at token p: the one that ends at p
                reference = states[b, p if mode == "predictor" else p + 1]
                torch.testing.assert_close(s["hidden"], reference, atol=1e-5, rtol=0)


def _force(model, scripts: list[list[int]]):
    """Make greedy decoding emit ``scripts[b][k]`` as new token k of batch row b: a forward hook on the model
    overwrites the last column's logits (a forward given more than one token starts a sequence). Hidden states stay
    the model's own. Returns the hook handle."""
    step = {"k": 0}

    def hook(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:
            step["k"] = 0
        last = output.logits[:, -1]
        forced = torch.full_like(last, -1e4)
        for b, script in enumerate(scripts):
            forced[b, script[step["k"]]] = 0.0
        last.copy_(forced)
        step["k"] += 1
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def _forced_mllama(budget: int):
    """A tiny mllama with the thinking tokens, its generation config ending at ``<|end_of_text|>`` only (the
    tokenizer's EOS ``<|eot_id|>`` stays an EOS for the accounting: Llama-3 checkpoints list several), and three
    scripted rows of ``budget`` tokens: ``(model, processor, scripts, handle)``.

    Row 0: thinking, ``<SUMMARY>``, thinking, a closed conclusion "B", the tokenizer's EOS (generation goes on
    after it) and two thinking tokens that must not count. Row 1: no conclusion, ends with the generation config's
    EOS (padded after it). Row 2: an opened conclusion, no EOS (truncated)."""
    model, processor = tiny_model("mllama")
    s, c, r = add_special_tokens(model, processor, TOKENS)
    tokenizer = processor.tokenizer

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    eot, end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    model.generation_config.eos_token_id = end
    assert eot != end and tokenizer.eos_token == "<|eot_id|>"
    tag, close = enc("<CONCLUSION>"), enc("</CONCLUSION>")
    assert (len(enc("<SUMMARY>")), len(tag), len(close), len(enc("B")), len(enc("red")), len(enc(" circle"))) == (
        3, 3, 4, 1, 1, 1,
    )  # fmt: skip
    scripts = [
        [s, *enc("<SUMMARY>"), c, *tag, *enc("B"), *close, eot, r, s],
        [*enc("red"), r, *enc(" circle"), end],
        [c, r, s, *tag, *enc(" red circle") * 5],
    ]
    scripts = [script + [tokenizer.pad_token_id] * (budget - len(script)) for script in scripts]
    assert [len(x) for x in scripts] == [budget] * 3
    return model.eval(), processor, scripts, _force(model, scripts)


THIRD = {"id": "c", "question": "How many circles are there?", "image": tiny_image(2)}


def test_generate_counts_a_forced_sequence():
    budget = 16
    model, processor, scripts, _ = _forced_mllama(budget)
    s, c, r = (thinking_token_ids(processor)[t] for t in TOKENS)
    samples = [*SAMPLES, THIRD]
    records = generate(model, processor, samples, max_new_tokens=budget, capture=True)
    got = [
        {k: rec[k] for k in ("generated_tokens", "reasoning_tokens", "thinking_tokens", "truncated")} for rec in records
    ]
    assert got == [
        {"generated_tokens": 14, "reasoning_tokens": 5, "thinking_tokens": 2, "truncated": False},
        {"generated_tokens": 4, "reasoning_tokens": 4, "thinking_tokens": 1, "truncated": False},
        {"generated_tokens": 16, "reasoning_tokens": 3, "thinking_tokens": 3, "truncated": True},
    ]
    assert [rec["token_ids"] for rec in records] == [scripts[0][:14], scripts[1][:4], scripts[2]]
    assert [rec["text"] for rec in records] == [
        "<THINKING_OF_SUMMARY><SUMMARY><THINKING_OF_CAPTION><CONCLUSION>B</CONCLUSION>",
        "red<THINKING_OF_REASONING> circle",
        "<THINKING_OF_CAPTION><THINKING_OF_REASONING><THINKING_OF_SUMMARY><CONCLUSION>" + " red circle" * 5,
    ]
    assert [rec["answer"] for rec in records] == [
        "B",
        "red circle",
        "red circle red circle red circle red circle red circle",
    ]
    assert [rec["id"] for rec in records] == ["a", "b", "c"]

    # the captured states: thinking tokens before EOS only (row 0's two after its EOS are not reported)
    states = [[(x["position"], x["token"], x["stage"]) for x in rec["hidden_states"]] for rec in records]
    assert states == [
        [(0, TOKENS[0], "summary"), (4, TOKENS[1], "caption")],
        [(1, TOKENS[2], "reasoning")],
        [(0, TOKENS[1], "caption"), (1, TOKENS[2], "reasoning"), (2, TOKENS[0], "summary")],
    ]
    assert [s, c, r] == [scripts[0][0], scripts[0][4], scripts[1][1]]
    # ... equal to the final-norm output at column t - 1 of one forward over prompt + script (causal: the columns
    # after t - 1, whatever they hold, do not change it)
    from heima.generate import _prompt_inputs

    inputs = _prompt_inputs(processor, samples, None)
    prompt_len = inputs["input_ids"].shape[1]
    _, normed = _forward(model, inputs, torch.cat([inputs["input_ids"], torch.tensor(scripts)], 1))
    for b, rec in enumerate(records):
        for x in rec["hidden_states"]:
            assert x["column"] == prompt_len + x["position"] - 1
            torch.testing.assert_close(x["hidden"], normed[b, prompt_len + x["position"] - 1], atol=1e-5, rtol=0)


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
    records[0]["image"] = "/data/images/s1.png"
    index = save_hidden_states(records, tmp_path, shard_size=2)  # records s1, s2 in shard 0; s3 in shard 1
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    # position = the recorded column (as interpreters capture writes it); generated_index = among the new tokens
    assert [(x["id"], x["stage"], x["token"], x["position"], x["generated_index"], x["question"]) for x in lines] == [
        ("s1", "summary", TOKENS[0], 9, 1, "q1"),
        ("s1", "caption", TOKENS[1], 12, 4, "q1"),
        ("s3", "reasoning", TOKENS[2], 7, 0, "q3"),
    ]
    assert [x["file"] for x in lines] == ["shard-00000.safetensors"] * 2 + ["shard-00001.safetensors"]
    assert [x.get("image") for x in lines] == ["/data/images/s1.png"] * 2 + [None]
    assert all("target" not in x for x in lines)  # states recorded while answering have no reference text
    loaded = load_hidden_states(tmp_path)
    expected = [s["hidden"] for r in records for s in r["hidden_states"]]
    for line, tensor in zip(loaded, expected, strict=True):
        assert torch.equal(line["hidden"], tensor)
    # The interpreters read the same directory: one format (their decode takes generate's states).
    from interpreters.data import load_captures

    rows = load_captures(tmp_path, ["caption", "reasoning"])
    assert [(r["id"], r["stage"], r["target"]) for r in rows] == [("s1", "caption", None), ("s3", "reasoning", None)]
    assert torch.equal(rows[0]["hidden"], expected[1]) and torch.equal(rows[1]["hidden"], expected[2])
    # Writing again replaces the states (no stale shard or index line survives).
    save_hidden_states(records[2:], tmp_path)
    assert [(x["id"], x["file"]) for x in load_hidden_states(tmp_path)] == [("s3", "shard-00000.safetensors")]
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000.safetensors"]
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


def _write_bench(path, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "answer", "category", "image"])
        for i, row in enumerate(rows):
            writer.writerow([*row, _png_b64(i)])


BENCH_ROWS = [
    ("1", "What colour is the square?", "red", "blue", "B", "colour"),
    ("2", "Is there a red circle?", "", "", "Yes", "colour"),
    ("3", "How many circles are there?", "", "", "3", "count"),
]


def test_heima_eval_method_records_forced_outputs(tmp_path):
    """The runner's records and summary for the forced rows of :func:`_forced_mllama`, written out by hand: row 0
    answers "B" (right), row 1 has no conclusion (unanswered), row 2 is cut in its conclusion (truncated and, being
    staged, unanswered)."""
    from latent_apps.eval.heima_method import HeimaMethod  # importing it registers "heima"
    from latent_apps.eval.runner import run_eval

    bench = tmp_path / "mini.tsv"
    _write_bench(bench, BENCH_ROWS)
    model, processor, _, _ = _forced_mllama(16)
    out = tmp_path / "eval"
    summary = run_eval(
        model, HeimaMethod(), [bench], out, batch_size=3, max_new_tokens=16, processor=processor, show_progress=False
    )
    records = [json.loads(line) for line in (out / "mini" / "samples.jsonl").read_text().splitlines()]
    keys = ("id", "kind", "generated_tokens", "reasoning_tokens", "thinking_tokens", "truncated", "unanswered")
    assert [tuple(r[k] for k in keys) for r in records] == [
        ("1", "choice", 14, 5, 2, False, False),
        ("2", "yes_no", 4, 4, 1, False, True),
        ("3", "number", 16, 3, 3, True, True),
    ]
    assert [(r["extracted"], r["correct"]) for r in records] == [("B", True), (None, False), (None, False)]
    assert records[1]["prediction"] == "red<THINKING_OF_REASONING> circle"
    b = summary["benches"]["mini"]
    assert (b["n"], b["n_correct"], b["n_truncated"], b["n_unanswered"], b["n_unextracted"]) == (3, 1, 1, 2, 2)
    assert b["accuracy_per_category"] == {"colour": {"n": 2, "accuracy": 0.5}, "count": {"n": 1, "accuracy": 0.0}}
    assert b["mean_generated_tokens"] == pytest.approx((14 + 4 + 16) / 3)
    assert b["mean_reasoning_tokens"] == pytest.approx((5 + 4 + 3) / 3)
    assert b["mean_thinking_tokens"] == pytest.approx((2 + 1 + 3) / 3)


def test_heima_eval_method_loads_stage_and_export_alike(tmp_path, stages):
    """A stage directory (HeimaMethod.load) and its exported checkpoint (the runner's own loading) give the same
    records, and those are what generate() gives the adapter model for the same prompts."""
    from latent_apps.eval.heima_method import HeimaMethod
    from latent_apps.eval.methods import build_prompt_text
    from latent_apps.eval.runner import run_eval

    bench = tmp_path / "mini.tsv"
    _write_bench(bench, BENCH_ROWS)
    stage, trained, trained_processor, merged = stages("qwen2_5_vl", "peft")
    model, processor = HeimaMethod.load(str(stage))  # what the runner should call for a stage directory
    common = dict(batch_size=2, max_new_tokens=6, show_progress=False)
    run_eval(model, "heima", [bench], tmp_path / "eval", processor=processor, **common)
    run_eval(str(merged), "heima", [bench], tmp_path / "eval2", **common)
    keys = ("id", "prediction", "generated_tokens", "reasoning_tokens", "thinking_tokens", "truncated")
    runs = [
        [
            tuple(json.loads(line)[k] for k in keys)
            for line in (tmp_path / d / "mini" / "samples.jsonl").read_text().splitlines()
        ]
        for d in ("eval", "eval2")
    ]
    # the reference: generate() on the adapter model, the runner's prompts (options listed, no instruction), batches
    samples = [
        {"id": i, "question": build_prompt_text({"question": q, "options": {"A": a, "B": b} if a else {}}, None),
         "image": tiny_image(n)}
        for n, (i, q, a, b, *_) in enumerate(BENCH_ROWS)
    ]  # fmt: skip
    reference = generate(trained, trained_processor, samples, max_new_tokens=6, batch_size=2)
    fields = ("id", "text", "generated_tokens", "reasoning_tokens", "thinking_tokens", "truncated")
    assert runs[0] == runs[1] == [tuple(r[k] for k in fields) for r in reference]
