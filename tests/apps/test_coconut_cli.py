"""`latent coconut train` and `latent eval --method coconut` on a tiny llava base and a tiny shapes set: the stages,
the latent controls, the training prompt = the evaluation prompt, a staged control read like the answer, bad input in
one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from latent_apps.cli import app as latent_app
from latent_apps.shapes import make_shapes
from latent_core.testing import save_tiny_model
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(6, 3, out, test_fraction=0.5, hops=(1, 2))
    return out


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coconut")
    base = save_tiny_model("llava", root / "base")
    result = runner.invoke(latent_app, [
        "coconut", "train", "--model", str(base), "--data", str(shapes / "train" / "llava_cot.jsonl"),
        "--images", str(shapes), "--out", str(root / "run"), "--steps-per-stage", "1", "--max-latent-stage", "2",
        "--c-thought", "2", "--batch-size", "2", "--limit", "4", "--threads", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    stages = [json.loads(m) for m in re.findall(r'\{"stage".*\}', result.output)]
    assert [(s["stage"], s["num_latents"], s["steps"]) for s in stages] == [(1, 2, 1), (2, 4, 1)]
    assert "kept" in result.output  # the data's skip report
    return root / "run"


def test_eval_coconut_reports_thoughts_and_their_controls(run, shapes, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(latent_app, [
        "eval", "--model", str(run), "--method", "coconut", "--bench", str(shapes / "test" / "llava_cot.jsonl"),
        "--out", str(out), "--limit", "3", "--batch-size", "3", "--max-new-tokens", "4", "--latent-diagnostics",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "llava_cot" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["latent_steps"] == 4 for r in records)  # stage 2: M * c thoughts
    assert all(set(r["controls"]) == {"zero", "shuffle"} for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benches"]["llava_cot"]["latent_controls"]) == {"zero", "shuffle"}


def test_training_prompt_is_the_evaluation_prompt(run, shapes):
    from latent_apps.eval.methods import build_inputs, build_prompt_text
    from latent_apps.eval.runner import _reader_for
    from latent_core.coconut import CoconutCollator, CoconutConfig, load_coconut, read_coconut_rows

    model, processor, _ = load_coconut(run)
    bench = shapes / "test" / "llava_cot.jsonl"
    rows = {r["id"]: r for r in read_coconut_rows(bench, shapes, CoconutConfig())}
    samples, _ = _reader_for(bench)(bench)
    for sample in list(samples)[:4]:
        train = CoconutCollator(processor, CoconutConfig(), 1)([rows[sample["id"]]])
        evaluated, _ = build_inputs(model, processor, [sample], [build_prompt_text(sample, None)])
        assert torch.equal(evaluated["input_ids"], train["input_ids"])


def _eval_with_zero_control(shapes, out, zero, limit):
    """``run_eval`` of a staged fake method that answers every sample right and whose zeroed control writes
    ``zero(sample)``: the bench summary and the samples written."""
    from latent_apps.eval.methods import Generation
    from latent_apps.eval.runner import run_eval
    from latent_core.testing import tiny_model

    class Staged:
        staged = True
        default_max_new_tokens = 4

        def __call__(self, model, processor, samples, max_new_tokens):
            return [Generation(text=f"<CONCLUSION>{s['answer']}</CONCLUSION>", generated_tokens=3,
                               controls={"zero": zero(s)}) for s in samples]  # fmt: skip

    model, processor = tiny_model("llava")
    summary = run_eval(model, Staged(), [shapes / "test" / "llava_cot.jsonl"], out, processor=processor,
                       limit=limit, batch_size=4, show_progress=False)  # fmt: skip
    return summary["benches"]["llava_cot"], [json.loads(x) for x in (out / "llava_cot" / "samples.jsonl").open()]


def test_a_staged_control_is_read_from_its_conclusion_only(shapes, tmp_path):
    """A control output cut in its caption ("row 1 column 2 ..." names option-like text) is unanswered, not read from
    its caption (before: the controls were read from the whole text)."""
    bench, _ = _eval_with_zero_control(shapes, tmp_path, lambda s: f"<CAPTION>{s['answer']} is row 1 column 2", 4)
    assert bench["accuracy"] == 1.0
    assert bench["latent_controls"]["zero"]["accuracy"] == 0.0


def test_bad_input_is_one_line(shapes, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "images/none.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "B"}]}) + "\n")  # fmt: skip
    result = runner.invoke(latent_app, ["coconut", "train", "--model", "nowhere", "--data", str(bad), "--images",
                                        str(shapes), "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "no row with staged reasoning" in result.output
    assert "missing_image" in result.output
    result = runner.invoke(
        latent_app,
        [
            "eval",
            "--model",
            str(tmp_path),
            "--method",
            "coconut",
            "--bench",
            str(shapes / "test" / "llava_cot.jsonl"),
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert result.exit_code == 2 and "latent coconut train" in result.output
    assert "Traceback" not in result.output


def test_latent_controls_per_category_by_hand(shapes, tmp_path):
    """A control's accuracy per question kind, so that a reproduction compares it with the model on the same
    questions: here the zeroed control keeps only the colour questions right, and its per-kind accuracy is counted
    by hand from the samples written."""
    bench, rows = _eval_with_zero_control(
        shapes, tmp_path, lambda s: f"<CONCLUSION>{s['answer'] if s['category'] == 'colour' else 'zz'}</CONCLUSION>", 8
    )
    zero = bench["latent_controls"]["zero"]
    kinds = {r["category"] for r in rows}
    assert "colour" in kinds and len(kinds) > 1
    assert zero["accuracy_per_category"] == {k: float(k == "colour") for k in sorted(kinds)}
    assert zero["accuracy"] == pytest.approx(sum(r["category"] == "colour" for r in rows) / len(rows))
