"""heima.data.prepare on data/fixtures/llava_cot: exact answer variants, records per turn, skip counts, options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from heima.data import load_prepared, prepare, samples_for_stage

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "fixtures" / "llava_cot"
DATA = FIXTURES / "train.jsonl"

# cot-0001, written out literally: stage s replaces the first s of summary, caption, reasoning.
COT_0001 = [
    "<SUMMARY>I will look at the square and name its colour.</SUMMARY>\n\n"
    "<CAPTION>A red square on a white background.</CAPTION>\n\n"
    "<REASONING>The only shape is filled with red.</REASONING>\n\n"
    "<CONCLUSION>Red</CONCLUSION>",
    "<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>\n\n"
    "<CAPTION>A red square on a white background.</CAPTION>\n\n"
    "<REASONING>The only shape is filled with red.</REASONING>\n\n"
    "<CONCLUSION>Red</CONCLUSION>",
    "<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>\n\n"
    "<CAPTION><THINKING_OF_CAPTION></CAPTION>\n\n"
    "<REASONING>The only shape is filled with red.</REASONING>\n\n"
    "<CONCLUSION>Red</CONCLUSION>",
    "<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>\n\n"
    "<CAPTION><THINKING_OF_CAPTION></CAPTION>\n\n"
    "<REASONING><THINKING_OF_REASONING></REASONING>\n\n"
    "<CONCLUSION>Red</CONCLUSION>",
]

SKIPPED = {
    "bad_conversation": 1,  # cot-0007 (human, human)
    "malformed_json": 1,  # line 4
    "missing_field:conversations": 1,  # cot-0006
    "missing_image": 1,  # cot-0005
    "missing_stage:summary": 1,  # cot-0003 (no <SUMMARY>)
}


def _by_id(dataset) -> dict[str, dict]:
    return {r["id"]: r for r in dataset}


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    dataset, report = prepare(DATA, FIXTURES, out, progress=False)
    return out, dataset, report


def test_answer_variants_exact(default):
    _, dataset, _ = default
    rec = _by_id(dataset)["cot-0001"]
    assert rec["answers"] == COT_0001
    assert rec["question"] == "What colour is the square?"
    assert rec["image"] == "images/red_square.png"
    assert rec["images_root"] == str(FIXTURES.resolve())
    assert rec["stage_texts"] == {
        "summary": "I will look at the square and name its colour.",
        "caption": "A red square on a white background.",
        "reasoning": "The only shape is filled with red.",
    }
    assert rec["conclusion"] == "Red"
    assert rec["thinking_tokens"] == [["<THINKING_OF_SUMMARY>"], ["<THINKING_OF_CAPTION>"], ["<THINKING_OF_REASONING>"]]


def test_multi_turn_and_skip_counts(default):
    out, dataset, report = default
    assert list(dataset["id"]) == ["cot-0001", "cot-0002#0", "cot-0002#1"]
    second = _by_id(dataset)["cot-0002#1"]
    assert second["turn"] == 1
    assert second["question"] == "What colour is it?"
    assert second["image"] == "images/blue_circle.png"
    assert second["answers"][3] == (
        "<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>\n\n<CAPTION><THINKING_OF_CAPTION></CAPTION>\n\n"
        "<REASONING><THINKING_OF_REASONING></REASONING>\n\n<CONCLUSION>Blue</CONCLUSION>"
    )
    assert _by_id(dataset)["cot-0002#0"]["question"] == "What shape is shown?"
    assert report.kept == 3
    assert dict(report.skipped) == SKIPPED

    meta = json.loads((out / "heima_prepare.json").read_text())
    assert meta["tokens"] == ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>", "<THINKING_OF_REASONING>"]
    assert meta["num_stages"] == 3
    assert meta["report"]["skipped"] == SKIPPED
    assert meta["report"]["kept"] == 3
    assert meta["options"]["drop_tags"] is False


def test_save_load_round_trip(default):
    out, dataset, _ = default
    loaded, meta = load_prepared(out)
    assert loaded.to_list() == dataset.to_list()
    assert meta["num_records"] == 3
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_prepared(out / "nothing-here")


def test_samples_for_stage(default):
    out, _, _ = default
    loaded, _ = load_prepared(out)
    rows = samples_for_stage(loaded, 2)
    assert rows[0] == {
        "id": "cot-0001",
        "prompt": "What colour is the square?",
        "answer": COT_0001[2],
        "image": str(FIXTURES.resolve() / "images" / "red_square.png"),
    }
    assert all(Path(r["image"]).is_file() for r in rows)
    assert [r["answer"] for r in samples_for_stage(loaded, "recover")] == list(
        loaded["answers"][i][3] for i in range(3)
    )
    assert samples_for_stage(loaded, 0)[0]["answer"] == COT_0001[0]
    assert samples_for_stage(loaded, 3, one_shot=True)[0]["answer"] == COT_0001[3]
    with pytest.raises(ValueError, match="one_shot"):
        samples_for_stage(loaded, 1, one_shot=True)
    with pytest.raises(ValueError, match="0..3"):
        samples_for_stage(loaded, 4)


def test_tokens_per_stage_2(tmp_path):
    dataset, _ = prepare(DATA, FIXTURES, tmp_path, tokens_per_stage=2, progress=False)
    rec = _by_id(dataset)["cot-0001"]
    assert rec["answers"][0] == COT_0001[0]
    assert rec["answers"][1] == (
        "<SUMMARY><THINKING_OF_SUMMARY_1><THINKING_OF_SUMMARY_2></SUMMARY>\n\n"
        "<CAPTION>A red square on a white background.</CAPTION>\n\n"
        "<REASONING>The only shape is filled with red.</REASONING>\n\n"
        "<CONCLUSION>Red</CONCLUSION>"
    )
    assert rec["answers"][3] == (
        "<SUMMARY><THINKING_OF_SUMMARY_1><THINKING_OF_SUMMARY_2></SUMMARY>\n\n"
        "<CAPTION><THINKING_OF_CAPTION_1><THINKING_OF_CAPTION_2></CAPTION>\n\n"
        "<REASONING><THINKING_OF_REASONING_1><THINKING_OF_REASONING_2></REASONING>\n\n"
        "<CONCLUSION>Red</CONCLUSION>"
    )
    meta = json.loads((tmp_path / "heima_prepare.json").read_text())
    assert meta["tokens"] == [f"<THINKING_OF_{k}_{i}>" for k in ("SUMMARY", "CAPTION", "REASONING") for i in (1, 2)]


def test_drop_tags(tmp_path):
    dataset, _ = prepare(DATA, FIXTURES, tmp_path, drop_tags=True, progress=False)
    rec = _by_id(dataset)["cot-0001"]
    assert rec["answers"][0] == COT_0001[0]
    assert rec["answers"][2] == (
        "<THINKING_OF_SUMMARY>\n\n<THINKING_OF_CAPTION>\n\n"
        "<REASONING>The only shape is filled with red.</REASONING>\n\n<CONCLUSION>Red</CONCLUSION>"
    )
    assert rec["answers"][3] == (
        "<THINKING_OF_SUMMARY>\n\n<THINKING_OF_CAPTION>\n\n<THINKING_OF_REASONING>\n\n<CONCLUSION>Red</CONCLUSION>"
    )


def test_retention_ratio(tmp_path):
    from latent_core.testing import tiny_tokenizer

    tok = tiny_tokenizer("mllama")
    ratio = 0.3
    dataset, _ = prepare(DATA, FIXTURES, tmp_path, retention_ratio=ratio, tokenizer=tok, progress=False)
    max_n = {"summary": 0, "caption": 0, "reasoning": 0}
    for rec in dataset:
        for stage, tokens in zip(("summary", "caption", "reasoning"), rec["thinking_tokens"], strict=True):
            length = len(tok(rec["stage_texts"][stage], add_special_tokens=False)["input_ids"])
            n = max(1, math.floor(ratio * length))
            expected = [f"<THINKING_OF_{stage.upper()}_{i}>" for i in range(1, n + 1)]
            assert tokens == expected, (rec["id"], stage, length)
            max_n[stage] = max(max_n[stage], n)
        assert rec["answers"][3].startswith("<SUMMARY>" + "".join(rec["thinking_tokens"][0]) + "</SUMMARY>\n\n")
    meta = json.loads((tmp_path / "heima_prepare.json").read_text())
    assert meta["tokens"] == [f"<THINKING_OF_{k.upper()}_{i}>" for k, n in max_n.items() for i in range(1, n + 1)]
    assert meta["tokens_per_stage_max"] == max_n
    assert meta["options"]["retention_ratio"] == ratio


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(DATA, FIXTURES, tmp_path, retention_ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="tokens_per_stage"):
        prepare(DATA, FIXTURES, tmp_path, tokens_per_stage=0, progress=False)
    with pytest.raises(ValueError, match="no usable sample"):
        prepare(DATA, tmp_path, tmp_path / "out", progress=False)  # wrong image root: every image missing
