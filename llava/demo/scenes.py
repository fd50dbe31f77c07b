"""The demo's scenes: what an image shows, how it is drawn, and the questions it answers.

A scene is one to four objects of one shape, colour and size in cells of a 3x3 grid; every question category has a
fixed set of one-word answers (for chance level and exact-match scoring) and a sentence form for plain questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 55, 190),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
# Cell (row, col) of the 3x3 grid -> its name, as captions say it ("a red circle at the top left").
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Where a lone object is, asked one axis at a time: its column and its row of the grid.
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
COUNTS = ("one", "two", "three", "four")
BACKGROUND = (245, 245, 240)
SHORT_ANSWER = "Answer the question using a single word or phrase."

# Questions whose answer is read off the image, and the answers each can have (for chance level and scoring).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "column": COLUMNS,
    "row": ROWS,
    "count": COUNTS,
}
TEXT_CATEGORY = "text"
# Categories asked of lone objects only (where the object is).
POSITION_CATEGORIES = ("column", "row")
_QUESTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    # (singular phrasing, plural phrasing)
    "color": (
        ("What color is the shape?", "What color are the shapes?"),
        ("Which color is the object in the image?", "Which color are the objects in the image?"),
    ),
    "shape": (
        ("What shape is shown in the image?", "What shape are the objects in the image?"),
        ("What kind of shape is it?", "What kind of shapes are they?"),
    ),
    "size": (
        ("Is the shape big or small?", "Are the shapes big or small?"),
        ("What size is the object?", "What size are the objects?"),
    ),
    "column": (
        ("Is the shape on the left, in the center or on the right?", ""),
        ("Is the object in the left, center or right part of the image?", ""),
    ),
    "row": (
        ("Is the shape at the top, in the middle or at the bottom?", ""),
        ("Is the object in the top, middle or bottom part of the image?", ""),
    ),
    "count": (
        ("How many shapes are there?", "How many shapes are there?"),
        ("How many objects are in the image?", "How many objects are in the image?"),
    ),
}

# Text-only knowledge (no image): stands in for the ShareGPT conversations of the LLaVA-1.5 mix.
TEXT_FACTS: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many corners does a circle have?", "zero"),
    ("Which shape is round?", "circle"),
    ("Which shape has three corners?", "triangle"),
    ("Which shape has four equal sides?", "square"),
    ("What color do you get by mixing red and yellow?", "orange"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("What color do you get by mixing red and blue?", "purple"),
    ("What number comes after two?", "three"),
    ("What number comes after three?", "four"),
    ("What number comes before two?", "one"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of left?", "right"),
    ("What is the opposite of top?", "bottom"),
)


@dataclass(frozen=True)
class Scene:
    """One to four objects, all of one shape, colour and size, in distinct cells of a 3x3 grid."""

    shape: str
    color: str
    size: str
    cells: tuple[int, ...]  # grid cells 0..8, row-major

    @property
    def count(self) -> int:
        return len(self.cells)

    def answer(self, category: str) -> str | None:
        """The ground-truth answer to a `category` question, or None when the question does not apply."""
        if category in ("column", "row"):
            if self.count != 1:
                return None
            row, col = divmod(self.cells[0], 3)
            return COLUMNS[col] if category == "column" else ROWS[row]
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "count": COUNTS[self.count - 1],
        }[category]

    def caption(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        if self.count == 1:
            where = POSITIONS[self.cells[0]]
            where = "in the center" if where == "center" else f"at the {where}"
            return f"a {self.size} {self.color} {noun} {where}"
        return f"{COUNTS[self.count - 1]} {self.size} {self.color} {noun}"

    def attributes(self) -> dict[str, str]:
        """Every attribute the scene has a value for, e.g. `{"color": "red", "count": "two", ...}`."""
        return {c: self.answer(c) for c in CATEGORIES if self.answer(c) is not None}

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "cells": list(self.cells)}

    def description(self) -> str:
        if self.count == 1:
            return f"There is {self.caption()} of the image."
        return f"There are {self.caption()}."


# ----------------------------------------------------------------------------------------------------------- scenes


def random_scene(rng: random.Random, **fixed) -> Scene:
    """A random scene; keyword arguments (`shape`, `color`, `size`, `count`, `cell`) pin attributes."""
    count = fixed.get("count") or rng.choice((1, 1, 1, 2, 3, 4))  # half the scenes hold one object
    if "cell" in fixed:
        cells = (fixed["cell"],)
    else:
        cells = tuple(sorted(rng.sample(range(9), count)))
    return Scene(
        shape=fixed.get("shape") or rng.choice(SHAPES),
        color=fixed.get("color") or rng.choice(tuple(COLORS)),
        size=fixed.get("size") or rng.choice(SIZES),
        cells=cells,
    )


def scene_for_answer(category: str, answer: str, rng: random.Random) -> Scene:
    """A random scene whose answer to a `category` question is `answer` (balanced held-out sets)."""
    if category == "count":
        return random_scene(rng, count=COUNTS.index(answer) + 1)
    if category in ("column", "row"):
        other = rng.randrange(3)
        row, col = (other, COLUMNS.index(answer)) if category == "column" else (ROWS.index(answer), other)
        return random_scene(rng, count=1, cell=3 * row + col)
    return random_scene(rng, **{category: answer})


def render(scene: Scene, rng: random.Random, side: int = 192) -> Image.Image:
    """Draw `scene` on a `side` x `side` canvas; objects are jittered a little inside their cells."""
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = side / 3
    radius = cell * (0.40 if scene.size == "big" else 0.26)
    slack = cell * 0.06  # a little jitter; the object stays well inside its cell
    fill = COLORS[scene.color]
    for index in scene.cells:
        row, col = divmod(index, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        if scene.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif scene.shape == "square":
            r = radius * 0.9  # same area impression as the circle
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=fill
            )
    return image


def blank_image(side: int = 192) -> Image.Image:
    """The background with no objects: the ablation's input."""
    return Image.new("RGB", (side, side), BACKGROUND)


# -------------------------------------------------------------------------------------------------------- questions


def question_text(category: str, scene: Scene, rng: random.Random, short: bool = True) -> str:
    """A `category` question about `scene`; `short` appends the single-word-answer instruction (as LLaVA-1.5's
    VQA data does), otherwise the question stands alone and gets a sentence (`sentence_answer`)."""
    singular, plural = rng.choice(_QUESTIONS[category])
    question = singular if scene.count == 1 else plural
    return f"{question}\n{SHORT_ANSWER}" if short else question


_WHERE = {"left": "on the left", "right": "on the right", "center": "in the center", "middle": "in the middle"}


def sentence_answer(category: str, scene: Scene) -> str:
    """The answer to a plain `category` question as a sentence, e.g. "They are red." or "There are two shapes."."""
    answer = scene.answer(category)
    one = scene.count == 1
    if category == "count":
        return "There is one shape." if one else f"There are {answer} shapes."
    if category == "shape":
        return f"It is a {answer}." if one else f"They are {answer}s."
    if category in ("column", "row"):
        return f"It is {_WHERE.get(answer, 'at the ' + answer)}."
    return f"It is {answer}." if one else f"They are {answer}."


def applicable_categories(scene: Scene) -> list[str]:
    return [c for c in CATEGORIES if scene.answer(c) is not None]
