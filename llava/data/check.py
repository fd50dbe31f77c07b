"""Check (and partly fix) a LLaVA training dataset before training on it.

    python -m llava.data.check --data_path playground/data/llava_v1_5_mix665k.json --image_folder playground/data \
        --model_name_or_path lmsys/vicuna-7b-v1.5 --version v1 --model_max_length 2048 \
        --vision_tower openai/clip-vit-large-patch14-336

Finds: records that do not parse (schema), `<image>` markers that do not match the images, missing and undecodable
images, images listed with the wrong extension (OCR-VQA lists `.jpg` where the download has `.gif`/`.png`; `--fix`
writes a corrected copy of the dataset), and, with a tokenizer, samples whose length after image expansion passes
`--model_max_length` (cut at training) or whose replies would be cut off entirely. Prints a summary table and exits
non-zero when there are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.train.data import BadRecordError, check_image, normalize_record, read_records

# (name, is an error); the order is the table's.
CHECKS = {
    "schema": True,
    "image count": True,
    "missing image": True,
    "undecodable image": True,
    "wrong extension": True,
    "no supervised token": True,
    "too long (cut)": False,
}


@dataclasses.dataclass
class Finding:
    check: str
    index: int
    detail: str


@dataclasses.dataclass
class Report:
    source: str
    records: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    fixed: int = 0
    skipped_checks: list[str] = dataclasses.field(default_factory=list)

    def by_check(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = defaultdict(list)
        for f in self.findings:
            out[f.check].append(f)
        return out

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if CHECKS[f.check])

    def table(self) -> str:
        groups = self.by_check()
        bad = {f.index for f in self.findings if CHECKS[f.check]}
        lines = [f"Dataset `{self.source}`: {self.records} records, {self.records - len(bad)} without errors."]
        lines.append(f"{'check':<22}{'records':>8}  {'status':<8} first example")
        for name, is_error in CHECKS.items():
            found = groups.get(name, [])
            if name in self.skipped_checks:
                status, example = "skipped", "(needs --model_name_or_path and image token count)"
            elif not found:
                status, example = "ok", ""
            else:
                status = "ERROR" if is_error else "warning"
                example = f"record {found[0].index}: {found[0].detail}"
            lines.append(f"{name:<22}{len(found):>8}  {status:<8} {example}".rstrip())
        if self.fixed:
            lines.append(f"Fixed {self.fixed} image path(s) with the wrong extension (see the written dataset).")
        return "\n".join(lines)


class _DirIndex:
    """File names per directory by stem, built once per directory (OCR-VQA keeps 200K images in one folder)."""

    def __init__(self):
        self._dirs: dict[str, dict[str, list[str]]] = {}

    def others(self, path: str) -> list[str]:
        folder, name = os.path.split(path)
        if folder not in self._dirs:
            stems: dict[str, list[str]] = defaultdict(list)
            if os.path.isdir(folder):
                for entry in os.listdir(folder):
                    stems[os.path.splitext(entry)[0]].append(entry)
            self._dirs[folder] = stems
        stem = os.path.splitext(name)[0]
        return [os.path.join(folder, n) for n in sorted(self._dirs[folder].get(stem, [])) if n != name]


def _image_field(raw: dict) -> tuple[str, Any]:
    key = "image" if "conversations" in raw else ("images" if "images" in raw else "image")
    return key, raw.get(key)


def _replace_image(raw: dict, old_rel: str, new_rel: str) -> None:
    key, value = _image_field(raw)
    if isinstance(value, str):
        raw[key] = new_rel if value == old_rel else value
    elif isinstance(value, list):
        raw[key] = [new_rel if v == old_rel else v for v in value]


def check_dataset(
    data_path: str,
    image_folder: str | None,
    preprocessor=None,
    image_tokens: int | None = None,
    model_max_length: int | None = None,
    image_check: str = "full",
    fix: bool = False,
    workers: int = 16,
) -> tuple[Report, list[Any]]:
    """Run every check; returns the report and the raw records (with fixed image paths when `fix`)."""
    raw = read_records(data_path)
    report = Report(source=data_path, records=len(raw))
    records = {}
    for i, item in enumerate(raw):
        try:
            records[i] = normalize_record(item, i, data_path, image_folder)
        except BadRecordError as err:
            check = "image count" if DEFAULT_IMAGE_TOKEN in err.reason else "schema"
            report.findings.append(Finding(check, i, err.reason))

    # images: checked in parallel threads, a missing one looked up under other extensions
    jobs = [(i, rel, path) for i, r in records.items() for rel, path in zip(_rel_paths(raw[i]), r.images)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs) or 1))) as pool:
        problems = list(pool.map(lambda job: check_image(job[2], image_check), jobs))
    index = _DirIndex()
    for (i, rel, path), problem in zip(jobs, problems):
        if problem is None:
            continue
        if "missing" in problem:
            found = [p for p in index.others(path) if check_image(p, image_check) is None]
            if found:
                actual = os.path.splitext(found[0])[1]
                if fix:
                    _replace_image(raw[i], rel, os.path.splitext(rel)[0] + actual)
                    report.fixed += 1
                else:
                    detail = f"`{rel}` is listed, `{os.path.basename(found[0])}` is on disk (run with --fix)"
                    report.findings.append(Finding("wrong extension", i, detail))
                continue
            report.findings.append(Finding("missing image", i, f"`{path}`"))
        else:
            report.findings.append(Finding("undecodable image", i, f"`{path}`: {problem}"))

    if preprocessor is None or image_tokens is None or model_max_length is None:
        report.skipped_checks += ["too long (cut)", "no supervised token"]
    else:
        for i, record in records.items():
            tokens = preprocessor(record.messages, len(record.images), validated=True)  # checked when read
            n_images = len(record.images)
            length = len(tokens.input_ids) - n_images + n_images * image_tokens
            if length <= model_max_length:
                continue
            detail = f"{length} positions after image expansion > --model_max_length {model_max_length}"
            report.findings.append(Finding("too long (cut)", i, detail))
            # the position (after expansion) of the first supervised token
            pos, first = 0, None
            for token, label in zip(tokens.input_ids, tokens.labels):
                if label != IGNORE_INDEX:
                    first = pos
                    break
                pos += image_tokens if token == IMAGE_TOKEN_INDEX else 1
            if first is None or first >= model_max_length:
                report.findings.append(Finding("no supervised token", i, "every reply is past the length limit"))
    report.findings.sort(key=lambda f: (list(CHECKS).index(f.check), f.index))
    return report, raw


def _rel_paths(raw: dict) -> list[str]:
    _, value = _image_field(raw)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _image_token_count(args: argparse.Namespace) -> int | None:
    if args.image_tokens is not None:
        return args.image_tokens
    if not args.vision_tower:
        return None
    from llava.model.multimodal_encoder.builder import resolve_vision_config

    config = resolve_vision_config(args.vision_tower)
    return (config.image_size // config.patch_size) ** 2


def _write(raw: list[Any], data_path: str, output: str | None) -> str:
    if output is None:
        stem, ext = os.path.splitext(data_path)
        output = f"{stem}.fixed{ext}"
    with open(output, "w", encoding="utf-8") as f:
        if output.endswith(".jsonl"):
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in raw)
        else:
            json.dump(raw, f, ensure_ascii=False)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.data.check", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--data_path", required=True, help="LLaVA JSON/JSONL or HF messages/images records.")
    parser.add_argument("--image_folder", default=None, help="Root the records' image paths are relative to.")
    parser.add_argument("--model_name_or_path", default=None, help="Tokenizer for the length check.")
    parser.add_argument("--version", default="v1", help="Conversation template (as --version in training).")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--vision_tower", default=None, help="Vision tower dir/id: gives the image token count.")
    parser.add_argument("--image_tokens", type=int, default=None, help="Positions per image (576 for CLIP-L/336).")
    parser.add_argument("--mm_use_im_start_end", action="store_true")
    parser.add_argument("--image_check", default="full", choices=["full", "header", "exists"])
    parser.add_argument("--fix", action="store_true", help="Write a copy with wrong image extensions corrected.")
    parser.add_argument("--output", default=None, help="Where --fix writes (default: <data_path>.fixed.json).")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)

    preprocessor = None
    if args.model_name_or_path:
        from transformers import AutoTokenizer

        from llava.train.preprocess import Preprocessor

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        preprocessor = Preprocessor(tokenizer, args.version, args.mm_use_im_start_end)
    report, raw = check_dataset(
        args.data_path,
        args.image_folder,
        preprocessor=preprocessor,
        image_tokens=_image_token_count(args),
        model_max_length=args.model_max_length,
        image_check=args.image_check,
        fix=args.fix,
        workers=args.workers,
    )
    print(report.table())
    if args.fix and report.fixed:
        print(f"Wrote the fixed dataset to {_write(raw, args.data_path, args.output)}")
    if report.errors:
        print(f"{report.errors} error(s).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
