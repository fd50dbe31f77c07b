"""The demo's synthetic visual dataset: shape scenes as PNG files plus LLaVA-format JSON, deterministic per seed.

Writes, under `out_dir` (default `playground/data/demo`):
  images/train/*.png, images/eval/*.png, images/blank.png
  pretrain.json       stage 1 captions, one per image (like LCS-558K; used with `--version plain`)
  finetune.json       stage 2 multi-turn short-answer questions in the v1 template, with text-only records
                      (like llava_v1_5_mix665k)
  eval_questions.jsonl       held-out questions `{question_id, image, text, category}` (model_vqa's format)
  eval_questions_blank.jsonl the same questions on a blank image (the ablation that proves answers use the image)
  eval_questions_text.jsonl  text-only held-out questions (no image), scored separately
  eval_answers.jsonl         ground truth `{question_id, answer, category, choices}`
  scenes.jsonl        what each image shows `{image, shape, color, size, cells}` (pretraining targets of the tiny CLIP)
  text_corpus.txt     every sentence of the dataset

    python -m llava.demo.data --out playground/data/demo --train-images 3000 --eval-per-category 80 --seed 0

A scene holds one to four objects of one shape and one colour in distinct cells of a 3x3 grid. Every question has
a one-word or short-phrase answer, so scoring is exact match, as for LLaVA-1.5's short-answer benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator
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
MIXES = ("demo", "llava665k")
# Share of stage-2 image questions asked plainly and answered with a sentence (what a web-UI user types).
PLAIN_QUESTION_SHARE = 0.3

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
_DESCRIBE = ("Describe the image briefly.", "What is in the picture?")
_PRETRAIN_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short caption for the picture.",
    "Summarize the visual content of the image.",
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


def _turn(human: str, gpt: str) -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _image_conversation(turns: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """(question, answer) turns as messages; the image marker goes with the first question, before or after it, as
    in the LLaVA mix."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        conversations += _turn(question, answer)
    return conversations


def pretrain_record(index: int, image: str, scene: Scene, rng: random.Random) -> dict:
    """A stage-1 record: image + caption (the plain template ignores the instruction, as for LCS-558K)."""
    prompt = rng.choice(_PRETRAIN_PROMPTS)
    prompt = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
    return {"id": f"demo-pt-{index:06d}", "image": image, "conversations": _turn(prompt, scene.caption())}


def finetune_record(index: int, image: str, scene: Scene, rng: random.Random) -> dict:
    """A stage-2 record: every short-answer question the image allows (3-5, shuffled), sometimes a description."""
    categories = applicable_categories(scene)
    rng.shuffle(categories)
    turns: list[tuple[str, str]] = []
    for c in categories:  # mostly short answers (the held-out format), sometimes a plain question and a sentence
        short = rng.random() >= PLAIN_QUESTION_SHARE
        turns.append((question_text(c, scene, rng, short), scene.answer(c) if short else sentence_answer(c, scene)))
    if rng.random() < 0.2:
        turns.insert(rng.randint(0, len(turns)), (rng.choice(_DESCRIBE), scene.description()))
    return {"id": f"demo-ft-{index:06d}", "image": image, "conversations": _image_conversation(turns, rng)}


def mixed_record(index: int, image: str, scene: Scene, rng: random.Random) -> dict:
    """A stage-2 record shaped like one of the parts of llava_v1_5_mix665k, so lengths vary as they do there:

    - 45 % short VQA (VQAv2, OKVQA): one to three short-answer questions;
    - 25 % many questions per image (GQA, OCR-VQA, RefCOCO): every question the image allows, in both phrasings;
    - 20 % conversation (LLaVA-Instruct): plain questions answered with sentences, and a description;
    - 10 % detailed description (detail_23k): one request, a description and a sentence per attribute.
    """
    categories = applicable_categories(scene)
    rng.shuffle(categories)
    kind = rng.random()
    if kind < 0.45:
        turns = [(question_text(c, scene, rng), scene.answer(c)) for c in categories[: rng.randint(1, 3)]]
    elif kind < 0.70:
        turns = []
        for c in categories:
            for singular, plural in _QUESTIONS[c]:
                turns.append((f"{singular if scene.count == 1 else plural}\n{SHORT_ANSWER}", scene.answer(c)))
        rng.shuffle(turns)
    elif kind < 0.90:
        turns = [(question_text(c, scene, rng, short=False), sentence_answer(c, scene)) for c in categories]
        turns.insert(rng.randint(0, len(turns)), (rng.choice(_DESCRIBE), scene.description()))
    else:
        details = " ".join(sentence_answer(c, scene) for c in categories)
        turns = [(rng.choice(_DESCRIBE), f"{scene.description()} {details}")]
    return {"id": f"demo-mix-{index:06d}", "image": image, "conversations": _image_conversation(turns, rng)}


def text_record(index: int, rng: random.Random, max_facts: int = 3) -> dict:
    """A text-only record (no image) of one to `max_facts` facts."""
    facts = rng.sample(TEXT_FACTS, rng.randint(1, max_facts))
    conversations = []
    for question, answer in facts:
        conversations += _turn(f"{question}\n{SHORT_ANSWER}", answer)
    return {"id": f"demo-text-{index:06d}", "conversations": conversations}


# ---------------------------------------------------------------------------------------------------------- writing


@dataclass
class DemoDataset:
    """Paths of a generated demo dataset (all under `root`)."""

    root: str

    @property
    def image_folder(self) -> str:
        return os.path.join(self.root, "images")

    @property
    def pretrain_json(self) -> str:
        return os.path.join(self.root, "pretrain.json")

    @property
    def finetune_json(self) -> str:
        return os.path.join(self.root, "finetune.json")

    @property
    def eval_questions(self) -> str:
        return os.path.join(self.root, "eval_questions.jsonl")

    @property
    def eval_questions_blank(self) -> str:
        return os.path.join(self.root, "eval_questions_blank.jsonl")

    @property
    def eval_questions_text(self) -> str:
        return os.path.join(self.root, "eval_questions_text.jsonl")

    @property
    def eval_answers(self) -> str:
        return os.path.join(self.root, "eval_answers.jsonl")

    @property
    def scenes(self) -> str:
        return os.path.join(self.root, "scenes.jsonl")

    @property
    def text_corpus(self) -> str:
        return os.path.join(self.root, "text_corpus.txt")

    @property
    def manifest(self) -> str:
        return os.path.join(self.root, "manifest.json")


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _eval_items(per_category: int, rng: random.Random) -> Iterator[tuple[str, str, Scene | None, str]]:
    """(category, answer, scene or None, question) with every answer of a category equally often."""
    for category, answers in CATEGORIES.items():
        for i in range(per_category):
            answer = answers[i % len(answers)]
            scene = scene_for_answer(category, answer, rng)
            yield category, answer, scene, question_text(category, scene, rng)
    for i in range(max(len(TEXT_FACTS), per_category // 4)):
        question, answer = TEXT_FACTS[i % len(TEXT_FACTS)]
        yield TEXT_CATEGORY, answer, None, f"{question}\n{SHORT_ANSWER}"


def generate(
    out_dir: str = "playground/data/demo",
    train_images: int = 3000,
    eval_per_category: int = 80,
    text_records: int | None = None,
    seed: int = 0,
    image_side: int = 192,
    progress: bool = True,
    mix: str = "demo",
) -> DemoDataset:
    """Write the whole dataset to `out_dir` (replacing an earlier one there); returns its paths.

    `mix` shapes the stage-2 records: "demo" (every record asks what its image allows, 3-6 turns; what the demo
    trains on) or "llava665k" (record kinds and lengths varying as in llava_v1_5_mix665k, see `mixed_record`, with
    text-only records of up to 12 facts; what the training benchmark uses)."""
    from tqdm import tqdm

    if train_images < 1 or eval_per_category < 1:
        raise ValueError(
            f"`train_images`={train_images} and `eval_per_category`={eval_per_category} must both be at least 1."
        )
    if mix not in MIXES:
        raise ValueError(f"Unknown stage-2 mix `{mix}`; valid: {', '.join(MIXES)}.")
    ds = DemoDataset(out_dir)
    for sub in ("train", "eval"):
        os.makedirs(os.path.join(ds.image_folder, sub), exist_ok=True)
    rng = random.Random(seed)
    text_records = train_images // 10 if text_records is None else text_records

    pretrain, finetune, scenes = [], [], []
    for i in tqdm(range(train_images), desc="[data] train images", disable=not progress, mininterval=1):
        scene = random_scene(rng)
        rel = f"train/{i:06d}.png"
        render(scene, rng, image_side).save(os.path.join(ds.image_folder, rel))
        pretrain.append(pretrain_record(i, rel, scene, rng))
        make = finetune_record if mix == "demo" else mixed_record
        finetune.append(make(i, rel, scene, rng))
        scenes.append({"image": rel, **scene.to_json()})
    finetune += [text_record(i, rng, 3 if mix == "demo" else 12) for i in range(text_records)]
    rng.shuffle(finetune)
    _write_json(ds.pretrain_json, pretrain)
    _write_json(ds.finetune_json, finetune)

    blank_image(image_side).save(os.path.join(ds.image_folder, "blank.png"))
    questions, blank_questions, text_questions, answers = [], [], [], []
    items = list(_eval_items(eval_per_category, rng))
    for qid, (category, answer, scene, text) in enumerate(
        tqdm(items, desc="[data] held-out questions", disable=not progress, mininterval=1)
    ):
        row = {"question_id": qid, "text": text, "category": category}
        if scene is None:
            text_questions.append(row)  # no image: the record has no `image` key, as in a text-only dataset
        else:
            rel = f"eval/{qid:06d}.png"
            render(scene, rng, image_side).save(os.path.join(ds.image_folder, rel))
            scenes.append({"image": rel, **scene.to_json()})
            questions.append({**row, "image": rel})
            blank_questions.append({**row, "image": "blank.png"})
        answers.append({"question_id": qid, "answer": answer, "category": category})
    _write_jsonl(ds.eval_questions, questions)
    _write_jsonl(ds.eval_questions_blank, blank_questions)
    _write_jsonl(ds.eval_questions_text, text_questions)
    _write_jsonl(ds.eval_answers, answers)
    _write_jsonl(ds.scenes, scenes)

    with open(ds.text_corpus, "w") as f:
        f.write("\n".join(corpus_lines(pretrain, finetune)) + "\n")
    _write_json(
        ds.manifest,
        {
            "seed": seed,
            "train_images": train_images,
            "text_records": text_records,
            "mix": mix,
            "eval_per_category": eval_per_category,
            "image_side": image_side,
            "categories": {k: list(v) for k, v in CATEGORIES.items()},
        },
    )
    return ds


def corpus_lines(*record_lists: list[dict]) -> list[str]:
    """Every message text of the records, image markers removed: the demo's language corpus."""
    lines = []
    for records in record_lists:
        for record in records:
            for message in record["conversations"]:
                text = message["value"].replace("<image>", "").strip()
                lines += [line for line in text.split("\n") if line]
    return lines


def read_scenes(path: str, split: str = "train") -> list[tuple[str, Scene]]:
    """(image path relative to the image folder, Scene) of one split (`train` or `eval`) from `scenes.jsonl`."""
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["image"].startswith(split + "/"):
                out.append((row["image"], Scene(row["shape"], row["color"], row["size"], tuple(row["cells"]))))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="playground/data/demo")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--eval-per-category", type=int, default=80)
    parser.add_argument("--text-records", type=int, default=None)
    parser.add_argument("--image-side", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default="demo", choices=MIXES, help="shape of the stage-2 records (see `generate`)")
    args = parser.parse_args(argv)
    ds = generate(
        args.out, args.train_images, args.eval_per_category, args.text_records, args.seed, args.image_side, mix=args.mix
    )
    print(f"[data] wrote {ds.root}")


if __name__ == "__main__":
    main()
