"""Question and answer files of the eval scripts: JSON-lines reading with line numbers, question lists, chunks.

`get_chunk` cuts a question list as the original scripts cut it (`--num-chunks/--chunk-idx`): consecutive parts
of ceil(len/n) questions, so `cat`-merged chunk answer files are in question order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; a bad line is reported with its number."""
    path = os.path.expanduser(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"`{path}` line {number} is not valid JSON ({err}).") from err
    return records


def read_answer_texts(path: str) -> tuple[dict, int]:
    """{question_id: text} and the number of lines that were not valid JSON (counted, as the original did)."""
    answers, errors = {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                errors += 1
                continue
            answers[record["question_id"]] = record["text"]
    return answers, errors


def read_questions(path: str) -> list[dict]:
    """Questions from a JSON list (ScienceQA's `llava_test_CQM-A.json`) or a JSON-lines file."""
    expanded = os.path.expanduser(path)
    with open(expanded, encoding="utf-8") as f:
        head = f.read(64).lstrip()
    if head.startswith("["):
        with open(expanded, encoding="utf-8") as f:
            return json.load(f)
    return read_jsonl(expanded)


def split_list(items: Sequence, n: int) -> list[Sequence]:
    """`items` cut into consecutive parts of ceil(len/n) items, as the original scripts cut them."""
    if not items:
        return []
    size = math.ceil(len(items) / n)
    return [items[i : i + size] for i in range(0, len(items), size)]


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> Sequence:
    """Part `chunk_idx` of `num_chunks`; concatenating parts 0..n-1 gives `items` back in order."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(
            f"`--chunk-idx`={chunk_idx} with `--num-chunks`={num_chunks}: need num_chunks >= 1 and "
            "0 <= chunk_idx < num_chunks."
        )
    chunks = split_list(items, num_chunks)
    return chunks[chunk_idx] if chunk_idx < len(chunks) else items[:0]
