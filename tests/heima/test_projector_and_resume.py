"""Heima's projector choice (HeimaConfig.train_projector) and a stage that resumes after a kill, then cleans up."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from heima.config import HeimaConfig
from heima.model import prepare_model, projector_name
from heima.trainer import StageError, train_stage
from latent_core.inference import load_trained
from latent_core.testing import tiny_model
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "fixtures" / "llava_cot"
TOKENS = ["<THINKING_OF_SUMMARY>", "<THINKING_OF_CAPTION>", "<THINKING_OF_REASONING>"]


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


def _adapter(stage: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(stage / "adapter_model.safetensors"))


def test_a_killed_stage_resumes_from_its_checkpoint_and_cleans_up(base, prepared, tmp_path, monkeypatch):
    config = _config(base, prepared, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2, seed=3)
    # The reference: the same stage trained without interruption.
    reference = train_stage(dataclasses.replace(config, run_dir=str(tmp_path / "ref"), output_dir=None), 0)
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
    # A checkpoint of a run with other settings is refused, never silently continued.
    with pytest.raises(core_trainer.StageError, match="learning_rate"):
        train_stage(dataclasses.replace(config, learning_rate=5e-3), 0)
    # A checkpoint folder the kill left half-written (no trainer_state.json) is skipped.
    (stage / "checkpoint-3").mkdir()
    train_stage(config, 0)
    summary = json.loads((stage / "heima_train.json").read_text())
    assert summary["resumed_from"] == str(stage / "checkpoint-2") and summary["steps"] == 4
    # Resuming gives the weights of the uninterrupted run (optimizer, scheduler and data order restored).
    resumed, expected = _adapter(stage), _adapter(reference)
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # The checkpoints (optimizer state) are gone once the stage is saved; the stage itself is complete.
    assert not list(stage.glob("checkpoint-*")) and (stage / "adapter_model.safetensors").is_file()
    kept = dataclasses.replace(config, run_dir=str(tmp_path / "kept"), output_dir=None, keep_checkpoints=True)
    train_stage(kept, 0)
    assert sorted(p.name for p in (tmp_path / "kept" / "stage-0").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_projector_choice_is_kept_across_stages(base, prepared, tmp_path):
    config = _config(base, prepared, tmp_path / "run", save_strategy="no")
    train_stage(config, 0)
    with pytest.raises(StageError, match="without the projector"):
        train_stage(dataclasses.replace(config, train_projector=True), 1)
    train_stage(config, 1)  # the same choice: fine


def test_export_merges_the_trained_projector(base, prepared, tmp_path):
    from heima.generate import export
    from latent_core.hub import load_model

    config = _config(base, prepared, tmp_path / "run", train_projector=True, learning_rate=1e-2, save_strategy="no")
    out = train_stage(config, 0)
    trained, _ = load_trained(out, str(base), device="cpu")
    expected = {k.rsplit(".", 1)[1]: v for k, v in trained.state_dict().items()
                if "multi_modal_projector.modules_to_save" in k}  # fmt: skip
    merged = load_model(str(export(out, tmp_path / "merged")))
    got = {k.rsplit(".", 1)[1]: v for k, v in merged.state_dict().items() if "multi_modal_projector" in k}
    assert got.keys() == expected.keys() == {"weight", "bias"}
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
