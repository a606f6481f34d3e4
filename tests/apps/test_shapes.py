"""The synthetic shapes task: deterministic bytes, disjoint splits, staged answers, bboxes and answers recomputed
independently from the stored scenes, a small vocabulary."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import pytest
from latent_apps.shapes import make_shapes
from PIL import Image

N, SEED, GRID, SIZE = 40, 3, 3, 96
CELL = SIZE // GRID
STAGES = ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")
STAGED = re.compile(
    r"^<SUMMARY>(.+)</SUMMARY>\n\n<CAPTION>(.+)</CAPTION>\n\n<REASONING>(.+)</REASONING>\n\n<CONCLUSION>(.+)</CONCLUSION>$",
    re.S,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "a"
    make_shapes(N, SEED, out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _split(root: Path, split: str) -> dict[str, list[dict]]:
    return {k: _jsonl(root / split / f"{k}.jsonl") for k in ("llava_cot", "visual_cot", "reasoning")}


def _parse_prompt(prompt: str) -> tuple[str, dict[str, str]]:
    """(bare question, {letter: option}) from a prompt, open-ended or multiple-choice."""
    lines = prompt.split("\n")
    options = {m[1]: m[2] for line in lines if (m := re.fullmatch(r"([A-D])\. (.+)", line))}
    return lines[0], options


def _solve(question: str, objects: list[dict]) -> tuple[str, set[tuple[int, int]]]:
    """Independent answer of a bare question from the scene, and the cells that must lie inside the bbox."""
    singular = {"circles": "circle", "squares": "square", "triangles": "triangle", "shapes": None}

    def select(words: list[str]) -> list[dict]:
        colour = words[0] if len(words) == 2 else None
        shape = singular.get(words[-1], words[-1])
        return [o for o in objects if colour in (None, o["colour"]) and shape in (None, o["shape"])]

    if m := re.fullmatch(r"How many (.+) are there\?", question):
        hits = select(m[1].split())
        return str(len(hits)), {(o["row"], o["col"]) for o in hits}
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        hits = select([m[1], m[2]])
        return ("yes" if hits else "no"), {(o["row"], o["col"]) for o in hits}
    if m := re.fullmatch(r"What colour is the shape at row (\d) column (\d)\?", question):
        r, c = int(m[1]) - 1, int(m[2]) - 1
        (o,) = [o for o in objects if (o["row"], o["col"]) == (r, c)]
        return o["colour"], {(r, c)}
    if m := re.fullmatch(r"Are there more (.+) than (.+)\?", question):
        a, b = select(m[1].split()), select(m[2].split())
        return ("yes" if len(a) > len(b) else "no"), {(o["row"], o["col"]) for o in a + b}
    if m := re.fullmatch(r"What colour is the shape (.+) the (\w+(?: \w+)?)\?", question):
        return _solve_hops(m[1], m[2], objects)
    raise AssertionError(f"unknown question {question!r}")


MOVES = {"to the right of": (0, 1), "to the left of": (0, -1), "below": (1, 0), "above": (-1, 0)}


def _solve_hops(path: str, anchor: str, objects: list[dict]) -> tuple[str, set[tuple[int, int]]]:
    """A multi-hop question by hand: the anchor must be the only shape of that name, the moves apply from the
    anchor outward (the last phrase of the question first), every cell on the way holds a shape, none twice."""
    words = anchor.split()
    named = [o for o in objects if o["shape"] == words[-1] and (len(words) == 1 or o["colour"] == words[0])]
    assert len(named) == 1, (anchor, objects)
    at = {(o["row"], o["col"]): o for o in objects}
    cell = (named[0]["row"], named[0]["col"])
    seen = [cell]
    for phrase in reversed(path.split(" the shape ")):
        dr, dc = MOVES[phrase]
        cell = (cell[0] + dr, cell[1] + dc)
        assert cell in at and cell not in seen, (path, anchor, objects)
        seen.append(cell)
    return at[cell]["colour"], set(seen)


def test_same_seed_same_bytes_other_seed_differs(built, tmp_path):
    make_shapes(N, SEED, tmp_path / "b")
    make_shapes(N, SEED + 1, tmp_path / "c")
    a, b, c = _files(built), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/llava_cot.jsonl"] != c["train/llava_cot.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) > N // 2


def test_layout_and_summary(built):
    summary = json.loads((built / "summary.json").read_text())
    assert summary["n"] == N and summary["seed"] == SEED
    split_counts = summary["splits"]
    assert split_counts["train"]["images"] + split_counts["test"]["images"] == N
    assert split_counts["test"]["images"] == round(N * 0.2)
    for split in ("train", "test"):
        rows = _split(built, split)
        assert all(len(v) == split_counts[split]["questions"] for v in rows.values())
        kinds = [r["id"].rsplit("-", 1)[1] for r in rows["visual_cot"]]
        for kind in ("count", "exists", "colour", "compare"):
            assert kinds.count(kind) == split_counts[split][kind] > 0
    assert len(list((built / "images").glob("*.png"))) == N
    assert len(_tsv(built / "test" / "shapes_mc.tsv")) == split_counts["test"]["questions"] == summary["tsv_rows"]


def test_splits_disjoint(built):
    train, test = _split(built, "train"), _split(built, "test")
    for key in train:
        assert {r["image"] for r in train[key]}.isdisjoint({r["image"] for r in test[key]})
        assert {r["id"] for r in train[key]}.isdisjoint({r["id"] for r in test[key]})
    scenes = json.loads((built / "scenes.json").read_text())
    for split, rows in (("train", train), ("test", test)):
        assert all(scenes[r["image"]]["split"] == split for r in rows["llava_cot"])


def test_staged_answers_and_formats_agree(built):
    for split in ("train", "test"):
        rows = _split(built, split)
        for cot, vcot, lare in zip(rows["llava_cot"], rows["visual_cot"], rows["reasoning"], strict=True):
            assert cot["id"] == vcot["id"] == lare["id"] and cot["image"] == vcot["image"] == lare["image"]
            human, gpt = cot["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"] == "<image>\n" + vcot["question"] and vcot["question"] == lare["question"]
            m = STAGED.fullmatch(gpt["value"])
            assert m, gpt["value"]
            assert all(s.strip() and "<" not in s for s in m.groups())
            assert [gpt["value"].index(f"<{s}>") for s in STAGES] == sorted(
                gpt["value"].index(f"<{s}>") for s in STAGES
            )
            assert m[4] == vcot["answer"] == lare["answer"]
            assert lare["reasoning"] == m[3]
            assert vcot["dataset"] == "shapes"


def test_answers_and_bboxes_recomputed_from_scene(built):
    scenes = json.loads((built / "scenes.json").read_text())
    mc_seen = open_seen = empty_seen = 0
    for split in ("train", "test"):
        for row in _split(built, split)["visual_cot"]:
            objects = scenes[row["image"]]["objects"]
            question, options = _parse_prompt(row["question"])
            answer, cells = _solve(question, objects)
            if options:
                mc_seen += 1
                assert len(options) in (2, 4) and answer in options.values()
                assert options[row["answer"]] == answer
            else:
                open_seen += 1
                assert row["answer"] == answer
            x0, y0, x1, y1 = row["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            if not cells:  # nothing matches: the whole grid
                empty_seen += 1
                assert row["bbox"] == [0, 0, GRID * CELL, GRID * CELL]
            for r, c in cells:
                assert x0 <= c * CELL and (c + 1) * CELL <= x1 and y0 <= r * CELL and (r + 1) * CELL <= y1
            # Tight: the box is exactly the union of the relevant cells.
            if cells:
                rs, cs = [r for r, _ in cells], [c for _, c in cells]
                assert row["bbox"] == [min(cs) * CELL, min(rs) * CELL, (max(cs) + 1) * CELL, (max(rs) + 1) * CELL]
    assert mc_seen > 0 and open_seen > 0 and empty_seen > 0


def test_images_match_scene(built):
    scenes = json.loads((built / "scenes.json").read_text())
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
    step = 80 // (GRID - 1)
    for name, scene in list(scenes.items())[:5]:
        img = Image.open(built / name).convert("RGB")
        assert img.size == (SIZE, SIZE)
        occupied = {(o["row"], o["col"]): o for o in scene["objects"]}
        for r in range(GRID):
            for c in range(GRID):
                centre = img.getpixel((c * CELL + CELL // 2, r * CELL + CELL * 2 // 3))
                tint = (255 - step * r, 255 - step * c, 255)  # pale background: red falls by row, green by column
                expected = colours[occupied[(r, c)]["colour"]] if (r, c) in occupied else tint
                assert centre == expected
                assert img.getpixel((c * CELL + 1, r * CELL + 1)) == tint  # a corner is always background


def test_no_tint_gives_white_background(tmp_path):
    make_shapes(3, 0, tmp_path, tint=False)
    scenes = json.loads((tmp_path / "scenes.json").read_text())
    name = next(iter(scenes))
    img = Image.open(tmp_path / name).convert("RGB")
    assert all(img.getpixel((c * CELL + 1, r * CELL + 1)) == (255, 255, 255) for r in range(GRID) for c in range(GRID))


def _cells(objects: list[dict]) -> list[tuple[int, int, str]]:
    at = {(o["row"], o["col"]): f"{o['colour']} {o['shape']}" for o in objects}
    return [(r + 1, c + 1, at.get((r, c), "no shape")) for r in range(GRID) for c in range(GRID)]


def _target(words: str) -> tuple[str | None, str | None]:
    """(colour, shape) of "red circles", "squares", "red shapes", "red circle"."""
    *colour, noun = words.split()
    shape = None if noun in ("shape", "shapes") else noun.removesuffix("s")
    return (colour[0] if colour else None), shape


def _expected_scan(objects: list[dict], targets: list[tuple[str | None, str | None]], against: str) -> str:
    counts = [0] * len(targets)
    parts = []
    for r, c, what in _cells(objects):
        colour, _, shape = what.partition(" ")
        hits = [what != "no shape" and tc in (None, colour) and ts in (None, shape) for tc, ts in targets]
        counts = [n + hit for n, hit in zip(counts, hits, strict=True)]
        verdicts = " ".join("yes" if hit else "no" for hit in hits)
        parts.append(f"row {r} column {c}: {what} vs {against}, {verdicts}, {' '.join(map(str, counts))}.")
    return " ".join(parts)


def test_caption_lists_every_cell_and_reasoning_scans_them(built):
    """Written out independently from the scene: the caption names every cell in reading order, position first; the
    count / exists / compare reasoning restates the target, then scans every cell against it with running counts."""
    scenes = json.loads((built / "scenes.json").read_text())
    kinds = set()
    for row in _split(built, "train")["llava_cot"][:80]:
        objects = scenes[row["image"]]["objects"]
        m = STAGED.fullmatch(row["conversations"][1]["value"])
        assert m[2] == " ".join(f"row {r} column {c}: {what}." for r, c, what in _cells(objects))
        question = row["conversations"][0]["value"].removeprefix("<image>\n").split("\n")[0]
        reasoning = m[3]
        if q := re.fullmatch(r"How many (.+) are there\?", question):
            kinds.add("count")
            target = _target(q[1])
            phrase = f"{target[0] or 'any'} {target[1] or 'shape'}"
            answer = _solve(question, objects)[0]
            scan = _expected_scan(objects, [target], phrase)
            assert reasoning.startswith(f"Target: {phrase}. {scan} So the count is {answer}.")
        elif q := re.fullmatch(r"Is there a (\w+ \w+)\?", question):
            kinds.add("exists")
            target = _target(q[1])
            scan = _expected_scan(objects, [target], q[1])
            assert reasoning.startswith(f"Target: {q[1]}. {scan} So the count is ")
            assert f"and the answer is {_solve(question, objects)[0]}." in reasoning
        elif q := re.fullmatch(r"Are there more (.+) than (.+)\?", question):
            kinds.add("compare")
            targets = [_target(q[1]), _target(q[2])]
            against = f"{targets[0][0] or targets[0][1]} and {targets[1][0] or targets[1][1]}"  # "red and blue"
            assert reasoning.startswith(f"Targets: {against}. {_expected_scan(objects, targets, against)}")
        else:
            kinds.add("colour")
            r, c = re.fullmatch(r"What colour is the shape at row (\d) column (\d)\?", question).groups()
            what = dict(((rr, cc), w) for rr, cc, w in _cells(objects))[(int(r), int(c))]
            assert reasoning.startswith(f"row {r} column {c}: {what}. So the colour is {what.split()[0]}.")
    assert kinds == {"count", "exists", "colour", "compare"}


def test_multiple_choice_prompts_come_from_the_shared_builder(built):
    """A multiple-choice human turn is exactly latent_core.prompts.question_text of the question and its options:
    the text evaluation builds from the TSV row (same options) too. Count options are four consecutive numbers,
    colour options the four colours in a fixed order, yes/no options yes then no."""
    from latent_core.prompts import question_text

    seen = 0
    for row in _split(built, "train")["llava_cot"]:
        prompt = row["conversations"][0]["value"].removeprefix("<image>\n")
        question, options = _parse_prompt(prompt)
        if not options:
            continue
        seen += 1
        assert prompt == question_text(question, list(options.values()))
        values = list(options.values())
        if question.startswith("How many"):
            assert [int(v) for v in values] == list(range(int(values[0]), int(values[0]) + 4))
        elif question.startswith("What colour"):
            assert values == ["red", "green", "blue", "yellow"]
        else:
            assert values == ["yes", "no"]
    assert seen > 0


def test_tsv_letters_point_at_answers(built):
    scenes = json.loads((built / "scenes.json").read_text())
    test_rows = _split(built, "test")["visual_cot"]
    tsv = _tsv(built / "test" / "shapes_mc.tsv")
    assert list(tsv[0]) == ["index", "question", "A", "B", "C", "D", "answer", "image", "category"]
    assert [int(r["index"]) for r in tsv] == list(range(len(tsv)))
    assert {r["category"] for r in tsv} == {"count", "exists", "colour", "compare"}
    for row, vcot in zip(tsv, test_rows, strict=True):
        assert vcot["id"].endswith(row["category"]) and _parse_prompt(vcot["question"])[0] == row["question"]
        answer, _ = _solve(row["question"], scenes[vcot["image"]]["objects"])
        assert row[row["answer"]] == answer
        options = [row[k] for k in "ABCD" if row[k]]
        assert len(options) == len(set(options)) and len(options) in (2, 4)
        assert base64.b64decode(row["image"]) == (built / vcot["image"]).read_bytes()


def test_vocabulary_is_small(built):
    words: set[str] = set()
    for split in ("train", "test"):
        for row in _split(built, split)["llava_cot"]:
            for turn in row["conversations"]:
                words |= set(re.findall(r"[A-Za-z]+|\d+", turn["value"]))
        for row in _split(built, split)["reasoning"]:
            words |= set(re.findall(r"[A-Za-z]+|\d+", row["reasoning"]))
    assert len(words) < 150, sorted(words)
    assert len(words) < 100  # in practice far fewer


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        make_shapes(0, 0, tmp_path)
    with pytest.raises(ValueError):
        make_shapes(4, 0, tmp_path, grid=1)
    with pytest.raises(ValueError):
        make_shapes(4, 0, tmp_path, test_fraction=1.5)


HOPS = (1, 2, 3)


@pytest.fixture(scope="module")
def built_hops(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "hops"
    make_shapes(N, SEED, out, hops=HOPS)
    return out


def test_hop_questions_leave_the_scenes_and_todays_questions_byte_identical(built, built_hops, tmp_path):
    a, b = _files(built), _files(built_hops)
    assert {k: v for k, v in a.items() if k.startswith("images/")} == {
        k: v for k, v in b.items() if k.startswith("images/")
    }
    assert a["scenes.json"] == b["scenes.json"]
    for split in ("train", "test"):
        for name in ("llava_cot", "visual_cot", "reasoning"):
            plain = (built / split / f"{name}.jsonl").read_text().splitlines()
            with_hops = (built_hops / split / f"{name}.jsonl").read_text().splitlines()
            assert [line for line in with_hops if "-hop" not in json.loads(line)["id"]] == plain
    todays = [{k: v for k, v in r.items() if k != "index"} for r in _tsv(built / "test" / "shapes_mc.tsv")]
    kept = [
        {k: v for k, v in r.items() if k != "index"}
        for r in _tsv(built_hops / "test" / "shapes_mc.tsv")
        if not r["category"].startswith("hop")
    ]
    assert kept == todays
    make_shapes(N, SEED, tmp_path / "again", hops=HOPS)
    assert _files(tmp_path / "again") == b


def test_hop_answers_paths_and_bboxes_recomputed_from_the_scene(built_hops):
    scenes = json.loads((built_hops / "scenes.json").read_text())
    summary = json.loads((built_hops / "summary.json").read_text())
    assert summary["kinds"] == ["count", "exists", "colour", "compare", "hop1", "hop2", "hop3"]
    seen = {h: 0 for h in HOPS}
    for split in ("train", "test"):
        rows = _split(built_hops, split)
        counts = summary["splits"][split]
        for h in HOPS:
            kind = f"hop{h}"
            assert counts[kind] + summary["hops_skipped"][split][kind] == counts["images"]
            assert counts[kind] == sum(r["category"] == kind for r in rows["llava_cot"])
        for vcot, lare in zip(rows["visual_cot"], rows["reasoning"], strict=True):
            if "-hop" not in vcot["id"]:
                continue
            h = int(vcot["id"].rsplit("hop", 1)[1])
            objects = scenes[vcot["image"]]["objects"]
            question, options = _parse_prompt(vcot["question"])
            assert question.count(" the shape ") == h  # "the shape" asked about, then one per further hop
            answer, cells = _solve(question, objects)
            assert (options[vcot["answer"]] if options else vcot["answer"]) == answer
            rs, cs = [r for r, _ in cells], [c for _, c in cells]
            assert vcot["bbox"] == [min(cs) * CELL, min(rs) * CELL, (max(cs) + 1) * CELL, (max(rs) + 1) * CELL]
            # one short sentence per hop, each naming the cell reached and what it holds, in solving order
            steps = re.findall(r"(Right of it|Left of it|Below it|Above it): row (\d) column (\d), (\w+) (\w+)\.", lare[
                "reasoning"
            ])  # fmt: skip
            assert len(steps) == h
            at = {(o["row"], o["col"]): o for o in objects}
            for _, r, c, colour, shape in steps:
                assert (at[int(r) - 1, int(c) - 1]["colour"], at[int(r) - 1, int(c) - 1]["shape"]) == (colour, shape)
            assert f"So the colour is {answer}." in lare["reasoning"]
            seen[h] += 1
    assert all(n >= 2 for n in seen.values()), seen  # hop3 keeps ~13% of 3x3 scenes once the anchor is needed
    assert sum(summary["hops_skipped"]["train"].values()) + sum(summary["hops_skipped"]["test"].values()) > 0


def _reached_without_anchor(question: str, objects: list[dict]) -> dict[str, int]:
    """By hand: the colours the question's moves reach from every occupied cell (a reader who skips the anchor)."""
    path = re.fullmatch(r"What colour is the shape (.+) the \w+(?: \w+)?\?", question)[1]
    at = {(o["row"], o["col"]): o["colour"] for o in objects}
    reached: dict[str, int] = {}
    for start in at:
        cell, seen = start, [start]
        for phrase in reversed(path.split(" the shape ")):
            cell = (cell[0] + MOVES[phrase][0], cell[1] + MOVES[phrase][1])
            if cell not in at or cell in seen:
                break
            seen.append(cell)
        else:
            reached[at[cell]] = reached.get(at[cell], 0) + 1
    return reached


def _hop_questions(root: Path, split: str):
    scenes = json.loads((root / "scenes.json").read_text())
    for vcot in _split(root, split)["visual_cot"]:
        if "-hop" in vcot["id"]:
            question, options = _parse_prompt(vcot["question"])
            answer = options[vcot["answer"]] if options else vcot["answer"]
            yield (
                vcot["id"].rsplit("-", 1)[1],
                answer,
                _reached_without_anchor(question, scenes[vcot["image"]]["objects"]),
            )


def test_hop_answers_need_the_anchor_and_the_summary_gives_the_shortcut(built_hops, tmp_path):
    """Every hop question (the default): following its moves from some other shape reaches another colour, so the
    moves alone do not give the answer. ``hop_shortcut`` is the accuracy of the most-reached colour (ties: the
    first colour of red, green, blue, yellow), recomputed here by hand. ``--any-anchor`` writes the old questions,
    most of which the shortcut answers (that is what the default removes)."""
    from latent_apps.shapes import COLOURS

    summary = json.loads((built_hops / "summary.json").read_text())
    assert summary["anchor_needed"] is True
    for split in ("train", "test"):
        right: dict[str, list[bool]] = {}
        for kind, answer, reached in _hop_questions(built_hops, split):
            assert answer in reached and set(reached) != {answer}, (kind, answer, reached)
            guess = max(COLOURS, key=lambda c: (reached.get(c, 0), -COLOURS.index(c)))
            right.setdefault(kind, []).append(guess == answer)
        assert summary["hop_shortcut"][split] == {k: round(sum(v) / len(v), 4) for k, v in right.items()}
    old = tmp_path / "old"
    make_shapes(N, SEED, old, hops=HOPS, anchor_needed=False)
    kept = json.loads((old / "summary.json").read_text())
    assert kept["anchor_needed"] is False
    one_colour = [set(reached) == {answer} for split in ("train", "test") for _, answer, reached in
                  _hop_questions(old, split)]  # fmt: skip
    assert sum(one_colour) > len(one_colour) / 3
    assert kept["hop_shortcut"]["train"]["hop3"] > summary["hop_shortcut"]["train"]["hop3"] + 0.2


def test_hop_shortcut_accuracy_of_chosen_questions_by_hand(built_hops, tmp_path):
    """``hop_shortcut_accuracy`` on some test questions (what ``reproduce all`` reports next to the majority): per
    hop kind, the most-reached colour's accuracy recomputed from the scenes by hand, other kinds left out; on the
    old any-anchor questions too. ``hop_moves`` reads a question's moves in solving order."""
    from latent_apps.shapes import COLOURS, hop_moves, hop_shortcut_accuracy

    assert hop_moves("What colour is the shape below the shape to the right of the red triangle?") == ["right", "below"]
    with pytest.raises(ValueError, match="not a hop question"):
        hop_moves("What colour is the shape at row 1 column 2?")
    old = tmp_path / "old"
    make_shapes(N, SEED, old, hops=HOPS, anchor_needed=False)
    for root in (built_hops, old):
        ids = [r["id"] for r in _split(root, "test")["visual_cot"]][::2]  # every other question
        scenes = json.loads((root / "scenes.json").read_text())
        right: dict[str, list[bool]] = {}
        for vcot in _split(root, "test")["visual_cot"]:
            if vcot["id"] in ids and "-hop" in vcot["id"]:
                question, options = _parse_prompt(vcot["question"])
                answer = options[vcot["answer"]] if options else vcot["answer"]
                reached = _reached_without_anchor(question, scenes[vcot["image"]]["objects"])
                guess = max(COLOURS, key=lambda c: (reached.get(c, 0), -COLOURS.index(c)))
                right.setdefault(vcot["id"].rsplit("-", 1)[1], []).append(guess == answer)
        expected = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(right.items())}
        assert hop_shortcut_accuracy(root, ids) == expected and expected


def test_hop_counts_out_of_range_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hops"):
        make_shapes(4, 0, tmp_path, hops=(0,))
    from latent_apps.cli import app
    from typer.testing import CliRunner

    for bad in ("1,x", "9"):
        result = CliRunner().invoke(app, ["make-shapes", "--n", "4", "--out", str(tmp_path / "c"), "--hops", bad])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "--hops" in result.output


def test_select_kinds_keeps_exactly_those_questions_and_their_images(built_hops, tmp_path):
    """`select_kinds`: every question of the chosen kinds and no other, in the source's order (the ids of the
    visual-CoT file, a separate format, as the reference), the kept counts those make_shapes counted, each image
    resolving through the new folder to the same bytes; an unknown kind is refused."""
    from latent_apps.eval.runner import _read_llava_cot_bench
    from latent_apps.shapes import select_kinds

    out = select_kinds(built_hops, ("count", "hop2"), tmp_path / "sel")
    counts = json.loads((built_hops / "summary.json").read_text())["splits"]
    for split in ("train", "test"):
        kept = [json.loads(x) for x in (out / split / "llava_cot.jsonl").open()]
        want = [
            r["id"] for r in _split(built_hops, split)["visual_cot"] if r["id"].rsplit("-", 1)[1] in ("count", "hop2")
        ]
        assert [r["id"] for r in kept] == want and want
        assert len(want) == counts[split]["count"] + counts[split]["hop2"]
        for row in kept[:3]:
            assert (out / row["image"]).read_bytes() == (built_hops / row["image"]).read_bytes()
    samples, report = _read_llava_cot_bench(out / "test" / "llava_cot.jsonl")
    assert {s["category"] for s in samples} == {"count", "hop2"} and report.total_skipped == 0
    assert select_kinds(built_hops, ("count", "hop2"), tmp_path / "sel") == out  # a re-run rewrites it in place
    with pytest.raises(ValueError, match="hop7"):
        select_kinds(built_hops, ("hop7",), tmp_path / "bad")
