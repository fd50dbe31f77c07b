"""Helpers for the eval tests: small benchmark files in their real formats, and a fake OpenAI-compatible judge."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, records) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, data) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    return str(path)


def make_image(i: int, size=(40, 30)):
    from PIL import Image

    return Image.new("RGB", size, ((53 * i) % 256, (97 * i + 40) % 256, (151 * i + 90) % 256))


def write_images(folder, names: list[str], sizes=None) -> list[str]:
    """PNG files named `names` under `folder` (sub-directories created), each a different colour."""
    paths = []
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        make_image(i + 1, (sizes or {}).get(name, (40 + 8 * i, 30))).save(path)
        paths.append(path)
    return paths


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def load_script(name: str):
    """A module from scripts/<name>.py, imported by path (the scripts are not a package)."""
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------------------
# A fake judge: an OpenAI-compatible /v1/chat/completions on 127.0.0.1 with canned replies and scripted failures
# ---------------------------------------------------------------------------------------------------------------------


class JudgeServer:
    """Replies to each chat completion with `reply(user_content)`; `failures(user_content)` may first return an HTTP
    status to answer with instead (429 with Retry-After: 0, 5xx). Every request is recorded in `requests`."""

    def __init__(self, reply: Callable[[str], str], failures: Callable[[str], int | None] = lambda c: None):
        self.reply = reply
        self.failures = failures
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.models = None  # None: every model exists; else the set of models served
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                content = body["messages"][-1]["content"]
                if server.models is not None and body["model"] not in server.models:
                    server.statuses.append(404)
                    return self._send(404, {"error": {"message": f"model {body['model']} not found"}})
                status = server.failures(content)
                if status:
                    server.statuses.append(status)
                    kind = "rate_limit_error" if status == 429 else "server_error"
                    return self._send(
                        status,
                        {"error": {"message": f"canned {status}", "type": kind}},
                        {"Retry-After": "0"} if status == 429 else None,
                    )
                server.statuses.append(200)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": server.reply(content)},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
