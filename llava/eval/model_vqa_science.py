"""Answer ScienceQA in LLaVA format (`scripts/convert_sqa_to_llava.py` output), then score with eval_science_qa.

    python -m llava.eval.model_vqa_science --model-path liuhaotian/llava-v1.5-13b \
        --question-file playground/data/eval/scienceqa/llava_test_CQM-A.json \
        --image-folder playground/data/eval/scienceqa/images/test \
        --answers-file playground/data/eval/scienceqa/answers/llava-v1.5-13b.jsonl \
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1

Questions are LLaVA records `{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}` (a JSON list or
JSON lines); the first human turn is asked. The answer's `prompt` starts with `<image>\\n` for questions with an
image, which eval_science_qa uses to report image-question accuracy.
"""

from __future__ import annotations

import argparse

from llava.constants import DEFAULT_IMAGE_TOKEN
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

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer ScienceQA (LLaVA format) with a LLaVA model.")
    add_model_args(parser, temperature=0.2, max_new_tokens=1024)
    add_prompt_args(parser)
    add_io_args(parser)
    parser.add_argument(
        "--single-pred-prompt", action="store_true", help=f"append the instruction `{SINGLE_PRED_PROMPT}`"
    )
    parser.add_argument(
        "--answer-prompter",
        action="store_true",
        help="v0 ScienceQA: after the model's reasoning, ask again with `###\\nANSWER:` for the letter",
    )
    return parser


def prompt_for_answer(engine, batch: list[Request], texts: list[str], conv_mode: str) -> list[str]:
    """The v0 two-pass ScienceQA prompting: feed the reasoning back, ask for the answer, and join the two as
    `<reasoning>\n The answer is <answer>` so the scorer finds the letter."""
    from llava.inference import GenerationParams

    prompts = [r.prompt + text + " ###\nANSWER:" for r, text in zip(batch, texts)]
    second = engine.generate(
        prompts, [r.images or [] for r in batch], GenerationParams(temperature=0, max_new_tokens=64), conv_mode
    )
    return [text + "\n The answer is " + answer for text, answer in zip(texts, second)]


def science_requests(questions: list[dict], args, engine, conv_mode: str, source: str) -> list[Request]:
    requests = []
    for number, line in enumerate(questions, 1):
        if "id" not in line or not line.get("conversations"):
            raise ValueError(f"`{source}` record {number} lacks `id` or `conversations` (LLaVA ScienceQA format).")
        question = line["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        paths = image_paths(opt(args, "image_folder", ""), line.get("image"))
        shown = (DEFAULT_IMAGE_TOKEN + "\n") * len(paths) + question
        if opt(args, "single_pred_prompt", False):
            question = question + "\n" + SINGLE_PRED_PROMPT
            shown = shown + "\n" + SINGLE_PRED_PROMPT
        prompt = question_prompt(engine, question, len(paths), conv_mode, args)
        requests.append(Request(line["id"], {"question_id": line["id"], "prompt": shown}, prompt, paths))
    return requests


def eval_model(args, engine=None) -> str:
    questions = read_questions(args.question_file)  # before loading the model: a bad path fails at once
    questions = get_chunk(questions, opt(args, "num_chunks", 1), opt(args, "chunk_idx", 0))
    return answer_all(
        args,
        engine,
        lambda eng, conv: science_requests(questions, args, eng, conv, args.question_file),
        followup=prompt_for_answer if opt(args, "answer_prompter", False) else None,
        default_conv_mode="llava_v0",  # the original model_vqa_science's default, unlike the other scripts
    )


def main(argv: list[str] | None = None) -> str:
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
