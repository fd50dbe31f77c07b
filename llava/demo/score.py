"""Exact-match scoring of model_vqa answer files against the demo's ground truth, with chance level per category."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from llava.demo.data import CATEGORIES, TEXT_CATEGORY

IMAGE_QUESTIONS = "image-dependent"


def normalize(answer: str) -> str:
    """Lower case, no surrounding space or final punctuation, single spaces: `" Top  Left."` -> `"top left"`."""
    answer = re.sub(r"\s+", " ", answer.strip().lower())
    return answer.rstrip(".!?,;:").strip()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class CategoryScore:
    n: int
    correct: int
    chance: float  # expected accuracy of a uniform guess among the category's answers

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def score(answers: Iterable[dict], truth: dict[int, dict]) -> dict[str, CategoryScore]:
    """Per-category scores of model_vqa answers (`{question_id, text}`) plus the pooled image-dependent score.

    Every question in `answers` must be in `truth`; a question with no answer is an error (the eval was cut short).
    """
    answers = list(answers)
    got = {a["question_id"]: a["text"] for a in answers}
    unknown = sorted(set(got) - set(truth))
    if unknown:
        raise ValueError(f"Answers for unknown question ids {unknown[:5]}; is this the right answer file?")
    scores: dict[str, CategoryScore] = {}
    for qid, text in got.items():
        category = truth[qid]["category"]
        choices = CATEGORIES.get(category)
        chance = 1 / len(choices) if choices else float("nan")
        s = scores.setdefault(category, CategoryScore(0, 0, chance))
        s.n += 1
        s.correct += normalize(text) == truth[qid]["answer"]
    image = [s for c, s in scores.items() if c != TEXT_CATEGORY]
    if image:
        n = sum(s.n for s in image)
        scores[IMAGE_QUESTIONS] = CategoryScore(
            n, sum(s.correct for s in image), sum(s.chance * s.n for s in image) / n
        )
    return scores


def format_table(columns: dict[str, dict[str, CategoryScore]]) -> str:
    """An aligned text table: one row per category, one accuracy column per run (e.g. trained, blank), chance."""
    names = list(columns)
    categories = [c for c in (*CATEGORIES, TEXT_CATEGORY, IMAGE_QUESTIONS) if any(c in col for col in columns.values())]
    header = f"{'category':<17}{'n':>5}" + "".join(f"{name:>10}" for name in names) + f"{'chance':>10}"
    lines = [header, "-" * len(header)]
    for category in categories:
        first = next(col[category] for col in columns.values() if category in col)
        cells = "".join(
            f"{100 * columns[name][category].accuracy:>9.1f}%" if category in columns[name] else f"{'-':>10}"
            for name in names
        )
        chance = f"{100 * first.chance:>9.1f}%" if first.chance == first.chance else f"{'-':>10}"
        if category == IMAGE_QUESTIONS:
            lines.append("-" * len(header))
        lines.append(f"{category:<17}{first.n:>5}{cells}{chance}")
    return "\n".join(lines)
