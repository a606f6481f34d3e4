"""Coconut (latent_core.coconut): the curriculum's text targets written out by hand, the loss against a naive
full-recompute reference, the stages chained and resumed, decoding against a naive greedy loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from latent_core.coconut import (
    COCONUT_NAME,
    CoconutCollator,
    CoconutConfig,
    CoconutTrainer,
    cot_steps,
    generate_coconut,
    load_coconut,
    remaining_answer,
    train_coconut,
)
from latent_core.families import model_parts
from latent_core.hub import load_model, load_processor
from latent_core.testing import save_tiny_model, tiny_image
from latent_core.tokens import add_special_tokens
from latent_core.trainer import LatentTrainingArguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANSWER = (
    "<SUMMARY>I will follow the question.</SUMMARY>\n\n<CAPTION>row 1 column 1: red circle.</CAPTION>\n\n"
    "<REASONING>The red circle is at row 1 column 1. Right of it: row 1 column 2, blue square. So the colour is "
    "blue.</REASONING>\n\n<CONCLUSION>B</CONCLUSION>"
)


def test_steps_of_a_staged_answer():
    steps, conclusion = cot_steps(ANSWER, "stage")
    assert steps == [
        ("SUMMARY", "I will follow the question."),
        ("CAPTION", "row 1 column 1: red circle."),
        ("REASONING", "The red circle is at row 1 column 1. Right of it: row 1 column 2, blue square. So the colour "
                      "is blue."),
    ]  # fmt: skip
    assert conclusion == "<CONCLUSION>B</CONCLUSION>"
    sentences, _ = cot_steps(ANSWER, "sentence")
    assert [text for _, text in sentences[2:]] == [
        "The red circle is at row 1 column 1.", "Right of it: row 1 column 2, blue square.", "So the colour is blue."
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no closed <CONCLUSION>"):
        cot_steps("<SUMMARY>s</SUMMARY>")
    with pytest.raises(ValueError, match="no reasoning step"):
        cot_steps("<CONCLUSION>B</CONCLUSION>")
    with pytest.raises(ValueError, match="unknown step unit"):
        CoconutConfig(unit="word")


def test_each_stage_removes_its_steps_and_the_last_removes_all():
    stage = CoconutConfig(c_thought=2, max_latent_stage=3)
    assert remaining_answer(ANSWER, 0, stage) == ANSWER
    assert remaining_answer(ANSWER, 1, stage) == ANSWER[ANSWER.index("<CAPTION>") :]
    assert remaining_answer(ANSWER, 2, stage) == ANSWER[ANSWER.index("<REASONING>") :]
    assert remaining_answer(ANSWER, 3, stage) == "<CONCLUSION>B</CONCLUSION>"
    assert [stage.num_latents(k) for k in range(5)] == [0, 2, 4, 6, 6]
    sentence = CoconutConfig(max_latent_stage=4, unit="sentence")
    assert remaining_answer(ANSWER, 0, sentence) == ANSWER
    assert remaining_answer(ANSWER, 3, sentence) == (
        "<REASONING>Right of it: row 1 column 2, blue square. So the colour is blue.</REASONING>\n\n"
        "<CONCLUSION>B</CONCLUSION>"
    )
    assert remaining_answer(ANSWER, 4, sentence) == "<CONCLUSION>B</CONCLUSION>"  # M = 4 < 5 steps: all of them
    assert remaining_answer(ANSWER, 9, sentence) == "<CONCLUSION>B</CONCLUSION>"


def _rows(tmp_path, n=2):
    rows = []
    for i in range(n):
        path = tmp_path / f"image_{i}.png"
        tiny_image(i).save(path)
        rows.append({"id": f"q{i}", "image": str(path), "question": f"What colour is shape {i}?", "answer": ANSWER})
    return rows


def _naive_thoughts(model, inputs, n_latents, bot, eot):
    """Reference prefix: the prompt's decoder inputs, ``<bot>``, each thought from a full recompute of the whole
    prefix (no cache), ``<eot>``; returns ``(parts, embeddings [1, L, d])``."""
    parts = model_parts(model)
    captured = {}
    handle = parts.language_model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embed = parts.input_embeddings
    seq = torch.cat([captured["inputs_embeds"], embed(torch.tensor([[bot]]))], 1)
    for _ in range(n_latents):
        hidden = parts.language_model(inputs_embeds=seq, use_cache=False).last_hidden_state[:, -1:]
        seq = torch.cat([seq, hidden], 1)
    return parts, torch.cat([seq, embed(torch.tensor([[eot]]))], 1)


def _naive_loss(model, inputs, n_latents, bot, eot, answer_ids):
    """Reference: the naive prefix, then the answer teacher-forced in one forward; the mean cross-entropy of the
    answer tokens."""
    parts, seq = _naive_thoughts(model, inputs, n_latents, bot, eot)
    seq = torch.cat([seq, parts.input_embeddings(answer_ids)], 1)
    logits = parts.lm_head(parts.language_model(inputs_embeds=seq, use_cache=False).last_hidden_state)
    predicting = logits[:, -answer_ids.shape[1] - 1 : -1]
    return F.cross_entropy(predicting.flatten(0, 1), answer_ids.flatten())


def test_the_loss_is_the_remaining_answer_after_the_thoughts(tmp_path):
    base = save_tiny_model("llava", tmp_path / "base")
    model, processor = load_model(str(base)), load_processor(str(base))
    config = CoconutConfig(c_thought=2, max_latent_stage=3)
    bot, eot = add_special_tokens(model, processor, [config.bot_token, config.eot_token])
    row = _rows(tmp_path, 1)
    batch = CoconutCollator(processor, config, 1)(row)
    target = processor.tokenizer.decode(batch["answer_ids"][0], skip_special_tokens=False)
    assert target.startswith("<CAPTION>row 1 column 1") and "<SUMMARY>" not in target  # stage 1: SUMMARY gone
    args = LatentTrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True,
                                   remove_unused_columns=False)  # fmt: skip
    trainer = CoconutTrainer(model=model, args=args, processing_class=processor, num_latents=2, bot_id=bot, eot_id=eot)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        prompt = {k: v for k, v in batch.items() if k not in ("answer_ids", "labels")}
        reference = _naive_loss(model, prompt, 2, bot, eot, batch["answer_ids"])
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the thoughts count: with none the loss leaves the reference's tolerance (7.5e-5 away)
        trainer.num_latents = 0
        assert abs(float(trainer.compute_loss(model, batch)) - float(reference)) > 2e-5


def _naive_greedy(model, inputs, n_latents, bot, eot, new_tokens):
    parts, seq = _naive_thoughts(model, inputs, n_latents, bot, eot)
    embed = parts.input_embeddings
    with torch.no_grad():
        tokens = []
        for _ in range(new_tokens):
            token = parts.lm_head(parts.language_model(inputs_embeds=seq).last_hidden_state[:, -1]).argmax(-1)
            tokens.append(int(token))
            seq = torch.cat([seq, embed(token)[:, None]], 1)
    return tokens


def test_stages_chain_resume_and_decode_like_a_naive_loop(tmp_path):
    base = save_tiny_model("llava", tmp_path / "base")
    rows = _rows(tmp_path)
    out = tmp_path / "coconut"
    config = CoconutConfig(c_thought=2, max_latent_stage=2)
    result = train_coconut(base, rows, out, config, steps_per_stage=2, batch_size=2, learning_rate=1e-3,
                           show_progress=False)  # fmt: skip
    records = [json.loads((out / f"stage_{k}" / COCONUT_NAME).read_text()) for k in (1, 2)]
    assert [r["num_latents"] for r in records] == [2, 4] and [r["stage"] for r in records] == [1, 2]
    assert [s["steps"] for s in result["stages"]] == [2, 2]
    assert not list(out.glob("stage_*/checkpoints/checkpoint-*"))  # cleaned once the stage is saved
    # Each stage starts from the previous one: stage 2's weights moved away from stage 1's, which moved from the base.
    w = {name: load_model(str(path)).lm_head.weight[:10] for name, path in
         (("base", base), ("1", out / "stage_1"), ("2", out / "stage_2"))}  # fmt: skip
    assert not torch.equal(w["base"], w["1"]) and not torch.equal(w["1"], w["2"])
    # A re-run skips the finished stages (nothing rewritten).
    stamp = (out / "stage_2" / "model.safetensors").stat().st_mtime_ns
    again = train_coconut(base, rows, out, config, steps_per_stage=2, batch_size=2, learning_rate=1e-3,
                          show_progress=False)  # fmt: skip
    assert (out / "stage_2" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["stages"] == result["stages"]

    model, processor, record = load_coconut(out)  # the run directory: its last stage
    assert record["stage"] == 2
    from latent_core.collate import answer_batch

    inputs = {k: v for k, v in answer_batch(processor, rows[:1]).items() if k not in ("answer_ids", "labels")}
    answers = generate_coconut(model, processor, inputs, record, max_new_tokens=6)
    expected = _naive_greedy(model, inputs, 4, record["bot_id"], record["eot_id"], 6)
    got = answers.sequences[0]
    assert answers.latent_steps == [4] and answers.token_counts == [len(got)]
    assert got == expected[: len(got)]
    ends = {processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id}
    assert len(got) == 6 or expected[len(got)] in ends  # stopped at the budget or at the naive loop's end token
    zero = generate_coconut(model, processor, inputs, record, max_new_tokens=6, latents="zero")
    assert torch.count_nonzero(zero.latents) == 0 and torch.count_nonzero(answers.latents) > 0


def test_not_a_coconut_stage_says_which_command_writes_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="latent coconut train"):
        load_coconut(tmp_path)


def test_a_row_without_steps_fails_before_training(tmp_path):
    rows = [{"id": "bad", "image": None, "question": "q", "answer": "just B"}]
    with pytest.raises(ValueError, match="row 'bad': the answer has no closed <CONCLUSION>"):
        train_coconut(tmp_path / "base", rows, tmp_path / "out", CoconutConfig(), steps_per_stage=1)
