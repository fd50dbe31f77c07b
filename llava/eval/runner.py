"""Shared pieces of the answer-generation scripts: flags, the model, the generation loop (`answer_all`).

Question files and chunks live in `llava.eval.questions`, resumable answers files and their provenance in
`llava.eval.answer_file`; their names are re-exported here, where the scripts have always imported them.

Every generation script reads its questions, keeps its chunk (`--num-chunks/--chunk-idx`), skips what the answers
file already holds, and writes one JSON line per answer (DESIGN.md, "Eval files"):
    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

Each answer's `metadata` records what wrote it: the checkpoint (path, base, and a fingerprint of its files), the
question file (sha256) and the generation settings. A run resumes an answers file only when every answer in it
records the same; otherwise it stops and names the difference (`--overwrite` starts afresh). The lines keep the
original's fields, so the original readers and scorers read the file unchanged, and `cat`-merged chunk files keep
their provenance.

Without `--conv-mode`, the template is the one the checkpoint records (config `conv_template`), else the original
script's default (`llava_v1`; `llava_v0` for model_vqa_science), never a guess from the folder name.

Prompts are the original scripts' (`question_prompt`): `<image>\n` before the question, bare even in the `*_mmtag`
templates, whose training wrapped it as `<Image><image></Image>`; `--training-image-markers` wraps it as training did.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

# The answers file and the question files live in their own modules; their names stay importable from here, where
# the eval scripts and the original's conversion scripts import them.
from llava.eval.answer_file import (
    AnswerFile,
    checkpoint_fingerprint,
    file_sha256,
    log,
    meta_differences,
    new_answer_id,
    question_key,
)
from llava.eval.questions import get_chunk, read_answer_texts, read_jsonl, read_questions, split_list
from llava.runtime import add_threads_argument, configure_threads

__all__ = [
    "SETTING_FLAGS",
    "AnswerFile",
    "Request",
    "add_io_args",
    "add_model_args",
    "add_prompt_args",
    "answer_all",
    "checkpoint_fingerprint",
    "conv_mode_for",
    "file_sha256",
    "generate_answers",
    "generation_params",
    "get_chunk",
    "image_paths",
    "load_engine",
    "log",
    "meta_differences",
    "model_id",
    "model_path_of",
    "new_answer_id",
    "one_at_a_time",
    "opt",
    "pending",
    "question_key",
    "question_prompt",
    "read_answer_texts",
    "read_jsonl",
    "read_questions",
    "run_meta",
    "split_list",
]


def opt(args: Any, name: str, default: Any = None) -> Any:
    """`args.name`, or `default` when absent: `eval_model` also takes hand-made args objects (README style)."""
    value = getattr(args, name, default)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------------


def add_model_args(parser: argparse.ArgumentParser, *, temperature: float = 0.2, max_new_tokens: int = 1024) -> None:
    """Model, template and sampling flags, spelled as in the original scripts (plus dashed aliases)."""
    parser.add_argument("--model-path", type=str, default=None, help="checkpoint directory or hub id (required)")
    parser.add_argument("--model-base", type=str, default=None, help="base decoder for LoRA / projector-only dirs")
    parser.add_argument(
        "--model-name",
        type=str,
        default=None,
        help="model_id in answers (default: from the path); without --model-path, the checkpoint (v0-era scripts)",
    )
    parser.add_argument("--vision-tower", type=str, default=None, help="override the config's mm_vision_tower")
    parser.add_argument(
        "--conv-mode", type=str, default=None, help="chat template (default: the one stored in the checkpoint)"
    )
    parser.add_argument("--device", type=str, default="auto", help="auto (CUDA, else MPS, else CPU), cuda, cpu, mps")
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top_p", "--top-p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=max_new_tokens)
    add_threads_argument(parser)


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """How the question's image marker is written (only `*_mmtag` templates differ; see `question_prompt`)."""
    parser.add_argument(
        "--training-image-markers",
        action="store_true",
        help="in *_mmtag templates, write the image marker as training does (<Image><image></Image>) instead of "
        "the original eval scripts' bare <image>",
    )


def add_io_args(parser: argparse.ArgumentParser, *, image_folder: bool = True, chunks: bool = True) -> None:
    parser.add_argument("--question-file", type=str, required=True)
    if image_folder:
        parser.add_argument("--image-folder", type=str, default="", help="image paths in questions are under it")
    parser.add_argument("--answers-file", type=str, required=True)
    if chunks:
        parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many parts")
        parser.add_argument("--chunk-idx", type=int, default=0, help="which part this process answers (0-based)")
    parser.add_argument("--overwrite", action="store_true", help="start the answers file afresh instead of resuming it")


# ---------------------------------------------------------------------------------------------------------------------
# Model and generation
# ---------------------------------------------------------------------------------------------------------------------


def load_engine(args: Any):
    """The `LlavaEngine` the flags describe (device and dtype from the machine unless `--device` says)."""
    from llava.inference import LlavaEngine

    configure_threads(opt(args, "threads"))
    return LlavaEngine.from_pretrained(
        model_path_of(args),
        opt(args, "model_base"),
        conv_mode=opt(args, "conv_mode") or None,
        model_name=opt(args, "model_name"),
        load_8bit=bool(opt(args, "load_8bit", False)),
        load_4bit=bool(opt(args, "load_4bit", False)),
        device=opt(args, "device", "auto"),
        vision_tower=opt(args, "vision_tower"),
    )


def model_path_of(args: Any) -> str:
    """`--model-path`; v0-era scripts named the checkpoint directory with `--model-name` instead."""
    path = opt(args, "model_path") or opt(args, "model_name")
    if not path:
        raise SystemExit("Pass the checkpoint with --model-path (a directory or a hub id).")
    return os.path.expanduser(path)


def model_id(args: Any) -> str:
    from llava.mm_utils import get_model_name_from_path

    return opt(args, "model_name") or get_model_name_from_path(model_path_of(args))


def conv_mode_for(args: Any, engine, default: str | None = None) -> str:
    """`--conv-mode` when given (empty counts as not given), else the template the checkpoint records (config
    `conv_template`), else `default` (the original script's own default). Without a `default` (run_llava, whose
    original guessed from the model name), the engine's choice."""
    from llava.conversation import conv_templates

    mode = opt(args, "conv_mode")
    if not mode and default is not None:
        config = getattr(getattr(engine, "model", None), "config", None)
        mode = getattr(config, "conv_template", None) or default
    mode = mode or engine.conv_mode
    if mode not in conv_templates:
        raise ValueError(f"Unknown `--conv-mode` `{mode}`; valid: {', '.join(sorted(conv_templates))}.")
    return mode


def question_prompt(engine, question: str, n_images: int, conv_mode: str, args: Any = None) -> str:
    """One question's full prompt in template `conv_mode`, as the original eval scripts built it: one `<image>\\n`
    per image before the question (in `<im_start>`/`<im_end>` for models trained with them), bare even in a
    `*_mmtag` template. With `--training-image-markers` the marker is wrapped as training wraps it
    (`<Image><image></Image>`), which is `LlavaEngine.build_prompt`'s default."""
    return engine.build_prompt(
        question, n_images, conv_mode, wrap_mmtag=bool(opt(args, "training_image_markers", False))
    )


def generation_params(args: Any):
    from llava.inference import GenerationParams

    return GenerationParams(
        temperature=float(opt(args, "temperature", 0.2)),
        top_p=float(opt(args, "top_p", 1.0)),
        num_beams=int(opt(args, "num_beams", 1)),
        max_new_tokens=int(opt(args, "max_new_tokens", 1024)),
    )


@dataclass
class Request:
    """One prompt to answer: the record fields around the answer text, the full prompt, and its image sources."""

    key: Hashable
    head: dict  # fields before "text": question_id (round_id), prompt
    prompt: str  # the full prompt in the chat template
    image_sources: list[str] = field(default_factory=list)
    base64_images: bool = False
    extra: dict = field(default_factory=dict)  # fields after "text" (MMBench: options, option_char)
    images: list | None = None

    def loaded(self) -> Request:
        """This request with its images loaded (paths/URLs, or base64 strings)."""
        from llava.mm_utils import load_image, load_image_from_base64

        loader = load_image_from_base64 if self.base64_images else load_image
        return dataclasses.replace(self, images=[loader(source) for source in self.image_sources])


def image_paths(image_folder: str, image: str | Sequence[str] | None) -> list[str]:
    """A question's `image` field (one path, a list, or none) as paths under `image_folder`."""
    if not image:
        return []
    names = [image] if isinstance(image, str) else list(image)
    folder = os.path.expanduser(image_folder or "")
    return [os.path.join(folder, name) for name in names]


def generate_answers(
    engine,
    batches: Iterable[list[Request]],
    total: int,
    args: Any,
    answers: AnswerFile,
    conv_mode: str,
    desc: str = "answering",
    followup: Callable[[Any, list[Request], list[str], str], list[str]] | None = None,
) -> int:
    """Generate for each batch of loaded requests and append one record per answer; returns the number written.

    `followup(engine, batch, texts, conv_mode)`, when given, turns the first answers into the final ones (e.g. a
    second pass that asks for the answer after the model's reasoning)."""
    from llava.inference import RequestError

    params = generation_params(args)
    name = model_id(args)
    metadata = answers.meta if answers.meta is not None else run_meta(args, conv_mode)
    written = 0
    with tqdm(total=total, desc=desc, unit="q", dynamic_ncols=True) as bar:
        for batch in batches:
            try:
                texts = engine.generate([r.prompt for r in batch], [r.images or [] for r in batch], params, conv_mode)
            except RequestError as err:
                keys = ", ".join(repr(r.key) for r in batch)
                raise RequestError(f"Question {keys}: {err}") from err
            if followup is not None:
                texts = followup(engine, batch, texts, conv_mode)
            for request, text in zip(batch, texts):
                answers.write(
                    {
                        **request.head,
                        "text": text,
                        **request.extra,
                        "answer_id": new_answer_id(),
                        "model_id": name,
                        "metadata": metadata,
                    }
                )
            written += len(batch)
            bar.update(len(batch))
    return written


def pending(requests: Iterable[Request], answers: AnswerFile, total: int) -> list[Request]:
    """The requests the answers file does not hold yet, with a note when some are skipped."""
    todo = [r for r in requests if r.key not in answers.done]
    if len(todo) < total:
        log(f"{answers.path}: {total - len(todo)} of {total} already answered; answering the other {len(todo)}.")
    return todo


def one_at_a_time(requests: Iterable[Request]) -> Iterable[list[Request]]:
    for request in requests:
        yield [request.loaded()]


# Flags that change the prompts or the answers, recorded with the generation settings when a script has them.
SETTING_FLAGS = (
    "single_pred_prompt",
    "answer_prompter",
    "all_rounds",
    "lang",
    "na_as_missing",
    "vision_tower",
    "load_8bit",
    "load_4bit",
)


def run_meta(args: Any, conv_mode: str) -> dict:
    """What a generation run is, as each answer's `metadata` records it: settings, model, question file."""
    from llava.conversation import get_conv_template

    params = generation_params(args)
    model_path = model_path_of(args)
    base = opt(args, "model_base")
    meta = {
        "conv_mode": conv_mode,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "num_beams": params.num_beams,
        "max_new_tokens": params.max_new_tokens,
    }
    meta.update({name: getattr(args, name) for name in SETTING_FLAGS if hasattr(args, name)})
    if get_conv_template(conv_mode).mmtag:  # only there do the two marker layouts differ
        meta["image_markers"] = "training" if opt(args, "training_image_markers", False) else "original"
    local = os.path.isdir(model_path)
    local_base = bool(base) and os.path.isdir(os.path.expanduser(base))
    meta.update(
        model_path=os.path.abspath(model_path) if local else model_path,
        model_base=os.path.abspath(os.path.expanduser(base)) if local_base else base,
        model_fingerprint=checkpoint_fingerprint(model_path),
        model_base_fingerprint=checkpoint_fingerprint(base),
        question_file_sha256=file_sha256(args.question_file),
    )
    return meta


def answer_all(
    args: Any,
    engine,
    make_requests: Callable[[Any, str], list[Request]],
    *,
    batches: Callable[[list[Request]], Iterable[list[Request]]] = one_at_a_time,
    key: Callable[[dict], Hashable] = question_key,
    followup: Callable[[Any, list[Request], list[str], str], list[str]] | None = None,
    default_conv_mode: str = "llava_v1",
) -> str:
    """The body every generation script shares: load the model (unless given), then answer each request that
    `args.answers_file` does not hold yet. `make_requests(engine, conv_mode)` builds the requests. Returns the path.

    Without `--conv-mode`: the checkpoint's recorded template, else `default_conv_mode` (the original script's)."""
    engine = engine or load_engine(args)
    conv_mode = conv_mode_for(args, engine, default_conv_mode)
    meta = run_meta(args, conv_mode)
    overwrite = bool(opt(args, "overwrite", False))
    with AnswerFile(args.answers_file, key=key, overwrite=overwrite, meta=meta) as answers:
        requests = make_requests(engine, conv_mode)
        todo = pending(requests, answers, len(requests))
        generate_answers(engine, batches(todo), len(todo), args, answers, conv_mode, followup=followup)
    return answers.path
