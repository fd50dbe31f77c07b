"""Ask one question about one or several images and print the answer.

    python -m llava.eval.run_llava --model-path liuhaotian/llava-v1.5-7b \
        --image-file view.jpg,https://llava-vl.github.io/static/images/view.jpg \
        --query "What differs between <image-placeholder> and <image-placeholder>?"

`--image-file` takes paths, http(s) URLs or data URLs joined by `--sep` (default ","). Each `<image-placeholder>`
in the query marks where an image goes, in order; without placeholders the images come before the query. From
Python (as in the original README):
    args = type("Args", (), {"model_path": path, "model_base": None, "query": q, "conv_mode": None,
                             "image_file": f, "sep": ",", "temperature": 0, "top_p": None, "num_beams": 1,
                             "max_new_tokens": 512})()
    eval_model(args)
"""

from __future__ import annotations

import argparse

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from llava.eval.runner import (
    add_model_args,
    add_prompt_args,
    conv_mode_for,
    generation_params,
    load_engine,
    opt,
    question_prompt,
)


def image_parser(args) -> list[str]:
    files = opt(args, "image_file", "")
    return [f.strip() for f in files.split(opt(args, "sep", ","))] if files else []


def load_images(image_files: list[str]) -> list:
    from llava.mm_utils import load_image

    return [load_image(f) for f in image_files]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ask a LLaVA model one question about one or several images.")
    add_model_args(parser, temperature=0.2, max_new_tokens=512)
    parser.add_argument("--image-file", type=str, default=None, help="image path(s)/URL(s), joined by --sep")
    parser.add_argument("--query", type=str, required=True, help=f"the question; `{IMAGE_PLACEHOLDER}` marks images")
    parser.add_argument("--sep", type=str, default=",")
    add_prompt_args(parser)
    return parser


def eval_model(args, engine=None) -> str:
    """Answer `args.query` about `args.image_file`; prints and returns the answer."""
    engine = engine or load_engine(args)
    conv_mode = conv_mode_for(args, engine)
    images = load_images(image_parser(args))
    query = args.query.replace(IMAGE_PLACEHOLDER, DEFAULT_IMAGE_TOKEN)
    prompt = question_prompt(engine, query, len(images), conv_mode, args)
    output = engine.generate([prompt], [images], generation_params(args), conv_mode)[0]
    print(output)
    return output


def main(argv: list[str] | None = None) -> str:
    return eval_model(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
