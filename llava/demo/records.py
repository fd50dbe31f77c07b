"""The demo's training records in LLaVA's data formats, built from scenes.

Stage-1 captions in the LCS-558K layout; stage-2 conversations in the llava_v1_5_mix665k layout (the demo mix, and a
mix665k-like one for the training benchmark); text-only records standing in for ShareGPT.
"""

from __future__ import annotations

import random

from llava.demo.scenes import (
    _QUESTIONS,
    POSITION_CATEGORIES,
    SHORT_ANSWER,
    TEXT_FACTS,
    Scene,
    applicable_categories,
    question_text,
    sentence_answer,
)

MIXES = ("demo", "llava665k")
# Share of stage-2 image questions asked plainly and answered with a sentence (what a web-UI user types).
PLAIN_QUESTION_SHARE = 0.3
_DESCRIBE = ("Describe the image briefly.", "What is in the picture?")
_PRETRAIN_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Give a short caption for the picture.",
    "Summarize the visual content of the image.",
)


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
    """A stage-2 record: every question the image allows (shuffled), sometimes a description.

    Colour, shape, size and count are asked once. Column and row apply to lone objects only (half the scenes), so
    they are asked twice (each time in a phrasing drawn at random): every category then gets about as many answers
    per epoch."""
    categories = applicable_categories(scene)
    categories += [c for c in categories if c in POSITION_CATEGORIES]
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


def corpus_lines(*record_lists: list[dict]) -> list[str]:
    """Every message text of the records, image markers removed: the demo's language corpus."""
    lines = []
    for records in record_lists:
        for record in records:
            for message in record["conversations"]:
                text = message["value"].replace("<image>", "").strip()
                lines += [line for line in text.split("\n") if line]
    return lines
