"""Answer a question file in batches, images loaded by a DataLoader (VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED).

    python -m llava.eval.model_vqa_loader --model-path liuhaotian/llava-v1.5-13b \
        --question-file playground/data/eval/textvqa/llava_textvqa_val_v051_ocr.jsonl \
        --image-folder playground/data/eval/textvqa/train_images \
        --answers-file playground/data/eval/textvqa/answers/llava-v1.5-13b.jsonl --temperature 0 --batch-size 8

`--batch-size N` answers N questions per forward pass; under greedy decoding (`--temperature 0`) the answers are the
ones batch size 1 gives (left padding with per-row attention masks). Same question and answer formats as model_vqa;
resumable; `--num-chunks/--chunk-idx` split the work across processes (see scripts/v1_5/eval/*.sh).
The original module's `CustomDataset` and `collate_fn` are here too, for code that runs its own loop on them.
"""

from __future__ import annotations

import argparse
import os

from torch.utils.data import DataLoader, Dataset

from llava.eval.model_vqa import question_requests
from llava.eval.runner import (
    Request,
    add_io_args,
    add_model_args,
    add_prompt_args,
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


# ---------------------------------------------------------------------------------------------------------------------
# The original module's dataset names, for code that builds its own loop on them (same call shapes as the original)
# ---------------------------------------------------------------------------------------------------------------------


class CustomDataset(Dataset):
    """The original `model_vqa_loader.CustomDataset`: item i is `(input_ids, image_tensor, image.size)` for
    question i (`{"image", "text"}`), its prompt built with our template and preprocessing.

    The original read the template from a global `args.conv_mode`; here it is the `conv_mode` argument, by default
    the one `model_config` records (`conv_template`), else `llava_v1` (the original script's default)."""

    def __init__(
        self,
        questions: list[dict],
        image_folder: str,
        tokenizer,
        image_processor,
        model_config,
        conv_mode: str | None = None,
    ):
        self.questions = questions
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.conv_mode = conv_mode or getattr(model_config, "conv_template", None) or "llava_v1"

    def __getitem__(self, index: int):
        from PIL import Image

        from llava.conversation import get_conv_template
        from llava.mm_utils import process_images, tokenizer_image_token
        from llava.prompting import image_marker_text

        line = self.questions[index]
        conv = get_conv_template(self.conv_mode)
        start_end = bool(getattr(self.model_config, "mm_use_im_start_end", False))
        # always first and never in <Image></Image>, as the original's (bare even in `*_mmtag` templates)
        marker = image_marker_text(mm_use_im_start_end=start_end)
        conv.append_message(conv.roles[0], marker + "\n" + line["text"])
        conv.append_message(conv.roles[1], None)
        with Image.open(os.path.join(self.image_folder, line["image"])) as raw:
            image = raw.convert("RGB")
        image_tensor = process_images([image], self.image_processor, self.model_config)[0]
        input_ids = tokenizer_image_token(conv.get_prompt(), self.tokenizer, return_tensors="pt")
        return input_ids, image_tensor, image.size

    def __len__(self) -> int:
        return len(self.questions)


def collate_fn(batch: list[tuple]) -> tuple:
    """The original's collate: stacked input_ids (equal lengths, as with batch size 1), stacked images, sizes."""
    import torch

    input_ids, image_tensors, image_sizes = zip(*batch)
    return torch.stack(input_ids, dim=0), torch.stack(image_tensors, dim=0), image_sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer a question file with a LLaVA model, batched.")
    add_model_args(parser, temperature=0.2, max_new_tokens=128)
    add_prompt_args(parser)
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
