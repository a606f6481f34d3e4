"""`--bf16/--no-bf16` on every method's train command reaches its training arguments (default: on iff CUDA supports
bf16); what bf16 then does (fp32 master weights, bf16 compute) is tested in tests/latent_core/test_trainer.py."""

from __future__ import annotations

import importlib

import pytest
import torch
from typer.testing import CliRunner

# (command module, trainer module, the training function the command calls, its config argument, extra args)
COMMANDS = {
    "heima": ("heima.cli", "heima.trainer", "train_stage", 0, ["--stage", "0"]),
    "interpreters": ("interpreters.cli", "interpreters.trainer", "train_interpreter", 0, ["--capture", "caps"]),
    "lare": ("lare.cli", "lare.trainer", "train_stage", 0, ["--stage", "1", "--data", "{data}", "--images", "."]),
    "lavit": ("lavit.cli", "lavit.trainer", "train_student", 0, ["--data", "{data}"]),
}


@pytest.mark.parametrize("flag", [None, "--bf16"])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_bf16_flag_reaches_the_training_arguments(name, flag, tmp_path, monkeypatch):
    cli, trainer, function, position, extra = COMMANDS[name]
    seen = []

    def capture(*args, **kwargs):
        seen.append(args[position])
        return {}

    monkeypatch.setattr(importlib.import_module(trainer), function, capture)
    data = tmp_path / "rows.jsonl"
    data.write_text("")
    args = ["train", *(a.format(data=data) for a in extra), *([flag] if flag else [])]
    result = CliRunner().invoke(importlib.import_module(cli).app, args)
    assert result.exit_code == 0, result.output
    default = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert seen[0].bf16 is {None: default, "--bf16": True}[flag]
