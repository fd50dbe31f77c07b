"""Score ScienceQA answers (model_vqa_science output) against ScienceQA's problems.json.

    python llava/eval/eval_science_qa.py --base-dir playground/data/eval/scienceqa \
        --result-file playground/data/eval/scienceqa/answers/llava-v1.5-13b.jsonl \
        --output-file playground/data/eval/scienceqa/answers/llava-v1.5-13b_output.jsonl \
        --output-result playground/data/eval/scienceqa/answers/llava-v1.5-13b_result.json

`--base-dir` holds problems.json and pid_splits.json. The predicted letter is the whole answer when it is one
("B"), its first character when it starts "B. ...", or the X of a single "The answer is X." in it; anything else
counts as wrong (FAILED). A problem with no answer counts as wrong too.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from llava.eval.runner import read_jsonl

OPTIONS = ["A", "B", "C", "D", "E"]
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_answer(pred_text: str, options: list[str] = OPTIONS) -> str:
    """The option letter in a model's answer, or "FAILED"."""
    if pred_text in options:
        return pred_text
    if len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        return pred_text[0]
    found = _ANSWER_IS.findall(pred_text)
    return found[0] if len(found) == 1 else "FAILED"


def get_pred_idx(prediction: str, choices: list, options: list[str] = OPTIONS) -> int:
    """The choice index of a predicted letter; -1 when it is not one of this problem's choices."""
    if prediction in options[: len(choices)]:
        return options.index(prediction)
    return -1


def score(problems: dict, split_ids: list[str], predictions: dict, options: list[str] = OPTIONS) -> tuple[dict, dict]:
    """(results {"correct": [...], "incorrect": [...]}, summary {"acc", "correct", "count", "results", "outputs"})."""
    results: dict = {"correct": [], "incorrect": []}
    summary: dict = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for prob_id in split_ids:
        prob = problems[prob_id]
        pred = predictions.get(prob_id, {"text": "FAILED", "prompt": "Unknown"})
        pred_text = pred["text"]
        answer = parse_answer(pred_text, options)
        pred_idx = get_pred_idx(answer, prob["choices"], options)
        analysis = {
            "question_id": prob_id,
            "parsed_ans": answer,
            "ground_truth": options[prob["answer"]],
            "question": pred["prompt"],
            "pred": pred_text,
            "is_multimodal": "<image>" in pred["prompt"],
        }
        summary["results"][prob_id] = pred_idx
        summary["outputs"][prob_id] = pred_text
        results["correct" if pred_idx == prob["answer"] else "incorrect"].append(analysis)
    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    summary.update(acc=correct / total * 100 if total else 0.0, correct=correct, count=total)
    return results, summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="ScienceQA accuracy of a LLaVA answers file.")
    parser.add_argument("--base-dir", type=str, required=True, help="directory with problems.json, pid_splits.json")
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--output-file", type=str, default=None, help="per-problem analysis (JSON)")
    parser.add_argument("--output-result", type=str, default=None, help="accuracy and parsed answers (JSON)")
    parser.add_argument("--split", type=str, default="test")
    parser.add_argument("--options", type=str, nargs="+", default=OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    base = os.path.expanduser(args.base_dir)
    with open(os.path.join(base, "pid_splits.json"), encoding="utf-8") as f:
        splits = json.load(f)
    if args.split not in splits:
        raise SystemExit(f"Split `{args.split}` is not in pid_splits.json; it has {sorted(splits)}.")
    with open(os.path.join(base, "problems.json"), encoding="utf-8") as f:
        problems = json.load(f)
    predictions = {str(p["question_id"]): p for p in read_jsonl(args.result_file)}
    results, summary = score(problems, splits[args.split], predictions, args.options)

    multimodal_correct = sum(1 for x in results["correct"] if x["is_multimodal"])
    multimodal_total = multimodal_correct + sum(1 for x in results["incorrect"] if x["is_multimodal"])
    img_acc = multimodal_correct / multimodal_total * 100 if multimodal_total else 0.0
    print(
        f"Total: {summary['count']}, Correct: {summary['correct']}, Accuracy: {summary['acc']:.2f}%, "
        f"IMG-Accuracy: {img_acc:.2f}%"
    )
    # --output-result keeps the original's layout ({acc, correct, count, results, outputs}); the image-question
    # accuracy is on stdout and in the returned dict only.
    for path, data in ((args.output_file, results), (args.output_result, summary)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
    return {**summary, "img_acc": img_acc}


if __name__ == "__main__":
    main()
