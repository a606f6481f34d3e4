"""The heima command line end to end on the fixtures: prepare, train (two chained stages), generate, export."""

from __future__ import annotations

import json
from pathlib import Path

from heima.cli import app
from latent_core.testing import save_tiny_model
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "data" / "fixtures" / "llava_cot"


def test_heima_cli_end_to_end(tmp_path):
    runner = CliRunner()
    base = save_tiny_model("mllama", tmp_path / "base")
    prepared, run = tmp_path / "prepared", tmp_path / "run"

    result = runner.invoke(
        app, ["prepare", "--data", str(FIXTURES / "train.jsonl"), "--images", str(FIXTURES), "--out", str(prepared)]
    )
    assert result.exit_code == 0, result.output
    assert "missing_stage:summary" in result.output and "3 records" in result.output

    common = [
        "--prepared",
        str(prepared),
        "--model",
        str(base),
        "--run-dir",
        str(run),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert runner.invoke(app, ["train", "--stage", "0", *common]).exit_code == 0
    result = runner.invoke(app, ["train", "--stage", "1", *common])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "stage-1" / "latent_stage.json").read_text())["stage"] == 1
    bad = runner.invoke(app, ["train", "--stage", "3", *common])
    assert bad.exit_code == 2 and "stage-2" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["train", "--stage", "two", *common]).exit_code == 2

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q", "question": "Is there a red circle?", "image": "shapes.png"}) + "\n")
    out = tmp_path / "gen"
    result = runner.invoke(
        app,
        [
            "generate",
            "--stage-dir",
            str(run / "stage-1"),
            "--data",
            str(questions),
            "--images",
            str(ROOT / "data" / "demo"),
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "generations.jsonl").read_text().splitlines()[0])
    assert record["id"] == "q" and record["generated_tokens"] == 5 and "latency_s" in record
    assert json.loads((out / "summary.json").read_text())["n"] == 1

    result = runner.invoke(app, ["export", "--stage-dir", str(run / "stage-1"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "config.json").is_file()
