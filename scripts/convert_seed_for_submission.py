"""Score SEED-Bench answers per question type and write the leaderboard upload file.

    python scripts/convert_seed_for_submission.py --annotation-file playground/data/eval/seed_bench/SEED-Bench.json \
        --result-file playground/data/eval/seed_bench/answers/llava-v1.5-13b/merge.jsonl \
        --result-upload-file playground/data/eval/seed_bench/answers_upload/llava-v1.5-13b.jsonl

An answer is right when its text is exactly the option letter of the annotation. Prints the accuracy of each
question type, overall, and for image and video questions; the upload file has `{"question_id", "prediction"}`.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.runner import read_jsonl


def accuracy(data: dict, results: dict, data_type: str | None = None, verbose: bool = True) -> float | None:
    """Percent correct over the annotation's questions (of `data_type` only, when given); unanswered count wrong."""
    names = {type_id: name for name, type_id in data["question_type"].items()}
    counts: dict = {}
    correct: dict = {}
    for q in data["questions"]:
        if data_type is not None and q.get("data_type") != data_type:
            continue
        t = q["question_type_id"]
        counts[t] = counts.get(t, 0) + 1
        row = results.get(str(q["question_id"]))
        correct[t] = correct.get(t, 0) + int(row is not None and row["text"] == q["answer"])
    if not counts:
        return None
    if verbose and data_type is None:
        for t in sorted(counts):
            print(f"{names.get(t, t)}: {correct[t] / counts[t] * 100:.2f}%")
    total = sum(correct.values()) / sum(counts.values()) * 100
    print(f"Total accuracy: {total:.2f}%" if data_type is None else f"{data_type} accuracy: {total:.2f}%")
    return total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SEED-Bench scores and upload file from LLaVA answers.")
    parser.add_argument("--annotation-file", type=str, required=True, help="SEED-Bench.json")
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--result-upload-file", type=str, required=True)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with open(args.annotation_file, encoding="utf-8") as f:
        data = json.load(f)
    results = {str(r["question_id"]): r for r in read_jsonl(args.result_file)}
    scores = {"all": accuracy(data, results)}
    for data_type in ("image", "video"):
        scores[data_type] = accuracy(data, results, data_type)
    missing = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.result_upload_file)), exist_ok=True)
    with open(args.result_upload_file, "w", encoding="utf-8") as f:
        for q in data["questions"]:
            row = results.get(str(q["question_id"]))
            if row is None:
                missing += 1
                continue
            f.write(json.dumps({"question_id": q["question_id"], "prediction": row["text"]}) + "\n")
    if missing:
        print(f"warning: {missing} question(s) have no answer and are not in {args.result_upload_file}")
    return scores


if __name__ == "__main__":
    main()
