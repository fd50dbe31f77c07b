"""Summarise GPT review files: per category, the candidate's score relative to the reference, and both scores.

    python llava/eval/summarize_gpt_review.py -f playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.5-13b.jsonl
    python llava/eval/summarize_gpt_review.py            # every review file in the current directory
    python llava/eval/summarize_gpt_review.py -d reviews/ -s 13b

Each line is `category relative score1*10 score2*10`, relative = 100 * mean(score2) / mean(score1), as in the
original. Reviews whose scores could not be parsed ([-1, -1]) are counted and left out of the means; the judge and
rule hash recorded in the reviews are printed, since scores are comparable only under the same judge and rule.

`--keep-failed` gives the original's numbers: the [-1, -1] reviews are averaged in, as the original did, and stdout
holds exactly the original's lines (the judge, rule and count notes go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import numpy as np

INVALID_SCORE = [-1, -1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Summarise GPT-assisted review files.")
    parser.add_argument("-d", "--dir", default=None, help="directory of review files (default: the current one)")
    parser.add_argument("-v", "--version", default=None, help="only files by this judge (e.g. 0314, gpt-4o)")
    parser.add_argument("-s", "--select", nargs="*", default=None, help="only files whose name has all of these")
    parser.add_argument("-f", "--files", nargs="*", default=[], help="review files (default: found in --dir)")
    parser.add_argument("-i", "--ignore", nargs="*", default=[], help="question_ids to leave out")
    parser.add_argument(
        "--keep-failed",
        action="store_true",
        help="average [-1, -1] (unparseable) reviews into the means and print only the original's lines on stdout, "
        "as the original script did",
    )
    return parser


def _looks_like_reviews(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and ("tuple" in record or "score" in record)


def find_review_files(directory: str | None) -> list[str]:
    """Review files in `directory` (default "."): named like the original's, or any JSON(L) with "review" in it."""
    directory = directory or "."
    found = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".jsonl", ".json")):
            continue
        named = name.startswith(("gpt4_text", "reviews_", "review_")) or "review" in name or "review" in directory
        path = os.path.join(directory, name)
        if named and _looks_like_reviews(path):
            found.append(path)
    return found


def _ignored(question_id, ignore: list) -> bool:
    return any(str(question_id) == str(x) for x in ignore)


def summarize_file(path: str, ignore: list | None = None, keep_failed: bool = False) -> dict:
    """{"scores": {category: [relative, score1*10, score2*10] or None}, "invalid": [question_id, ...],
    "judges": {judge model, ...}, "rules": {category: {rule hash, ...}}}.

    `keep_failed`: [-1, -1] reviews are still listed in "invalid" but averaged in, as the original did."""
    ignore = ignore or []
    scores: dict[str, list] = defaultdict(list)
    categories: set = set()
    invalid: list = []
    judges: set = set()
    rules: dict[str, set] = defaultdict(set)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                review = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"`{path}` line {number} is not valid JSON ({err}).") from err
            if _ignored(review.get("question_id"), ignore):
                continue
            if review.get("judge_model"):
                judges.add(review["judge_model"])
            if review.get("rule_sha256"):
                rules[review.get("category", "all")].add(review["rule_sha256"])
            pair = review["tuple"] if "tuple" in review else review["score"]
            if "category" in review:
                categories.add(review["category"])
            if list(pair) == INVALID_SCORE:
                invalid.append(review.get("question_id"))
                if not keep_failed:
                    continue
            if "category" in review:
                scores[review["category"]].append(pair)
            scores["all"].append(pair)
    out = {}
    for category in sorted(set(scores) | categories | {"all"}):
        if not scores.get(category):
            out[category] = None
            continue
        stats = [round(x, 3) for x in np.asarray(scores[category], dtype=float).mean(0).tolist()]
        relative = round(stats[1] / stats[0] * 100, 1) if stats[0] else float("nan")
        out[category] = [relative, round(stats[0] * 10, 1), round(stats[1] * 10, 1)]
    return {"scores": out, "invalid": invalid, "judges": judges, "rules": dict(rules)}


def _judge_version(path: str, judges: set) -> set[str]:
    return judges or {"0613" if "0613" in os.path.basename(path) else "0314"}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = build_parser().parse_args(argv)
    files = args.files or find_review_files(args.dir)
    if not files:
        raise SystemExit(f"No review files in `{args.dir or '.'}`; pass them with -f.")
    results = {}
    for path in sorted(files):
        config = os.path.basename(path).replace("gpt4_text_", "")
        config = config.removesuffix(".jsonl").removesuffix(".json")
        if args.select is not None and any(x not in config for x in args.select):
            continue
        summary = summarize_file(path, args.ignore, args.keep_failed)
        if args.version is not None and not any(args.version in v for v in _judge_version(path, summary["judges"])):
            continue
        notes = sys.stderr if args.keep_failed else sys.stdout  # --keep-failed: stdout as the original's
        print(config)
        if summary["judges"] or summary["rules"]:
            rules = ", ".join(f"{c}={'/'.join(sorted(h))}" for c, h in sorted(summary["rules"].items()))
            mixed = len(summary["judges"]) > 1 or any(len(h) > 1 for h in summary["rules"].values())
            warning = "  -- MIXED judges or rules: these scores are not comparable" if mixed else ""
            note = f"judge: {', '.join(sorted(summary['judges'])) or 'unknown'}; rule sha256: {rules}{warning}"
            print(note if notes is sys.stdout else f"{config}: {note}", file=notes)
        for category, stats in summary["scores"].items():
            if stats:
                print(category, *stats)
            else:
                print(category, "(no parseable reviews)")
        if summary["invalid"]:
            ids = ", ".join(str(q) for q in summary["invalid"][:10])
            fate = "averaged in (--keep-failed)" if args.keep_failed else "left out"
            note = f"unparseable: {len(summary['invalid'])} review(s) scored [-1, -1], {fate} (question_id {ids})"
            print(note if notes is sys.stdout else f"{config}: {note}", file=notes)
        print("=================================")
        results[path] = summary
    return results


if __name__ == "__main__":
    main()
