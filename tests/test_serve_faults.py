"""Faults and hostile input against the real serving stack (issue 14, items 5-10; issue 12, items 17-18): a worker
killed under a burst, a dead idle worker, malformed and oversized bodies on every server, a client that leaves a
non-streaming request, protocol defaults, the CLI after a rejected turn, and the web UI on an original-protocol
worker. Every server is a real process on loopback; the streaming checks use the official `openai` client."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from serve_helpers import REPO, SERVE_ENV, Proc, controller_post, free_port, http_ok, png_b64, wait_until

from llava.conversation import get_conv_template

pytestmark = pytest.mark.slow

MODEL = "alpha"
EXPIRATION = 120.0  # heartbeat window: long, so only a report can take a dead worker out of routing in these tests


class Stack:
    """A controller, two workers of one model and the OpenAI API server."""

    def __init__(self, tmp: str, checkpoint: str, workers: tuple[str, ...] = ("w1", "w2")):
        self.tmp, self.checkpoint = tmp, checkpoint
        self.procs: dict[str, Proc] = {}
        self.ports = {name: free_port() for name in ("controller", *workers, "api")}
        self.controller = f"http://127.0.0.1:{self.ports['controller']}"
        self.workers = {name: f"http://127.0.0.1:{self.ports[name]}" for name in workers}
        self.api = f"http://127.0.0.1:{self.ports['api']}"

    def start(self, name: str, module: str, args: list[str]) -> Proc:
        proc = Proc(name, module, args, self.tmp, {"OMP_NUM_THREADS": "1"})
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, concurrency: int = 8, max_queue: int = 256) -> Proc:
        port = str(self.ports[name])
        args = ["--port", port, "--worker", self.workers[name], "--controller", self.controller]
        args += ["--model-path", self.checkpoint, "--model-name", MODEL, "--device", "cpu"]
        args += ["--limit-model-concurrency", str(concurrency), "--max-queue-size", str(max_queue)]
        args += ["--heart-beat-interval", "0.5", "--max-new-tokens-limit", "4096"]
        return self.start(name, "llava.serve.model_worker", args)

    def start_controller_and_api(self) -> None:
        args = ["--port", str(self.ports["controller"]), "--heart-beat-expiration", str(EXPIRATION)]
        args += ["--dispatch-method", "lottery"]  # each new request may pick any worker, as in the report
        self.start("controller", "llava.serve.controller", args)
        self.start("api", "llava.serve.openai_api_server", ["--port", str(self.ports["api"]), "--controller",
                                                             self.controller])  # fmt: skip

    def wait_ready(self, workers: int) -> None:
        procs = list(self.procs.values())
        wait_until(lambda: http_ok(self.controller + "/health"), 60, "the controller", procs)
        count = lambda: controller_post(self.controller, "/worker_get_status")["workers"] == workers  # noqa: E731
        wait_until(count, 180, f"{workers} workers to register", procs)
        wait_until(lambda: http_ok(self.api + "/health"), 60, "the OpenAI server", procs)

    def registered(self) -> list[str]:
        return sorted(controller_post(self.controller, "/worker_get_status").get("model_names", []))

    def routed(self, n: int = 12) -> set[str]:
        return {controller_post(self.controller, "/get_worker_address", {"model": MODEL})["address"] for _ in range(n)}

    def queue(self, name: str) -> int:
        return requests.get(self.workers[name] + "/health", timeout=10).json()["queue_length"]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def stack(tiny, tmp_path_factory):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    s = Stack(str(tmp_path_factory.mktemp("faults")), tiny.save_full(model))
    try:
        s.start_controller_and_api()
        s.start_worker("w1")
        s.start_worker("w2")
        s.wait_ready(2)
        yield s
    finally:
        s.stop()


def chat_body(text: str = "What is in the picture?", max_tokens: int = 6, **extra) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
        {"type": "text", "text": text},
    ]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip


def llava_prompt(question: str) -> str:
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def post_chunked(url: str, total: int, piece: int = 1 << 20) -> int:
    """POST `total` bytes with Transfer-Encoding: chunked (no Content-Length); the response status. The server may
    answer 413 and close while the body is still being sent: the status is read anyway."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        block = b'{"x": "' + b"a" * (piece - 7)
        sent = 0
        try:
            while sent < total:
                conn.send(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is already waiting
        return conn.getresponse().status
    finally:
        conn.close()


def raw_post(url: str, body: str | bytes) -> requests.Response:
    data = body.encode() if isinstance(body, str) else body
    return requests.post(url, data=data, headers={"Content-Type": "application/json"}, timeout=60)


# ---------------------------------------------------------------------------------------------------------------------
# Malformed input: 4xx, never 500, and the server stays up
# ---------------------------------------------------------------------------------------------------------------------


def test_malformed_bodies_are_4xx_on_every_server(stack):
    deep_array = "[" * 100_000
    deep_object = '{"a":' * 40 + "1" + "}" * 40
    worker_ok = json.dumps({"model": MODEL, "prompt": llava_prompt("Hi"), "images": [png_b64()], "temperature": 0})
    api_ok = json.dumps(chat_body())
    targets = {
        stack.api + "/v1/chat/completions": (api_ok, "max_tokens"),
        stack.workers["w1"] + "/worker_generate_stream": (worker_ok, "max_new_tokens"),
        stack.controller + "/worker_generate_stream": (worker_ok, "max_new_tokens"),
        stack.controller + "/get_worker_address": (json.dumps({"model": MODEL}), "max_new_tokens"),
        stack.controller + "/report_unreachable": (json.dumps({"worker_name": "x"}), "n"),
    }
    for url, (ok, number_field) in targets.items():
        cases = {
            "deeply nested array": deep_array,
            "deeply nested object": deep_object,
            "not JSON": "{nope",
        }
        for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
            cases[f"{number_field}={literal}"] = ok[:-1] + f', "{number_field}": {literal}}}'
        for what, body in cases.items():
            response = raw_post(url, body)
            assert 400 <= response.status_code < 500, (url, what, response.status_code, response.text[:300])
            text = response.text
            assert "nested too deeply" in text or "not JSON" in text or "not valid JSON" in text or "range" in text, (
                url,
                what,
                text[:300],
            )
        status = post_chunked(url, 40 << 20)
        assert status == 413, (url, "40 MB chunked body", status)
    for url in (stack.api, stack.controller, *stack.workers.values()):
        assert http_ok(url + "/health"), url
    # the API server's own answer is in OpenAI's error format
    err = raw_post(stack.api + "/v1/chat/completions", api_ok[:-1] + ', "max_tokens": NaN}').json()["error"]
    assert err["type"] == "invalid_request_error" and "NaN" in err["message"]


def test_logprobs_is_rejected_with_400(stack):
    for extra in ({"logprobs": True}, {"top_logprobs": 2}):
        response = requests.post(stack.api + "/v1/chat/completions", json=chat_body(**extra), timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "not supported" in error["message"] and error["param"] in extra
    assert requests.post(stack.api + "/v1/chat/completions", json=chat_body(logprobs=False), timeout=120).ok


# ---------------------------------------------------------------------------------------------------------------------
# A client that leaves a non-streaming request
# ---------------------------------------------------------------------------------------------------------------------


def test_non_streaming_client_that_leaves_is_cancelled(stack):
    body = json.dumps(chat_body("Tell a long story.", max_tokens=3000, stream=False)).encode()
    sock = socket.create_connection(("127.0.0.1", stack.ports["api"]), timeout=30)
    try:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        busy = lambda: stack.queue("w1") + stack.queue("w2") == 1  # noqa: E731
        wait_until(busy, 60, "the request to reach a worker", list(stack.procs.values()), interval=0.05)
    finally:
        sock.close()  # the client goes away without reading the answer
    idle = lambda: stack.queue("w1") + stack.queue("w2") == 0  # noqa: E731
    wait_until(idle, 30, "the worker to drop the abandoned request", list(stack.procs.values()))
    log = stack.procs["api"].log_tail(200)
    assert "The client went away; cancelling its request" in log, log


# ---------------------------------------------------------------------------------------------------------------------
# Dead workers
# ---------------------------------------------------------------------------------------------------------------------


def test_dead_idle_worker_stops_receiving_requests_after_one_failure(stack, tmp_path):
    from llava.serve.gradio_web_server import UserFacingError, WebServer, stream_reply

    dead, live = stack.workers["w2"], stack.workers["w1"]
    reported = f"Worker {dead} was reported unreachable"
    controller_log = lambda: stack.procs["controller"].log_tail(2000)  # noqa: E731
    assert stack.routed() == {dead, live}
    stack.procs["w2"].kill()
    # The web UI: one failed request reports the worker, and the controller stops routing to it at once.
    web = WebServer(stack.controller, str(tmp_path), model_list_mode="reload")
    payload = {"model": MODEL, "prompt": llava_prompt("Hi"), "images": [png_b64()], "max_new_tokens": 4}
    with pytest.raises(UserFacingError, match="not responding"):
        list(stream_reply(web, dead, MODEL, payload))
    assert controller_log().count(reported) == 1
    assert stack.routed(20) == {live}  # long before its heartbeats (120 s here) would expire
    # A worker that answers again is re-admitted only after the controller's own status probe.
    stack.start_worker("w2")
    wait_until(lambda: dead in stack.routed(), 180, "the restarted worker to be routed again", [stack.procs["w2"]])
    assert f"Worker {dead} answers again" in controller_log()
    # The OpenAI API server: every request still succeeds (the one that meets the dead worker is retried on the live
    # one) and it reports the worker. The lottery picks the dead one with probability 1/2 per request: 40 misses
    # in a row happen once in 10^12 runs.
    stack.procs["w2"].kill()
    for _ in range(40):
        response = requests.post(stack.api + "/v1/chat/completions", json=chat_body(), timeout=120)
        assert response.status_code == 200, response.text
        if controller_log().count(reported) == 2:
            break
    assert controller_log().count(reported) == 2
    assert stack.routed(20) == {live}
    stack.start_worker("w2")  # back for the next test
    wait_until(lambda: dead in stack.routed(), 180, "the restarted worker to be routed again", [stack.procs["w2"]])


def test_report_unreachable_of_an_unknown_worker_changes_nothing(stack):
    assert controller_post(stack.controller, "/report_unreachable", {"worker_name": "http://127.0.0.1:1"}) == {
        "known": False
    }
    assert stack.routed() == set(stack.workers.values())


def test_stream_cut_by_a_kill_raises_in_the_openai_client(stack):
    import openai

    client = openai.OpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0, timeout=600)
    stream = client.chat.completions.create(stream=True, **chat_body("Tell a long story.", max_tokens=3000))
    chunks = [next(stream)]  # the role chunk: the answer is under way
    busy = lambda: [name for name in ("w1", "w2") if stack.queue(name) == 1]  # noqa: E731
    (name,) = wait_until(busy, 60, "the stream to reach a worker", list(stack.procs.values()), interval=0.05)
    stack.procs[name].kill()
    with pytest.raises(openai.APIError) as raised:
        chunks += list(stream)
    assert f"The worker at {stack.workers[name]} stopped mid-answer" in str(raised.value)
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)  # never passed off as finished
    stack.start_worker(name)  # back for the next test
    wait_until(lambda: stack.workers[name] in stack.routed(), 180, "the restarted worker", [stack.procs[name]])


def test_worker_killed_under_a_200_request_burst(stack):
    import openai

    client = openai.OpenAI(base_url=stack.api + "/v1", api_key="none", max_retries=0, timeout=600)
    victim = stack.workers["w2"]

    def plain(i: int) -> tuple[str, str]:
        response = requests.post(stack.api + "/v1/chat/completions", json=chat_body(f"Question {i}?", 12), timeout=600)
        if response.status_code == 200:
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["message"]["content"], str)
            return "ok", ""
        error = response.json()["error"]  # OpenAI's format, never a plain-text 500
        return "error", f"{response.status_code} {error['message']}"

    def streamed(i: int) -> tuple[str, str]:
        kwargs = chat_body(f"Question {i}?", 12)
        try:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
        except openai.APIError as err:
            return "error", str(err)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        # a stream that ends without a finish reason and without raising would be a cut answer passed off as whole
        assert finish in (["stop"], ["length"]), chunks[-3:]
        return "ok", ""

    with ThreadPoolExecutor(200) as pool:
        futures = [pool.submit(streamed if i % 2 else plain, i) for i in range(200)]
        wait_until(lambda: stack.queue("w2") >= 3, 120, "requests on the victim", list(stack.procs.values()), 0.05)
        stack.procs["w2"].kill()
        results = [f.result(timeout=900) for f in futures]  # none hangs
    kinds = {i: results[i] for i in range(200)}
    assert len(results) == 200
    plain_results = [kinds[i] for i in range(0, 200, 2)]
    stream_results = [kinds[i] for i in range(1, 200, 2)]
    # non-streaming requests had sent nothing to their client: each was retried on the live worker
    assert all(kind == "ok" for kind, _ in plain_results), [r for r in plain_results if r[0] != "ok"][:5]
    # a stream cut by the kill raises in the official client with the cause named
    errors = [message for kind, message in stream_results if kind == "error"]
    assert all(victim in message and "stopped mid-answer" in message for message in errors), errors[:5]
    assert sum(kind == "ok" for kind, _ in stream_results) >= 50
    # the kill did land mid-answer: some request was cut on the victim, either a stream (its client saw the error
    # above) or a non-streaming request that the API server retried on the live worker (its log says so)
    retried = f"The worker at {victim} stopped mid-answer" in stack.procs["api"].log_tail(10**7)
    assert errors or retried, "no request was mid-answer on the victim when it was killed"
    assert stack.routed(20) == {stack.workers["w1"]}


# ---------------------------------------------------------------------------------------------------------------------
# Full queues: another worker is asked, and 503 `overloaded` only when every worker was tried and was full
# ---------------------------------------------------------------------------------------------------------------------


def test_controller_exclude_filters_and_is_validated(stack):
    from llava.serve.controller import Controller

    controller = Controller("lottery")
    for name in ("http://a", "http://b/", "http://c"):
        controller.register_worker(name, True, {"model_names": ["m"], "speed": 1, "queue_length": 0})
    assert {controller.get_worker_address("m", ["http://a", "http://c"]) for _ in range(20)} == {"http://b/"}
    assert controller.get_worker_address("m", ["http://a", "http://b", "http://c/"]) == ""  # a trailing / is the same
    assert {controller.get_worker_address("m", []) for _ in range(50)} == {"http://a", "http://b/", "http://c"}
    # over HTTP, on the real controller: `exclude` is optional, filters, and anything but a list of strings is a 400
    for name, address in stack.workers.items():  # an earlier test may have killed one
        if not stack.procs[name].alive():
            stack.start_worker(name)
            routed = lambda a=address: a in stack.routed()  # noqa: E731
            wait_until(routed, 180, f"worker {name} to be routed", [stack.procs[name]])
    url = stack.controller + "/get_worker_address"
    w1, w2 = stack.workers["w1"], stack.workers["w2"]
    picks = {controller_post(stack.controller, "/get_worker_address", {"model": MODEL, "exclude": [w1]})["address"]
             for _ in range(12)}  # fmt: skip
    assert picks == {w2}
    none_left = controller_post(stack.controller, "/get_worker_address", {"model": MODEL, "exclude": [w2, w1]})
    assert none_left["address"] == "" and "`exclude`" in none_left["error"], none_left
    for bad in ("http://x", [1], [None], {"a": 1}, None, [["http://x"]]):
        response = requests.post(url, json={"model": MODEL, "exclude": bad}, timeout=60)
        assert response.status_code == 400, (bad, response.status_code, response.text)
        assert "`exclude`" in response.json()["text"], response.text
    assert stack.routed() == {w1, w2}  # the original request, without `exclude`, is unchanged


@pytest.fixture(scope="module")
def small_queues(tiny, tmp_path_factory):
    """A controller (lottery), the API server and two workers that hold 2 requests each (1 decoding, 1 waiting);
    the test starts a third, roomy worker ("roomy") itself."""
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    s = Stack(str(tmp_path_factory.mktemp("overload")), tiny.save_full(model, "overload"), ("s1", "s2", "roomy"))
    try:
        s.start_controller_and_api()
        s.start_worker("s1", concurrency=1, max_queue=1)
        s.start_worker("s2", concurrency=1, max_queue=1)
        s.wait_ready(2)
        yield s
    finally:
        s.stop()


def burst(api: str, n: int, max_tokens: int = 16) -> list[tuple[int, dict | None]]:
    """`n` concurrent chat requests (every other one streamed); each one's HTTP status and, for an error, the OpenAI
    error object. A 200 must be a finished answer (a stream ends with `[DONE]`)."""

    def one(i: int) -> tuple[int, dict | None]:
        body = chat_body(f"Question {i}?", max_tokens, stream=bool(i % 2))
        response = requests.post(api + "/v1/chat/completions", json=body, timeout=600)
        if response.status_code != 200:
            return response.status_code, response.json()["error"]
        if i % 2:
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length"), response.text
        return 200, None

    with ThreadPoolExecutor(n) as pool:
        return [f.result(timeout=900) for f in [pool.submit(one, i) for i in range(n)]]


def test_overloaded_only_when_every_worker_is_full(small_queues):
    s = small_queues
    api_log = lambda: s.procs["api"].log_tail(10**7)  # noqa: E731
    # Both workers small: many requests find both full. Each 503 is `overloaded` after both were tried; the rest
    # complete; nothing is lost or fails otherwise.
    sent = 24
    results = burst(s.api, sent)
    overloaded = [error for status, error in results if status == 503]
    completed = sum(status == 200 for status, _ in results)
    assert completed + len(overloaded) == sent, [r for r in results if r[0] not in (200, 503)][:5]
    assert overloaded and completed >= 2, (completed, len(overloaded))
    for error in overloaded:
        assert error["code"] == "overloaded" and "(2 tried)" in error["message"], error
    # A roomy worker joins: a request that meets a full small worker is sent on to another, so none gets 503
    # while the roomy one has room, though the lottery picks a small worker for most of them.
    full_before = api_log().count("is full; trying another")
    s.start_worker("roomy", concurrency=8, max_queue=256)
    s.wait_ready(3)
    results = burst(s.api, 40)
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
    assert api_log().count("is full; trying another") > full_before  # the full workers were met, and passed over


def test_load_script_loses_nothing(tmp_path):
    out = tmp_path / "load.json"
    args = [sys.executable, "scripts/bench/serve_load.py", "--concurrency", "40", "--max-tokens", "2"]
    args += ["--work-dir", str(tmp_path), "--json", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, **SERVE_ENV})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["concurrency"] == 40 and run["lost"] == 0 and run["completed"] + sum(run["errors"].values()) == 40
    assert all(rss > 0 for rss in run["peak_worker_rss_mb"]) and run["p50_s"] <= run["p99_s"]


# ---------------------------------------------------------------------------------------------------------------------
# Protocol defaults (issue 12.18)
# ---------------------------------------------------------------------------------------------------------------------


def test_worker_protocol_defaults_are_the_originals(tiny):
    from llava.inference import LlavaEngine
    from llava.serve.model_worker import ModelWorker

    model = tiny.model("llama", seed=3)
    model.config.conv_template = "llava_v1"
    engine = LlavaEngine.from_pretrained(tiny.save_full(model, "defaults"), device="cpu")
    worker = ModelWorker(engine, MODEL, "http://127.0.0.1:1", None)
    prompt = llava_prompt("Hi")
    _, _, params = worker.prepare({"prompt": prompt, "images": [png_b64()]})
    assert (params.temperature, params.top_p, params.max_new_tokens) == (1.0, 1.0, 256)
    _, _, params = worker.prepare({"prompt": prompt, "images": [png_b64()], "max_new_tokens": 10**9})
    assert params.max_new_tokens == 1024  # capped as the original's worker did
    _, _, params = worker.prepare({"prompt": prompt, "images": [png_b64()], "temperature": 0.2, "max_new_tokens": 7})
    assert (params.temperature, params.max_new_tokens) == (0.2, 7)  # clients' own values are kept


# ---------------------------------------------------------------------------------------------------------------------
# CLI: a rejected turn leaves the conversation as it was
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_rejected_first_turn_keeps_the_image(tiny, tmp_path):
    from PIL import Image

    from llava.inference import GenerationParams, LlavaEngine

    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    checkpoint = tiny.save_full(model, "cli")
    image_path = tmp_path / "picture.png"
    Image.new("RGB", (40, 30), (10, 100, 200)).save(image_path)
    args = [sys.executable, "-m", "llava.serve.cli", "--model-path", checkpoint, "--device", "cpu"]
    args += ["--image-file", str(image_path), "--temperature", "0", "--max-new-tokens", "12"]
    questions = "word " * 3000 + "\nWhat is in the picture?\n"
    done = subprocess.run(
        args, input=questions, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **SERVE_ENV}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count("[error:") == 1 and "exceeds the model's context" in out, out[-2000:]
    answer = out.split("ASSISTANT: ")[-1].split("USER:")[0].strip()
    engine = LlavaEngine.from_pretrained(checkpoint, device="cpu")
    prompt = engine.build_prompt("What is in the picture?", n_images=1)
    image = Image.open(image_path).convert("RGB")
    expected = engine.generate([prompt], [[image]], GenerationParams(temperature=0, max_new_tokens=12))[0]
    assert answer == expected


# ---------------------------------------------------------------------------------------------------------------------
# The web UI on a worker that speaks only the original protocol (issue 12.17)
# ---------------------------------------------------------------------------------------------------------------------


class OriginalProtocolWorker(http.server.BaseHTTPRequestHandler):
    """The endpoints the original LLaVA worker has (no /model_details): status and a NUL-delimited stream whose
    `text` is the prompt plus the answer so far, as its `generate_stream` sends."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (the handler's API)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/worker_get_status":
            return self._send(json.dumps({"model_names": ["llava-v1.5-7b"], "speed": 1, "queue_length": 0}).encode())
        if self.path == "/worker_generate_stream":
            type(self).seen.append(body)
            out = b"".join(
                json.dumps({"text": body["prompt"] + text, "error_code": 0}).encode() + b"\0"
                for text in ("A", "A blue", "A blue square.")
            )
            return self._send(out)
        self.send_error(404)

    def _send(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_web_ui_falls_back_to_the_original_protocol(tmp_path):
    from llava.serve.gradio_web_server import WebServer, stream_reply, template_from_model_name

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OriginalProtocolWorker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        web = WebServer("http://127.0.0.1:1", str(tmp_path), model_list_mode="reload")
        template = web.model_template(address, "llava-v1.5-7b")
        assert template == "llava_v1" == template_from_model_name("llava-v1.5-7b")
        conv = get_conv_template(template)
        conv.append_message(conv.roles[0], "<image>\nWhat is it?")
        conv.append_message(conv.roles[1], None)
        payload = {"model": "llava-v1.5-7b", "prompt": conv.get_prompt(), "images": [png_b64()], "temperature": 0.2}
        assert list(stream_reply(web, address, "llava-v1.5-7b", payload))[-1] == "A blue square."
        assert OriginalProtocolWorker.seen[-1]["prompt"].endswith("What is it? ASSISTANT:")
    finally:
        server.shutdown()
    # the original web UI's choices for other names
    assert template_from_model_name("llava-v1.6-mistral-7b") == "mistral_instruct"
    assert template_from_model_name("llava-v1.6-34b") == "chatml_direct"
    assert template_from_model_name("llava-llama-2-13b-chat") == "llava_llama_2"
    assert template_from_model_name("llava-13b-v0") == "llava_v0"
    assert template_from_model_name("vicuna-7b") == "vicuna_v1"
