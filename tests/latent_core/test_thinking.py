"""latent_core.thinking: thinking-token names and the one on-disk format of thinking states."""

from __future__ import annotations

import json

import pytest
import torch
from latent_core.hub import CheckpointError
from latent_core.thinking import (
    THINKING_STAGES,
    indexed_files,
    load_states,
    parse_thinking_token,
    read_index,
    stage_of_token,
    thinking_token,
    thinking_tokens,
    write_states_shard,
)


def test_stage_list_and_token_names():
    assert THINKING_STAGES == ("summary", "caption", "reasoning")
    assert thinking_token("summary") == "<THINKING_OF_SUMMARY>"
    assert thinking_tokens("caption", 3) == [
        "<THINKING_OF_CAPTION_1>",
        "<THINKING_OF_CAPTION_2>",
        "<THINKING_OF_CAPTION_3>",
    ]
    assert thinking_tokens("reasoning", 1) == ["<THINKING_OF_REASONING>"]
    assert parse_thinking_token("<THINKING_OF_SUMMARY_12>") == ("summary", 12)
    assert parse_thinking_token("<THINKING_OF_CAPTION>") == ("caption", None)
    # Only what thinking_token writes: upper-case names, the whole token.
    for other in ("<THINKING_OF_summary>", "<THOUGHT>", "x<THINKING_OF_SUMMARY>", "<THINKING_OF_SUMMARY_>"):
        assert parse_thinking_token(other) is None, other
    assert stage_of_token("<THINKING_OF_REASONING_2>") == "reasoning"
    with pytest.raises(ValueError, match="not a thinking token"):
        stage_of_token("<CONCLUSION>")
    with pytest.raises(ValueError):
        thinking_token("summary", 0)
    with pytest.raises(ValueError):
        thinking_token("two words")


def _entry(i: str, token: str, **extra) -> dict:
    return {
        "id": i,
        "stage": "summary",
        "token": token,
        "question": f"q{i}",
        "position": 3,
        "mode": "predictor",
        **extra,
    }


def test_states_round_trip_keys_and_optional_fields(tmp_path):
    a, b, c = torch.arange(4.0), torch.arange(4.0) + 10, torch.arange(4.0) + 20
    tok = "<THINKING_OF_SUMMARY>"
    write_states_shard(tmp_path, 0, [_entry("1", tok, target="the text"), _entry("1", tok)], [a, b])
    write_states_shard(tmp_path, 1, [_entry("2", tok, image="/img/2.png")], [c.to(torch.bfloat16)])
    lines = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    # A repeated token of one sample gets its own key; shards are named by number.
    assert [(x["file"], x["key"]) for x in lines] == [
        ("shard-00000.safetensors", "1/<THINKING_OF_SUMMARY>"),
        ("shard-00000.safetensors", "1/<THINKING_OF_SUMMARY>#2"),
        ("shard-00001.safetensors", "2/<THINKING_OF_SUMMARY>"),
    ]
    rows = load_states(tmp_path)
    assert [r["target"] for r in rows] == ["the text", None, None]  # target optional
    assert [r.get("image") for r in rows] == [None, None, "/img/2.png"]
    for row, expected in zip(rows, (a, b, c), strict=True):
        assert row["hidden"].dtype == torch.float32 and torch.equal(row["hidden"], expected)
    assert indexed_files(tmp_path) == {"shard-00000.safetensors", "shard-00001.safetensors"}
    with pytest.raises(ValueError, match="lacks mode"):
        write_states_shard(tmp_path, 2, [{"id": "3", "stage": "s", "token": tok, "question": "", "position": 0}], [a])


def test_a_torn_index_line_is_dropped(tmp_path):
    write_states_shard(tmp_path, 0, [_entry("1", "<THINKING_OF_SUMMARY>")], [torch.ones(2)])
    with open(tmp_path / "index.jsonl", "a") as handle:
        handle.write('{"id": "2", "stage": "sum')  # a kill during the append
    assert len(load_states(tmp_path)) == 1  # reading does not rewrite
    assert (tmp_path / "index.jsonl").read_text().count("\n") == 1
    assert [e["id"] for e in read_index(tmp_path)] == ["1"]  # a writer repairs it
    assert (tmp_path / "index.jsonl").read_text().endswith("}\n")
    # A bad line in the middle is corruption, not a kill: an error naming the line, nothing dropped.
    with open(tmp_path / "index.jsonl", "a") as handle:
        handle.write("garbage\n" + (tmp_path / "index.jsonl").read_text())
    with pytest.raises(ValueError, match="index.jsonl:2 is not a JSON line"):
        read_index(tmp_path)


def test_missing_and_corrupted_shards_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="heima generate --capture"):
        load_states(tmp_path)
    write_states_shard(tmp_path, 0, [_entry("1", "<THINKING_OF_SUMMARY>")], [torch.ones(2)])
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match=str(shard)):
        load_states(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00000.safetensors"):
        load_states(tmp_path)
