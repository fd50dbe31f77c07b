"""Convert MMBench answers into the .xlsx the MMBench evaluation server takes.

    python scripts/convert_mmbench_for_submission.py \
        --annotation-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \
        --result-dir playground/data/eval/mmbench/answers/mmbench_dev_20230712 \
        --upload-dir playground/data/eval/mmbench/answers_upload/mmbench_dev_20230712 --experiment llava-v1.5-13b

Reads `<result-dir>/<experiment>.jsonl`, writes `<upload-dir>/<experiment>.xlsx`: the TSV's rows without the
hint, category, source, image, comment and l2-category columns, with a `prediction` column. With --all-rounds
answers, the first round (options in their original order) is the prediction. Needs no openpyxl.
"""

from __future__ import annotations

import argparse
import os

from llava.eval.mini_xlsx import write_xlsx
from llava.eval.model_vqa_mmbench import is_none, read_tsv
from llava.eval.runner import read_jsonl

DROPPED = ["hint", "category", "source", "image", "comment", "l2-category"]


def _typed_columns(rows: list[dict], columns: list[str], na_as_missing: bool = False) -> dict[str, type]:
    """int / float / str per column, as pandas reads a TSV column (numbers stay numbers in the xlsx; a numeric
    column with an empty cell is float)."""
    types = {}
    for col in columns:
        cells = [r.get(col) for r in rows]
        values = [v for v in cells if not is_none(v, na_as_missing)]
        kind: type = str
        for candidate in (int, float):
            try:
                for v in values:
                    candidate(v)
            except (TypeError, ValueError):
                continue
            kind = float if candidate is int and len(values) < len(cells) else candidate
            break
        types[col] = kind
    return types


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LLaVA MMBench answers -> submission .xlsx.")
    parser.add_argument("--annotation-file", type=str, required=True, help="the MMBench TSV")
    parser.add_argument("--result-dir", type=str, required=True)
    parser.add_argument("--upload-dir", type=str, required=True)
    parser.add_argument("--experiment", type=str, required=True)
    parser.add_argument(
        "--na-as-missing",
        action="store_true",
        help="write cells pandas reads as missing (NA, N/A, null, ...) as empty cells, as the original did",
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    rows = read_tsv(args.annotation_file)
    columns = [c for c in (list(rows[0]) if rows else []) if c not in DROPPED]
    columns.insert(min(6, len(columns)), "prediction")
    predictions = {}
    for answer in read_jsonl(os.path.join(args.result_dir, f"{args.experiment}.jsonl")):
        if answer.get("round_id", 0) == 0:
            predictions[answer["question_id"]] = answer["text"]
    types = _typed_columns(rows, [c for c in columns if c != "prediction"], args.na_as_missing)
    table = []
    for row in rows:
        out = []
        for col in columns:
            if col == "prediction":
                # An empty reply is an empty cell, as the original's pandas/openpyxl wrote it.
                out.append(predictions.get(row["index"]) or None)
            else:
                value = row.get(col)
                out.append(None if is_none(value, args.na_as_missing) else types[col](value))
        table.append(out)
    missing = sum(1 for row in rows if row["index"] not in predictions)
    if missing:
        print(f"warning: {missing} of {len(rows)} questions have no answer (empty prediction).")
    os.makedirs(args.upload_dir, exist_ok=True)
    path = os.path.join(args.upload_dir, f"{args.experiment}.xlsx")
    write_xlsx(path, columns, table)
    print(f"{len(rows) - missing} predictions -> {path}")
    return path


if __name__ == "__main__":
    main()
