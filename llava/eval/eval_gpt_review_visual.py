"""GPT-assisted review of two answer files on COCO questions, the judge seeing captions and boxes (LLaVA-Bench COCO).

    OPENAI_API_KEY=... python llava/eval/eval_gpt_review_visual.py \
        --question playground/data/coco2014_val_qa_eval/qa90_questions.jsonl \
        --context llava/eval/table/caps_boxes_coco2014_val_80.jsonl \
        --answer-list ref_answers.jsonl our_answers.jsonl \
        --rule llava/eval/table/rule.json --output review.jsonl
    python llava/eval/summarize_gpt_review.py -f review.jsonl

The context file has one record per image: `{"image", "captions": [...], "instances": [{"category", "bbox"}]}`.
A question's `category` (conv, detail, complex) picks its rule. Another judge: `--judge-model` and `--api-base`
(or OPENAI_BASE_URL) for any OpenAI-compatible server. Re-running resumes.
"""

from __future__ import annotations

import argparse

from llava.eval.judge import add_judge_args, build_jobs, judge_from_args, load_rules, read_records, run_reviews


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT-assisted review with COCO captions and boxes as context.")
    add_judge_args(parser, context=True)
    return parser


def coco_context(record: dict) -> str:
    captions = "\n".join(record["captions"])
    boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in record["instances"])
    return f"[Context]\n{captions}\n\n{boxes}\n\n"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    contexts = {c["image"]: c for c in read_records(args.context)}

    def context_for(question: dict) -> str:
        if question["image"] not in contexts:
            raise ValueError(
                f"Question {question['question_id']}: image `{question['image']}` not in `{args.context}`."
            )
        return coco_context(contexts[question["image"]])

    rules = load_rules(args.rule)
    jobs = build_jobs(args, rules, lambda q: q["category"], context_for)
    return run_reviews(jobs, judge_from_args(args), args.output, args.parallel, args.overwrite, args.lenient_scores)


if __name__ == "__main__":
    main()
