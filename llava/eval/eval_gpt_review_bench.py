"""GPT-assisted review on LLaVA-Bench (In-the-Wild): the judge sees each image's detailed description.

    OPENAI_API_KEY=... python llava/eval/eval_gpt_review_bench.py \
        --question playground/data/eval/llava-bench-in-the-wild/questions.jsonl \
        --context playground/data/eval/llava-bench-in-the-wild/context.jsonl \
        --rule llava/eval/table/rule.json \
        --answer-list playground/data/eval/llava-bench-in-the-wild/answers_gpt4.jsonl \
                      playground/data/eval/llava-bench-in-the-wild/answers/llava-v1.5-13b.jsonl \
        --output playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.5-13b.jsonl

The context file has `{"image", "caption"}` per image (a list of captions is joined one per line); a question's
category X uses the rule `llava_bench_X`.
"""

from __future__ import annotations

import argparse

from llava.eval.judge import add_judge_args, build_jobs, judge_from_args, load_rules, read_records, run_reviews


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT-assisted review on LLaVA-Bench (In-the-Wild).")
    add_judge_args(parser, context=True)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    contexts = {c["image"]: c for c in read_records(args.context)}

    def context_for(question: dict) -> str:
        if question["image"] not in contexts:
            raise ValueError(
                f"Question {question['question_id']}: image `{question['image']}` not in `{args.context}`."
            )
        caption = contexts[question["image"]]["caption"]
        if isinstance(caption, list):  # several captions: one per line, as the original joins them
            caption = "\n".join(caption)
        return f"[Context]\n{caption}\n\n"

    rules = load_rules(args.rule)
    jobs = build_jobs(args, rules, lambda q: "llava_bench_" + q["category"], context_for)
    return run_reviews(jobs, judge_from_args(args), args.output, args.parallel, args.overwrite, args.lenient_scores)


if __name__ == "__main__":
    main()
