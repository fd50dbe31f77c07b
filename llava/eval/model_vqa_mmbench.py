"""Answer MMBench / MMBench-CN from its TSV (base64 images), then convert with scripts/convert_mmbench_for_submission.py.

    python -m llava.eval.model_vqa_mmbench --model-path liuhaotian/llava-v1.5-13b \
        --question-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \
        --answers-file playground/data/eval/mmbench/answers/mmbench_dev_20230712/llava-v1.5-13b.jsonl \
        --single-pred-prompt --temperature 0 --conv-mode vicuna_v1          # MMBench-CN: add --lang cn

TSV columns: index, question, hint, A, B, C, D, (answer,) image (base64; or the index of a row holding the same
image), ... `--all-rounds` asks each question once per option, rotating the options (A..D stay in place, the texts
move); each answer records `round_id`, the `options` as shown and `option_char`, the original letter of each.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

from llava.eval.runner import (
    Request,
    add_io_args,
    add_model_args,
    add_prompt_args,
    answer_all,
    get_chunk,
    opt,
    question_prompt,
)

ALL_OPTIONS = ["A", "B", "C", "D"]
INSTRUCTIONS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "cn": "请直接回答选项字母。",
}


# The strings pandas' read_table turns into NaN by default (pandas' STR_NA_VALUES). The original read the TSV with
# pandas' defaults, so an option whose text is `NA`, `N/A`, `null`, ... vanished from its prompt; we read every cell
# as text and keep them. `--na-as-missing` restores the original behaviour.
PANDAS_NA_VALUES = frozenset(
    ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"]
)  # fmt: skip


def is_none(value, na_as_missing: bool = False) -> bool:
    """An empty cell: None, NaN, or text the original's `is_none` treats as none ("", "nan", "none", any case).
    With `na_as_missing`, also every string pandas reads as missing by default (as the original's TSV read did)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if na_as_missing and isinstance(value, str) and value in PANDAS_NA_VALUES:
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_tsv(path: str) -> list[dict]:
    """Rows of a TSV as dicts of strings; the `index` column becomes an int when it is one (as pandas gives it)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far longer than csv's default limit
    with open(os.path.expanduser(path), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        index = row.get("index")
        if isinstance(index, str) and index.strip().lstrip("-").isdigit():
            row["index"] = int(index)
    return rows


def get_options(row: dict, options: list[str], na_as_missing: bool = False) -> list[str]:
    """The option texts of a row, up to the first empty one (`NA`, `N/A`, `null`, ... are text unless
    `na_as_missing`)."""
    parsed = []
    for option in options:
        value = row.get(option)
        if is_none(value, na_as_missing):
            break
        parsed.append(value)
    return parsed


def row_image(row: dict, by_index: dict) -> str:
    """The row's base64 image; newer MMBench TSVs give the index of another row with the same image instead."""
    image = row.get("image")
    if is_none(image):
        raise ValueError(f"MMBench row index={row.get('index')!r} has no image.")
    if len(image) < 64 and image.strip().isdigit() and int(image) in by_index:
        return by_index[int(image)]["image"]
    return image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer MMBench (TSV with base64 images) with a LLaVA model.")
    add_model_args(parser, temperature=0.2, max_new_tokens=1024)  # the original generated up to 1024 tokens here
    add_prompt_args(parser)
    add_io_args(parser)
    parser.add_argument("--single-pred-prompt", action="store_true", help="ask for the option's letter only")
    parser.add_argument("--all-rounds", action="store_true", help="ask once per option, rotating the options")
    parser.add_argument("--lang", type=str, default="en", choices=sorted(INSTRUCTIONS))
    parser.add_argument(
        "--na-as-missing",
        action="store_true",
        help="treat option cells pandas reads as missing (NA, N/A, null, ...) as absent, as the original did",
    )
    return parser


def mmbench_requests(rows: list[dict], all_rows: list[dict], args, engine, conv_mode: str) -> list[Request]:
    by_index = {row["index"]: row for row in all_rows if "index" in row}
    instruction = INSTRUCTIONS[opt(args, "lang", "en")]
    requests = []
    for row in rows:
        options = get_options(row, ALL_OPTIONS, bool(opt(args, "na_as_missing", False)))
        option_char = ALL_OPTIONS[: len(options)]
        rounds = len(options) if opt(args, "all_rounds", False) else 1
        image = row_image(row, by_index)
        for round_idx in range(rounds):
            idx = row["index"]
            question = row["question"]
            if not is_none(row.get("hint"), bool(opt(args, "na_as_missing", False))):
                question = row["hint"] + "\n" + question
            for letter, option in zip(ALL_OPTIONS[: len(options)], options):
                question = question + "\n" + letter + ". " + option
            asked = question + "\n" + instruction if opt(args, "single_pred_prompt", False) else question
            prompt = question_prompt(engine, asked, 1, conv_mode, args)
            head = {"question_id": idx, "round_id": round_idx, "prompt": question}
            extra = {"options": options, "option_char": option_char}
            requests.append(Request((idx, round_idx), head, prompt, [image], base64_images=True, extra=extra))
            options = options[1:] + options[:1]  # the next round shows the options rotated by one
            option_char = option_char[1:] + option_char[:1]
    return requests


def round_key(record: dict):
    return record["question_id"], record.get("round_id", 0)


def eval_model(args, engine=None) -> str:
    all_rows = read_tsv(args.question_file)
    missing = {"index", "question", "image"} - set(all_rows[0] if all_rows else {})
    if missing:
        raise ValueError(f"`{args.question_file}` lacks the MMBench column(s) {sorted(missing)}.")
    rows = get_chunk(all_rows, opt(args, "num_chunks", 1), opt(args, "chunk_idx", 0))
    return answer_all(args, engine, lambda eng, conv: mmbench_requests(rows, all_rows, args, eng, conv), key=round_key)


def main(argv: list[str] | None = None) -> str:
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
