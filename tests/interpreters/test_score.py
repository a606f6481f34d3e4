"""``score`` on a handwritten decoded.jsonl: metrics recomputed per stage and condition; gaps = real - control."""

import json
import os

import pytest
from interpreters import metrics
from interpreters.judge import JudgeResult
from interpreters.score import score

TARGETS = {
    "summary": ["what color is the bus", "how many dogs are on the grass"],
    "caption": ["a red bus parked next to a building", "two dogs lying on green grass"],
}
PREDICTIONS = {
    "real": {
        "summary": ["what color is the bus", "how many dogs are in the grass"],
        "caption": ["a red bus parked by a building", "two dogs lying on the grass"],
    },
    "zero": {
        "summary": ["what is in the image", "what is in the image"],
        "caption": ["a picture of a thing", "a picture of a thing"],
    },
    "shuffled": {
        "summary": ["how many dogs are on the grass", "what color is the bus"],
        "caption": ["two dogs lying on green grass", "a red bus parked next to a building"],
    },
}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoded") / "decoded.jsonl"
    lines = []
    for condition, by_stage in PREDICTIONS.items():
        for stage, preds in by_stage.items():
            for i, (pred, target) in enumerate(zip(preds, TARGETS[stage], strict=True)):
                lines.append(
                    {
                        "id": f"s{i}",
                        "stage": stage,
                        "question": f"q{i}",
                        "target": target,
                        "prediction": pred,
                        "condition": condition,
                    }
                )
    text = "\n".join(json.dumps(line) for line in lines)
    path.write_text(text + '\n{"stage": "summary"}\nnot json\n')
    return path


def _judge(pairs):
    """A fake judge: 5 for an exact reconstruction, a failure for 'a picture of a thing', else 2."""
    out = []
    for p in pairs:
        if p["prediction"] == "a picture of a thing":
            out.append(JudgeResult(None, True, "malformed JSON in the reply", "{oops"))
        else:
            out.append(JudgeResult(5 if p["prediction"] == p["target"] else 2, False, None, "{}"))
    return out


def test_score_table_matches_metric_functions(decoded, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    minilm = metrics.shipped_minilm_path()
    names = ("bleu", "rouge", "bertscore")
    try:
        metrics.ensure_wordnet()
        names += ("meteor",)
    except metrics.MeteorDataError:
        pass
    result = score(decoded, tmp_path, metrics=names, bertscore_model=minilm, bertscore_num_layers=6, judge=_judge)

    functions = {
        "bleu": metrics.bleu4,
        "rouge": metrics.rouge_l,
        "meteor": metrics.meteor,
        "bertscore": lambda p, r: metrics.bert_score_f1(p, r, model=minilm, num_layers=6),
    }
    for stage, targets in TARGETS.items():
        for condition in PREDICTIONS:
            row = result["scores"][stage][condition]
            assert row["n"] == 2
            for name in names:
                assert row[name] == pytest.approx(functions[name](PREDICTIONS[condition][stage], targets))
        for control in ("zero", "shuffled"):
            for name in names:
                real, ctrl = result["scores"][stage]["real"][name], result["scores"][stage][control][name]
                assert result["gap"][stage][control][name] == pytest.approx(real - ctrl)
        assert result["gap"][stage]["zero"]["bleu"] > 0 and result["gap"][stage]["shuffled"]["rouge"] > 0

    # judge: means over scored calls, failures counted, gap on the mean
    summary = result["scores"]["summary"]
    assert summary["real"]["judge_mean"] == pytest.approx((5 + 2) / 2)
    assert summary["shuffled"]["judge_mean"] == 2 and summary["shuffled"]["judge_failed"] == 0
    caption_zero = result["scores"]["caption"]["zero"]
    assert (
        caption_zero["judge_mean"] is None and caption_zero["judge_failed"] == 2 and caption_zero["judge_scored"] == 0
    )
    assert result["gap"]["caption"]["zero"]["judge_mean"] is None
    assert result["gap"]["summary"]["shuffled"]["judge_mean"] == pytest.approx(1.5)

    # data problems are counted, not dropped silently
    assert result["skipped"] == {"missing target,prediction,condition": 1, "malformed JSON line": 1}

    on_disk = json.loads((tmp_path / "scores.json").read_text())
    assert on_disk["gap"] == json.loads(json.dumps(result["gap"]))
    assert len((tmp_path / "judge.jsonl").read_text().splitlines()) == 12
    table = (tmp_path / "scores.md").read_text()
    for title in (
        "BLEU-4",
        "ROUGE-L",
        "BERTScore F1",
        "Judge mean (1-5)",
        "## Gap: real - zero",
        "## Gap: real - shuffled",
    ):
        assert title in table
    assert "| summary | 2 |" in table and "| caption | |" in table


def test_unknown_metric_rejected(decoded, tmp_path):
    with pytest.raises(ValueError, match="unknown metrics"):
        score(decoded, tmp_path, metrics=("bleu", "cider"))
