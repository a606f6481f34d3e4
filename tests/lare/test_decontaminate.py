"""Decontamination on planted exact and near duplicates, checked against a brute-force reference (every reasoning
image against every test image, one forward each); the embedding cache resumes after a crash without recomputing."""

from __future__ import annotations

import json

import pytest
import torch
from lare.decontaminate import EmbeddingCache, clip_embedder, decontaminate, nearest, qa_key
from latent_core.testing import tiny_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(out)
    return out


def _rows(tmp_path):
    rows = []
    for i in range(10):
        path = tmp_path / f"r{i}.png"
        tiny_image(100 + i).save(path)
        rows.append({"id": f"r{i}", "image": path, "question": f"How many shapes in picture {i}?", "answer": str(i)})
    tiny_image(7).save(tmp_path / "r3.png")  # planted: r3's image is test image t7, pixel for pixel
    rows[5]["question"], rows[5]["answer"] = "What COLOUR is the square??", "Red"  # planted: a training-split QA
    return rows


def test_qa_key_ignores_case_punctuation_and_articles():
    assert qa_key("<image>\nWhat colour is the square?", "red") == qa_key("what colour is square", "Red.")
    assert qa_key("What colour is the square?", "red") != qa_key("What colour is the square?", "blue")


def test_planted_duplicates_and_the_brute_force_reference(tmp_path, clip_path):
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    rows = _rows(tmp_path)
    train = [{"id": "ai2d-1", "question": "What colour is the square?", "options": {"A": "blue", "B": "red"},
              "answer": "B"}]  # fmt: skip
    test = [(f"t{i}", tiny_image(i)) for i in range(12)]
    embed = clip_embedder(str(clip_path), device="cpu")

    # the reference: each image alone through the model, every pair compared
    model = CLIPVisionModelWithProjection.from_pretrained(clip_path).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_path)

    def one(image):
        with torch.no_grad():
            out = model(**processor(images=[image.convert("RGB")], return_tensors="pt")).image_embeds[0]
        return out / out.norm()

    test_vectors = [one(image) for _, image in test]
    best = {r["id"]: max(float(one(Image.open(r["image"])) @ t) for t in test_vectors) for r in rows}
    candidates = sorted(v for k, v in best.items() if k not in ("r3", "r5"))
    gap, i = max((candidates[i + 1] - candidates[i], i) for i in range(len(candidates) - 1))
    threshold = (candidates[i] + candidates[i + 1]) / 2  # some rows on each side, none near it
    assert gap > 1e-5, candidates

    kept, report = decontaminate(rows, train, test, embed, tmp_path / "cache", threshold, batch_size=3)
    expected_near = {k for k, v in best.items() if v >= threshold and k != "r5"}
    removed = {e["id"]: e for e in report["removed_rows"]}
    assert removed["r5"] == {"id": "r5", "reason": "exact_qa_match", "benchmark_id": "ai2d-1"}
    assert {k for k, e in removed.items() if e["reason"] == "near_duplicate_image"} == expected_near
    assert "r3" in expected_near and removed["r3"]["test_id"] == "t7" and removed["r3"]["cosine"] > 0.9999
    assert [r["id"] for r in kept] == [r["id"] for r in rows if r["id"] not in removed]
    assert report["removed"] == {"exact_qa_match": 1, "near_duplicate_image": len(expected_near)}
    assert report["kept"] == len(kept) == len(rows) - 1 - len(expected_near)


def test_nearest_in_blocks_equals_one_matrix():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(37, 8, generator=g), torch.randn(11, 8, generator=g)
    full = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    value, index = nearest(queries, keys, block=5)
    torch.testing.assert_close(value, full.max(-1).values)
    assert torch.equal(index, full.argmax(-1))


def test_cache_resumes_after_a_crash_without_recomputing(tmp_path, clip_path):
    rows = _rows(tmp_path)
    embed = clip_embedder(str(clip_path), device="cpu")
    calls = []

    def crashing(images):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two finished batches
        calls.append(len(images))
        return embed(images)

    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        cache.fill(((r["id"], r["image"]) for r in rows), crashing, batch_size=3)
    with (tmp_path / "cache" / "index.jsonl").open("a") as handle:
        handle.write('{"file": "shard-0000')  # a line cut by the kill
    resumed = EmbeddingCache(tmp_path / "cache")
    assert resumed.ids() == {"r0", "r1", "r2", "r3", "r4", "r5"}
    counted = []

    def counting(images):
        counted.append(len(images))
        return embed(images)

    assert resumed.fill(((r["id"], r["image"]) for r in rows), counting, batch_size=3) == 4 and sum(counted) == 4
    clean = EmbeddingCache(tmp_path / "clean")
    clean.fill(((r["id"], r["image"]) for r in rows), embed, batch_size=4)
    ids = [r["id"] for r in rows]
    torch.testing.assert_close(resumed.load(ids), clean.load(ids), atol=1e-6, rtol=0)


def test_decontaminate_command(tmp_path, clip_path):
    from lare.cli import app
    from typer.testing import CliRunner

    root = "data/fixtures/vision_r1"
    args = ["decontaminate", "--data", f"{root}/vision_r1_llava.json", "--data", f"{root}/vision_r1_chat.json",
            "--images", root, "--train-bench", "data/fixtures/vlmevalkit/MMStar_mini.tsv", "--vision", str(clip_path),
            "--out", str(tmp_path / "out"), "--threshold", "0.99"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "decontamination.json").read_text())
    # MMStar_mini row 0 asks "What colour is the square?" (A = red), row 2 "Is the square red?" (A = yes): the two
    # Vision-R1 rows kept by the readers are exactly those pairs
    assert report["removed"] == {"exact_qa_match": 2} and report["kept"] == 0
    evidence = {e["id"]: e["benchmark_id"] for e in report["removed_rows"]}
    assert evidence == {"r1-llava-1": "0", "vision_r1_chat:1": "2"}
    assert report["readers"][f"{root}/vision_r1_chat.json"]["skipped"]["multiple_images"] == 1
    assert (tmp_path / "out" / "reasoning.jsonl").read_text() == ""
