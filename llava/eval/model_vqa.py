"""Answer a question file one question at a time (LLaVA-Bench, MM-Vet, the GPT-review question sets).

    python -m llava.eval.model_vqa --model-path liuhaotian/llava-v1.5-13b \
        --question-file playground/data/eval/llava-bench-in-the-wild/questions.jsonl \
        --image-folder playground/data/eval/llava-bench-in-the-wild/images \
        --answers-file playground/data/eval/llava-bench-in-the-wild/answers/llava-v1.5-13b.jsonl --temperature 0

Questions are JSON lines `{"question_id", "image", "text", "category"?}` (`image` may be a list, or absent for a
text-only question). On CPU with a tiny checkpoint a handful of questions take seconds; add `--max_new_tokens 8`.
A re-run resumes: question_ids already in the answers file are skipped (`--overwrite` starts afresh).
"""

from __future__ import annotations

import argparse

from llava.eval.runner import (
    Request,
    add_io_args,
    add_model_args,
    add_prompt_args,
    answer_all,
    get_chunk,
    image_paths,
    opt,
    question_prompt,
    read_questions,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer a question file with a LLaVA model (one at a time).")
    add_model_args(parser, temperature=0.2, max_new_tokens=1024)
    add_prompt_args(parser)
    add_io_args(parser)
    return parser


def question_requests(questions: list[dict], args, engine, conv_mode: str, source: str) -> list[Request]:
    """One request per question: `text` in the chat template with one `<image>` per image (prepended if absent)."""
    requests = []
    for number, q in enumerate(questions, 1):
        missing = [k for k in ("question_id", "text") if k not in q]
        if missing:
            raise ValueError(f"`{source}` question {number} lacks {missing}; each question needs question_id, text.")
        paths = image_paths(opt(args, "image_folder", ""), q.get("image"))
        prompt = question_prompt(engine, q["text"], len(paths), conv_mode, args)
        head = {"question_id": q["question_id"], "prompt": q["text"]}
        requests.append(Request(q["question_id"], head, prompt, paths))
    return requests


def eval_model(args, engine=None) -> str:
    """Answer `args.question_file` into `args.answers_file`; pass a loaded `engine` to reuse it. Returns the path."""
    questions = read_questions(args.question_file)  # before loading the model: a bad path fails at once
    questions = get_chunk(questions, opt(args, "num_chunks", 1), opt(args, "chunk_idx", 0))
    return answer_all(args, engine, lambda eng, conv: question_requests(questions, args, eng, conv, args.question_file))


def main(argv: list[str] | None = None) -> str:
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
