"""The evaluation runner: per-sample JSONL, summaries recomputed from it, resume, and method errors.

A tiny random Qwen2.5-VL (saved and loaded back through the runner's path) answers at random: these tests check
the accounting, not accuracy. A scripted method with known answers, token counts and timings checks the numbers.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import statistics
from collections import Counter
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


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _recompute(records: list[dict]) -> dict:
    """Every number of a bench summary, recomputed here from the written records with plain Python (none of the
    runner's helpers): accuracy overall and per category, counts, kinds, token and latency means, majority baseline."""
    n = len(records)
    right = [r for r in records if r["correct"] is True]
    by_category: dict[str, list[dict]] = {}
    for r in records:
        by_category.setdefault(r["category"], []).append(r)
    latency = sum(r["latency_s"] for r in records)
    # majority baseline: the most common gold of each (category, kind), first seen on ties
    groups: dict[tuple[str, str], Counter] = {}
    for r in records:
        groups.setdefault((r["category"], r["kind"]), Counter())[r["gold"].lower()] += 1
    majority: dict[str, dict] = {}
    for (category, kind), golds in groups.items():
        answer, hits = golds.most_common(1)[0]
        entry = majority.setdefault(category, {"n": 0, "hits": 0, "answers": {}})
        entry["n"] += sum(golds.values())
        entry["hits"] += hits
        entry["answers"][kind] = answer
    hits = sum(entry["hits"] for entry in majority.values())
    return {
        "n": n,
        "n_correct": len(right),
        "accuracy": len(right) / n,
        "n_unextracted": sum(r["extracted"] is None for r in records),
        "n_truncated": sum(r["truncated"] is True for r in records),
        "n_unanswered": sum(r["unanswered"] is True for r in records),
        "kinds": dict(Counter(r["kind"] for r in records)),
        "accuracy_per_category": {
            c: {"n": len(rs), "accuracy": sum(r["correct"] is True for r in rs) / len(rs)}
            for c, rs in by_category.items()
        },
        "mean_generated_tokens": _mean(r["generated_tokens"] for r in records),
        "mean_generated_tokens_correct": _mean(r["generated_tokens"] for r in right),
        "mean_reasoning_tokens": _mean(r["reasoning_tokens"] for r in records if r["reasoning_tokens"] is not None),
        "mean_thinking_tokens": _mean(r["thinking_tokens"] for r in records if r["thinking_tokens"] is not None),
        "mean_latent_steps": _mean(r["latent_steps"] for r in records if r["latent_steps"] is not None),
        "mean_latency_s": latency / n,
        "tokens_per_s": sum(r["generated_tokens"] for r in records) / latency,
        "majority_baseline": {
            "accuracy": hits / n,
            "per_category": {
                c: {"n": e["n"], "accuracy": e["hits"] / e["n"], "answers": e["answers"]} for c, e in majority.items()
            },
        },
    }


def _assert_matches(summary: dict, expected: dict, path: str = "") -> None:
    """``summary`` has ``expected``'s keys (nested dicts: exactly its keys) with equal values (floats approx)."""
    for key, value in expected.items():
        where = f"{path}.{key}"
        if isinstance(value, dict):
            assert isinstance(summary[key], dict) and summary[key].keys() == value.keys(), where
            _assert_matches(summary[key], value, where)
        elif isinstance(value, float):
            assert summary[key] == pytest.approx(value), where
        else:
            assert summary[key] == value, where


SUMMARY_NUMBERS = {
    "n", "n_correct", "accuracy", "n_unextracted", "n_truncated", "n_unanswered", "kinds", "accuracy_per_category",
    "mean_generated_tokens", "mean_generated_tokens_correct", "mean_reasoning_tokens", "mean_thinking_tokens",
    "mean_latent_steps", "mean_latency_s", "tokens_per_s", "majority_baseline",
}  # fmt: skip
"""The summary fields :func:`_recompute` checks; the rest are settings and paths."""


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
        assert r["reasoning_tokens"] is None and r["latent_steps"] is None and r["thinking_tokens"] is None
        assert r["unanswered"] is False  # plain is not staged: every output is read
        if r["generated_tokens"] < 5:
            assert r["truncated"] is False  # it stopped before the budget: at an EOS
        assert r["correct"] == (r["extracted"] is not None and str(r["extracted"]).lower() == r["gold"].lower())
    # latency = batch wall time / batch size: 9 samples in batches of 4, 4, 1 (file order).
    by_id = {r["id"]: r for r in records}
    assert by_id["1"]["latency_s"] == by_id["4"]["latency_s"] != by_id["5"]["latency_s"]

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    bench_summary = on_disk["benches"]["shapes_mini"]
    expected = _recompute(records)
    assert expected.keys() == SUMMARY_NUMBERS
    _assert_matches(bench_summary, expected)
    assert set(bench_summary) - SUMMARY_NUMBERS == {
        "bench", "samples", "skipped", "reader_complete", "duplicate_ids"
    }  # fmt: skip
    assert bench_summary["duplicate_ids"] == 0 and bench_summary["reader_complete"] is True
    assert bench_summary["skipped"]["skipped"] == {"undecodable_image": 1}
    assert on_disk["method"] == "plain" and on_disk["max_new_tokens"] == 5 and on_disk["model"] == str(model_dir)
    assert {"torch", "transformers", "device"} <= on_disk.keys()
    assert json.loads((out / "shapes_mini" / "summary.json").read_text())["n"] == 9
    assert "| shapes_mini | 9 |" in (out / "summary.md").read_text()


class Scripted:
    """Known answers, token counts, latent steps, truncation and self-reported latencies, by sample id."""

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
    REASONING = {"2": 2, "8": 4}
    THINKING = {"2": 3, "7": 0}
    TRUNCATED = {"4", "9"}

    def __call__(self, model, processor, samples, max_new_tokens):
        return [
            Generation(
                text=self.TEXT[s["id"]],
                generated_tokens=int(s["id"]) + 1,
                reasoning_tokens=self.REASONING.get(s["id"]),
                thinking_tokens=self.THINKING.get(s["id"]),
                truncated=s["id"] in self.TRUNCATED,
                latent_steps=int(s["id"]) % 3 if int(s["id"]) % 2 else None,
                latency_s=0.01 * int(s["id"]),
            )
            for s in samples
        ]


class StagedScripted(Scripted):
    """The same outputs read as staged chains of thought: only id 2 has a closed <CONCLUSION>."""

    name = "staged-scripted"
    staged = True


def test_summary_numbers_from_scripted_answers(bench, tmp_path):
    model, processor = tiny_model("qwen2_5_vl")
    out = tmp_path / "scripted"
    summary = run_eval(model, Scripted(), [bench], out, batch_size=4, processor=processor, show_progress=False)
    records = _jsonl(out / "shapes_mini" / "samples.jsonl")
    by_id = {r["id"]: r for r in records}
    assert sorted(by_id, key=int) == [str(i) for i in range(1, 10)]  # id 10's image does not decode
    assert {i: (r["kind"], r["extracted"], r["correct"]) for i, r in by_id.items()} == {
        "1": ("choice", "A", True),
        "2": ("choice", "B", True),
        "3": ("choice", "A", False),
        "4": ("choice", None, False),
        "5": ("choice", "A", True),
        "6": ("choice", "B", False),
        "7": ("yes_no", "yes", True),
        "8": ("number", 3, True),
        "9": ("yes_no", "yes", False),
    }
    assert [i for i, r in by_id.items() if r["truncated"]] == ["4", "9"]
    assert not any(r["unanswered"] for r in records)
    b = json.loads((out / "summary.json").read_text())["benches"]["shapes_mini"]
    assert b == json.loads(json.dumps(summary["benches"]["shapes_mini"]))
    # by hand: right = 1, 2, 5, 7, 8; colour = 1, 3, 5, 7 (3 right); count = 2, 4, 6, 8, 9 (2 right);
    # generated tokens = id + 1; latency = 0.01 * id; latent steps = id % 3 for odd ids.
    expected = {
        "n": 9,
        "n_correct": 5,
        "accuracy": 5 / 9,
        "n_unextracted": 1,
        "n_truncated": 2,
        "n_unanswered": 0,
        "kinds": {"choice": 6, "number": 1, "yes_no": 2},
        "accuracy_per_category": {"colour": {"n": 4, "accuracy": 0.75}, "count": {"n": 5, "accuracy": 0.4}},
        "mean_generated_tokens": 6.0,  # (2 + ... + 10) / 9
        "mean_generated_tokens_correct": 5.6,  # (2 + 3 + 6 + 8 + 9) / 5
        "mean_reasoning_tokens": 3.0,  # ids 2 and 8
        "mean_thinking_tokens": 1.5,  # ids 2 and 7
        "mean_latent_steps": 0.8,  # ids 1, 3, 5, 7, 9: 1, 0, 2, 1, 0
        "mean_latency_s": 0.05,
        "tokens_per_s": 120.0,  # 54 tokens in 0.45 s
        # the most common gold per (category, kind): colour choice "a" (1, 5 of 1, 3, 5), colour yes_no "yes";
        # count choice "b" (a three-way tie: the first seen), count number "3", count yes_no "no": 2+1+1+1+1 hits
        "majority_baseline": {
            "accuracy": 6 / 9,
            "per_category": {
                "colour": {"n": 4, "accuracy": 0.75, "answers": {"choice": "a", "yes_no": "yes"}},
                "count": {"n": 5, "accuracy": 0.6, "answers": {"choice": "b", "number": "3", "yes_no": "no"}},
            },
        },
    }
    assert expected.keys() == SUMMARY_NUMBERS
    _assert_matches(b, expected)
    _assert_matches(b, _recompute(records))  # the test's own recomputation agrees with the hand-written numbers
    table = (out / "summary.md").read_text()
    assert "| shapes_mini | 9 | 55.6 | 66.7 | 2 | 0 | 6.0 | 3.0 | 1.5 | 0.8 | 0.050 | 120.0 |" in table

    # read as staged outputs: only the closed <CONCLUSION>B</CONCLUSION> of id 2 is an answer
    out = tmp_path / "staged"
    summary = run_eval(model, StagedScripted(), [bench], out, batch_size=4, processor=processor, show_progress=False)
    records = _jsonl(out / "shapes_mini" / "samples.jsonl")
    assert sorted(r["id"] for r in records if not r["unanswered"]) == ["2"]
    assert all(r["extracted"] is None and r["correct"] is False for r in records if r["id"] != "2")
    b = summary["benches"]["shapes_mini"]
    assert (b["n"], b["n_correct"], b["n_unanswered"], b["n_unextracted"], b["n_truncated"]) == (9, 1, 8, 8, 2)
    assert b["accuracy_per_category"] == {"colour": {"n": 4, "accuracy": 0.0}, "count": {"n": 5, "accuracy": 0.2}}
    assert b["mean_generated_tokens_correct"] == 3
    _assert_matches(b, _recompute(records))


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


def test_blink_mmvp_and_vstar_folders(tmp_path):
    """BLINK (per-task parquet, up to four images per question; the task is the category), the MMVP layout and a
    V* bench folder run through the same runner; the readers' skip reports reach the summary."""
    from latent_apps.eval.runner import run_eval
    from latent_core.testing import tiny_model

    model, processor = tiny_model("qwen2_5_vl")
    fixtures = Path(__file__).resolve().parents[2] / "data" / "fixtures"
    summary = run_eval(
        model,
        "plain",
        [fixtures / "blink", fixtures / "mmvp", fixtures / "vstar"],
        tmp_path / "out",
        batch_size=2,
        max_new_tokens=2,
        processor=processor,
        show_progress=False,
    )
    records = [json.loads(line) for line in (tmp_path / "out" / "blink" / "samples.jsonl").read_text().splitlines()]
    assert {r["category"] for r in records} == {"Relative_Depth", "IQ_Test"}
    assert len(records) == 3 and all(r["kind"] == "choice" for r in records)
    mmvp = [json.loads(line) for line in (tmp_path / "out" / "mmvp" / "samples.jsonl").read_text().splitlines()]
    assert len(mmvp) == 2 and all(r["gold"] in ("A", "B") for r in mmvp)
    vstar = [json.loads(line) for line in (tmp_path / "out" / "vstar" / "samples.jsonl").read_text().splitlines()]
    assert {r["category"] for r in vstar} == {"direct_attributes", "relative_position"} and len(vstar) == 3
    assert all(r["options"][r["gold"]] == {"sa_1": "red", "sa_2": "blue", "sa_3": "left"}[r["id"][-4:]] for r in vstar)
    assert summary["benches"]["vstar"]["skipped"]["total_skipped"] == 5
