"""Send one text message to a served model and print the streamed answer: a quick check of a deployment.

    python -m llava.serve.test_message --controller-address http://localhost:10000 --model-name llava-v1.5-7b \\
        --message "Tell me a story."
    python -m llava.serve.test_message --worker-address http://localhost:40000 --message "Hi"   # skip the controller

With a cluster key (--cluster-key or LLAVA_CLUSTER_KEY) every request carries it.
"""

from __future__ import annotations

import argparse
import sys

import requests

from llava.conversation import get_conv_template
from llava.serve.client import cluster_key_from, post_json, stream_worker
from llava.serve.server_utils import add_cluster_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--controller-address", "--controller", dest="controller_address", default="http://localhost:21001"
    )
    parser.add_argument("--worker-address", "--worker", dest="worker_address", default=None)
    parser.add_argument("--model-name", default=None, help="Default: the first model the controller lists.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--message", default="Tell me a story with more than 1000 words.")
    add_cluster_args(parser)
    args = parser.parse_args(argv)
    key = cluster_key_from(args.cluster_key)

    controller = args.controller_address.rstrip("/")
    worker = args.worker_address
    model = args.model_name
    try:
        if worker is None:
            refreshed = post_json(controller + "/refresh_all_workers", {}, key, timeout=10)
            if refreshed.status_code == 401:
                print("The controller refused the cluster key (401): pass --cluster-key.", file=sys.stderr)
                return 1
            models = post_json(controller + "/list_models", {}, key, timeout=10).json()["models"]
            print(f"Models: {', '.join(models) or 'none'}")
            model = model or (models[0] if models else None)
            if model is None:
                print("No model is served; start a model worker first.", file=sys.stderr)
                return 1
            answer = post_json(controller + "/get_worker_address", {"model": model}, key, timeout=10).json()
            worker = answer.get("address")
            if not worker:
                print(answer.get("error") or f"No worker serves `{model}`.", file=sys.stderr)
                return 1
        worker = worker.rstrip("/")
        details = post_json(worker + "/model_details", {}, key, timeout=10).json()
        model = model or details.get("model_name")
        print(f"Worker: {worker} ({model}, template `{details.get('conv_mode')}`)")

        conv = get_conv_template(details.get("conv_mode") or "llava_v1")
        conv.append_message(conv.roles[0], args.message)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        payload = {
            "model": model,
            "prompt": prompt,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "stop": conv.sep if conv.sep_style.name in ("SINGLE", "MPT") else conv.sep2,  # original workers need it
        }
        print(f"{conv.roles[0]}: {args.message}\n{conv.roles[1]}: ", end="", flush=True)
        shown = ""
        for data in stream_worker(worker + "/worker_generate_stream", payload, key, timeout=(10, 300)):
            if data.get("error_code"):
                print(f"\n[error {data['error_code']}: {data.get('text')}]", file=sys.stderr)
                return 1
            text = data["text"][len(prompt) :].strip()
            print(text[len(shown) :] if text.startswith(shown) else "\n" + text, end="", flush=True)
            shown = text
        print()
    except (requests.RequestException, ValueError, KeyError) as err:
        print(f"\n[error: {type(err).__name__}: {err}]", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
