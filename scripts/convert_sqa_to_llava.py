"""Convert ScienceQA (problems.json + pid_splits.json) into LLaVA conversations: training data, or the question file
model_vqa_science answers.

    python scripts/convert_sqa_to_llava.py convert_to_llava --base-dir /path/to/ScienceQA/data/scienceqa \
        --prompt-format QCM-LEA --split {train,val,minival,test,minitest}
        -> <base-dir>/llava_<split>_<prompt-format>.json   ({"id", "image"?, "conversations"})
    python scripts/convert_sqa_to_llava.py convert_to_jsonl --base-dir ... --split train --prompt-format QCM-LEPA
        -> <base-dir>/scienceqa_<split>_<prompt-format>.jsonl   ({"id", "image"?, "instruction", "output"})

A prompt format is INPUT-OUTPUT: the input's letters say what the question shows and in which order (C context,
Q question, M options, L lecture, E explanation/solution), the output's what the answer holds (A the answer
letter). The LLaVA paper fine-tuned on QCM-LEA. Images go under `<id>/image.png`. The output is byte for byte the
original converter's (tests/compat/test_eval_compat.py runs both).

Note: `--prompt-format CQM-A` writes the original converter's CQM-A ("Options: (A) ... (B) ...", answers
"The answer is A."); it is NOT the `llava_test_CQM-A.json` that LLaVA-1.5's sqa.sh reads, which has one `A. ...`
line per option and bare-letter answers and comes with the original eval.zip (the original has no script that
writes it either).
"""

from __future__ import annotations

import argparse
import json
import os

OPTIONS = ["A", "B", "C", "D", "E"]

# Inputs: which fields, in which order ("BECAUSE" carries lecture and/or solution as a hint).
INPUT_FORMATS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n",
}


def _lepa(answer: str, lecture: str, solution: str) -> str:
    out = f"LECTURE: {lecture}\n" if lecture.strip() else ""
    out += f"SOLUTION: {solution}\n" if solution.strip() else ""
    return out + f"###\nANSWER: {answer}."


OUTPUT_FORMATS = {
    "A": "Answer: The answer is {answer}.",
    # AL shows the solution and AE the lecture: swapped in the original, kept so its data files are rebuilt exactly.
    "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
    "LEPA": _lepa,
}


def parse_format(prompt_format: str) -> tuple[str, str]:
    parts = prompt_format.split("-")
    if len(parts) != 2 or parts[0] not in INPUT_FORMATS or parts[1] not in OUTPUT_FORMATS:
        raise ValueError(
            f"Unknown prompt format `{prompt_format}`; use INPUT-OUTPUT with INPUT in {sorted(INPUT_FORMATS)} and "
            f"OUTPUT in {sorted(OUTPUT_FORMATS)} (e.g. QCM-LEA, CQM-A)."
        )
    return parts[0], parts[1]


def _tidy(text: str) -> str:
    text = text.replace("  ", " ").strip()
    if text.endswith("BECAUSE:"):  # an empty lecture/solution leaves a dangling marker
        text = text.replace("BECAUSE:", "").strip()
    return text


def build_example(problem: dict, prompt_format: str, use_caption: bool = False, is_test: bool = False):
    """(input, output) of one problem in `prompt_format`, before the LLaVA-specific prefix removal."""
    input_format, output_format = parse_format(prompt_format)
    context = " ".join([problem.get("hint") or "", (problem.get("caption") or "") if use_caption else ""]).strip()
    fields = {
        "question": problem["question"],
        "context": context or "N/A",
        "choice": " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"])),
        "answer": OPTIONS[problem["answer"]],
        # The original round-trips these through "\\n" escapes, so a literal backslash-n becomes a line break.
        "lecture": (problem.get("lecture") or "").replace("\\n", "\n"),
        "solution": (problem.get("solution") or "").replace("\\n", "\n"),
    }
    text_in = INPUT_FORMATS[input_format].format(**fields)
    template = OUTPUT_FORMATS[output_format]
    if is_test:
        text_out = "Answer:"
    elif callable(template):
        text_out = template(fields["answer"], fields["lecture"], fields["solution"])
    else:
        text_out = template.format(**fields)
    return _tidy(text_in), _tidy(text_out)


def _load(base_dir: str, split: str) -> tuple[dict, list[str]]:
    with open(os.path.join(base_dir, "pid_splits.json"), encoding="utf-8") as f:
        splits = json.load(f)
    if split not in splits:
        raise SystemExit(f"Split `{split}` is not in {base_dir}/pid_splits.json; it has {sorted(splits)}.")
    with open(os.path.join(base_dir, "problems.json"), encoding="utf-8") as f:
        problems = json.load(f)
    return problems, splits[split]


def _examples(base_dir: str, split: str, prompt_format: str):
    problems, ids = _load(base_dir, split)
    for prob_id in ids:
        problem = problems[prob_id]
        text_in, text_out = build_example(problem, prompt_format)
        # As the original: a leading "Question: " / "Answer: " removes every occurrence, and nothing is stripped
        # after it (LEA with no lecture and no solution keeps a leading space: " The answer is C.").
        if text_in.startswith("Question: "):
            text_in = text_in.replace("Question: ", "")
        if text_out.startswith("Answer: "):
            text_out = text_out.replace("Answer: ", "")
        image = os.path.join(prob_id, problem["image"]) if problem.get("image") is not None else None
        yield prob_id, image, text_in, text_out


def convert_to_llava(base_dir: str, split: str, prompt_format: str = "QCM-LEA", output_dir: str | None = None) -> str:
    records = []
    for prob_id, image, text_in, text_out in _examples(base_dir, split, prompt_format):
        record: dict = {"id": prob_id}
        if image:
            record["image"] = image
            text_in = f"{text_in}\n<image>"
        record["conversations"] = [{"from": "human", "value": text_in}, {"from": "gpt", "value": text_out}]
        records.append(record)
    path = os.path.join(output_dir or base_dir, f"llava_{split}_{prompt_format}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=2)
    print(f"Number of samples: {len(records)} -> {path}")
    return path


def convert_to_jsonl(base_dir: str, split: str, prompt_format: str = "QCM-LEPA", output_dir: str | None = None) -> str:
    path = os.path.join(output_dir or base_dir, f"scienceqa_{split}_{prompt_format}.jsonl")
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for prob_id, image, text_in, text_out in _examples(base_dir, split, prompt_format):
            record: dict = {"id": prob_id}
            if image:
                record.update(image=image, instruction=f"{text_in}\n<image>")
            else:
                record["instruction"] = text_in
            record["output"] = text_out
            f.write(json.dumps(record) + "\n")
            count += 1
    print(f"Number of samples: {count} -> {path}")
    return path


TASKS = {"convert_to_llava": (convert_to_llava, "QCM-LEA"), "convert_to_jsonl": (convert_to_jsonl, "QCM-LEPA")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert ScienceQA to LLaVA conversations.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--base-dir", "--base_dir", dest="base_dir", required=True, help="has problems.json etc.")
    parser.add_argument("--split", required=True, help="train, val, minival, test, minitest")
    parser.add_argument("--prompt-format", "--prompt_format", dest="prompt_format", default=None)
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, help="default: base dir")
    return parser


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    func, default_format = TASKS[args.task]
    return func(os.path.expanduser(args.base_dir), args.split, args.prompt_format or default_format, args.output_dir)


if __name__ == "__main__":
    main()
