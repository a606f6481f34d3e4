"""A synthetic staged chain-of-thought visual task: a small grid of coloured shapes and templated questions.

Every question comes with a four-stage LLaVA-CoT answer (summary, caption, reasoning, conclusion), a ground-truth
bbox (Visual-CoT style) and an explicit reasoning text (LaRe), so all three methods can train and evaluate on one
task that small models learn from scratch on a CPU. Written by :func:`make_shapes`:

    out/images/shapes_00000.png ...         one PNG per scene (image root = ``out``; ``image`` fields are relative)
    out/{train,test}/llava_cot.jsonl        {"id", "image", "category", "conversations": [human "<image>\\n...", gpt]}
    out/{train,test}/visual_cot.jsonl       {"id", "image", "question", "answer", "bbox", "dataset": "shapes"}
    out/{train,test}/reasoning.jsonl        {"id", "image", "question", "reasoning", "answer"}
    out/test/shapes_mc.tsv                  VLMEvalKit TSV: every test question in multiple-choice form
    out/scenes.json                         per image: split and objects (row, col 0-based; texts say 1-based)
    out/summary.json                        seed, n, counts per split / kind / variant, the conventions below

Conventions (documented here and in summary.json):

- ``n`` is the number of images (scenes); each image gets one question of each kind
  (count, exists, colour, compare), so ``4 n`` questions. Ids are ``shapes-{image:05d}-{kind}``.
- Splits are by image: ``round(n * test_fraction)`` images (at least one of each split when ``n >= 2``) go to test.
- Each question is open-ended or multiple-choice (coin flip per question). Multiple-choice questions list their
  options after the question and their answer (and conclusion) is the option letter; open-ended answers are a
  digit (counts), ``yes``/``no`` or a colour name. yes/no questions have two options (A, B; the TSV's C and D
  are empty, as VLMEvalKit reads missing options); count and colour questions have four.
- bbox: pixels ``[x0, y0, x1, y1]`` (x1, y1 exclusive: the cell edge), the union of the whole cells that matter:
  count / exists: the matching cells; colour: the asked cell; compare: the cells of both compared groups;
  hop: the cells of the path, anchor to answer.
  When no cell matches (count 0, "no" to exists, nothing to compare) the bbox is the whole grid, since the
  answer follows from inspecting every cell.
- Multi-hop questions (``hops``, opt-in: ``make-shapes --hops 1,2,3``): per image and per ``h``, one question of
  kind ``hop{h}`` whose answer needs ``h`` serial look-ups, each a move to a neighbouring shape ("What colour is the
  shape below the shape to the right of the red triangle?"); the anchor is named so that it is unique in the scene,
  every cell on the path holds a shape and none is visited twice. The reasoning writes one short sentence per hop
  ("The red triangle is at row 1 column 2. Right of it: row 1 column 3, blue circle. Below it: ..."). Their own
  generator leaves everything else byte-identical; scenes without a valid path are counted in ``hops_skipped``.
  By default (``anchor_needed``) a path is drawn only where the moves alone leave the answer open (followed from
  some other shape they reach another colour: :func:`hop_shortcut`); ``summary["hop_shortcut"]`` is the accuracy
  of answering from the moves alone, the floor to read hop results against (about 50% by construction).
- The tiny tokenizer's corpus (``latent_core.testing._CORPUS``) covers almost every word used.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from latent_core.prompts import question_text
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "KINDS", "make_shapes", "scan_entries", "select_kinds", "main", "draw_scene", "cell_bbox",
    "hop_shortcut", "hop_moves", "hop_shortcut_accuracy",
]  # fmt: skip

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[str, ...] = ("count", "exists", "colour", "compare")
RGB = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
LETTERS = "ABCD"
P_OCCUPIED = 0.6  # probability that a cell holds a shape
P_MC = 0.5  # probability that a question is asked in multiple-choice form
EMPTY = "no shape"
BBOX_RULE = (
    "union of whole cells that matter (count/exists: matching cells; colour: the asked cell; compare: cells of "
    "both groups); the whole grid when none match"
)


@dataclass(frozen=True)
class Obj:
    row: int  # 0-based
    col: int  # 0-based
    shape: str
    colour: str

    def where(self) -> str:
        return f"row {self.row + 1} column {self.col + 1}"


@dataclass
class Question:
    """One question about a scene, with everything the three formats need."""

    kind: str
    text: str  # the bare question (no options)
    answer: str  # open-ended answer text
    options: list[str]  # option texts (2 or 4), the answer among them
    summary: str
    reasoning: str
    cells: list[tuple[int, int]] = field(default_factory=list)  # relevant (row, col); empty = whole grid
    mc: bool = False
    shortcut: str | None = None  # hop questions: the answer of a reader who skips the anchor (hop_shortcut)

    @property
    def letter(self) -> str:
        return LETTERS[self.options.index(self.answer)]

    def prompt(self) -> str:
        """The user text, written by the prompt builder that training and evaluation share."""
        return question_text(self.text, self.options if self.mc else None)

    def final(self) -> str:
        return self.letter if self.mc else self.answer


# ---------------------------------------------------------------- scenes and images


def random_scene(rng: random.Random, grid: int) -> list[Obj]:
    """Objects in reading order; each cell is occupied with probability P_OCCUPIED; never empty."""
    objects = []
    for r in range(grid):
        for c in range(grid):
            occupied = rng.random() < P_OCCUPIED
            shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
            if occupied:
                objects.append(Obj(r, c, shape, colour))
    if not objects:
        cell = rng.randrange(grid * grid)
        objects.append(Obj(cell // grid, cell % grid, rng.choice(SHAPES), rng.choice(COLOURS)))
    return objects


def cell_tint(row: int, col: int, grid: int) -> tuple[int, int, int]:
    """The pale background of cell (row, col): red falls with the row, green with the column (white at the top
    left). It marks where a cell is, in the pixels themselves (see :func:`draw_scene`)."""
    step = 80 // max(1, grid - 1)
    return (255 - step * row, 255 - step * col, 255)


def draw_scene(objects: list[Obj], grid: int, image_size: int, tint: bool = True) -> Image.Image:
    """One shape per occupied cell on a background whose pale tint marks each cell's row and column
    (:func:`cell_tint`; ``tint=False``: white, the style of data/demo/make_demo.py).

    Why the tint: Qwen2.5-VL's vision encoder has no absolute position embedding (only 2-D rotary, relative), so a
    small model trained from scratch must otherwise infer which image token is which cell from M-RoPE alone, which
    it did not learn within the CPU budget; with the tint, "row 2 column 3" is in the token's content.
    """
    cell = image_size // grid
    margin = max(1, cell * 3 // 16)
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if tint:
        for r in range(grid):
            for c in range(grid):
                d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=cell_tint(r, c, grid))
    for o in objects:
        x0, y0 = o.col * cell + margin, o.row * cell + margin
        x1, y1 = (o.col + 1) * cell - margin, (o.row + 1) * cell - margin
        if o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=RGB[o.colour])
        elif o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=RGB[o.colour])
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=RGB[o.colour])
    return img


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG: fixed options, no metadata chunks (no timestamps)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def cell_bbox(cells: list[tuple[int, int]], grid: int, image_size: int) -> list[int]:
    """Pixel box [x0, y0, x1, y1] (x1, y1 exclusive) of the union of ``cells``; the whole grid when empty."""
    cell = image_size // grid
    if not cells:
        return [0, 0, grid * cell, grid * cell]
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    return [min(cols) * cell, min(rows) * cell, (max(cols) + 1) * cell, (max(rows) + 1) * cell]


# ---------------------------------------------------------------- questions


def _name(colour: str | None, shape: str | None, plural: bool) -> str:
    noun = (PLURAL[shape] if plural else shape) if shape else ("shapes" if plural else "shape")
    return f"{colour} {noun}" if colour else noun


def _matches(o: Obj, colour: str | None, shape: str | None) -> bool:
    return (colour is None or o.colour == colour) and (shape is None or o.shape == shape)


def _scan(
    objects: list[Obj], grid: int, groups: list[tuple[str | None, str | None]], target: str
) -> tuple[str, list[int]]:
    """The cell-by-cell scan of the reasoning stage: every cell in caption order, what it holds against the
    ``target`` phrase, whether it matches each group, and the running count of each group after it
    (``"row 1 column 2: red circle vs red shape, yes, 1."``; two groups: ``".. vs red and blue, yes no, 1 0."``).
    Restating the target in every entry keeps each decision local: without it no tiny base learned to count in
    2,500 steps (the verdicts stayed "no"; see data/base/README.md). Returns the text and the final counts."""
    at = {(o.row, o.col): o for o in objects}
    counts = [0] * len(groups)
    parts = []
    for r in range(grid):
        for c in range(grid):
            o = at.get((r, c))
            hits = [o is not None and _matches(o, colour, shape) for colour, shape in groups]
            counts = [n + hit for n, hit in zip(counts, hits, strict=True)]
            what = f"{o.colour} {o.shape}" if o is not None else EMPTY
            verdicts = " ".join("yes" if hit else "no" for hit in hits)
            parts.append(f"row {r + 1} column {c + 1}: {what} vs {target}, {verdicts}, {' '.join(map(str, counts))}.")
    return " ".join(parts), counts


_SCAN_ENTRY = re.compile(r"row (\d+) column (\d+): [^.,]+ vs [^,]+, ((?:yes|no)(?: (?:yes|no))*), (\d+(?: \d+)*)\.")
"""One entry of a :func:`_scan` (row, column, the verdicts, the running counts after it)."""


def scan_entries(text: str) -> list[tuple[str, str, str]]:
    """The entries of a :func:`_scan` written in ``text``, in order: ``("row r column c", verdicts, running
    counts)`` each (``("row 1 column 2", "yes", "1")``; two groups ``("row 1 column 2", "yes no", "1 0")``)."""
    return [(f"row {m.group(1)} column {m.group(2)}", m.group(3), m.group(4)) for m in _SCAN_ENTRY.finditer(text)]


def short_reasoning(reasoning: str) -> str:
    """The reasoning of a short partial answer (``make-base --mix cot+direct+partial``): ``reasoning`` with a
    cell-by-cell :func:`_scan` cut to one entry per row, the running counts at the row's end (``"row 1: 1. row 2:
    1. row 3: 3."``; two groups ``"row 1: 1 0."``), the rest unchanged: each row's entry aggregates three cells
    without writing them, so the base learns part of an aggregation inside a forward pass. A reasoning without a
    scan (colour, hops) is returned as it is: its steps are already short and one per look-up."""
    entries = list(_SCAN_ENTRY.finditer(reasoning))
    if not entries:
        return reasoning
    last = max(int(m.group(2)) for m in entries)
    rows = " ".join(f"row {m.group(1)}: {m.group(4)}." for m in entries if int(m.group(2)) == last)
    return reasoning[: entries[0].start()] + rows + reasoning[entries[-1].end() :]


def partial_answer(staged: str) -> str:
    """The short partial answer of a staged answer (:func:`staged_answer`): its ``<REASONING>`` through
    :func:`short_reasoning` and its ``<CONCLUSION>``; no summary and no caption, so the image is read without
    being written down. Raises ``ValueError`` when ``staged`` lacks either block."""
    from latent_core.readers import parse_cot_stages

    stages = parse_cot_stages(staged)
    if not stages.get("reasoning") or not stages.get("conclusion"):
        raise ValueError("a partial answer needs a <REASONING> and a <CONCLUSION> block")
    return (
        f"<REASONING>{short_reasoning(stages['reasoning'])}</REASONING>\n\n"
        f"<CONCLUSION>{stages['conclusion']}</CONCLUSION>"
    )


def _count_options(rng: random.Random, answer: int, grid: int) -> list[str]:
    """Four consecutive counts, ascending, holding ``answer`` at a random place (A-D), within 0..grid*grid."""
    start = max(0, min(answer - rng.randrange(4), grid * grid + 1 - 4))
    return [str(v) for v in range(start, start + 4)]


def _phrase(colour: str | None, shape: str | None) -> str:
    """The canonical form of a (colour, shape) target in the reasoning: ``red square``, ``any square``,
    ``red shape``."""
    return f"{colour or 'any'} {shape or 'shape'}"


def _target(rng: random.Random, objects: list[Obj], partial: bool) -> tuple[str | None, str | None]:
    """A (colour, shape) target: half the time taken from an object in the scene, else random. With ``partial``
    one of the two may be dropped (count questions: "red shapes", "circles")."""
    if rng.random() < 0.5:
        o = rng.choice(objects)
        colour, shape = o.colour, o.shape
    else:
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    if partial:
        mode = rng.choice(("both", "both", "colour", "shape"))
        if mode == "colour":
            shape = None
        elif mode == "shape":
            colour = None
    return colour, shape


def ask_count(rng: random.Random, objects: list[Obj], grid: int) -> Question:
    colour, shape = _target(rng, objects, partial=True)
    hits = [o for o in objects if _matches(o, colour, shape)]
    plural = _name(colour, shape, True)
    scan, (n,) = _scan(objects, grid, [(colour, shape)], _phrase(colour, shape))
    return Question(
        kind="count",
        text=f"How many {plural} are there?",
        answer=str(n),
        options=_count_options(rng, n, grid),
        summary=f"I will count the {plural} in the grid and answer the question.",
        reasoning=f"Target: {_phrase(colour, shape)}. {scan} So the count is {n}.",
        cells=[(o.row, o.col) for o in hits],
    )


def ask_exists(rng: random.Random, objects: list[Obj], grid: int) -> Question:
    colour, shape = _target(rng, objects, partial=False)
    hits = [o for o in objects if _matches(o, colour, shape)]
    name = _name(colour, shape, False)
    scan, (n,) = _scan(objects, grid, [(colour, shape)], _phrase(colour, shape))
    verdict = "yes" if n else "no"
    return Question(
        kind="exists",
        text=f"Is there a {name}?",
        answer=verdict,
        options=["yes", "no"],
        summary=f"I will count the {_name(colour, shape, True)} in the grid and answer the question with yes or no.",
        reasoning=f"Target: {_phrase(colour, shape)}. {scan} So the count is {n}, and the answer is {verdict}.",
        cells=[(o.row, o.col) for o in hits],
    )


def ask_colour(rng: random.Random, objects: list[Obj], grid: int) -> Question:
    o = rng.choice(objects)
    return Question(
        kind="colour",
        text=f"What colour is the shape at {o.where()}?",
        answer=o.colour,
        options=list(COLOURS),
        summary=f"I will look at the shape at {o.where()} and answer the question.",
        reasoning=f"{o.where()}: {o.colour} {o.shape}. So the colour is {o.colour}.",
        cells=[(o.row, o.col)],
    )


def ask_compare(rng: random.Random, objects: list[Obj], grid: int) -> Question:
    if rng.random() < 0.5:
        a, b = rng.sample(SHAPES, 2)
        pa, pb = PLURAL[a], PLURAL[b]
        groups: list[tuple[str | None, str | None]] = [(None, a), (None, b)]
    else:
        a, b = rng.sample(COLOURS, 2)
        pa, pb = f"{a} shapes", f"{b} shapes"
        groups = [(a, None), (b, None)]
    ha = [o for o in objects if _matches(o, *groups[0])]
    hb = [o for o in objects if _matches(o, *groups[1])]
    scan, (na, nb) = _scan(objects, grid, groups, f"{a} and {b}")
    if na > nb:
        verdict = f"{na} is more than {nb}, so the answer is yes."
    elif na < nb:
        verdict = f"{na} is fewer than {nb}, so the answer is no."
    else:
        verdict = f"{na} and {nb} are the same, so the answer is no."
    return Question(
        kind="compare",
        text=f"Are there more {pa} than {pb}?",
        answer="yes" if na > nb else "no",
        options=["yes", "no"],
        summary=f"I will count the {pa} and the {pb} and answer the question.",
        reasoning=f"Targets: {a} and {b}. {scan} So there are {na} {pa} and {nb} {pb}. {verdict}",
        cells=sorted((o.row, o.col) for o in ha + hb),
    )


ASK = {"count": ask_count, "exists": ask_exists, "colour": ask_colour, "compare": ask_compare}

# Multi-hop questions (opt-in, ``hops``): a move from one cell to its neighbour, as the question words it and as the
# reasoning states it.
MOVES: dict[str, tuple[int, int]] = {"right": (0, 1), "left": (0, -1), "below": (1, 0), "above": (-1, 0)}
MOVE_TEXT = {"right": "to the right of", "left": "to the left of", "below": "below", "above": "above"}
MOVE_STEP = {"right": "Right of it", "left": "Left of it", "below": "Below it", "above": "Above it"}
MAX_HOPS = 8


def hop_kind(h: int) -> str:
    """The kind (and category) of an ``h``-hop question: ``hop1``, ``hop2``, ..."""
    return f"hop{h}"


def _anchor_name(o: Obj, objects: list[Obj]) -> str | None:
    """The shortest name that picks ``o`` out of the scene: ``triangle`` when it is the only triangle, ``red
    triangle`` when it is the only red triangle, ``None`` when neither is unique."""
    if sum(x.shape == o.shape for x in objects) == 1:
        return o.shape
    if sum(x.shape == o.shape and x.colour == o.colour for x in objects) == 1:
        return f"{o.colour} {o.shape}"
    return None


def _paths(start: Obj, at: dict[tuple[int, int], Obj], grid: int, h: int) -> list[list[str]]:
    """Every sequence of ``h`` moves from ``start`` that stays on occupied cells and never revisits one."""
    out: list[list[str]] = []

    def walk(cell: tuple[int, int], seen: set[tuple[int, int]], moves: list[str]) -> None:
        if len(moves) == h:
            out.append(list(moves))
            return
        for name, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if 0 <= nxt[0] < grid and 0 <= nxt[1] < grid and nxt in at and nxt not in seen:
                walk(nxt, seen | {nxt}, [*moves, name])

    walk((start.row, start.col), {(start.row, start.col)}, [])
    return out


def hop_shortcut(objects: list[Obj], moves: list[str]) -> dict[str, int]:
    """What a reader who never finds the anchor knows: the colours reached by following ``moves`` from *every*
    occupied cell (each cell on the way occupied, none twice), with how many start cells reach each.

    On a small grid the moves alone pin the answer down: "below the shape below the shape to the right of X" can
    start only in the top two rows of the first two columns, and with the occupied-path rule often only one colour
    is reachable. On a 3x3 grid with uniformly drawn paths the most common reachable colour is the answer for 67%
    (hop1), 88% (hop2) and 95% (hop3) of the questions, so deeper questions were *easier* without any look-up;
    ``anchor_needed`` keeps only questions whose reachable colours include another than the answer."""
    at = {(o.row, o.col): o for o in objects}
    reached: dict[str, int] = {}
    for start in at:
        cells = _walk(start, moves)
        if all(c in at for c in cells) and len(set(cells)) == len(cells):
            reached[at[cells[-1]].colour] = reached.get(at[cells[-1]].colour, 0) + 1
    return reached


def _walk(start: tuple[int, int], moves: list[str]) -> list[tuple[int, int]]:
    """The cells visited from ``start`` by ``moves``, ``start`` first (on the grid or not)."""
    cells = [start]
    for move in moves:
        cells.append((cells[-1][0] + MOVES[move][0], cells[-1][1] + MOVES[move][1]))
    return cells


def shortcut_answer(reached: dict[str, int]) -> str:
    """The shortcut's guess: the colour most start cells reach (ties: the first in :data:`COLOURS`)."""
    return max(COLOURS, key=lambda c: (reached.get(c, 0), -COLOURS.index(c)))


def hop_moves(question: str) -> list[str]:
    """The moves of a hop question's text (:func:`ask_hop`), in solving order (from the anchor outward): "What
    colour is the shape below the shape to the right of the triangle?" -> ``["right", "below"]``.

    Raises:
        ValueError: not a hop question."""
    by_text = {v: k for k, v in MOVE_TEXT.items()}
    m = re.fullmatch(r"What colour is the shape (.+) the \w+(?: \w+)?\?", question)
    phrases = m[1].split(" the shape ") if m else []
    if not phrases or any(p not in by_text for p in phrases):
        raise ValueError(f"not a hop question: {question!r}")
    return [by_text[p] for p in reversed(phrases)]


def hop_shortcut_accuracy(shapes: Path, ids: list[str]) -> dict[str, dict[str, float | int]]:
    """Per hop kind, over the questions ``ids`` of a :func:`make_shapes` output's test split: how often the
    anchor-free answer (:func:`shortcut_answer` of :func:`hop_shortcut`) is right, ``{kind: {"n", "accuracy"}}``.
    The floor a hop result is read against, as the majority baseline is (other kinds are left out)."""
    shapes = Path(shapes)
    scenes = json.loads((shapes / "scenes.json").read_text(encoding="utf-8"))
    wanted, out = set(ids), {}
    for line in (shapes / "test" / "llava_cot.jsonl").open(encoding="utf-8"):
        row = json.loads(line)
        if row["id"] not in wanted or not str(row.get("category", "")).startswith("hop"):
            continue
        question = row["conversations"][0]["value"].removeprefix("<image>\n").split("\n")[0]
        gold = re.search(r"So the colour is (\w+)\.", row["conversations"][1]["value"])[1]
        objects = [Obj(**o) for o in scenes[row["image"]]["objects"]]
        guess = shortcut_answer(hop_shortcut(objects, hop_moves(question)))
        entry = out.setdefault(row["category"], {"n": 0, "right": 0})
        entry["n"] += 1
        entry["right"] += guess == gold
    return {k: {"n": v["n"], "accuracy": v["right"] / v["n"]} for k, v in sorted(out.items())}


def ask_hop(rng: random.Random, objects: list[Obj], grid: int, h: int, anchor_needed: bool = True) -> Question | None:
    """An ``h``-hop question: start at a uniquely named shape, move ``h`` times to a neighbouring shape, ask the
    last one's colour ("What colour is the shape below the shape to the right of the red triangle?"). Every answer
    needs ``h`` serial look-ups, each a local step; the reasoning writes one short sentence per hop. The anchor and
    path are drawn uniformly among all valid ones; with ``anchor_needed`` (the default) only among those where
    skipping the anchor leaves a doubt (:func:`hop_shortcut` reaches another colour than the answer), so the
    answer cannot come from the moves alone. ``None`` when the scene has none (counted by the caller)."""
    at = {(o.row, o.col): o for o in objects}
    choices = [
        (o, name, moves)
        for o in objects
        if (name := _anchor_name(o, objects)) is not None
        for moves in _paths(o, at, grid, h)
        if not anchor_needed or set(hop_shortcut(objects, moves)) != {at[_walk((o.row, o.col), moves)[-1]].colour}
    ]
    if not choices:
        return None
    anchor, name, moves = rng.choice(choices)
    cells = _walk((anchor.row, anchor.col), moves)
    steps = [
        f"{MOVE_STEP[m]}: {at[c].where()}, {at[c].colour} {at[c].shape}." for m, c in zip(moves, cells[1:], strict=True)
    ]
    final = at[cells[-1]]
    path = " the shape ".join(MOVE_TEXT[m] for m in reversed(moves))
    return Question(
        kind=hop_kind(h),
        text=f"What colour is the shape {path} the {name}?",
        answer=final.colour,
        options=list(COLOURS),
        summary=f"I will find the {name}, follow the question from it one shape at a time and answer the question.",
        reasoning=f"The {name} is at {anchor.where()}. {' '.join(steps)} So the colour is {final.colour}.",
        cells=cells,
        shortcut=shortcut_answer(hop_shortcut(objects, moves)),
    )


def caption(objects: list[Obj], grid: int = 3) -> str:
    """Every cell in reading order, position first (``"row 1 column 1: red circle."``, ``"..: empty."``)."""
    at = {(o.row, o.col): o for o in objects}
    parts = []
    for r in range(grid):
        for c in range(grid):
            o = at.get((r, c))
            parts.append(f"row {r + 1} column {c + 1}: {f'{o.colour} {o.shape}' if o else EMPTY}.")
    return " ".join(parts)


def staged_answer(q: Question, objects: list[Obj], grid: int = 3) -> str:
    summary, reasoning = q.summary, q.reasoning
    if q.mc:
        summary += " I will then answer with the letter of the correct option."
        reasoning += f" The answer {q.answer} is option {q.letter}."
    return (
        f"<SUMMARY>{summary}</SUMMARY>\n\n<CAPTION>{caption(objects, grid)}</CAPTION>\n\n"
        f"<REASONING>{reasoning}</REASONING>\n\n<CONCLUSION>{q.final()}</CONCLUSION>"
    )


# ---------------------------------------------------------------- writing


def _split_sizes(n: int, test_fraction: float) -> int:
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n >= 2 and 0.0 < test_fraction < 1.0:
        n_test = min(max(n_test, 1), n - 1)
    return n_test


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_shapes(
    n: int,
    seed: int,
    out: Path,
    test_fraction: float = 0.2,
    grid: int = 3,
    image_size: int = 96,
    tint: bool = True,
    hops: tuple[int, ...] = (),
    anchor_needed: bool = True,
) -> dict:
    """Generate ``n`` scenes (4 questions each, plus one ``h``-hop question per ``h`` in ``hops``) into ``out``;
    returns the summary (also ``out/summary.json``).

    Deterministic: the same arguments give byte-identical files (one ``random.Random(seed)``, fixed PNG options).
    Hop questions draw from a second generator (``random.Random(f"shapes-hops-{seed}")``), so adding them leaves
    the scenes and today's four questions byte-identical; a scene with no valid h-hop path gets no h-hop question
    and is counted in ``summary["hops_skipped"]``. ``anchor_needed`` (:func:`ask_hop`): only hop questions whose
    answer needs the anchor; ``False`` writes the hop questions of the data sets made before it (whose recorded
    arguments have no ``anchor_needed``: read as ``False``, see ``latent_apps.base.base_shapes``).
    ``summary["hop_shortcut"]``: per split and hop kind, the accuracy of answering without the anchor
    (:func:`shortcut_answer`), the floor a hop result must be read against, like the majority baseline.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 2 <= grid <= 9:
        raise ValueError(f"grid must be in 2..9 (single-digit rows and columns), got {grid}")
    if image_size < 8 * grid:
        raise ValueError(f"image_size must be at least 8 px per cell ({8 * grid}), got {image_size}")
    hops = tuple(sorted(set(int(h) for h in hops)))
    if any(not 1 <= h <= MAX_HOPS for h in hops):
        raise ValueError(f"hops must be in 1..{MAX_HOPS}, got {list(hops)}")
    out = Path(out)
    rng = random.Random(seed)
    hop_rng = random.Random(f"shapes-hops-{seed}")
    kinds = [*KINDS, *(hop_kind(h) for h in hops)]
    skipped = {s: {hop_kind(h): 0 for h in hops} for s in ("train", "test")}
    shortcut_right = {s: {hop_kind(h): 0 for h in hops} for s in ("train", "test")}
    n_test = _split_sizes(n, test_fraction)
    order = list(range(n))
    rng.shuffle(order)
    test_ids = set(order[:n_test])

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list]] = {s: {"llava": [], "vcot": [], "lare": []} for s in ("train", "test")}
    tsv_rows: list[list] = []
    scenes: dict[str, dict] = {}
    counts = {s: {"images": 0, "questions": 0, **{k: 0 for k in kinds}, "open": 0, "mc": 0} for s in ("train", "test")}
    for i in range(n):
        split = "test" if i in test_ids else "train"
        objects = random_scene(rng, grid)
        image = f"images/shapes_{i:05d}.png"
        data = png_bytes(draw_scene(objects, grid, image_size, tint))
        (out / image).write_bytes(data)
        scenes[image] = {"split": split, "objects": [o.__dict__ for o in objects]}
        counts[split]["images"] += 1
        questions = []
        for kind in KINDS:
            q = ASK[kind](rng, objects, grid)
            q.mc = rng.random() < P_MC
            questions.append(q)
        for h in hops:
            q = ask_hop(hop_rng, objects, grid, h, anchor_needed)
            if q is None:
                skipped[split][hop_kind(h)] += 1
                continue
            shortcut_right[split][q.kind] += q.shortcut == q.answer
            q.mc = hop_rng.random() < P_MC
            questions.append(q)
        for q in questions:
            kind = q.kind
            qid = f"shapes-{i:05d}-{kind}"
            prompt, final = q.prompt(), q.final()
            bbox = cell_bbox(q.cells, grid, image_size)
            rows[split]["llava"].append(
                {
                    "id": qid,
                    "image": image,
                    "category": kind,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"},
                        {"from": "gpt", "value": staged_answer(q, objects, grid)},
                    ],
                }
            )
            rows[split]["vcot"].append(
                {"id": qid, "image": image, "question": prompt, "answer": final, "bbox": bbox, "dataset": "shapes"}
            )
            reasoning = q.reasoning + (f" The answer {q.answer} is option {q.letter}." if q.mc else "")
            rows[split]["lare"].append(
                {"id": qid, "image": image, "question": prompt, "reasoning": reasoning, "answer": final}
            )
            if split == "test":
                opts = q.options + [""] * (4 - len(q.options))
                tsv_rows.append([len(tsv_rows), q.text, *opts, q.letter, base64.b64encode(data).decode(), kind])
            counts[split]["questions"] += 1
            counts[split][kind] += 1
            counts[split]["mc" if q.mc else "open"] += 1

    for split, r in rows.items():
        _write_jsonl(out / split / "llava_cot.jsonl", r["llava"])
        _write_jsonl(out / split / "visual_cot.jsonl", r["vcot"])
        _write_jsonl(out / split / "reasoning.jsonl", r["lare"])
    with open(out / "test" / "shapes_mc.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["index", "question", "A", "B", "C", "D", "answer", "image", "category"])
        writer.writerows(tsv_rows)
    (out / "scenes.json").write_text(json.dumps(scenes, indent=1) + "\n", encoding="utf-8")

    summary = {
        "dataset": "shapes",
        "n": n,
        "seed": seed,
        "test_fraction": test_fraction,
        "grid": grid,
        "image_size": image_size,
        "tint": tint,
        "cell_px": image_size // grid,
        "kinds": kinds,
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "splits": counts,
        "tsv_rows": len(tsv_rows),
        "bbox": BBOX_RULE,
        "files": {
            "images": "images/",
            "scenes": "scenes.json",
            "llava_cot": "{split}/llava_cot.jsonl",
            "visual_cot": "{split}/visual_cot.jsonl",
            "reasoning": "{split}/reasoning.jsonl",
            "tsv": "test/shapes_mc.tsv",
        },
    }
    if hops:  # without them, today's summary byte for byte
        summary["hops"] = list(hops)
        summary["hops_skipped"] = skipped
        summary["hop_shortcut"] = {
            split: {k: round(right / max(counts[split][k], 1), 4) for k, right in by_kind.items()}
            for split, by_kind in shortcut_right.items()
        }
        summary["anchor_needed"] = anchor_needed
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def select_kinds(shapes: Path, kinds: tuple[str, ...], out: Path) -> Path:
    """The questions of ``kinds`` only, of a :func:`make_shapes` output ``shapes``, as a shapes folder ``out``:
    ``{train,test}/llava_cot.jsonl`` filtered by ``category`` (order kept), ``images`` a link to ``shapes/images``,
    ``summary.json`` naming the source and the kinds with the kept counts. Rewritten on every call (cheap and
    deterministic), so a re-run with the same arguments gives the same files.

    Raises:
        ValueError: a kind that ``shapes`` does not have.
    """
    shapes, out = Path(shapes), Path(out)
    have = json.loads((shapes / "summary.json").read_text(encoding="utf-8"))["kinds"]
    unknown = [k for k in kinds if k not in have]
    if unknown or not kinds:
        raise ValueError(f"unknown question kinds {', '.join(unknown) or '(none given)'}: {shapes} has "
                         f"{', '.join(have)}")  # fmt: skip
    counts = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (shapes / split / "llava_cot.jsonl").open(encoding="utf-8")]
        kept = [r for r in rows if r.get("category") in kinds]
        _write_jsonl(out / split / "llava_cot.jsonl", kept)
        counts[split] = {k: sum(r["category"] == k for r in kept) for k in kinds}
    link = out / "images"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to((shapes / "images").resolve(), target_is_directory=True)
    summary = {"dataset": "shapes", "selected_from": str(shapes), "kinds": list(kinds), "splits": counts}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out


def main(
    n: int = 500,
    seed: int = 0,
    out: Path = Path("data/shapes"),
    test_fraction: float = 0.2,
    grid: int = 3,
    image_size: int = 96,
    tint: bool = True,
    hops: tuple[int, ...] = (),
    anchor_needed: bool = True,
) -> dict:
    """Entry point for the ``make-shapes`` command: same as :func:`make_shapes`, with defaults."""
    return make_shapes(
        n=n,
        seed=seed,
        out=Path(out),
        test_fraction=test_fraction,
        grid=grid,
        image_size=image_size,
        tint=tint,
        hops=hops,
        anchor_needed=anchor_needed,
    )
