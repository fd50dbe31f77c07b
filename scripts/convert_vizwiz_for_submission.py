"""Convert VizWiz answers into the EvalAI submission file (answers normalised the way the server does).

    python scripts/convert_vizwiz_for_submission.py --annotation-file playground/data/eval/vizwiz/llava_test.jsonl \
        --result-file playground/data/eval/vizwiz/answers/llava-v1.5-13b.jsonl \
        --result-upload-file playground/data/eval/vizwiz/answers_upload/llava-v1.5-13b.json

Every question of the annotation (question) file must have an answer; the output is `[{"image", "answer"}]`.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.m4c_evaluator import EvalAIAnswerProcessor
from llava.eval.runner import read_answer_texts, read_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA answers -> VizWiz EvalAI submission.")
    parser.add_argument("--annotation-file", type=str, required=True, help="the question file (llava_test.jsonl)")
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--result-upload-file", type=str, required=True)
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    results, error_lines = read_answer_texts(args.result_file)
    test_split = read_jsonl(args.annotation_file)
    print(f"total results: {len(results)}, total split: {len(test_split)}, error_line: {error_lines}")
    missing = [q["question_id"] for q in test_split if q["question_id"] not in results]
    if missing:
        raise SystemExit(
            f"`{args.result_file}` has no answer for {len(missing)} question(s), e.g. {missing[:5]}; VizWiz needs all. "
            "Re-run the generation (it resumes) and merge every chunk."
        )
    processor = EvalAIAnswerProcessor()
    submission = [{"image": q["image"], "answer": processor(results[q["question_id"]])} for q in test_split]
    os.makedirs(os.path.dirname(os.path.abspath(args.result_upload_file)), exist_ok=True)
    with open(args.result_upload_file, "w", encoding="utf-8") as f:
        json.dump(submission, f)
    print(f"-> {args.result_upload_file}")
    return submission


if __name__ == "__main__":
    main()
