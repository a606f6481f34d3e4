"""Heima's projector choice (HeimaConfig.train_projector) and a stage that resumes after a kill, then cleans up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from heima.config import HeimaConfig
from heima.model import prepare_model, projector_name
from heima.trainer import train_stage
from latent_core.inference import load_trained
from latent_core.testing import tiny_model
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "fixtures" / "llava_cot"
TOKENS = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>", "<THINKING_OF_REASONING>"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-mllama")
    model, processor = tiny_model("mllama")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from heima.data import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(FIXTURES / "train.jsonl", FIXTURES, out, progress=False)
    return out


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_projector_is_frozen_by_default_and_trains_in_full_when_asked():
    model, processor = tiny_model("mllama")
    frozen = prepare_model(HeimaConfig(use_cpu=True), model, processor, TOKENS)
    assert not any("multi_modal_projector" in name for name in _trainable(frozen))
    model, processor = tiny_model("mllama")
    expected = {name.rsplit(".", 1)[1] for name, _ in model.named_parameters() if "multi_modal_projector" in name}
    config = HeimaConfig(use_cpu=True, train_projector=True)
    trained = prepare_model(config, model, processor, TOKENS)
    projector = {name for name in _trainable(trained) if "multi_modal_projector" in name}
    # every projector weight (a trainable full copy), not LoRA on it
    assert {name.rsplit(".", 1)[1] for name in projector} == expected == {"weight", "bias"}
    assert all(".modules_to_save." in name for name in projector)
    assert not any("vision_model" in name for name in _trainable(trained))
    qwen, qwen_processor = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="no multi_modal_projector"):
        projector_name(qwen)


def _config(base: Path, prepared: Path, run_dir: Path, **overrides) -> HeimaConfig:
    values = dict(model=str(base), run_dir=str(run_dir), prepared=str(prepared), max_steps=2,
                  per_device_train_batch_size=2, warmup_steps=0, use_cpu=True, logging_steps=1, disable_tqdm=True,
                  activation_checkpointing=False, report_to=[])  # fmt: skip
    values.update(overrides)
    return HeimaConfig(**values)


def test_trained_projector_is_saved_and_loaded(base, prepared, tmp_path):
    config = _config(base, prepared, tmp_path / "run", train_projector=True, learning_rate=1e-2, save_strategy="no")
    out = train_stage(config, 0)
    fresh, _ = tiny_model("mllama")
    original = {k: v for k, v in fresh.state_dict().items() if "multi_modal_projector" in k}
    loaded, _ = load_trained(out, str(base), device="cpu")
    now = {k.rsplit(".", 1)[1]: v for k, v in loaded.state_dict().items()
           if "multi_modal_projector.modules_to_save" in k}  # fmt: skip
    base_now = {k.split("multi_modal_projector.", 1)[1]: v for k, v in original.items()}
    assert now.keys() == base_now.keys()
    assert any(not torch.equal(now[k], base_now[k]) for k in now)  # the trained copy came back, not the base


class _Kill(TrainerCallback):
    """Stop like a kill -9 right after the checkpoint of step ``at`` is written (no final save)."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            raise KeyboardInterrupt


def test_a_killed_stage_resumes_from_its_checkpoint_and_cleans_up(base, prepared, tmp_path, monkeypatch):
    config = _config(base, prepared, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    import latent_core.trainer as core_trainer

    original_init = core_trainer.LatentTrainer.__init__

    def killed_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(_Kill(2))

    monkeypatch.setattr(core_trainer.LatentTrainer, "__init__", killed_init)
    with pytest.raises(KeyboardInterrupt):
        train_stage(config, 0)
    stage = tmp_path / "run" / "stage-0"
    assert (stage / "checkpoint-2").is_dir() and not (stage / "heima_train.json").exists()
    monkeypatch.setattr(core_trainer.LatentTrainer, "__init__", original_init)
    train_stage(config, 0)
    summary = json.loads((stage / "heima_train.json").read_text())
    assert summary["resumed_from"] == str(stage / "checkpoint-2") and summary["steps"] == 4
    # The checkpoints (optimizer state) are gone once the stage is saved; the stage itself is complete.
    assert not list(stage.glob("checkpoint-*")) and (stage / "adapter_model.safetensors").is_file()
    kept = dataclasses.replace(config, run_dir=str(tmp_path / "kept"), output_dir=None, keep_checkpoints=True)
    train_stage(kept, 0)
    assert sorted(p.name for p in (tmp_path / "kept" / "stage-0").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
