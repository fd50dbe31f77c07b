"""GPT-assisted review of two answer files on text-only questions (no context).

    OPENAI_API_KEY=... python llava/eval/eval_gpt_review.py --question questions.jsonl \
        --answer-list ref_answers.jsonl our_answers.jsonl --rule llava/eval/table/rule.json --output review.jsonl

A question's `category` picks its rule when rule.json has one (coding, math, ...), else `default`; the review
records the question's own category either way, and the judge defaults to `gpt-4`, as in the original script.
"""

from __future__ import annotations

import argparse

from llava.eval.judge import add_judge_args, build_jobs, judge_from_args, load_rules, run_reviews


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT-assisted review of text-only answers.")
    add_judge_args(parser, context=False, judge_model="gpt-4")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    rules = load_rules(args.rule)

    def pick_rule(question: dict) -> str:
        category = question.get("category")
        return category if category in rules else "default"

    def category_of(question: dict) -> str:
        if "category" not in question:
            raise ValueError(f"Question {question.get('question_id')!r} in `{args.question}` has no `category`.")
        return question["category"]

    jobs = build_jobs(args, rules, pick_rule, lambda q: "", category_of)
    return run_reviews(jobs, judge_from_args(args), args.output, args.parallel, args.overwrite, args.lenient_scores)


if __name__ == "__main__":
    main()
