"""Chat with a model in the terminal, about one or more images or none; answers stream as they are generated.

    python -m llava.serve.cli --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg [--load-4bit]
    python -m llava.serve.cli --model-path <tiny ckpt> --device cpu --image-file x.png < questions.txt

The chat template comes from the checkpoint (or a guess from its name for old checkpoints) unless --conv-mode
overrides it. Each line you type is one turn; an empty line is ignored; end the session with Ctrl-D (EOF).
"""

from __future__ import annotations

import argparse
import re
import sys

from llava.conversation import get_conv_template
from llava.inference import GenerationParams, LlavaEngine, PromptTooLongError, RequestError
from llava.mm_utils import ImageLoadError, load_image
from llava.runtime import add_threads_argument, configure_threads


def display_role(role: str, fallback: str) -> str:
    """A template's role tag as a short label: `<|im_start|>user\\n` -> `user`."""
    label = re.sub(r"<\|[^|]*\|>", "", role).strip()
    return label or fallback


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument(
        "--image-file", action="append", default=[], help="A path or http(s) URL; repeat the flag for several images."
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--conv-mode", default=None, help="Chat template override (default: the checkpoint's).")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--use-flash-attn", action="store_true")
    parser.add_argument(
        "--training-image-markers",
        action="store_true",
        help="In *_mmtag templates, write the image marker as training does (<Image><image></Image>) instead of "
        "the original CLI's bare <image>.",
    )
    parser.add_argument("--debug", action="store_true", help="Print the prompt and raw output after each answer.")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if args.load_8bit and args.load_4bit:
        parser.error("Choose one of --load-8bit and --load-4bit.")
    return args


def stream_answer(engine: LlavaEngine, prompt: str, images, params: GenerationParams, out=sys.stdout) -> str:
    """Print the answer as it grows (through the same step-wise decoder as the model worker); return it."""
    decoder = engine.decoder(params)
    decoder.add([(0, engine.encode(prompt, images, 1), params)])
    shown = ""
    while decoder:
        for update in decoder.step():
            visible = update.text.strip() if update.finished else update.text.lstrip()
            if visible.startswith(shown) and len(visible) > len(shown):
                out.write(visible[len(shown) :])
                out.flush()
                shown = visible
    return shown


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads)
    try:
        images = [load_image(source) for source in args.image_file]
    except ImageLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engine = LlavaEngine.from_pretrained(
        args.model_path,
        args.model_base,
        conv_mode=args.conv_mode,
        load_8bit=args.load_8bit,
        load_4bit=args.load_4bit,
        device=args.device,
        use_flash_attn=args.use_flash_attn,
    )
    params = GenerationParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    conv = get_conv_template(engine.conv_mode)
    user, assistant = display_role(conv.roles[0], "USER"), display_role(conv.roles[1], "ASSISTANT")
    pending_images = bool(images)
    while True:
        print(f"{user}: ", end="", flush=True)  # on stdout: input() would put its prompt on stderr in a terminal
        try:
            line = input()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if pending_images:  # the images go with the first message, marked where the user put `<image>` or first
            # the original CLI wrote a bare marker, even for *_mmtag templates
            line = engine.with_image_markers(line, len(images), wrap_mmtag=args.training_image_markers)
        conv.append_message(conv.roles[0], line)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        print(f"{assistant}: ", end="", flush=True)
        try:
            answer = stream_answer(engine, prompt, images, params)
        except (PromptTooLongError, RequestError) as err:
            # a rejected turn leaves the conversation as it was: the images still go with the next message
            print(f"\n[error: {err}]", flush=True)
            conv.messages = conv.messages[:-2]
            continue
        pending_images = False
        print(flush=True)
        conv.messages[-1][1] = answer
        if args.debug:
            print("\n" + repr({"prompt": prompt, "outputs": answer}) + "\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
