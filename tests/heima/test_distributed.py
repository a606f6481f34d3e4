"""`heima train` scales out as the README says: two processes under torchrun with ZeRO-3 on CPU (gloo), through the
command line a user runs; the saved stage loads in one process, generates, and the next stage continues it in one
process.

It used to fail on both ranks while loading the base: on a CPU machine accelerate found no backend and counted one
process, and DeepSpeed's communication layer was never attached, so ZeRO-3's batch check saw "2 != 1 * 1 * 1".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from heima.cli import app
from heima.generate import generate, load_for_inference
from latent_core.testing import save_tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "fixtures" / "llava_cot"


@pytest.mark.slow
def test_heima_train_under_torchrun_zero3_on_cpu(tmp_path):
    base = save_tiny_model("mllama", tmp_path / "base")
    prepared = tmp_path / "prepared"
    result = CliRunner().invoke(app, ["prepare", "--data", str(FIXTURES / "train.jsonl"), "--images", str(FIXTURES),
                                      "--out", str(prepared)])  # fmt: skip
    assert result.exit_code == 0, result.output
    heima = shutil.which("heima", path=str(Path(sys.executable).parent))
    assert heima is not None
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", heima, "train",
               "--stage", "0", "--prepared", str(prepared), "--model", str(base), "--run-dir", str(run),
               "--deepspeed", "zero3", "--max-steps", "2", "--batch-size", "1", "--learning-rate", "1e-2",
               "--warmup-steps", "0"]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    stage = run / "stage-0"
    summary = json.loads((stage / "heima_train.json").read_text())
    assert summary["steps"] == 2
    args = torch.load(stage / "training_args.bin", weights_only=False)
    assert args.world_size == 2 and args.deepspeed  # two processes really trained it
    adapter = load_file(str(stage / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # LoRA B starts at zero: it trained

    # The next stage in one process (PEFT's trainable tokens) continues the ZeRO-3 stage (TrainableRows): it used to
    # fail with "extra_modules.safetensors holds [...latent_trainable_rows.head_rows, ...] which the model does not
    # have".
    result = CliRunner().invoke(app, ["train", "--stage", "1", "--prepared", str(prepared), "--model", str(base),
                                      "--run-dir", str(run), "--max-steps", "1", "--batch-size", "1",
                                      "--warmup-steps", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((run / "stage-1" / "latent_stage.json").read_text())["trainable_rows"]["route"] == "peft"

    loaded, loaded_processor = load_for_inference(stage, device="cpu")
    records = generate(loaded, loaded_processor, [{"id": "q", "question": "Is there a red circle?",
                                                   "image": str(ROOT / "data" / "demo" / "shapes.png")}],
                       max_new_tokens=4)  # fmt: skip
    assert records[0]["generated_tokens"] >= 1
