"""Score MME answers (model_vqa_loader on llava_mme.jsonl): perception and cognition scores per subtask.

    python -m llava.eval.eval_mme --data-dir playground/data/eval/MME/MME_Benchmark_release_version \
        --result-file playground/data/eval/MME/answers/llava-v1.5-13b.jsonl \
        --results-dir playground/data/eval/MME/eval_tool/answers/llava-v1.5-13b

MME asks two yes/no questions per image. A subtask scores 100 * (accuracy + accuracy+), accuracy+ being the share
of images with both questions right; a reply counts as yes/no when it is one or its first 4 characters hold one,
otherwise it is wrong. Ground truth comes from `<subtask>/questions_answers_YN/*.txt` or `<subtask>/*.txt`
(`question<TAB>answer` lines). `--results-dir` also writes the `<subtask>.txt` files the official eval_tool reads.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict

from llava.eval.runner import read_jsonl

EVAL_TYPES = {
    "Perception": [
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def _question_key(question: str) -> str:
    """A question without the instructions around it, whitespace collapsed (prompts and GT files differ there)."""
    return " ".join(question.replace(_SHORT_ANSWER, " ").replace(_YES_NO, " ").split())


def read_ground_truth(data_dir: str) -> dict[tuple[str, str, str], tuple[str, str]]:
    """{(subtask, image stem, question key): (question as in the GT file, answer)}."""
    gt = {}
    for category in sorted(os.listdir(data_dir)):
        category_dir = os.path.join(data_dir, category)
        if not os.path.isdir(category_dir):
            continue
        qa_dir = os.path.join(category_dir, "questions_answers_YN")
        if not os.path.isdir(qa_dir):
            qa_dir = category_dir
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            with open(os.path.join(qa_dir, name), encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2:
                        raise ValueError(f"`{os.path.join(qa_dir, name)}` line {number}: expected question<TAB>answer.")
                    gt[category, name[: -len(".txt")], _question_key(parts[0])] = (parts[0], parts[1].strip())
    if not gt:
        raise ValueError(f"No MME ground truth under `{data_dir}` (expected <subtask>/...*.txt files).")
    return gt


def parse_pred_ans(pred_ans: str) -> str:
    """yes / no / other, as the official eval_tool reads a reply."""
    pred_ans = pred_ans.lower()
    if pred_ans in ("yes", "no"):
        return pred_ans
    prefix = pred_ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def collect(answers: list[dict], gt: dict) -> dict[str, list[tuple[str, str, str, str]]]:
    """{subtask: [(image file, question, gt answer, prediction)]} for every answer, matched to its ground truth.

    Every ground-truth question must have an answer: a partial answers file is refused."""
    rows = defaultdict(list)
    answered = set()
    for answer in answers:
        qid = str(answer["question_id"])
        category = qid.split("/")[0]
        image = qid.split("/")[-1]
        stem = os.path.splitext(image)[0]
        key = (category, stem, _question_key(answer["prompt"]))
        if key not in gt:
            raise KeyError(f"No MME ground truth for question_id `{qid}` with question `{key[2]}`.")
        question, gt_answer = gt[key]
        rows[category].append((image, question, gt_answer, answer["text"]))
        answered.add(key)
    missing = [key for key in gt if key not in answered]
    if missing:  # scoring a subset would give a score that looks comparable and is not (the POPE scorer refuses too)
        per_task = Counter(category for category, _, _ in missing)
        examples = ", ".join(f"{c}/{stem}: {q!r}" for c, stem, q in missing[:3])
        raise ValueError(
            f"The answers file has no answer for {len(missing)} MME question(s) of the ground truth "
            f"({', '.join(f'{c}: {n}' for c, n in sorted(per_task.items()))}), e.g. {examples}. Answer every "
            "question of llava_mme.jsonl (model_vqa_loader resumes a partial answers file) before scoring."
        )
    return rows


def score_subtask(rows: list[tuple[str, str, str, str]]) -> dict:
    """acc, acc_plus and score (= 100 * (acc + acc_plus)) of one subtask; images are grouped by file name."""
    per_image = defaultdict(list)
    for image, _, gt_answer, pred in rows:
        per_image[image].append(gt_answer.lower() == parse_pred_ans(pred))
    correct = sum(sum(v) for v in per_image.values())
    acc = correct / len(rows)
    acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
    others = sum(parse_pred_ans(pred) == "other" for *_, pred in rows)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "other": others, "n": len(rows)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MME scores of a LLaVA answers file.")
    parser.add_argument("--data-dir", type=str, required=True, help="MME_Benchmark_release_version")
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--results-dir", type=str, default=None, help="also write eval_tool's <subtask>.txt files")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    rows = collect(read_jsonl(args.result_file), read_ground_truth(args.data_dir))
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        for category, items in rows.items():
            with open(os.path.join(args.results_dir, f"{category}.txt"), "w", encoding="utf-8") as f:
                for image, question, gt_answer, pred in items:
                    f.write("\t".join((image, question, gt_answer, pred.replace("\n", " ").replace("\t", " "))) + "\n")
    report: dict = {}
    for eval_type, tasks in EVAL_TYPES.items():
        present = [t for t in tasks if t in rows]
        if not present:
            continue
        scores = {t: score_subtask(rows[t]) for t in present}
        total = sum(s["score"] for s in scores.values())
        print(f"=========== {eval_type} ===========")
        print(f"total score: {total:.2f}\n")
        for task, s in scores.items():
            print(f"\t {task}  score: {s['score']:.2f}")
        print()
        report[eval_type] = {"total": total, "subtasks": scores}
    unknown = sorted(set(rows) - {t for tasks in EVAL_TYPES.values() for t in tasks})
    if unknown:
        print(f"Not an MME subtask, not scored: {unknown}")
    return report


if __name__ == "__main__":
    main()
