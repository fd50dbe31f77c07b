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

# The scene and record vocabulary, re-exported: `llava.demo.data` is where the tests and benchmarks import it from.
from llava.demo.records import (  # noqa: F401
    MIXES,
    PLAIN_QUESTION_SHARE,
    corpus_lines,
    finetune_record,
    mixed_record,
    pretrain_record,
    text_record,
)
from llava.demo.scenes import (  # noqa: F401
    BACKGROUND,
    CATEGORIES,
    COLORS,
    COLUMNS,
    COUNTS,
    POSITION_CATEGORIES,
    POSITIONS,
    ROWS,
    SHAPES,
    SHORT_ANSWER,
    SIZES,
    TEXT_CATEGORY,
    TEXT_FACTS,
    Scene,
    applicable_categories,
    blank_image,
    question_text,
    random_scene,
    render,
    scene_for_answer,
    sentence_answer,
)


class PathUnder:
    """A read-only attribute: a path under the directory held in the instance's attribute `base` (e.g. `root`)."""

    def __init__(self, *parts: str, base: str = "root"):
        self.parts = parts
        self.base = base

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        return os.path.join(getattr(instance, self.base), *self.parts)


@dataclass
class DemoDataset:
    """Paths of a generated demo dataset (all under `root`)."""

    root: str

    image_folder = PathUnder("images")
    pretrain_json = PathUnder("pretrain.json")
    finetune_json = PathUnder("finetune.json")
    eval_questions = PathUnder("eval_questions.jsonl")
    eval_questions_blank = PathUnder("eval_questions_blank.jsonl")
    eval_questions_text = PathUnder("eval_questions_text.jsonl")
    eval_answers = PathUnder("eval_answers.jsonl")
    scenes = PathUnder("scenes.jsonl")
    text_corpus = PathUnder("text_corpus.txt")
    manifest = PathUnder("manifest.json")


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
