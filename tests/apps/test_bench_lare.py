"""`bench lare-loop` on a much smaller configuration: the record's keys and its accuracy metrics (never time): the
cached refocusing loop and the naive full recompute produce the same latents and logits."""

from __future__ import annotations

import json

import pytest
from latent_apps.bench.lare_loop import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lare_loop_bench_record(capsys):
    record = run(
        as_json=True, layers=2, hidden=64, heads=4, kv_heads=2, image_size=112, text_tokens=8, extractor_hidden=32,
        extractor_heads=4, repeats=1,
    )  # fmt: skip
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(record))
    expected = {"speedup", "max_latent_diff", "max_logit_diff", "step_s", "halt_check_step_s", "halted_step_s"}
    assert expected <= record.keys()
    assert record["config"]["image_tokens"] == 64 and record["config"]["window"] == 4 and record["config"]["pad"] > 0
    assert record["max_latent_diff"] <= 1e-5 and record["max_logit_diff"] <= 1e-4
