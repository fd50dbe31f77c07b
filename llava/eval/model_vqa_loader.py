"""Answer a question file in batches, images loaded by a DataLoader (VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED).

    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-13b \
        --question-file playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \
        --image-folder playground/data/eval/textvqa/train_images \
        --answers-file playground/data/eval/textvqa/answers/llava-v1.5-13b.jsonl --temperature 0 --batch-size 8

`--batch-size N` answers N questions per forward pass; under greedy decoding (`--temperature 0`) the answers are the
ones batch size 1 gives (left padding with per-row attention masks). Same question and answer formats as model_vqa;
resumable; `--num-chunks/--chunk-idx` split the work across processes (see scripts/v1_5/eval/*.sh).
"""

from __future__ import annotations

import argparse

from torch.utils.data import DataLoader, Dataset

from llava.eval.model_vqa import question_requests
from llava.eval.runner import (
    Request,
    add_io_args,
    add_model_args,
    answer_all,
    get_chunk,
    opt,
    read_questions,
)


class RequestDataset(Dataset):
    """Requests whose images are loaded on access (in DataLoader workers when `num_workers` > 0)."""

    def __init__(self, requests: list[Request]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> Request:
        return self.requests[index].loaded()


def collate_requests(batch: list[Request]) -> list[Request]:
    return list(batch)


def create_data_loader(requests: list[Request], batch_size: int = 1, num_workers: int = 4) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"`--batch-size`={batch_size}; it must be at least 1.")
    return DataLoader(
        RequestDataset(requests),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        collate_fn=collate_requests,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer a question file with a LLaVA model, batched.")
    add_model_args(parser, temperature=0.2, max_new_tokens=128)
    add_io_args(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="questions per forward pass")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader processes loading images (0: inline)")
    return parser


def eval_model(args, engine=None) -> str:
    """Answer `args.question_file` into `args.answers_file`; pass a loaded `engine` to reuse it. Returns the path."""
    questions = read_questions(args.question_file)  # before loading the model: a bad path fails at once
    questions = get_chunk(questions, opt(args, "num_chunks", 1), opt(args, "chunk_idx", 0))
    return answer_all(
        args,
        engine,
        lambda eng, conv: question_requests(questions, args, eng, conv, args.question_file),
        batches=lambda todo: create_data_loader(
            todo, batch_size=int(opt(args, "batch_size", 1)), num_workers=int(opt(args, "num_workers", 4))
        ),
    )


def main(argv: list[str] | None = None) -> str:
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
