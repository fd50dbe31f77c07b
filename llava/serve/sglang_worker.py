"""The original's `sglang_worker`, kept by name and flags: a worker that serves a model running in SGLang.

    python -m sglang.launch_server --model-path ./llava-v1.5-7b-hf --port 30000      # the engine (GPU)
    python -m llava.serve.sglang_worker --sgl-endpoint http://localhost:30000 \\
        --controller-address http://localhost:21001 --worker-address http://localhost:21002 --port 21002

It is `llava.serve.engine_worker` aimed at SGLang's OpenAI-compatible endpoint (`<sgl-endpoint>/v1`): the same
registration, protocol and checks, with the original's flags and defaults (`--limit-model-concurrency 5`). The
original drove SGLang's own frontend language; SGLang also serves `/v1/chat/completions`, which applies the chat
template of the checkpoint it loaded, so export the model with `python -m llava.model.convert_hf export` first.
"""

from __future__ import annotations

import argparse

from llava.serve.engine_worker import add_worker_args, serve


def engine_url(sgl_endpoint: str) -> str:
    """The OpenAI API base of an SGLang server given as the original's `--sgl-endpoint` (with or without /v1)."""
    base = sgl_endpoint.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sgl-endpoint", required=True, help="The SGLang server, e.g. http://localhost:30000.")
    add_worker_args(parser, concurrency=5)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    serve(args, engine_url(args.sgl_endpoint), name="llava.serve.sglang_worker")


if __name__ == "__main__":
    main()
