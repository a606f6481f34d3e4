"""The evaluation runner: per-sample JSONL, summaries recomputed from it, resume, and method errors.

A tiny random Qwen2.5-VL (saved and loaded back through the runner's path) answers at random: these tests check
the accounting, not accuracy. A scripted method with known answers, token counts and timings checks the numbers.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import typer
from latent_apps.eval.methods import Generation, PlainMethod, UnknownMethodError, get_method, register_method
from latent_apps.eval.runner import eval_command, run_eval
from latent_core.testing import tiny_image, tiny_model
from typer.testing import CliRunner

# (index, question, options, answer, category, hint)
ROWS = [
    ("1", "What colour is the shape at row 1 column 2?", ["red", "green", "blue"], "A", "colour", None),
    ("2", "How many red circles are there?", ["one", "two", "three"], "B", "count", None),
    ("3", "What colour is the square?", ["red", "blue"], "B", "colour", None),
    ("4", "How many shapes are there?", ["two", "three", "four"], "C", "count", "Count carefully."),
    ("5", "Which shape is at the top left?", ["circle", "square", "triangle"], "A", "colour", None),
    ("6", "How many blue squares are there?", ["zero", "one"], "A", "count", None),
    ("7", "Is there a red circle?", [], "Yes", "colour", None),
    ("8", "How many circles are there?", [], "3", "count", None),
    ("9", "Are there more squares than circles?", [], "No", "count", None),
    ("10", "What colour is the star?", ["red", "yellow"], "B", "colour", None),  # image does not decode
]
BAD_IMAGE_ID = "10"


def _png_b64(seed: int) -> str:
    buf = io.BytesIO()
    tiny_image(seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "shapes_mini.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "answer", "category", "image"])
        for i, (index, question, options, answer, category, hint) in enumerate(ROWS):
            options = options + [""] * (3 - len(options))
            image = "not-base64!!" if index == BAD_IMAGE_ID else _png_b64(i)
            writer.writerow([index, question, hint or "", *options, answer, category, image])
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen")
    model, processor = tiny_model("qwen2_5_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recompute(records: list[dict]) -> dict:
    """The summary numbers, recomputed here independently of the runner's code."""
    n = len(records)
    n_correct = sum(1 for r in records if r["correct"] is True)
    cats: dict[str, list[bool]] = {}
    for r in records:
        cats.setdefault(r["category"], []).append(r["correct"] is True)
    correct_tokens = [r["generated_tokens"] for r in records if r["correct"] is True]
    steps = [r["latent_steps"] for r in records if r["latent_steps"] is not None]
    total_latency = sum(r["latency_s"] for r in records)
    return {
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n,
        "accuracy_per_category": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in cats.items()},
        "mean_generated_tokens": sum(r["generated_tokens"] for r in records) / n,
        "mean_generated_tokens_correct": sum(correct_tokens) / len(correct_tokens) if correct_tokens else None,
        "mean_latent_steps": sum(steps) / len(steps) if steps else None,
        "mean_latency_s": total_latency / n,
        "tokens_per_s": sum(r["generated_tokens"] for r in records) / total_latency,
        "n_unextracted": sum(r["extracted"] is None for r in records),
    }


def _assert_matches(summary: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, dict):  # per category
            assert summary[key].keys() == value.keys(), key
            for cat, numbers in value.items():
                assert summary[key][cat] == pytest.approx(numbers), (key, cat)
        else:
            assert summary[key] == pytest.approx(value), key


def test_plain_run_accounts_every_sample(bench, model_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_eval(str(model_dir), "plain", [bench], out, batch_size=4, max_new_tokens=5, show_progress=False)
    records = _jsonl(out / "shapes_mini" / "samples.jsonl")
    ids = [r["id"] for r in records]
    assert sorted(ids, key=int) == [r[0] for r in ROWS if r[0] != BAD_IMAGE_ID]
    assert len(ids) == len(set(ids))
    assert {r["kind"] for r in records} == {"choice", "yes_no", "number"}
    for r in records:
        assert 1 <= r["generated_tokens"] <= 5
        assert r["reasoning_tokens"] is None and r["latent_steps"] is None
        assert r["correct"] == (r["extracted"] is not None and str(r["extracted"]).lower() == r["gold"].lower())
    # latency = batch wall time / batch size: 9 samples in batches of 4, 4, 1 (file order).
    by_id = {r["id"]: r for r in records}
    assert by_id["1"]["latency_s"] == by_id["4"]["latency_s"] != by_id["5"]["latency_s"]

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    bench_summary = on_disk["benches"]["shapes_mini"]
    _assert_matches(bench_summary, _recompute(records))
    assert bench_summary["skipped"]["skipped"] == {"undecodable_image": 1}
    assert on_disk["method"] == "plain" and on_disk["max_new_tokens"] == 5 and on_disk["model"] == str(model_dir)
    assert {"torch", "transformers", "device"} <= on_disk.keys()
    assert json.loads((out / "shapes_mini" / "summary.json").read_text())["n"] == 9
    assert "| shapes_mini | 9 |" in (out / "summary.md").read_text()


class Scripted:
    """Known answers, token counts, latent steps and self-reported latencies, by sample id."""

    name = "scripted"
    TEXT = {
        "1": "The answer is (A).",  # right
        "2": "<REASONING>two or three</REASONING><CONCLUSION>B</CONCLUSION>",  # right
        "3": "red",  # wrong (A)
        "4": "A or C",  # ambiguous -> None
        "5": "Answer: a",  # right
        "6": "B) one",  # wrong
        "7": "Yes, there is.",  # right
        "8": "There are three.",  # right
        "9": "yes",  # wrong
    }

    def __call__(self, model, processor, samples, max_new_tokens):
        return [
            Generation(
                text=self.TEXT[s["id"]],
                generated_tokens=int(s["id"]) + 1,
                reasoning_tokens=int(s["id"]) if s["id"] == "2" else None,
                latent_steps=int(s["id"]) % 3 if int(s["id"]) % 2 else None,
                latency_s=0.01 * int(s["id"]),
            )
            for s in samples
        ]


def test_summary_numbers_from_scripted_answers(bench, model_dir, tmp_path):
    model, processor = tiny_model("qwen2_5_vl")
    out = tmp_path / "scripted"
    summary = run_eval(model, Scripted(), [bench], out, batch_size=4, processor=processor, show_progress=False)
    records = _jsonl(out / "shapes_mini" / "samples.jsonl")
    b = json.loads((out / "summary.json").read_text())["benches"]["shapes_mini"]
    assert b == summary["benches"]["shapes_mini"]
    _assert_matches(b, _recompute(records))
    # and by hand: right = 1, 2, 5, 7, 8; colour = 1, 3, 5, 7 (3 right); count = 2, 4, 6, 8, 9 (2 right).
    assert b["n"] == 9 and b["n_correct"] == 5 and b["n_unextracted"] == 1
    assert b["accuracy_per_category"] == {
        "colour": {"n": 4, "accuracy": 0.75},
        "count": {"n": 5, "accuracy": 0.4},
    }
    assert b["mean_generated_tokens_correct"] == pytest.approx((2 + 3 + 6 + 8 + 9) / 5)
    assert b["mean_latent_steps"] == pytest.approx((1 + 0 + 2 + 1 + 0) / 5)  # odd ids 1, 3, 5, 7, 9
    assert b["mean_reasoning_tokens"] == 2
    assert b["mean_latency_s"] == pytest.approx(0.01 * 45 / 9)
    assert b["tokens_per_s"] == pytest.approx(sum(range(2, 11)) / 0.45)


def _stable(summary: dict) -> dict:
    """The bench summary without the fields that depend on wall time."""
    b = dict(summary["benches"]["shapes_mini"])
    for key in ("mean_latency_s", "tokens_per_s", "samples", "reader_complete", "skipped"):
        b.pop(key)
    return b


def test_interrupted_and_resumed_run_equals_one_run(bench, model_dir, tmp_path, monkeypatch):
    common = dict(batch_size=3, max_new_tokens=4, show_progress=False)
    full = run_eval(str(model_dir), "plain", [bench], tmp_path / "full", **common)

    # 1. stopped by --limit after one batch, then resumed.
    out = tmp_path / "limited"
    first = run_eval(str(model_dir), "plain", [bench], out, limit=3, **common)
    assert first["benches"]["shapes_mini"]["n"] == 3
    resumed = run_eval(str(model_dir), "plain", [bench], out, **common)
    assert _stable(resumed) == _stable(full)

    # 2. crashed after the first batch (with a torn half-written line), then resumed.
    class Crashing(PlainMethod):
        name = "plain"
        calls = 0

        def __call__(self, *args, **kwargs):
            Crashing.calls += 1
            if Crashing.calls == 2:
                raise RuntimeError("killed")
            return super().__call__(*args, **kwargs)

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed"):
        run_eval(str(model_dir), Crashing(), [bench], out, **common)
    samples = out / "shapes_mini" / "samples.jsonl"
    assert len(_jsonl(samples)) == 3
    with open(samples, "a") as f:
        f.write('{"id": "4", "categ')  # a write cut by the kill
    resumed = run_eval(str(model_dir), "plain", [bench], out, **common)
    assert _stable(resumed) == _stable(full)
    ids = [r["id"] for r in _jsonl(samples)]
    assert len(ids) == len(set(ids)) == 9
    full_records = {r["id"]: r for r in _jsonl(tmp_path / "full" / "shapes_mini" / "samples.jsonl")}
    for r in _jsonl(samples):  # same batches, same greedy outputs
        assert (r["prediction"], r["generated_tokens"]) == (
            full_records[r["id"]]["prediction"],
            full_records[r["id"]]["generated_tokens"],
        )

    # resuming with other settings would mix runs: refused.
    with pytest.raises(ValueError, match="cannot resume"):
        run_eval(str(model_dir), "plain", [bench], out, batch_size=3, max_new_tokens=6, show_progress=False)


def test_unknown_method_lists_registered(bench, model_dir, tmp_path):
    register_method("scripted-test", Scripted, overwrite=True)
    with pytest.raises(UnknownMethodError, match="registered methods: .*plain.*scripted-test"):
        get_method("nope")
    with pytest.raises(UnknownMethodError, match="plain"):
        run_eval(str(model_dir), "nope", [bench], tmp_path / "x", show_progress=False)
    with pytest.raises(ValueError, match="no reader for"):
        run_eval(str(model_dir), "plain", [bench.with_suffix(".xlsx")], tmp_path / "x", show_progress=False)


def test_eval_command_cli(bench, model_dir, tmp_path):
    app = typer.Typer()
    app.command()(eval_command)
    runner = CliRunner()
    bad = runner.invoke(app, ["--model", str(model_dir), "--bench", str(bench), "--method", "nope"])
    assert bad.exit_code == 2 and "plain" in bad.output
    out = tmp_path / "cli"
    args = ["--model", str(model_dir), "--bench", str(bench), "--out", str(out), "--limit", "2"]
    args += ["--max-new-tokens", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["benches"]["shapes_mini"]["n"] == 2


def test_blink_and_mmvp_folders(tmp_path):
    """BLINK (per-task parquet, up to four images per question; the task is the category) and the MMVP layout
    run through the same runner; the readers' skip reports reach the summary."""
    from latent_apps.eval.runner import run_eval
    from latent_core.testing import tiny_model

    model, processor = tiny_model("qwen2_5_vl")
    fixtures = Path(__file__).resolve().parents[2] / "data" / "fixtures"
    summary = run_eval(
        model, "plain", [fixtures / "blink", fixtures / "mmvp"], tmp_path / "out", batch_size=2, max_new_tokens=2,
        processor=processor, show_progress=False,
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "blink" / "samples.jsonl").read_text().splitlines()]
    assert {r["category"] for r in records} == {"Relative_Depth", "IQ_Test"}
    assert len(records) == 3 and all(r["kind"] == "choice" for r in records)
    mmvp = [json.loads(line) for line in (tmp_path / "out" / "mmvp" / "samples.jsonl").read_text().splitlines()]
    assert len(mmvp) == 2 and all(r["gold"] in ("A", "B") for r in mmvp)
    assert summary is not None
