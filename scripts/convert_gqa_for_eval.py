"""Convert GQA answers (model_vqa_loader output) into the predictions file GQA's official eval.py reads.

    python scripts/convert_gqa_for_eval.py --src answers/merge.jsonl \
        --dst playground/data/eval/gqa/data/testdev_balanced_predictions.json
    cd playground/data/eval/gqa/data && python eval/eval.py --tier testdev_balanced

Each prediction is the answer lower-cased with trailing periods removed: `[{"questionId", "prediction"}]`.
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.runner import read_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA answers -> GQA predictions.")
    parser.add_argument("--src", type=str, required=True, help="answers JSONL")
    parser.add_argument("--dst", type=str, required=True, help="predictions JSON for GQA's eval.py")
    return parser


def convert(answers: list[dict]) -> list[dict]:
    return [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers]


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    predictions = convert(read_jsonl(args.src))
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    with open(args.dst, "w", encoding="utf-8") as f:
        json.dump(predictions, f)
    print(f"{len(predictions)} predictions -> {args.dst}")
    return predictions


if __name__ == "__main__":
    main()
