"""The latent loop, the gate and the attention recorder under DeepSpeed ZeRO-3 (2 CPU processes, gloo).

Under ZeRO-3 every parameter is partitioned (its local shape is ``(0,)``); the loop once read the embedding width from
``weight.shape`` and could not start when nothing had gathered the embedding yet (the worker calls the model's forward
as a function, as generate-time code and a method's own step do; through the engine's module call DeepSpeed happens
to gather it first). The reference is the same forward and backward in one process, without DeepSpeed: the loss, the
recorded attention mass and every parameter's gradient must match.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from latent_core.zero3 import full_shape, num_rows
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def test_full_shape_reads_the_deepspeed_shape():
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_shape = torch.Size([694, 64])  # what a ZeRO-3 partitioned embedding looks like outside a forward
    assert full_shape(weight) == (694, 64) and num_rows(weight) == 694
    embedding = torch.nn.Embedding(10, 4)
    assert full_shape(embedding.weight) == (10, 4) and num_rows(embedding) == 10


@pytest.mark.slow
def test_latent_loop_gate_and_recorder_under_zero3_match_one_process(tmp_path):
    out = tmp_path / "zero3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "zero3_latent_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    loss, ntp, mass, partitioned = (out / "result.txt").read_text().split()
    assert int(partitioned) > 0  # the parameters really were partitioned

    sys.path.insert(0, str(HERE))
    try:
        import zero3_latent_worker as worker
    finally:
        sys.path.remove(str(HERE))
    torch.manual_seed(0)
    model, batch = worker.build()
    outputs = model(**batch)
    outputs["loss"].backward()
    assert float(outputs["mass"].detach()) > 0  # the recorder saw the gated keys: the attention term is not vacuous
    torch.testing.assert_close(torch.tensor(float(loss)), outputs["loss"].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(float(mass)), outputs["mass"].detach(), rtol=1e-5, atol=1e-7)
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads = load_file(str(out / "grads.safetensors"))
    assert grads.keys() == expected.keys() and "step.weight" in grads
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
