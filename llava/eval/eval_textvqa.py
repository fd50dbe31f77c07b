"""Score TextVQA answers (model_vqa_loader output) against TextVQA_0.5.1_val.json with the VQA soft accuracy.

    python -m llava.eval.eval_textvqa --annotation-file playground/data/eval/textvqa/TextVQA_0.5.1_val.json \
        --result-file playground/data/eval/textvqa/answers/llava-v1.5-13b.jsonl

Answers are matched to annotations by (image_id, question): the answer's `question_id` is the image id and the
question is read back from its `prompt` (the LLaVA question files add OCR tokens and an instruction around it).
`--result-dir` scores every .jsonl in a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator
from llava.eval.runner import read_jsonl

_OCR_PREFIX = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def prompt_processor(prompt: str) -> str:
    """The bare question inside a TextVQA prompt, lower-cased, for the forms the LLaVA question files use."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_PREFIX.search(prompt)
        if match is None:
            raise ValueError(f"TextVQA prompt `{prompt[:120]}` starts with `OCR tokens:` but has no `Question: ...`.")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(
            f"Cannot find the question in TextVQA prompt `{prompt[:120]}`; expected `question\\n[Reference OCR "
            "token: ...\\n]instruction` as in llava_textvqa_val_v051_ocr.jsonl."
        )
    return question.lower()


def eval_single(annotation_file: str, result_file: str) -> float:
    """Print and return the accuracy (0..1) of one answers file."""
    experiment = os.path.splitext(os.path.basename(result_file))[0]
    print(experiment)
    with open(os.path.expanduser(annotation_file), encoding="utf-8") as f:
        annotations = json.load(f)["data"]
    by_key = {(a["image_id"], a["question"].lower()): a for a in annotations}
    pred_list = []
    for result in read_jsonl(result_file):
        key = (result["question_id"], prompt_processor(result["prompt"]))
        if key not in by_key:
            raise KeyError(
                f"`{result_file}`: no annotation for image_id={key[0]!r}, question `{key[1]}` in `{annotation_file}`."
            )
        pred_list.append({"pred_answer": result["text"], "gt_answers": by_key[key]["answers"]})
    accuracy = TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    print(f"Samples: {len(pred_list)}\nAccuracy: {100.0 * accuracy:.2f}%\n")
    return accuracy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="TextVQA accuracy of a LLaVA answers file.")
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, default=None)
    parser.add_argument("--result-dir", type=str, default=None)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    if not args.result_file and not args.result_dir:
        raise SystemExit("Pass --result-file, or --result-dir with .jsonl answer files.")
    results = {}
    if args.result_file:
        results[args.result_file] = eval_single(args.annotation_file, args.result_file)
    if args.result_dir:
        for name in sorted(os.listdir(args.result_dir)):
            if not name.endswith(".jsonl"):
                print(f"Skipping {name}")  # as the original does
                continue
            path = os.path.join(args.result_dir, name)
            results[path] = eval_single(args.annotation_file, path)
    return results


if __name__ == "__main__":
    main()
