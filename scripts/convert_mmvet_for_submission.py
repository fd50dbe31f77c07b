"""Convert MM-Vet answers into the JSON the MM-Vet grader takes: `{"v1_<question_id>": answer}`.

    python scripts/convert_mmvet_for_submission.py --src playground/data/eval/mm-vet/answers/llava-v1.5-13b.jsonl \
        --dst playground/data/eval/mm-vet/results/llava-v1.5-13b.json
"""

from __future__ import annotations

import argparse
import json
import os

from llava.eval.runner import read_jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA answers -> MM-Vet results JSON.")
    parser.add_argument("--src", type=str, required=True)
    parser.add_argument("--dst", type=str, required=True)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results = {f"v1_{a['question_id']}": a["text"] for a in read_jsonl(args.src)}
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    with open(args.dst, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"{len(results)} answers -> {args.dst}")
    return results


if __name__ == "__main__":
    main()
