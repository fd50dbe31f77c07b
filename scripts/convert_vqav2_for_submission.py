"""Convert VQAv2 answers into the EvalAI submission file (answers normalised the way the server does).

    python scripts/convert_vqav2_for_submission.py --split llava_vqav2_mscoco_test-dev2015 --ckpt llava-v1.5-13b
        reads  <dir>/answers/<split>/<ckpt>/merge.jsonl
        writes <dir>/answers_upload/<split>/<ckpt>.json   ([{"question_id", "answer"}], every test2015 question)

Questions of the full test2015 list without an answer (test-dev is a subset) get an empty answer, as EvalAI wants
every question present. `--dir` defaults to ./playground/data/eval/vqav2.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.m4c_evaluator import EvalAIAnswerProcessor
from llava.eval.runner import read_answer_texts, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA answers -> VQAv2 EvalAI submission.")
    parser.add_argument("--dir", type=str, default="./playground/data/eval/vqav2")
    parser.add_argument("--ckpt", type=str, required=True)
    parser.add_argument("--split", type=str, required=True)
    parser.add_argument("--test-split", type=str, default="llava_vqav2_mscoco_test2015.jsonl", help="under --dir")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    src = os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl")
    dst = os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")
    results, error_lines = read_answer_texts(src)
    test_split = read_jsonl(os.path.join(args.dir, args.test_split))
    print(f"total results: {len(results)}, total split: {len(test_split)}, error_line: {error_lines}")
    processor = EvalAIAnswerProcessor()
    submission = [
        {
            "question_id": q["question_id"],
            "answer": processor(results[q["question_id"]]) if q["question_id"] in results else "",
        }
        for q in test_split
    ]
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(submission, f)
    print(f"-> {dst}")
    return dst


if __name__ == "__main__":
    main()
