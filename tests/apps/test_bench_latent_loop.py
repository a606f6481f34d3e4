"""`bench latent-loop` on a much smaller configuration: the record's keys and the accuracy metric (never time)."""

from __future__ import annotations

import json

import pytest
from latent_apps.bench.latent_loop import run


def test_latent_loop_bench_record(capsys):
    record = run(
        as_json=True,
        prompt_tokens=24,
        num_latents=3,
        answer_tokens=4,
        layers=2,
        hidden=64,
        heads=2,
        intermediate=128,
        vocab=256,
        repeats=1,
        warmup=0,
    )
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(record))
    expected = {"speedup", "step_cost_ratio", "max_latent_diff", "tokens_match", "naive_s", "ours_s"}
    expected |= {"speedup_vs_cached_generate", "latent_phase_speedup", "latent_phase_max_diff"}
    assert expected <= record.keys()
    assert record["config"]["batch"] == 2 and record["config"]["pad"] > 0  # a left-padded batch
    assert record["latent_phase_max_diff"] <= 1e-4
    assert {"latent_step_s", "decode_step_s", "config", "timings_s"} <= record.keys()
    assert record["config"]["num_latents"] == 3 and record["config"]["torch_threads"] == 1
    assert record["max_latent_diff"] <= 1e-4
    assert record["tokens_match"] is True


def test_latent_loop_bench_needs_two_steps():
    with pytest.raises(ValueError, match="num_latents >= 2"):
        run(num_latents=1)
