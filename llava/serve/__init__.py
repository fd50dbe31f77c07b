"""Serving: a controller that routes requests to model workers, workers that batch and stream generation, a Gradio
web UI, an OpenAI-compatible API and a terminal chat. See docs/Serving.md and docs/API.md.

    python -m llava.serve.controller --port 10000
    python -m llava.serve.model_worker --controller http://localhost:10000 --port 40000 \\
        --worker http://localhost:40000 --model-path liuhaotian/llava-v1.5-7b
    python -m llava.serve.gradio_web_server --controller http://localhost:10000 --model-list-mode reload
    python -m llava.serve.openai_api_server --controller http://localhost:10000 --port 8000
    python -m llava.serve.cli --model-path liuhaotian/llava-v1.5-7b --image-file view.jpg

Who owns what: `protocol` (stream chunks, error codes and their one meaning table), `client` (THE client of the
controller/worker protocol, sync and async, pooled), `batching` (the `Scheduler` interface: batch and serial),
`openai_protocol` (the OpenAI API's request and answer formats), `server_utils` (HTTP plumbing, the cluster-key and
image-limit flags), `launch` (free ports, readiness waits, the process supervisor).
"""
