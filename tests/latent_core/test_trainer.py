"""LatentTrainer: losses by name, learning, saving extra modules, resume, stage chaining, and a real two-process
DeepSpeed ZeRO-3 run on CPU (gloo) whose saved stage reproduces the ZeRO-3 model's logits in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from latent_core.collate import SupervisedCollator
from latent_core.families import lora_target_modules, model_parts
from latent_core.testing import tiny_image, tiny_model
from latent_core.trainer import (
    EXTRA_MODULES_NAME,
    STAGE_INFO_NAME,
    STAGE_WEIGHTS_NAME,
    LatentModel,
    LatentTrainer,
    LatentTrainingArguments,
    StageError,
    deepspeed_config,
    load_extra_modules,
    load_stage,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).parent
ROWS = [
    {"id": "a", "prompt": "How many red circles are there?", "answer": "two"},
    {"id": "b", "prompt": "Is there a blue square?", "answer": "yes"},
    {"id": "c", "prompt": "What colour is the star?", "answer": "yellow"},
    {"id": "d", "prompt": "Count the shapes.", "answer": "five"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WithHead(LatentModel):
    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__(backbone)
        self.head = nn.Linear(hidden, 4)

    def forward(self, **batch):
        out = self.backbone(**batch, output_hidden_states=True)
        return {
            "loss": out.loss,
            "logits": out.logits,
            "aux_losses": {"probe": self.head(out.hidden_states[-1]).pow(2).mean()},
        }


def _model(family: str = "causal_lm", seed: int = 0):
    model, processor = tiny_model(family, seed=seed)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_modules(model, include_lm_head=True))
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed + 1)
    return WithHead(peft_model, model.config.get_text_config().hidden_size), processor


def _args(tmp_path, **overrides) -> LatentTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        loss_weights={"probe": 0.1},
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return LatentTrainingArguments(**{**defaults, **overrides})


def _rows_with_image(family: str):
    image = tiny_image()
    return [dict(row, image=image) for row in ROWS] if family != "causal_lm" else ROWS


@pytest.mark.parametrize("family", ["causal_lm", "qwen2_5_vl"])
def test_loss_halves_and_terms_are_logged_by_name(tmp_path, family):
    model, processor = _model(family)
    rows = _rows_with_image(family)
    collator = SupervisedCollator(processor)
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=Dataset.from_list(ROWS),
        data_collator=lambda batch: collator([rows[[r["id"] for r in ROWS].index(b["id"])] for b in batch]),
        processing_class=processor,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 30
    first, last = logs[0], logs[-1]
    assert last["ntp_loss"] < first["ntp_loss"] / 2, (first["ntp_loss"], last["ntp_loss"])
    for entry in logs:
        assert {"ntp_loss", "probe_loss"} <= entry.keys()
        # HF's total loss is the weighted sum of the named terms.
        assert entry["loss"] == pytest.approx(entry["ntp_loss"] + 0.1 * entry["probe_loss"], rel=1e-4)


def test_gradient_accumulation_keeps_the_loss_a_mean(tmp_path):
    model, processor = _model()
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=Dataset.from_list(ROWS),
        data_collator=SupervisedCollator(processor),
    )
    trainer.train()
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        assert entry["loss"] == pytest.approx(entry["ntp_loss"] + 0.1 * entry["probe_loss"], rel=1e-4)


def test_aux_loss_without_weight_fails_clearly(tmp_path):
    model, processor = _model()
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path, loss_weights=None, max_steps=1),
        train_dataset=Dataset.from_list(ROWS),
        data_collator=SupervisedCollator(processor),
    )
    with pytest.raises(KeyError, match="auxiliary loss 'probe' but the training arguments give it no weight"):
        trainer.train()


def test_schedules_run_before_every_step(tmp_path):
    model, processor = _model()
    seen = []
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path, max_steps=4),
        train_dataset=Dataset.from_list(ROWS),
        data_collator=SupervisedCollator(processor),
        step_schedules=[seen.append],
    )
    trainer.train()
    assert seen == [0, 0, 1, 2, 3]  # on train begin, then before steps 1..4


def test_save_writes_adapter_extras_and_stage_info_and_stage_chains(tmp_path):
    model, processor = _model()
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(ROWS),
        data_collator=SupervisedCollator(processor),
        processing_class=processor,
        stage_info={"stage": 1},
    )
    trainer.train()
    out = tmp_path / "stage1"
    trainer.save_model(str(out))
    for name in ("adapter_model.safetensors", "adapter_config.json", EXTRA_MODULES_NAME, "tokenizer.json"):
        assert (out / name).is_file(), name
    assert sorted(load_file(str(out / EXTRA_MODULES_NAME))) == ["head.bias", "head.weight"]
    assert not any("lora" in k for k in load_file(str(out / EXTRA_MODULES_NAME)))

    # Stage 2 starts from stage 1's weights: same outputs as the trained model.
    batch = SupervisedCollator(processor)(ROWS)
    model.eval()
    with torch.no_grad():
        expected = model(**batch)["logits"]
    base, _ = tiny_model("causal_lm", seed=0)
    chained = WithHead(load_stage(base, out), base.config.hidden_size)
    assert load_extra_modules(chained, out) == ["head.bias", "head.weight"]
    chained.eval()
    with torch.no_grad():
        assert torch.equal(chained(**batch)["logits"], expected)
    assert any(p.requires_grad for n, p in chained.named_parameters() if "lora_" in n)  # the adapter keeps training

    with pytest.raises(StageError, match="does not exist: run that stage first"):
        load_stage(tiny_model("causal_lm")[0], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="has no adapter_config.json"):
        load_stage(tiny_model("causal_lm")[0], tmp_path / "empty")
    grown, tokenizer = tiny_model("causal_lm")
    grown.resize_token_embeddings(len(tokenizer) + 5)
    with pytest.raises(StageError, match="embedding rows"):
        load_stage(grown, out)
    with pytest.raises(StageError, match=r"does not have|shape"):
        load_extra_modules(WithHead(tiny_model("causal_lm")[0], 8), out)


def _full_model(tmp_path, family: str = "qwen2_5_vl", seed: int = 0):
    """A full-weight stage's model: the whole language model trains, the vision tower (or, for a text model, the
    input embeddings) stays frozen; plus an extra head. Loaded from a saved base, so the stage can name it."""
    from latent_core.hub import load_model
    from latent_core.testing import save_tiny_model

    base_dir = tmp_path / f"base-{family}"
    if not base_dir.is_dir():
        save_tiny_model(family, base_dir, seed=seed)
    model = load_model(str(base_dir))
    frozen = model_parts(model).vision_tower if family != "causal_lm" else model.get_input_embeddings()
    frozen.requires_grad_(False)
    torch.manual_seed(seed + 1)
    return WithHead(model, model.config.get_text_config().hidden_size), base_dir


def test_full_weight_stage_saves_trained_weights_only_and_chains(tmp_path):
    model, base_dir = _full_model(tmp_path)
    _, processor = tiny_model("qwen2_5_vl")
    rows = _rows_with_image("qwen2_5_vl")
    trainer = LatentTrainer(
        model=model,
        args=_args(tmp_path, max_steps=3),
        train_dataset=Dataset.from_list(rows),
        data_collator=SupervisedCollator(processor),
        processing_class=processor,
        stage_info={"stage": 3},
    )
    trainer.train()
    out = tmp_path / "stage3"
    trainer.save_model(str(out))
    saved = load_file(str(out / STAGE_WEIGHTS_NAME))
    backbone = model.backbone
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert set(saved) == trained and not any(".visual." in k or k.startswith("model.visual") for k in saved)
    assert sorted(load_file(str(out / EXTRA_MODULES_NAME))) == ["head.bias", "head.weight"]
    info = json.loads((out / STAGE_INFO_NAME).read_text())
    assert info["kind"] == "full" and info["base_model"] == str(base_dir) and info["frozen_weights"] > 0
    assert not (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()

    # The next stage: the base from its id, the stage's weights, the same head: the trained model's outputs.
    batch = SupervisedCollator(processor)(rows)
    model.eval()
    with torch.no_grad():
        expected = model(**batch)["logits"]
    from latent_core.hub import load_model

    base = load_model(info["base_model"])
    chained = WithHead(load_stage(base, out), base.config.get_text_config().hidden_size)
    assert load_extra_modules(chained, out) == ["head.bias", "head.weight"]
    chained.eval()
    with torch.no_grad():
        assert torch.equal(chained(**batch)["logits"], expected)

    other, _ = tiny_model("causal_lm")
    with pytest.raises(StageError, match=r"embedding rows|does not have"):
        load_stage(other, out)

    # For inference: the base the stage names, its weights, the stage's processor; the backbone's logits.
    from latent_core.inference import load_trained

    loaded, _ = load_trained(out, device="cpu")
    with torch.no_grad():
        backbone_inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(loaded(**backbone_inputs).logits, model.backbone(**backbone_inputs).logits)


def test_full_weight_stages_chain_restores_every_part(tmp_path):
    # LaRe-like: stage A trains the language model; stage B freezes it and trains only the head. Loading stage B
    # onto the base must restore A's language model too (B saved none of it), even after A is gone from memory.
    model, base_dir = _full_model(tmp_path, "causal_lm")
    _, tokenizer = tiny_model("causal_lm")

    def train(model, out, steps=2):
        trainer = LatentTrainer(
            model=model,
            args=_args(tmp_path, max_steps=steps, output_dir=str(tmp_path / "tmp")),
            train_dataset=Dataset.from_list(ROWS),
            data_collator=SupervisedCollator(tokenizer),
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(str(out))

    train(model, tmp_path / "A")
    from latent_core.hub import load_model

    base = load_stage(load_model(str(base_dir)), tmp_path / "A")
    base.requires_grad_(False)
    torch.manual_seed(5)
    stage_b = WithHead(base, base.config.hidden_size)
    train(stage_b, tmp_path / "B")
    assert load_file(str(tmp_path / "B" / STAGE_WEIGHTS_NAME)) == {}  # B trained no weight of the base
    info = json.loads((tmp_path / "B" / STAGE_INFO_NAME).read_text())
    assert info["previous_stages"] == [str((tmp_path / "A").resolve())]

    restored = WithHead(load_stage(load_model(info["base_model"]), tmp_path / "B"), base.config.hidden_size)
    load_extra_modules(restored, tmp_path / "B")
    for (name, want), (_, got) in zip(stage_b.named_parameters(), restored.named_parameters(), strict=True):
        assert torch.equal(got, want), name
    start = load_model(str(base_dir))
    assert not torch.equal(
        restored.backbone.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    )

    (tmp_path / "A").rename(tmp_path / "A-moved")
    with pytest.raises(StageError, match="builds on the full-weight stage .*A.* restore it"):
        load_stage(load_model(info["base_model"]), tmp_path / "B")


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_resume_matches_an_uninterrupted_run(tmp_path, kind):
    def run(out: Path, stop_after: int | None, resume: str | None):
        if kind == "adapter":
            model, processor = _model()
        else:
            model, processor = _full_model(tmp_path, "causal_lm")[0], tiny_model("causal_lm")[1]
        args = _args(
            tmp_path,
            output_dir=str(out),
            max_steps=6,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=3,
            learning_rate=1e-2,
        )
        trainer = LatentTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(ROWS), data_collator=SupervisedCollator(processor)
        )
        if stop_after is not None:
            from transformers import TrainerCallback

            class Kill(TrainerCallback):
                def on_save(self, args, state, control, **kwargs):
                    if state.global_step >= stop_after:
                        control.should_training_stop = True

            trainer.add_callback(Kill())
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run(tmp_path / "full", None, None)
    run(tmp_path / "killed", 3, None)
    checkpoint = tmp_path / "killed" / "checkpoint-3"
    assert (checkpoint / EXTRA_MODULES_NAME).is_file() and (checkpoint / "optimizer.pt").is_file()
    weights = "adapter_model.safetensors" if kind == "adapter" else STAGE_WEIGHTS_NAME
    assert (checkpoint / weights).is_file()
    resumed = run(tmp_path / "killed", None, str(checkpoint))
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)


def test_bad_rows_name_their_id(tmp_path):
    _, processor = tiny_model("qwen2_5_vl")
    collator = SupervisedCollator(processor, image_root=tmp_path)
    with pytest.raises(ValueError, match="row 'b' has no answer"):
        collator([ROWS[0], {"id": "b", "prompt": "Q?"}])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"row 'x': cannot read image .*broken.png"):
        collator([{"id": "x", "prompt": "Q?", "answer": "A", "image": "broken.png"}])
    with pytest.raises(ValueError, match=r"row 'y': cannot read image .*missing.png"):
        collator([{"id": "y", "prompt": "Q?", "answer": "A", "image": "missing.png"}])


def test_collator_labels_only_the_answer():
    _, processor = tiny_model("qwen2_5_vl")
    rows = [dict(row, image=tiny_image()) for row in ROWS[:2]]
    batch = SupervisedCollator(processor)(rows)
    tokenizer = processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tokenizer.decode(labelled).startswith(row["answer"])
        assert "<|image_pad|>" not in tokenizer.decode(labelled)
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padded for training


def test_deepspeed_configs_by_name_or_path(tmp_path):
    for name in ("zero2", "zero3", "zero3_offload"):
        path = Path(deepspeed_config(name))
        assert path.is_file() and path.name == f"{name}.json"
    custom = tmp_path / "mine.json"
    custom.write_text("{}")
    assert deepspeed_config(str(custom)) == str(custom)
    with pytest.raises(ValueError, match="neither a shipped config"):
        deepspeed_config("zero4")


@pytest.mark.slow
def test_two_process_zero3_on_cpu(tmp_path):
    """LoRA + two new tokens + an extra head under ZeRO-3 with 2 processes (gloo). The saved stage, loaded in a
    single process, gives the logits of the ZeRO-3 model (tolerance 1e-5: the same fp32 weights, gathered)."""
    out = tmp_path / "zero3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "zero3_worker.py"),
        str(out),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    losses = [float(x) for x in (out / "losses.txt").read_text().split()]
    assert len(losses) == 3 and losses[-1] < losses[0]

    sys.path.insert(0, str(HERE))
    try:
        import zero3_worker as worker
    finally:
        sys.path.remove(str(HERE))
    from latent_core.lora import prepare_lora_model

    model, tokenizer, ids = worker.build()
    extras = sorted(load_file(str(out / EXTRA_MODULES_NAME)))
    assert "head.weight" in extras and any("rows" in k for k in extras), extras
    peft_model = prepare_lora_model(model, new_token_ids=ids, rows_route="rows", r=8, alpha=16)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, load_file(str(out / "adapter_model.safetensors")))
    single = worker.WithHead(peft_model, model.config.hidden_size)
    load_extra_modules(single, out)
    single.eval()
    with torch.no_grad():
        logits = single(**SupervisedCollator(tokenizer)(worker.ROWS))["logits"]
    expected = load_file(str(out / "zero3_logits.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    untrained, _, _ = worker.build()
    with torch.no_grad():
        before = untrained(**SupervisedCollator(tokenizer)(worker.ROWS)).logits
    assert (before - expected).abs().max() > 1e-2  # training changed the model: the comparison is not vacuous


@pytest.mark.slow
def test_two_process_deepspeed_full_weight_stage_resumes_to_the_same_weights(tmp_path):
    """A full-weight stage under ZeRO-3 with 2 processes (gloo), stopped after its step-2 checkpoint and resumed from
    DeepSpeed's engine checkpoint (weights and optimizer partitions): its saved stage equals an uninterrupted run's."""
    from latent_core.testing import save_tiny_model

    base = save_tiny_model("causal_lm", tmp_path / "base")
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "full_stage_worker.py"), str(base), str(out)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    checkpoint = out / "killed" / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir() and (checkpoint / STAGE_WEIGHTS_NAME).is_file()
    assert float((out / "partitioned_load_diff.txt").read_text()) == 0.0  # load_stage into ZeRO-3 partitions
    full, resumed = out / "uninterrupted" / "stage", out / "killed" / "stage"
    for name in (STAGE_WEIGHTS_NAME, EXTRA_MODULES_NAME):
        expected, got = load_file(str(full / name)), load_file(str(resumed / name))
        assert expected.keys() == got.keys() and "model.embed_tokens.weight" not in expected
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # The stage loads in one process onto the base it names, the frozen embeddings untouched.
    from latent_core.hub import load_model

    info = json.loads((resumed / STAGE_INFO_NAME).read_text())
    model = load_stage(load_model(info["base_model"]), resumed)
    start = load_model(str(base))
    weights = load_file(str(resumed / STAGE_WEIGHTS_NAME))
    for name, param in model.named_parameters():
        expected = weights[name] if name in weights else dict(start.named_parameters())[name]
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=0, msg=name)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight)


def test_bf16_training_keeps_fp32_master_weights_and_applies_small_updates(tmp_path):
    """Table A1 trains LaViT's LLM in full at lr 5e-6 with bf16: the weights loaded in bf16 (load_base(bf16=True))
    must train as fp32 master copies, or most updates vanish below bf16's precision. The reference is AdamW by
    hand: its first step moves every weight with a non-zero gradient by lr * g / (|g| + eps), i.e. by lr."""
    from latent_core.testing import save_tiny_model
    from latent_core.trainer import load_base

    model, processor = load_base(str(save_tiny_model("qwen2_5_vl", tmp_path / "base")), bf16=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model_parts(model).vision_tower.requires_grad_(False)  # frozen, as LaViT's vision tower
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    lr = 5e-6
    args = _args(tmp_path, max_steps=1, learning_rate=lr, weight_decay=0.0, max_grad_norm=0.0, bf16=True,
                 loss_weights=None)  # fmt: skip
    trainer = LatentTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS),
                            data_collator=SupervisedCollator(processor))  # fmt: skip
    trainer.train()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.float32}  # the master copies
    assert {p.dtype for p in model_parts(model).vision_tower.parameters()} == {torch.bfloat16}  # frozen: half memory
    layer = "model.language_model.layers.0.mlp.down_proj.weight"
    step = (trained[layer].detach() - before[layer]).abs()
    assert (step > 0).float().mean() > 0.99  # in bf16, most of these updates round away
    assert step.median() == pytest.approx(lr, rel=0.05)
