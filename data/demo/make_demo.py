"""Writes the demo's image and questions (deterministic; re-run to regenerate: `uv run data/demo/make_demo.py`)."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
CELL = 32
# (row, column, shape, colour) on a 3x3 grid.
SHAPES = [
    (0, 0, "circle", "red"),
    (0, 2, "square", "blue"),
    (1, 1, "triangle", "green"),
    (2, 0, "circle", "red"),
    (2, 2, "circle", "yellow"),
]
RGB = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}


def draw() -> Image.Image:
    img = Image.new("RGB", (3 * CELL, 3 * CELL), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for row, col, shape, colour in SHAPES:
        x0, y0 = col * CELL + 6, row * CELL + 6
        x1, y1 = x0 + CELL - 12, y0 + CELL - 12
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=RGB[colour])
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=RGB[colour])
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=RGB[colour])
    return img


def main() -> None:
    draw().save(HERE / "shapes.png", optimize=False)
    questions = [
        {"id": "demo-0", "image": "shapes.png", "question": "How many red circles are there?", "answer": "2"},
        {"id": "demo-1", "image": "shapes.png", "question": "Is there a blue square?", "answer": "yes"},
    ]
    with open(HERE / "questions.jsonl", "w") as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")


if __name__ == "__main__":
    main()
