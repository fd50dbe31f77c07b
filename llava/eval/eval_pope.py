"""Score POPE answers (model_vqa_loader output): accuracy, precision, recall, F1 and yes-ratio per category.

    python llava/eval/eval_pope.py --annotation-dir playground/data/eval/pope/coco \
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \
        --result-file playground/data/eval/pope/answers/llava-v1.5-13b.jsonl

`--annotation-dir` holds coco_pope_{adversarial,popular,random}.json (JSON lines with `label` yes/no); the question
file gives each question its `category`. Within a category the labels follow the question file's order, so answers
are put in question-file order (whatever order the answers file has) and checked against the label's image.
An answer is "no" when its first sentence has the word No, no or not; otherwise "yes".
"""

from __future__ import annotations

import argparse
import os

from llava.eval.runner import read_jsonl


def yes_no(text: str) -> str:
    """The original rule: first sentence, commas removed, "no" if it has the word No/no/not, else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    """Confusion counts and scores with "yes" as the positive class."""
    if len(preds) != len(labels) or not preds:
        raise ValueError(f"POPE: {len(preds)} predictions for {len(labels)} labels.")
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g != "no" for p, g in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "TP": tp,
        "FP": fp,
        "TN": tn,
        "FN": fn,
        "accuracy": (tp + tn) / len(preds),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": preds.count("yes") / len(preds),
    }


def eval_pope(answers: list[dict], label_file: str) -> dict:
    """Metrics of `answers` (in label order) against one coco_pope_*.json; prints them as the original did."""
    labels = read_jsonl(label_file)
    if len(labels) != len(answers):
        raise ValueError(
            f"`{label_file}` has {len(labels)} labels but {len(answers)} answers are in its category; "
            "is the answers file complete (merged from every chunk)?"
        )
    preds = [yes_no(a["text"]) for a in answers]
    gold = ["no" if label["label"] == "no" else "yes" for label in labels]
    m = pope_metrics(preds, gold)
    print("TP\tFP\tTN\tFN\t")
    print(f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}")
    print(f"Accuracy: {m['accuracy']}")
    print(f"Precision: {m['precision']}")
    print(f"Recall: {m['recall']}")
    print(f"F1 score: {m['f1']}")
    print(f"Yes ratio: {m['yes_ratio']}")
    print(", ".join(f"{m[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")))
    return m


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="POPE scores of a LLaVA answers file.")
    parser.add_argument("--annotation-dir", type=str, required=True, help="directory with coco_pope_<category>.json")
    parser.add_argument("--question-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = build_parser().parse_args(argv)
    questions = read_jsonl(args.question_file)
    answers = {a["question_id"]: a for a in read_jsonl(args.result_file)}
    out = {}
    for name in sorted(os.listdir(args.annotation_dir)):
        if not (name.startswith("coco_pope_") and name.endswith(".json")):
            continue
        category = name[len("coco_pope_") : -len(".json")]
        label_file = os.path.join(args.annotation_dir, name)
        in_category = [q for q in questions if q.get("category") == category]
        missing = [q["question_id"] for q in in_category if q["question_id"] not in answers]
        if missing:
            raise ValueError(
                f"`{args.result_file}` has no answer for {len(missing)} {category} question(s): {missing[:5]}."
            )
        labels = read_jsonl(label_file)
        for q, label in zip(in_category, labels):
            if "image" in label and "image" in q and os.path.basename(q["image"]) != os.path.basename(label["image"]):
                raise ValueError(
                    f"Question {q['question_id']} ({q['image']}) does not line up with `{label_file}` "
                    f"question {label.get('question_id')} ({label['image']}): the question file and labels differ."
                )
        cur_answers = [answers[q["question_id"]] for q in in_category]
        print(f"Category: {category}, # samples: {len(cur_answers)}")
        out[category] = eval_pope(cur_answers, label_file)
        print("====================================")
    if not out:
        raise SystemExit(f"No coco_pope_<category>.json files in `{args.annotation_dir}`.")
    return out


if __name__ == "__main__":
    main()
