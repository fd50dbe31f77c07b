"""Register a running model worker with a controller by hand (workers normally register themselves).

    python -m llava.serve.register_worker --controller-address http://localhost:10000 \\
        --worker-name http://localhost:40000 [--no-check-heart-beat] [--cluster-key SECRET]

The controller first asks the worker for its status, so both must share the cluster key (--cluster-key or
LLAVA_CLUSTER_KEY) when one is set.
"""

from __future__ import annotations

import argparse
import sys

from llava.serve.client import CALL_ERRORS, ClusterClient, Refused, cluster_key_from
from llava.serve.server_utils import add_cluster_args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controller-address", "--controller", dest="controller_address", required=True)
    parser.add_argument("--worker-name", "--worker-address", "--worker", dest="worker_name", required=True)
    parser.add_argument(
        "--check-heart-beat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Drop the worker when its heartbeats stop (default); --no-check-heart-beat keeps it listed.",
    )
    add_cluster_args(parser)
    args = parser.parse_args(argv)
    client = ClusterClient(args.controller_address, cluster_key_from(args.cluster_key))
    try:
        client.register(args.worker_name.rstrip("/"), check_heart_beat=args.check_heart_beat)
    except Refused as err:
        print(f"Registration refused: {err}", file=sys.stderr)
        return 1
    except CALL_ERRORS as err:
        print(f"The controller at {args.controller_address} is unreachable: {err}", file=sys.stderr)
        return 1
    print(f"Registered {args.worker_name} with {args.controller_address}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
