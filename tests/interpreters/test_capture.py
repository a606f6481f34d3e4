"""Capture on a tiny Heima (mllama + thinking tokens + LoRA adapter, saved as the trainer writes a stage).

The captured state equals the final-norm output of a teacher-forced forward at the chosen position (predictor:
t-1, token: t), and a capture interrupted after its first shard and resumed writes byte-identical shards and index.
"""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from interpreters import capture as capture_module
from interpreters.capture import capture
from latent_core.collate import SupervisedCollator
from latent_core.families import model_parts
from latent_core.inference import load_trained
from latent_core.lora import prepare_lora_model
from latent_core.testing import tiny_image, tiny_model
from latent_core.tokens import add_special_tokens
from latent_core.trainer import STAGE_INFO_NAME

TOKENS = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>", "<THINKING_OF_REASONING>"]
STAGE_TEXTS = [
    {
        "summary": "I will count the shapes.",
        "caption": "The image shows a grid.",
        "reasoning": "There is a red circle.",
    },
    {
        "summary": "I will answer the question.",
        "caption": "There is a blue square.",
        "reasoning": "So the answer is B.",
    },
]
N_RECORDS = 5


def _answer(texts: dict[str, str] | None, conclusion: str) -> str:
    parts = [
        f"<{k.upper()}>{texts[k] if texts else tok}</{k.upper()}>"
        for k, tok in zip(("summary", "caption", "reasoning"), TOKENS, strict=True)
    ]
    return "\n\n".join([*parts, f"<CONCLUSION>{conclusion}</CONCLUSION>"])


@pytest.fixture(scope="module")
def heima(tmp_path_factory):
    """(stage_dir, prepared_dir): a tiny Heima stage output and a prepared dataset written by hand."""
    root = tmp_path_factory.mktemp("heima")
    base_dir = root / "base"
    model, processor = tiny_model("mllama")
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    ids = add_special_tokens(model, processor, TOKENS)
    peft_model = prepare_lora_model(model, new_token_ids=ids, rows_route="peft")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    stage = root / "recover"
    peft_model.save_pretrained(stage)
    info = {"method": "heima", "stage": "recover", "tokens": TOKENS, "base": str(base_dir)}
    info["embedding_rows"] = int(peft_model.get_input_embeddings().weight.shape[0])
    (stage / STAGE_INFO_NAME).write_text(json.dumps(info))
    processor.save_pretrained(stage)

    images = root / "images"
    images.mkdir()
    records = []
    for i in range(N_RECORDS):
        tiny_image(i).save(images / f"{i}.png")
        texts = STAGE_TEXTS[i % 2]
        question = "How many red circles are there?" if i % 2 else "What colour is the shape at row 1 column 2?"
        records.append(
            {
                "id": f"r{i}",
                "turn": 0,
                "image": f"{i}.png",
                "images_root": str(images),
                "question": question,
                "answers": [_answer(texts, "B"), "", "", _answer(None, "B")],
                "stage_texts": texts,
                "conclusion": "B",
                "thinking_tokens": [[t] for t in TOKENS],
            }
        )
    prepared = root / "prepared"
    datasets.Dataset.from_list(records).save_to_disk(str(prepared))
    (prepared / "heima_prepare.json").write_text(json.dumps({"tokens": TOKENS, "num_stages": 3}))
    return stage, prepared


def _forced_final_norm(model, processor, record):
    """One record alone (no padding): the final-norm output [seq, d] and the input ids."""
    row = {"id": record["id"], "prompt": record["question"], "answer": record["answers"][-1]}
    row["image"] = f"{record['images_root']}/{record['image']}"
    batch = SupervisedCollator(processor)([row])
    batch.pop("labels")
    seen = []
    handle = model_parts(model).final_norm.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0][0], batch["input_ids"][0]


@pytest.mark.parametrize("position", ["predictor", "token"])
def test_captured_state_equals_teacher_forced_final_norm(heima, tmp_path, position):
    stage, prepared = heima
    out = tmp_path / "cap"
    summary = capture(stage, prepared, out, position=position, batch_size=3, shard_size=4, show_progress=False)
    assert summary["states"] == 3 * N_RECORDS and summary["problems"].get("missing_state", 0) == 0
    assert summary["states_per_stage"] == {"summary": N_RECORDS, "caption": N_RECORDS, "reasoning": N_RECORDS}
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    from interpreters.data import load_captures

    rows = load_captures(out)
    assert set(rows[0]) >= {"id", "stage", "token", "question", "target", "position", "mode", "file", "key", "hidden"}
    model, processor = load_trained(stage, device="cpu")
    dataset = datasets.load_from_disk(str(prepared))
    tok_ids = processor.tokenizer.convert_tokens_to_ids(TOKENS)
    shift = 1 if position == "predictor" else 0
    for record in dataset:
        states, ids = _forced_final_norm(model, processor, record)
        mine = [r for r in rows if r["id"] == record["id"]]
        assert [r["token"] for r in mine] == TOKENS
        for r in mine:
            assert r["target"] == record["stage_texts"][r["stage"]] and r["mode"] == position
            (col,) = (ids == tok_ids[TOKENS.index(r["token"])]).nonzero().flatten().tolist()
            assert r["position"] == col - shift
            torch.testing.assert_close(r["hidden"], states[col - shift], atol=1e-5, rtol=0)


def test_resumed_capture_writes_identical_shards(heima, tmp_path, monkeypatch):
    stage, prepared = heima
    kwargs = dict(batch_size=2, shard_size=2, show_progress=False)
    capture(stage, prepared, tmp_path / "full", **kwargs)

    real = capture_module._capture_shard
    calls = {"n": 0}

    def dies_on_second_shard(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(capture_module, "_capture_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        capture(stage, prepared, tmp_path / "resumed", **kwargs)
    assert [p.name for p in (tmp_path / "resumed").glob("shard-*")] == ["shard-00000.safetensors"]
    monkeypatch.setattr(capture_module, "_capture_shard", real)
    summary = capture(stage, prepared, tmp_path / "resumed", **kwargs)
    assert summary["resumed_shards"] == 1 and summary["shards"] == 3

    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", "index.jsonl"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    with pytest.raises(ValueError, match="other options"):
        capture(stage, prepared, tmp_path / "resumed", position="token", **kwargs)
