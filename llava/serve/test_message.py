"""Send one text message to a served model and print the streamed answer: a quick check of a deployment.

    python -m llava.serve.test_message --controller-address http://localhost:10000 --model-name llava-v1.5-7b \\
        --message "Tell me a story."
    python -m llava.serve.test_message --worker-address http://localhost:40000 --message "Hi"   # skip the controller

With a cluster key (--cluster-key or LLAVA_CLUSTER_KEY) every request carries it.
"""

from __future__ import annotations

import argparse
import sys

from llava.conversation import get_conv_template
from llava.serve.client import CALL_ERRORS, ClusterClient, NoWorker, Refused, cluster_key_from
from llava.serve.protocol import explain, template_from_model_name
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
    client = ClusterClient(args.controller_address, cluster_key_from(args.cluster_key))
    worker = args.worker_address
    model = args.model_name
    try:
        if worker is None:
            models = client.list_models(refresh=True)
            print(f"Models: {', '.join(models) or 'none'}")
            model = model or (models[0] if models else None)
            if model is None:
                print("No model is served; start a model worker first.", file=sys.stderr)
                return 1
            worker = client.get_worker_address(model)
        worker = worker.rstrip("/")
        details = client.model_details(worker)  # None: an original-protocol worker; its template from its name
        model = model or (details or {}).get("model_name")
        conv_mode = (details or {}).get("conv_mode") or template_from_model_name(model or "")
        print(f"Worker: {worker} ({model}, template `{conv_mode}`)")

        conv = get_conv_template(conv_mode)
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
        for data in client.generate_stream(worker, payload):
            if data.get("error_code"):
                print(
                    f"\n[error {data['error_code']}: {explain(data['error_code'], data.get('text', ''))}]",
                    file=sys.stderr,
                )
                return 1
            text = data["text"][len(prompt) :].strip()
            print(text[len(shown) :] if text.startswith(shown) else "\n" + text, end="", flush=True)
            shown = text
        print()
    except NoWorker as err:
        print(err.message, file=sys.stderr)
        return 1
    except Refused as err:
        print(f"Refused: {err}", file=sys.stderr)
        return 1
    except (*CALL_ERRORS, KeyError) as err:
        print(f"\n[error: {type(err).__name__}: {err}]", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
