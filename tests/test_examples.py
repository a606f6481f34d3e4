"""The README's training example runs (a few steps, one process) and leaves a loadable stage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_lora_example(tmp_path):
    spec = importlib.util.spec_from_file_location("train_lora", ROOT / "examples" / "train_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--out", str(tmp_path / "run"), "--steps", "3", "--cpu"])
    for name in ("adapter_model.safetensors", "latent_stage.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    from latent_core.testing import tiny_model
    from latent_core.tokens import add_special_tokens
    from latent_core.trainer import load_stage

    model, processor = tiny_model("qwen2_5_vl")
    add_special_tokens(model, processor, ["<think>"])
    load_stage(model, out)
