"""latent_core.readers on the fixtures of data/fixtures (exact kept/skipped counts, hand-checked fields)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
from latent_core.readers import (
    COT_STAGES,
    DataFormatError,
    ReadReport,
    parse_cot_stages,
    read_blink,
    read_llava_cot,
    read_mmvp,
    read_reasoning,
    read_visual_cot,
    read_vlmevalkit_tsv,
    read_vstar,
)

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "fixtures"


def _read(reader, *args, **kwargs) -> tuple[list[dict], ReadReport]:
    report = ReadReport()
    rows = list(reader(*args, report=report, **kwargs))
    assert report.kept == len(rows)
    assert all(isinstance(r["id"], str) and r["id"] for r in rows)
    return rows, report


# ----------------------------------------------------------------------------------------------- LLaVA-CoT


def test_llava_cot_fixture():
    rows, report = _read(read_llava_cot, FIXTURES / "llava_cot/train.jsonl", FIXTURES / "llava_cot")
    assert [r["id"] for r in rows] == ["cot-0001", "cot-0002", "cot-0003"]
    assert report.skipped == {
        "malformed_json": 1,
        "missing_image": 1,
        "missing_field:conversations": 1,
        "bad_conversation": 1,
    }
    assert report.examples["malformed_json"] == ["line 4"]
    assert report.examples["missing_image"] == ["cot-0005"]
    first, multi, no_summary = rows
    assert first["image"] == FIXTURES / "llava_cot/images/red_square.png"
    assert [t["from"] for t in multi["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert parse_cot_stages(first["conversations"][1]["value"])["conclusion"] == "Red"
    assert parse_cot_stages(multi["conversations"][3]["value"])["conclusion"] == "Blue"
    assert "<SUMMARY>" in first["conversations"][1]["value"]  # answers keep their tags
    assert set(parse_cot_stages(no_summary["conversations"][1]["value"])) == {"caption", "reasoning", "conclusion"}


def test_llava_cot_json_list(tmp_path):
    lines = (FIXTURES / "llava_cot/train.jsonl").read_text().splitlines()
    good = [json.loads(line) for line in lines[:3]]
    (tmp_path / "train.json").write_text(json.dumps([*good, "not an object"]))
    rows, report = _read(read_llava_cot, tmp_path / "train.json", FIXTURES / "llava_cot")
    assert [r["id"] for r in rows] == ["cot-0001", "cot-0002", "cot-0003"]
    assert report.skipped == {"not_an_object": 1}


def test_parse_cot_stages():
    answer = (
        "<SUMMARY> s </SUMMARY>\n\n<CAPTION>c\nc</CAPTION>\n\n<REASONING>r</REASONING>\n\n<CONCLUSION>a</CONCLUSION>"
    )
    assert parse_cot_stages(answer) == {"summary": "s", "caption": "c\nc", "reasoning": "r", "conclusion": "a"}
    assert list(parse_cot_stages(answer)) == list(COT_STAGES)
    missing = "<SUMMARY>s</SUMMARY><REASONING>r</REASONING><CONCLUSION>a</CONCLUSION>"
    assert parse_cot_stages(missing) == {"summary": "s", "reasoning": "r", "conclusion": "a"}
    assert "caption" not in parse_cot_stages("<CAPTION>unclosed <CONCLUSION>a</CONCLUSION>")
    assert parse_cot_stages("plain answer") == {}


# ----------------------------------------------------------------------------------------------- Visual-CoT, LaRe


def test_visual_cot_fixture():
    rows, report = _read(read_visual_cot, FIXTURES / "visual_cot/train.jsonl", FIXTURES / "visual_cot")
    assert [r["id"] for r in rows] == ["101", "102", "103"]
    assert report.skipped == {
        "malformed_json": 1,
        "missing_image": 1,
        "bad_bbox": 1,
        "bbox_outside_image": 1,
        "missing_field:question": 1,
        "image_size_mismatch": 1,
    }
    assert report.examples["bbox_outside_image"] == ["107"]
    one, two, llava = rows
    assert one["bbox"] == [16.0, 12.0, 48.0, 36.0] and one["image_size"] == (64, 48)
    assert one["dataset"] == "gqa" and one["answer"] == "green"
    assert two["bbox"] == [12.0, 16.0, 36.0, 48.0] and len(two["bboxes"]) == 2 and two["image_size"] == (48, 64)
    assert llava["question"] == "What colour is the box?" and llava["answer"] == "green"
    assert llava["bbox"] == [16.0, 12.0, 48.0, 36.0] and llava["split"] is None


def test_vision_r1_cold_two_schemas_read_one_file_at_a_time():
    root = FIXTURES / "vision_r1"
    rows, report = _read(read_reasoning, root / "vision_r1_llava.json", root)
    assert report.skipped == {"bad_conversation": 1, "not_an_object": 1}
    assert rows == [
        {
            "id": "r1-llava-1",
            "image": root / "images/red_square.png",
            "question": "What colour is the square?",
            "reasoning": "The square in the middle is filled with red.",
            "answer": "red",
        }
    ]
    rows, report = _read(read_reasoning, root / "vision_r1_chat.json", root)
    assert report.skipped == {"multiple_images": 1, "missing_image": 1, "missing_field:reasoning": 1}
    assert rows == [
        {
            "id": "vision_r1_chat:1",
            "image": root / "images/red_square.png",
            "question": "Is the square red?",
            "reasoning": "It is red.",
            "answer": "yes",
        }
    ]


def test_reasoning_fixture():
    rows, report = _read(read_reasoning, FIXTURES / "reasoning/train.jsonl", FIXTURES / "reasoning")
    assert [r["id"] for r in rows] == ["lare-1", "lare-2"]
    assert report.skipped == {"malformed_json": 1, "missing_image": 1, "missing_field:reasoning": 1}
    assert rows[1] == {
        "id": "lare-2",
        "image": FIXTURES / "reasoning/images/two_squares.png",
        "question": "Is the background white?",
        "reasoning": "The pixels around the square are white.",
        "answer": "yes",
    }


# ----------------------------------------------------------------------------------------------- evaluation sets


def test_vlmevalkit_tsv_fixture():
    rows, report = _read(read_vlmevalkit_tsv, FIXTURES / "vlmevalkit/MMStar_mini.tsv")
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert report.skipped == {
        "undecodable_image": 1,
        "answer_not_in_options": 1,
        "missing_field:question": 1,
        "unknown_image_ref": 1,
    }
    by_id = {r["id"]: r for r in rows}
    assert by_id["0"]["options"] == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert by_id["1"]["options"] == {"A": "square", "B": "circle", "C": "triangle"}  # empty D dropped
    assert by_id["1"]["image"].size == (40, 32) and by_id["1"]["answer"] == "B"
    assert by_id["2"]["image"].size == (32, 32)  # reused from row 0
    assert by_id["2"]["image"].getpixel((16, 16)) == by_id["0"]["image"].getpixel((16, 16))
    assert by_id["3"]["hint"] == "Look at the fill." and by_id["0"]["hint"] is None
    assert [im.size for im in by_id["4"]["images"]] == [(32, 32), (40, 32)]
    assert by_id["0"]["category"] == "coarse perception" and by_id["0"]["l2_category"] == "color"


def test_mmvp_fixture():
    rows, report = _read(read_mmvp, FIXTURES / "mmvp")
    assert [r["id"] for r in rows] == ["1", "2"]
    assert report.skipped == {"missing_image": 1, "bad_options": 1, "answer_not_in_options": 1}
    assert rows[0]["options"] == {"A": "Open", "B": "Closed"} and rows[0]["answer"] == "A"
    assert rows[1]["answer"] == "B" and rows[1]["image"].size == (48, 48)


def test_blink_fixture():
    rows, report = _read(read_blink, FIXTURES / "blink")
    assert [r["id"] for r in rows] == ["val_IQ_Test_1", "val_Relative_Depth_1", "val_Relative_Depth_2"]
    assert report.skipped == {"undecodable_image": 1, "missing_image": 1, "answer_not_in_options": 1}
    iq, depth1, depth2 = rows
    assert iq["task"] == "IQ_Test" and iq["answer"] == "B" and [im.size for im in iq["images"]] == [(64, 48)] * 2
    assert depth1["options"] == {"A": "A", "B": "B"} and depth1["answer"] == "A" and len(depth1["images"]) == 1
    assert depth2["answer"] == "B" and "(A) A (B) B" in depth2["prompt"]

    only, _ = _read(read_blink, FIXTURES / "blink", tasks=["IQ_Test"])
    assert [r["id"] for r in only] == ["val_IQ_Test_1"]


def test_blink_flat_layout(tmp_path):
    shutil.copy(FIXTURES / "blink/Relative_Depth/val-00000-of-00001.parquet", tmp_path / "Relative_Depth.parquet")
    rows, report = _read(read_blink, tmp_path)
    assert [r["task"] for r in rows] == ["Relative_Depth"] * 2 and report.total_skipped == 3
    rows, _ = _read(read_blink, tmp_path / "Relative_Depth.parquet")
    assert len(rows) == 2


# ----------------------------------------------------------------------------------------------- report, errors


def test_report_merge_and_table():
    a, b = ReadReport("a"), ReadReport("b")
    a.keep()
    a.skip("missing_image", "x1")
    b.keep()
    b.keep()
    b.skip("missing_image", "x2")
    b.skip("bad_bbox", "line 3")
    a.merge(b)
    assert a.kept == 3 and a.skipped == {"missing_image": 2, "bad_bbox": 1} and a.total_skipped == 3
    assert a.as_dict()["examples"] == {"bad_bbox": ["line 3"], "missing_image": ["x1", "x2"]}
    json.dumps(a.as_dict())
    text = str(a)
    assert "kept 3, skipped 3" in text and "missing_image" in text and "x2" in text


def test_skips_are_logged_without_a_report(caplog):
    with caplog.at_level(logging.WARNING, logger="latent_core.readers"):
        rows = list(read_mmvp(FIXTURES / "mmvp"))
    assert len(rows) == 2
    assert "bad_options" in caplog.text and "skipped 3" in caplog.text


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        next(read_llava_cot(tmp_path / "nope.jsonl", tmp_path))
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        next(read_mmvp(tmp_path))
    with pytest.raises(FileNotFoundError, match="no BLINK parquet"):
        next(read_blink(tmp_path))
    with pytest.raises(FileNotFoundError, match="VLMEvalKit TSV"):
        next(read_vlmevalkit_tsv(tmp_path / "MMStar.tsv"))


def test_wrong_formats_raise(tmp_path):
    csv_file = tmp_path / "MMStar.tsv"
    csv_file.write_text("index,question,answer,image\n0,q,A,xyz\n")  # commas, not tabs
    with pytest.raises(DataFormatError, match=r"MMStar\.tsv.*missing column.*question"):
        next(read_vlmevalkit_tsv(csv_file))
    (tmp_path / "Questions.csv").write_text("Index,Question\n1,q\n")
    with pytest.raises(DataFormatError, match=r"Questions\.csv.*Options"):
        next(read_mmvp(tmp_path))
    (tmp_path / "Task.parquet").write_text("not parquet")
    with pytest.raises(DataFormatError, match=r"Task\.parquet.*not a parquet"):
        next(read_blink(tmp_path / "Task.parquet"))
    (tmp_path / "train.json").write_text('{"id": 1}')
    with pytest.raises(DataFormatError, match=r"train\.json.*list"):
        next(read_reasoning(tmp_path / "train.json", tmp_path))


# ----------------------------------------------------------------------------------------------- fixture script


def test_fixture_script_is_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path / "one")
    module.main(tmp_path / "two")
    written = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(written) == 33  # 16 + the V* bench folder (8 JSON, 6 images) + Vision-R1-cold (2 JSON, 1 image)
    for rel in written:
        data = (tmp_path / "one" / rel).read_bytes()
        assert data == (tmp_path / "two" / rel).read_bytes(), rel
        assert data == (FIXTURES / rel).read_bytes(), f"{rel} differs from the committed fixture: re-run the script"


def test_vstar_fixture():
    rows, report = _read(read_vstar, FIXTURES / "vstar")
    assert [r["id"] for r in rows] == ["direct_attributes/sa_1", "direct_attributes/sa_2", "relative_position/sa_3"]
    assert report.skipped == {
        "malformed_json": 1, "missing_image": 1, "bad_options": 1, "bad_bbox": 1, "missing_field:question": 1,
    }  # fmt: skip
    cup, ball, position = rows
    # the right option is the released file's options[0], wherever the shuffle put it
    assert cup["options"][cup["answer"]] == "red" and sorted(cup["options"].values()) == sorted(
        ["red", "blue", "green", "yellow"]
    )
    assert ball["options"][ball["answer"]] == "blue" and position["options"][position["answer"]] == "left"
    assert cup["category"] == "direct_attributes" and position["category"] == "relative_position"
    # [x, y, w, h] -> corners
    assert cup["bbox"] == [[8, 12, 24, 32]] and position["bbox"] == [[4, 4, 14, 14], [30, 30, 40, 40]]
    assert cup["image"].size == (48, 48) and cup["target_object"] == ["cup"]
    # the order is fixed by (seed, id): the same on a second read, and the right option is not always first
    again, _ = _read(read_vstar, FIXTURES / "vstar")
    assert [r["options"] for r in again] == [r["options"] for r in rows]
    letters = {next(iter(_read(read_vstar, FIXTURES / "vstar", seed=s)[0]))["answer"] for s in range(12)}
    assert len(letters) > 1
