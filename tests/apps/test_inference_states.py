"""The paper's use of the interpreters: explain what a deployed Heima thought *while answering*.

The shipped Heima (data/reproduced/heima-mllama/model) answers shapes questions with `heima generate --capture`; the
states it recorded go straight into `interpreters decode` (one states format), next to an interpreter trained on the
teacher-forced `interpreters capture` of the same model. Scoring needs reference texts, which inference-time states do
not have: `interpreters score` says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from heima.cli import app as heima_app
from interpreters.cli import app as interpreters_app
from latent_apps.shapes import make_shapes
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
HEIMA = ROOT / "data" / "reproduced" / "heima-mllama" / "model"
INTERPRETER_BASE = ROOT / "data" / "base" / "causal_lm"
runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_generated_states_are_decoded(tmp_path):
    if not (HEIMA / "config.json").is_file():
        pytest.skip("the shipped Heima is not in this checkout")
    shapes = tmp_path / "shapes"
    make_shapes(n=10, seed=7, out=shapes)
    prepared, capture, interp = tmp_path / "prepared", tmp_path / "capture", tmp_path / "interp"
    _ok(runner.invoke(heima_app, ["prepare", "--data", str(shapes / "train" / "llava_cot.jsonl"), "--images",
                                  str(shapes), "--out", str(prepared)]))  # fmt: skip
    _ok(runner.invoke(interpreters_app, ["capture", "--heima", str(HEIMA), "--data", str(prepared), "--out",
                                         str(capture)]))  # fmt: skip
    _ok(runner.invoke(interpreters_app, ["train", "--capture", str(capture), "--stage", "caption", "--model",
                                         str(INTERPRETER_BASE), "--run-dir", str(interp), "--max-steps", "2",
                                         "--batch-size", "4"]))  # fmt: skip

    gen = tmp_path / "gen"
    questions = shapes / "test" / "llava_cot.jsonl"
    _ok(runner.invoke(heima_app, ["generate", "--stage-dir", str(HEIMA), "--data", str(questions), "--images",
                                  str(shapes), "--out", str(gen), "--capture", "--max-new-tokens", "64"]))  # fmt: skip
    generations = [json.loads(line) for line in (gen / "generations.jsonl").read_text().splitlines()]
    index = [json.loads(line) for line in (gen / "hidden_states" / "index.jsonl").read_text().splitlines()]
    # One state per generated thinking token, none invented: the shipped Heima writes its three thinking tokens.
    assert len(index) == sum(g["thinking_tokens"] for g in generations) == 3 * len(generations) > 0
    for g in generations:
        mine = [e for e in index if e["id"] == g["id"]]
        assert [e["stage"] for e in mine] == ["summary", "caption", "reasoning"]
        assert [e["token"] for e in mine] == [f"<THINKING_OF_{s.upper()}>" for s in ("summary", "caption", "reasoning")]
        assert all(e["token"] in g["text"] and "target" not in e for e in mine)
        assert all(Path(e["image"]) == Path(g["image"]) and Path(e["image"]).is_file() for e in mine)

    decoded = tmp_path / "decoded"
    _ok(runner.invoke(interpreters_app, ["decode", "--interpreter", str(interp), "--capture",
                                         str(gen / "hidden_states"), "--out", str(decoded), "--stage", "caption",
                                         "--max-new-tokens", "8"]))  # fmt: skip
    lines = [json.loads(line) for line in (decoded / "decoded.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(generations)  # real, zero, shuffled for every generated caption state
    assert {line["condition"] for line in lines} == {"real", "zero", "shuffled"}
    assert all(line["target"] is None and line["stage"] == "caption" and line["image"] for line in lines)

    result = runner.invoke(interpreters_app, ["score", "--decoded", str(decoded / "decoded.jsonl"), "--out",
                                              str(tmp_path / "scores"), "--metrics", "bleu"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error:" in result.output and "no target" in result.output
