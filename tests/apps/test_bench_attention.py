"""The attention benchmarks run end to end on small shapes and print their JSON record (no timing asserts)."""

from __future__ import annotations

import json

from latent_apps.bench import attention_capture, gating, latent_train


def test_attention_capture_bench_small(capsys):
    record = attention_capture.run(
        as_json=True, tokens=128, batch=2, pad=32, layers=2, hidden=64, heads=4, kv_heads=2, rows=8, repeats=1
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(record))
    assert {"time_ratio", "peak_mem_ratio", "max_abs_diff", "train_time_ratio", "train_peak_mem_ratio"} <= record.keys()
    assert record["config"]["pad"] == 32 and record["config"]["kv_heads"] == 2
    # The recorded rows and their gradients equal eager attention's (GQA, a left-padded sample, a backward pass).
    assert record["max_abs_diff"] <= 1e-5 and record["max_grad_diff"] <= 1e-5
    # Eager keeps every L x L map: it must need more memory than a few recorded rows.
    assert 0 < record["ours_peak_bytes"] < record["eager_peak_bytes"]


def test_gating_bench_small(capsys):
    record = gating.run(as_json=True, tokens=64, batch=2, layers=2, hidden=64, heads=4, kv_heads=2, pad=16, repeats=1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "gating" and record["time_ratio"] > 0 and record["backward_time_ratio"] > 0
    assert record["config"]["pad"] == 16
    assert record["ungated_rows_max_diff"] <= 1e-5  # rows before the gated quarter are untouched


def test_benches_run_where_they_say(monkeypatch):
    """The record names the device the model and inputs really ran on; CUDA asked for without one is a one-line
    error on the command line (a CUDA machine once ran the model on the CPU and labelled it "cuda")."""
    import torch
    from latent_apps.bench.common import bench_device, ratio
    from latent_apps.cli import app
    from typer.testing import CliRunner

    record = gating.run(tokens=32, batch=1, layers=1, hidden=32, heads=2, repeats=1, device="cpu")
    assert record["device"] == "cpu"
    assert ratio(3.0, 0) is None and ratio(3.0, 2.0) == 1.5  # an empty measurement is no ratio, not a crash
    assert bench_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bench in ("gating", "attention-capture", "latent-loop", "latent-train", "lavit-teacher"):
        result = CliRunner().invoke(app, ["bench", bench, "--device", "cuda"])
        assert result.exit_code == 2 and result.output.startswith("error: --device cuda: no CUDA device"), bench


def test_latent_train_bench_small(capsys):
    # Our cached loop and Coconut's K+1 passes compute the same training step: same loss, same gradients.
    record = latent_train.run(
        as_json=True, prompt_tokens=32, num_latents=3, answer_tokens=4, pad=8, layers=2, hidden=64, heads=4,
        kv_heads=2, repeats=1,
    )  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(record))
    assert {"time_ratio", "peak_mem_ratio", "max_grad_diff"} <= record.keys()
    assert record["max_grad_diff"] <= 1e-4 and record["loss_diff"] <= 1e-5
    assert 0 < record["ours_peak_bytes"] and 0 < record["coconut_peak_bytes"]


def test_lavit_teacher_bench_small(capsys):
    # The fused pass and the authors' three passes give the same S_j and V_sem.
    from latent_apps.bench import lavit_teacher

    record = lavit_teacher.run(
        as_json=True, batch=2, image_px=112, new_tokens=4, layers=2, hidden=64, heads=4, kv_heads=2, repeats=1
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(record))
    assert {"throughput_ratio", "peak_mem_ratio", "max_abs_diff"} <= record.keys()
    assert record["config"]["image_tokens"] == 16 and record["max_abs_diff"] <= 1e-5 and record["vsem_max_diff"] <= 1e-5
