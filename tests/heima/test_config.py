"""heima.config: thinking-token names and the Table A1/A2 defaults of HeimaConfig."""

from __future__ import annotations

import pytest
from heima.config import STAGES, HeimaConfig, thinking_token, thinking_tokens


def test_thinking_tokens():
    assert STAGES == ("summary", "caption", "reasoning")
    assert thinking_token("summary") == "<THINKING_OF_SUMMARY>"
    assert thinking_token("caption", 2) == "<THINKING_OF_CAPTION_2>"
    assert thinking_tokens("reasoning", 1) == ["<THINKING_OF_REASONING>"]
    assert thinking_tokens("summary", 2) == ["<THINKING_OF_SUMMARY_1>", "<THINKING_OF_SUMMARY_2>"]
    with pytest.raises(ValueError):
        thinking_tokens("summary", 0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_defaults_and_stages(tmp_path):
    c = HeimaConfig(run_dir=str(tmp_path))
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_include_lm_head) == (16, 32, 0.0, True)
    assert (c.learning_rate, c.per_device_train_batch_size) == (1e-4, 6)
    assert (c.recover_learning_rate, c.recover_batch_size) == (1e-5, 8)
    assert (c.weight_decay, c.warmup_steps, c.max_grad_norm, c.num_train_epochs) == (0.01, 100, 1.0, 1.0)
    assert c.lr_scheduler_type.value == "cosine"
    assert c.activation_checkpointing and c.gradient_checkpointing
    assert c.remove_unused_columns is False and c.report_to == []
    assert c.bf16 in (True, False) and c.model == "llava-cot-11b"
    assert c.output_dir == str(tmp_path)

    s1 = c.for_stage(1)
    assert s1.output_dir == str(tmp_path / "stage-1") and s1.stage == "1" and s1.learning_rate == 1e-4
    rec = c.for_stage("recover")
    assert rec.output_dir == str(tmp_path / "recover")
    assert (rec.learning_rate, rec.per_device_train_batch_size) == (1e-5, 8)
    assert c.learning_rate == 1e-4  # the original is unchanged
    with pytest.raises(ValueError, match="stage"):
        c.for_stage("nope")
