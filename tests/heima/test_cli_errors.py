"""The heima command line as a new user meets it: flags reach the config, wrong models and missing inputs get one
clear line (exit 2, no traceback), choice flags are choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from heima.cli import app
from latent_core.testing import save_tiny_model, tiny_model
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "fixtures" / "llava_cot"
TEXT_ONLY = ROOT / "data" / "base" / "causal_lm"  # a real saved text-only Llama checkpoint
runner = CliRunner()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    result = runner.invoke(app, ["prepare", "--data", str(FIXTURES / "train.jsonl"), "--images", str(FIXTURES),
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def seen(monkeypatch):
    """Replace the training itself: record the config the command line built."""
    configs = []

    def fake_train_stage(config, stage):
        configs.append(config)
        return Path(config.run_dir) / "stage"

    import heima.trainer

    monkeypatch.setattr(heima.trainer, "train_stage", fake_train_stage)
    return configs


def test_train_flags_reach_the_config(seen, tmp_path):
    common = ["--stage", "0", "--prepared", str(tmp_path), "--run-dir", str(tmp_path / "run")]
    assert runner.invoke(app, ["train", *common]).exit_code == 0
    paper = seen[-1]  # Tables A1/A2
    assert (paper.learning_rate, paper.recover_learning_rate, paper.warmup_steps) == (1e-4, 1e-5, 100)
    assert (paper.num_train_epochs, paper.save_total_limit, paper.report_to, paper.train_projector) == (
        1.0, 2, [], False,
    )  # fmt: skip
    args = ["--learning-rate", "2e-3", "--warmup-steps", "7", "--epochs", "3", "--seed", "5", "--save-total-limit",
            "1", "--report-to", "tensorboard", "--train-projector", "--keep-checkpoints"]  # fmt: skip
    result = runner.invoke(app, ["train", *common, *args])
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert config.learning_rate == 2e-3 and config.recover_learning_rate == pytest.approx(2e-4)  # the 10x ratio
    assert (config.warmup_steps, config.num_train_epochs, config.seed, config.save_total_limit) == (7, 3.0, 5, 1)
    assert config.report_to == ["tensorboard"] and config.train_projector and config.keep_checkpoints
    assert config.for_stage("recover").learning_rate == pytest.approx(2e-4)
    result = runner.invoke(app, ["train", *common, "--learning-rate", "2e-3", "--recover-learning-rate", "3e-5"])
    assert result.exit_code == 0 and seen[-1].recover_learning_rate == 3e-5


def test_train_refuses_a_text_only_model(prepared, tmp_path):
    result = runner.invoke(app, ["train", "--stage", "0", "--prepared", str(prepared), "--model", str(TEXT_ONLY),
                                 "--run-dir", str(tmp_path / "run"), "--max-steps", "1"])  # fmt: skip
    line = _one_error_line(result)
    assert "family is causal_lm" in line and "cannot take images" in line
    assert "mllama (MllamaForConditionalGeneration)" in line and "qwen2_5_vl" in line
    assert not (tmp_path / "run" / "stage-0").exists()  # nothing trained, nothing saved


def test_generate_refuses_a_text_only_model(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q", "question": "Is there a circle?", "image": "shapes.png"}) + "\n")
    result = runner.invoke(app, ["generate", "--stage-dir", str(TEXT_ONLY), "--data", str(questions),
                                 "--images", str(ROOT / "data" / "demo"), "--out", str(tmp_path / "gen")])  # fmt: skip
    assert "family is causal_lm" in _one_error_line(result)


def test_missing_inputs_are_one_line(prepared, tmp_path):
    base = save_tiny_model("mllama", tmp_path / "base")
    run = tmp_path / "run"
    line = _one_error_line(runner.invoke(app, ["train", "--stage", "2", "--prepared", str(prepared), "--model",
                                               str(base), "--run-dir", str(run)]))  # fmt: skip
    assert str(run / "stage-1") in line and "heima train --stage 1" in line
    line = _one_error_line(runner.invoke(app, ["train", "--stage", "0", "--prepared", str(tmp_path / "nope"),
                                               "--model", str(base), "--run-dir", str(run)]))  # fmt: skip
    assert str(tmp_path / "nope") in line and "heima prepare" in line
    line = _one_error_line(runner.invoke(app, ["generate", "--stage-dir", str(tmp_path / "no-stage"), "--data",
                                               str(tmp_path / "q.jsonl"), "--images", str(tmp_path), "--out",
                                               str(tmp_path / "gen")]))  # fmt: skip
    assert str(tmp_path / "no-stage") in line


def test_a_corrupted_adapter_names_the_file(tmp_path):
    stage = tmp_path / "stage"
    base = save_tiny_model("mllama", tmp_path / "base")
    tiny_model("mllama")[1].save_pretrained(stage)  # the processor a stage directory holds
    (stage / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base),
                                                           "r": 2, "target_modules": ["q_proj"]}))  # fmt: skip
    (stage / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q", "question": "Is there a circle?", "image": "shapes.png"}) + "\n")
    line = _one_error_line(runner.invoke(app, ["generate", "--stage-dir", str(stage), "--data", str(questions),
                                               "--images", str(ROOT / "data" / "demo"), "--out",
                                               str(tmp_path / "gen")]))  # fmt: skip
    assert str(stage / "adapter_model.safetensors") in line and "safetensors" in line


def test_position_is_a_choice(seen, tmp_path):
    result = runner.invoke(app, ["generate", "--help"])
    assert "<predictor|token>" in result.output
    common = ["train", "--stage", "recover", "--prepared", str(tmp_path)]
    assert runner.invoke(app, [*common, "--save-total-limit", "0"]).exit_code == 2  # 0 would keep every checkpoint
    assert "--epochs" in runner.invoke(app, [*common, "--epochs", "0"]).output
    result = runner.invoke(app, [*common, "--learning-rate", "1e-5"])
    assert result.exit_code == 0 and "trains at a tenth of it, 1e-06" in result.output
