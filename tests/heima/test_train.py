"""Heima's training stages on a tiny mllama (the real loading path: a saved checkpoint, ``config.model`` = its dir).

- every stage (0, 1, 2, 3, recover, one-shot, one-shot recover) trains 2 steps and writes its stage directory;
- stage 2 starts from stage 1's saved adapter (captured when its trainer starts), not from a fresh adapter;
- a missing previous stage raises ``StageError`` naming its directory;
- overfitting 3 synthetic shapes samples (one-shot stage K, then recover) makes greedy decoding emit the thinking-token
  structure with the right conclusions and K = 3 thinking tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from heima import trainer as heima_trainer
from heima.config import STAGES, HeimaConfig, thinking_token
from heima.data import load_prepared, prepare
from heima.model import add_thinking_tokens, prepare_model, stage_of_token
from heima.trainer import StageError, train_stage
from latent_apps.shapes import make_shapes
from latent_core.hub import load_model, load_processor
from latent_core.readers import parse_cot_stages
from latent_core.trainer import load_stage
from peft import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

TOKENS = [thinking_token(s) for s in STAGES]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(n=4, seed=0, out=out)
    return out


def _prepared(shapes: Path, out: Path, n: int | None = None) -> Path:
    data = shapes / "train" / "llava_cot.jsonl"
    if n is not None:
        data = out.parent / f"{out.name}.jsonl"
        picked, answers = [], set()
        for line in (shapes / "train" / "llava_cot.jsonl").read_text().splitlines(True):
            answer = parse_cot_stages(json.loads(line)["conversations"][1]["value"])["conclusion"]
            if answer not in answers:  # rows with different answers: a model that ignores the input cannot fit them
                picked.append(line)
                answers.add(answer)
        data.write_text("".join(picked[:n]))
    prepare(data, shapes, out, progress=False)
    return out


def _config(base: Path, prepared: Path, run_dir: Path, **overrides) -> HeimaConfig:
    values = dict(
        model=str(base),
        run_dir=str(run_dir),
        prepared=str(prepared),
        max_steps=2,
        per_device_train_batch_size=2,
        recover_batch_size=2,
        warmup_steps=0,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=0,
    )
    return HeimaConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def chain(shapes, base, tmp_path_factory):
    """Stages 0..3 and recover, then the one-shot ablation and its recover; stage 2's starting adapter captured."""
    tmp = tmp_path_factory.mktemp("chain")
    prepared = _prepared(shapes, tmp / "prepared", n=4)
    config = _config(base, prepared, tmp / "run")
    captured: dict[str, dict[str, torch.Tensor]] = {}

    class Capturing(heima_trainer.LatentTrainer):
        def train(self, *args, **kwargs):
            state = get_peft_model_state_dict(self.model)
            captured[self.stage_info["starts_from"] or f"base:{self.args.output_dir}"] = {
                k: v.detach().clone() for k, v in state.items()
            }
            return super().train(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(heima_trainer, "LatentTrainer", Capturing)
    handler = _ListHandler()
    logging.getLogger("heima").addHandler(handler)
    logging.getLogger("heima").setLevel(logging.INFO)
    try:
        outs = {stage: train_stage(config, stage) for stage in (0, 1, 2, 3, "recover")}
        one_shot = dataclasses.replace(config, one_shot=True)
        outs["one-shot"] = train_stage(one_shot, 3)
        outs["one-shot-recover"] = train_stage(one_shot, "recover")
    finally:
        mp.undo()
        logging.getLogger("heima").removeHandler(handler)
    return dict(config=config, outs=outs, captured=captured, logs=handler.messages)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_every_stage_trains_and_writes_its_directory(chain):
    config, outs = chain["config"], chain["outs"]
    run = Path(config.run_dir)
    expected = {
        0: (run / "stage-0", None),
        1: (run / "stage-1", run / "stage-0"),
        2: (run / "stage-2", run / "stage-1"),
        3: (run / "stage-3", run / "stage-2"),
        "recover": (run / "recover", run / "stage-3"),
        "one-shot": (run / "one-shot", None),
        "one-shot-recover": (run / "one-shot-recover", run / "one-shot"),
    }
    for key, (directory, starts_from) in expected.items():
        assert outs[key] == directory
        for name in ("adapter_model.safetensors", "adapter_config.json", "latent_stage.json", "heima_train.json"):
            assert (directory / name).is_file(), (key, name)
        info = json.loads((directory / "latent_stage.json").read_text())
        assert info["method"] == "heima" and info["tokens"] == TOKENS
        assert info["stage"] == (3 if key == "one-shot" else "recover" if "recover" in str(key) else key)
        assert info["starts_from"] == (str(starts_from) if starts_from else None)
        summary = json.loads((directory / "heima_train.json").read_text())
        assert summary["steps"] == 2
        # The processor is saved with the thinking tokens.
        tokenizer = load_processor(str(directory)).tokenizer
        assert set(TOKENS) <= set(tokenizer.get_vocab())
    assert (
        json.loads((run / "recover" / "heima_train.json").read_text())["learning_rate"] == config.recover_learning_rate
    )
    assert f"heima stage 2 starts from {run / 'stage-1'}" in chain["logs"]
    assert f"heima stage recover starts from {run / 'one-shot'}" in chain["logs"]


def test_stage_2_starts_from_stage_1_weights(chain, base):
    run = Path(chain["config"].run_dir)
    start = chain["captured"][str(run / "stage-1")]
    saved = load_file(str(run / "stage-1" / "adapter_model.safetensors"))
    assert sorted(start) == sorted(saved)
    assert any("trainable_tokens" in k for k in saved) and any("lora_B" in k for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0, msg=key)
    # ... and not from a fresh adapter (LoRA B starts at zero, the rows at their initialisation).
    model, processor = load_model(str(base)), load_processor(str(base))
    fresh = get_peft_model_state_dict(prepare_model(chain["config"], model, processor, TOKENS))
    assert sorted(fresh) == sorted(saved)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if "lora_B" in k)
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if "trainable_tokens" in k)


def test_missing_previous_stage_names_it(shapes, base, tmp_path):
    prepared = _prepared(shapes, tmp_path / "prepared", n=2)
    config = _config(base, prepared, tmp_path / "run")
    with pytest.raises(StageError, match=r"run[/\\]stage-1.*heima train --stage 1"):
        train_stage(config, 2)
    with pytest.raises(StageError, match=r"run[/\\]stage-3"):
        train_stage(config, "recover")
    with pytest.raises(StageError, match=r"run[/\\]one-shot"):
        train_stage(dataclasses.replace(config, one_shot=True), "recover")
    with pytest.raises(ValueError, match="one_shot"):
        train_stage(dataclasses.replace(config, one_shot=True), 1)
    assert not (tmp_path / "run" / "stage-2").exists()


def test_thinking_tokens_start_at_their_stage_name(base):
    model, processor = load_model(str(base)), load_processor(str(base))
    ids = add_thinking_tokens(model, processor, TOKENS)
    tokenizer = processor.tokenizer
    for token, i in zip(TOKENS, ids, strict=True):
        text_ids = tokenizer.encode(stage_of_token(token), add_special_tokens=False)
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            torch.testing.assert_close(table[i], table[text_ids].mean(0))
    assert add_thinking_tokens(model, processor, TOKENS) == ids  # idempotent: later stages get the same ids
    assert stage_of_token("<THINKING_OF_CAPTION_12>") == "caption"


def _tokens_before(tokenizer, ids: list[int], marker: str) -> int:
    """Generated tokens that end before ``marker`` starts in the decoded text."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut = text.index(marker)
    return max(i for i in range(len(ids) + 1) if len(tokenizer.decode(ids[:i], skip_special_tokens=False)) <= cut)


def test_overfit_recover_emits_thinking_tokens_and_right_conclusion(shapes, base, tmp_path):
    # 3 samples with three different answers.
    prepared = _prepared(shapes, tmp_path / "prepared", n=3)
    config = _config(
        base,
        prepared,
        tmp_path / "run",
        one_shot=True,
        max_steps=200,
        per_device_train_batch_size=3,
        recover_batch_size=3,
        learning_rate=5e-3,
        recover_learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
    )
    train_stage(config, 3)
    out = train_stage(dataclasses.replace(config, max_steps=10), "recover")
    assert json.loads((out / "heima_train.json").read_text())["last_loss"] < 0.1

    model, processor = load_model(str(base)), load_processor(str(out))
    ids = add_thinking_tokens(model, processor, TOKENS)
    model = load_stage(model, out, is_trainable=False).eval()
    tokenizer = processor.tokenizer
    records = json.loads((prepared / "heima_prepare.json").read_text())
    assert records["num_stages"] == len(STAGES)
    dataset, _ = load_prepared(prepared)
    conclusions = set()
    for record in dataset:
        image = Image.open(Path(record["images_root"]) / record["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(images=[[image]], text=[prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        new = generated[0, inputs["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=False)
        expected = (
            "<SUMMARY><THINKING_OF_SUMMARY></SUMMARY>\n\n<CAPTION><THINKING_OF_CAPTION></CAPTION>\n\n"
            f"<REASONING><THINKING_OF_REASONING></REASONING>\n\n<CONCLUSION>{record['conclusion']}</CONCLUSION>"
        )
        assert text.startswith(expected), (record["id"], text)
        # Reasoning-token count: the thinking tokens generated = K = 3 (one per stage) ...
        assert sum(t in ids for t in new) == len(STAGES)
        # ... and all tokens before <CONCLUSION> (tags included) = those of the fully replaced answer.
        before = _tokens_before(tokenizer, new, "<CONCLUSION>")
        answer = record["answers"][len(STAGES)]
        reference = tokenizer.encode(answer[: answer.index("<CONCLUSION>")], add_special_tokens=False)
        assert before == len(reference), (before, len(reference))
        conclusions.add(record["conclusion"])
    assert len(conclusions) == 3  # three different answers: the model reads the question and the image


@pytest.mark.parametrize(("first", "then"), [("rows", "peft"), ("peft", "rows")])
def test_a_stage_continues_a_stage_trained_under_the_other_rows_route(shapes, base, tmp_path, first, then):
    """torchrun + ZeRO-3 on CPU trains the rows with TrainableRows, one process with PEFT's trainable tokens: the
    next stage starts from the previous one's weights either way (the reference: the saved stage loaded for
    inference), with the trained rows, not fresh ones."""
    from latent_core.inference import load_trained
    from latent_core.trainer import saved_token_rows

    prepared = _prepared(shapes, tmp_path / "prepared", n=2)
    config = _config(base, prepared, tmp_path / "run", one_shot=True, learning_rate=1e-2, rows_route=first)
    stage = train_stage(config, 3)  # every thinking token in the inputs: their rows train
    reference, processor = load_trained(stage, device="cpu")
    ids = processor.tokenizer("Is there a red circle? " + " ".join(TOKENS), return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    fresh, fresh_processor = load_model(str(base)), load_processor(str(base))
    token_ids = add_thinking_tokens(fresh, fresh_processor, TOKENS)
    rows = saved_token_rows(stage, fresh)
    assert rows["route"] == first and rows["token_ids"] == token_ids
    assert not torch.allclose(rows["embed"], fresh.get_input_embeddings().weight[token_ids].detach())  # trained

    started: dict[str, torch.Tensor] = {}

    class Capturing(heima_trainer.LatentTrainer):
        def train(self, *args, **kwargs):
            with torch.no_grad():
                started["logits"] = self.model(input_ids=ids).logits
            return super().train(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heima_trainer, "LatentTrainer", Capturing)
        recover = train_stage(dataclasses.replace(config, rows_route=then), "recover")
    torch.testing.assert_close(started["logits"], expected, rtol=0, atol=1e-5)
    assert saved_token_rows(recover, fresh)["route"] == then
