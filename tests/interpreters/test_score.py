"""``score`` on a handwritten decoded.jsonl whose metric values are worked out by hand below.

Hand values (4-word sentences, one reference each):

- a prediction equal to its target: BLEU-4 100, ROUGE-L 100, METEOR 100 * (1 - 0.5 * (1/4)**3) = 99.21875
  (one chunk of 4 matches; nltk's fragmentation penalty gamma * (chunks/matches)**beta, gamma 0.5, beta 3),
  BERTScore F1 100 (every token matches itself);
- no word in common: BLEU-4 0, ROUGE-L 0, METEOR 0;
- one equal and one disjoint pair: corpus BLEU-4 = 100 * (4/8 * 3/6 * 2/4 * 1/2)**(1/4) = 50 (equal lengths, no
  brevity penalty), ROUGE-L and METEOR = the mean of the two pairs;
- "red bus parked there" for "red bus parked here": LCS 3 of 4 -> ROUGE-L 75; BLEU-4 precisions 3/4, 2/3, 1/2 and
  no 4-gram match, which sacrebleu's "exp" smoothing counts as 1/(2*1) -> 100 * (3/4 * 2/3 * 1/2 * 1/2)**(1/4);
  METEOR: P = R = 3/4, one chunk of 3 -> 100 * 3/4 * (1 - 0.5 * (1/3)**3).
"""

import json
import re

import pytest
from interpreters import metrics
from interpreters.judge import JudgeResult
from interpreters.score import score

EQUAL_METEOR = 100 * (1 - 0.5 * (1 / 4) ** 3)
PARTIAL_BLEU = 100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** (1 / 4)
PARTIAL_METEOR = 100 * 3 / 4 * (1 - 0.5 * (1 / 3) ** 3)

# (id, stage, condition, target, prediction)
RECORDS = [
    ("s0", "summary", "real", "red bus parked here", "red bus parked here"),
    ("s1", "summary", "real", "two dogs on grass", "two dogs on grass"),
    ("s0", "summary", "zero", "red bus parked here", "zork blat quux frob"),
    ("s1", "summary", "zero", "two dogs on grass", "zork blat quux frob"),
    ("s0", "summary", "shuffled", "red bus parked here", "red bus parked here"),
    ("s1", "summary", "shuffled", "two dogs on grass", "zork blat quux frob"),
    ("s0", "caption", "real", "red bus parked here", "red bus parked there"),
    ("s0", "caption", "zero", "red bus parked here", "zork blat quux frob"),
]
#: what the fake judge answers per (id, stage, condition): a rank, or None for a failed call
JUDGE = {
    ("s0", "summary", "real"): 5,
    ("s1", "summary", "real"): 4,
    ("s0", "summary", "zero"): 1,
    ("s1", "summary", "zero"): None,
    ("s0", "summary", "shuffled"): 5,
    ("s1", "summary", "shuffled"): 1,
    ("s0", "caption", "real"): 3,
    ("s0", "caption", "zero"): None,
}
#: lines that must not be scored, and the reason each is counted under
BAD_LINES = [
    ("not json", "malformed JSON line"),
    ("[1, 2]", "not a JSON object"),
    ('{"stage": "summary", "target": "x"}', "missing prediction,condition"),
    ('{"id": "s9", "stage": "summary", "condition": "real", "prediction": "a b c d"}', "no target"),
    ('{"id": "s9", "stage": "caption", "condition": "real", "prediction": "a b c d", "target": null}', "no target"),
    ('{"stage": "conclusion", "condition": "real", "prediction": "a", "target": "a"}', "unknown stage 'conclusion'"),
    ('{"stage": "summary", "condition": "noise", "prediction": "a", "target": "a"}', "unknown condition 'noise'"),
]
EXPECTED_SKIPPED = {
    "malformed JSON line": 1,
    "not a JSON object": 1,
    "missing prediction,condition": 1,
    "no target (inference-time states)": 2,
    "unknown stage 'conclusion'": 1,
    "unknown condition 'noise'": 1,
}

#: hand values: stage -> condition -> metric
HAND = {
    "summary": {
        "real": {"n": 2, "bleu": 100.0, "rouge": 100.0, "meteor": EQUAL_METEOR, "judge_mean": 4.5},
        "zero": {"n": 2, "bleu": 0.0, "rouge": 0.0, "meteor": 0.0, "judge_mean": 1.0},
        "shuffled": {"n": 2, "bleu": 50.0, "rouge": 50.0, "meteor": EQUAL_METEOR / 2, "judge_mean": 3.0},
    },
    "caption": {
        "real": {"n": 1, "bleu": PARTIAL_BLEU, "rouge": 75.0, "meteor": PARTIAL_METEOR, "judge_mean": 3.0},
        "zero": {"n": 1, "bleu": 0.0, "rouge": 0.0, "meteor": 0.0, "judge_mean": None},
    },
}
HAND_GAP = {
    "summary": {
        "zero": {"bleu": 100.0, "rouge": 100.0, "meteor": EQUAL_METEOR, "judge_mean": 3.5},
        "shuffled": {"bleu": 50.0, "rouge": 50.0, "meteor": EQUAL_METEOR / 2, "judge_mean": 1.5},
    },
    "caption": {"zero": {"bleu": PARTIAL_BLEU, "rouge": 75.0, "meteor": PARTIAL_METEOR, "judge_mean": None}},
}
HAND_JUDGE_FAILED = {("summary", "zero"): 1, ("caption", "zero"): 1}


def _write(path, records=RECORDS, bad_lines=BAD_LINES):
    lines = [
        json.dumps(
            {
                "id": rid,
                "stage": stage,
                "question": f"question of {rid}",
                "target": target,
                "prediction": pred,
                "condition": condition,
                "image": f"images/{rid}.png",
            }
        )
        for rid, stage, condition, target, pred in records
    ]
    path.write_text("\n".join(lines + [line for line, _ in bad_lines]) + "\n\n")
    return path


class _FakeJudge:
    """Answers from :data:`JUDGE` and keeps every pair it was given."""

    def __init__(self):
        self.pairs: list[dict] = []

    def __call__(self, pairs):
        self.pairs += pairs
        out = []
        for p in pairs:
            rank = JUDGE[(p["id"], p["stage"], p["condition"])]
            out.append(
                JudgeResult(None, True, "stub failure", "") if rank is None else JudgeResult(rank, False, None, "")
            )
        return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One run with BLEU, ROUGE-L, BERTScore (the shipped MiniLM, offline) and the fake judge."""
    root = tmp_path_factory.mktemp("score")
    decoded = _write(root / "decoded.jsonl")
    judge = _FakeJudge()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = score(
            decoded,
            root / "out",
            metrics=("bleu", "rouge", "bertscore"),
            bertscore_model=metrics.shipped_minilm_path(),
            bertscore_num_layers=6,
            judge=judge,
        )
    return result, root / "out", judge


def test_scores_and_gaps_match_hand_values(scored):
    result, _, _ = scored
    assert set(result["scores"]) == {"summary", "caption"}
    assert set(result["scores"]["summary"]) == {"real", "zero", "shuffled"}
    assert set(result["scores"]["caption"]) == {"real", "zero"}
    for stage, by_condition in HAND.items():
        for condition, hand in by_condition.items():
            row = result["scores"][stage][condition]
            assert row["n"] == hand["n"]
            for name in ("bleu", "rouge", "judge_mean"):
                assert row[name] == pytest.approx(hand[name], abs=1e-6), (stage, condition, name)
            assert row["judge_failed"] == HAND_JUDGE_FAILED.get((stage, condition), 0)
            assert row["judge_scored"] == hand["n"] - row["judge_failed"]
    assert result["gap"]["summary"].keys() == {"zero", "shuffled"}
    assert result["gap"]["caption"].keys() == {"zero"}  # no shuffled control for caption: no gap
    for stage, by_control in HAND_GAP.items():
        for control, hand in by_control.items():
            for name in ("bleu", "rouge", "judge_mean"):
                assert result["gap"][stage][control][name] == pytest.approx(hand[name], abs=1e-6)


def test_bertscore_identical_is_100_and_disjoint_lower(scored):
    result, _, _ = scored
    summary = result["scores"]["summary"]
    assert summary["real"]["bertscore"] == pytest.approx(100.0, abs=1e-3)
    assert 0 < summary["zero"]["bertscore"] < 90
    assert summary["zero"]["bertscore"] < summary["shuffled"]["bertscore"] < summary["real"]["bertscore"]
    assert result["gap"]["summary"]["zero"]["bertscore"] > 10


def test_unusable_lines_are_counted_not_scored(scored):
    result, out, judge = scored
    assert result["skipped"] == EXPECTED_SKIPPED
    assert sum(row["n"] for rows in result["scores"].values() for row in rows.values()) == len(RECORDS)
    # the judge saw exactly the scorable records, each with its question, target and image path
    seen = sorted((p["id"], p["stage"], p["condition"]) for p in judge.pairs)
    assert seen == sorted((rid, stage, condition) for rid, stage, condition, _, _ in RECORDS)
    for p in judge.pairs:
        assert p["image"] == f"images/{p['id']}.png" and p["question"] == f"question of {p['id']}"
        assert isinstance(p["target"], str)
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk["skipped"] == EXPECTED_SKIPPED


def test_files_on_disk_hold_the_hand_values(scored):
    _, out, _ = scored
    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk["scores"]["summary"]["shuffled"]["bleu"] == pytest.approx(50.0, abs=1e-6)
    assert on_disk["gap"]["summary"]["zero"]["rouge"] == pytest.approx(100.0)
    assert on_disk["gap"]["caption"]["zero"]["judge_mean"] is None
    judged = [json.loads(line) for line in (out / "judge.jsonl").read_text().splitlines()]
    assert len(judged) == len(RECORDS)
    failed = sorted((j["id"], j["stage"], j["condition"]) for j in judged if j["failed"])
    assert failed == [("s0", "caption", "zero"), ("s1", "summary", "zero")]
    assert all(j["reason"] == "stub failure" and j["score"] is None for j in judged if j["failed"])


def _tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{block title: {stage: {column title: cell}}}`` of a scores.md."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    title, header = None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
            tables[title] = {}
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-"):
                tables[title][cells[0]] = dict(zip(header, cells, strict=True))
    return tables


def test_markdown_table_numbers(scored):
    _, out, _ = scored
    markdown = (out / "scores.md").read_text()
    tables = _tables(markdown)
    assert list(tables) == [
        "Condition: real",
        "Condition: zero",
        "Condition: shuffled",
        "Gap: real - zero",
        "Gap: real - shuffled",
    ]
    columns = {"bleu": "BLEU-4", "rouge": "ROUGE-L", "judge_mean": "Judge mean (1-5)"}
    for stage, by_condition in HAND.items():
        for condition, hand in by_condition.items():
            row = tables[f"Condition: {condition}"][stage]
            assert row["n"] == str(hand["n"])
            for key, column in columns.items():
                expected = "-" if hand[key] is None else f"{hand[key]:.1f}"
                assert row[column] == expected, (stage, condition, column)
            assert row["Judge failed"] == str(HAND_JUDGE_FAILED.get((stage, condition), 0))
    for stage, by_control in HAND_GAP.items():
        for control, hand in by_control.items():
            row = tables[f"Gap: real - {control}"][stage]
            assert row["n"] == ""
            for key, column in columns.items():
                expected = "-" if hand[key] is None else f"{hand[key]:+.1f}"
                assert row[column] == expected, (stage, control, column)
    # hand-typed cells, to catch a formatting change the loop above would share with the code
    assert tables["Condition: real"]["caption"]["ROUGE-L"] == "75.0"
    assert tables["Condition: real"]["caption"]["BLEU-4"] == "59.5"
    assert tables["Gap: real - shuffled"]["summary"]["BLEU-4"] == "+50.0"
    assert tables["Gap: real - zero"]["caption"]["Judge mean (1-5)"] == "-"
    assert "caption" not in tables["Condition: shuffled"] and "caption" not in tables["Gap: real - shuffled"]
    assert float(tables["Condition: real"]["summary"]["BERTScore F1"]) == pytest.approx(100.0, abs=0.05)
    (not_scored,) = [line for line in markdown.splitlines() if line.startswith("Records not scored:")]
    for reason, count in EXPECTED_SKIPPED.items():
        assert f"{reason}: {count}" in not_scored


def test_meteor_hand_values(tmp_path):
    try:
        metrics.ensure_wordnet()
    except metrics.MeteorDataError as exc:
        pytest.skip(f"no WordNet for METEOR: {exc}")
    result = score(_write(tmp_path / "decoded.jsonl"), tmp_path / "out", metrics=("meteor",))
    for stage, by_condition in HAND.items():
        for condition, hand in by_condition.items():
            assert result["scores"][stage][condition]["meteor"] == pytest.approx(hand["meteor"], abs=1e-6)
    for stage, by_control in HAND_GAP.items():
        for control, hand in by_control.items():
            assert result["gap"][stage][control]["meteor"] == pytest.approx(hand["meteor"], abs=1e-6)
    assert re.search(r"\| summary \| 2 \| 99\.2 \|", (tmp_path / "out" / "scores.md").read_text())


def test_only_inference_time_records_is_an_explained_error(tmp_path):
    path = tmp_path / "decoded.jsonl"
    path.write_text(
        '{"id": "a", "stage": "summary", "condition": "real", "prediction": "p", "target": null, "image": "a.png"}\n'
        '{"id": "b", "stage": "caption", "condition": "zero", "prediction": "p", "image": "b.png"}\n'
    )
    with pytest.raises(ValueError, match=r"no scorable records.*no target \(inference-time states\)': 2"):
        score(path, tmp_path / "out", metrics=("bleu",))


def test_unknown_metric_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown metrics"):
        score(_write(tmp_path / "decoded.jsonl"), tmp_path / "out", metrics=("bleu", "cider"))
