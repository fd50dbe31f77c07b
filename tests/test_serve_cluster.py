"""The serving stack as users run it: controller, two workers with different tiny checkpoints, the OpenAI API and the
web UI, each a real process on a free loopback port, talking real HTTP."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import Proc, controller_post, free_port, generate, http_ok, png_b64, wait_until

from llava.conversation import get_conv_template
from llava.demo.screenshot import BROWSER_ARGS

pytestmark = pytest.mark.slow

EXPIRATION = 3.0  # the controller's heartbeat window in these tests
CHROMIUM = "/usr/bin/chromium"


class Cluster:
    def __init__(self, tmp, checkpoints: dict[str, str]):
        self.tmp = tmp
        self.checkpoints = checkpoints
        self.procs: list[Proc] = []
        self.ports = {name: free_port() for name in ("controller", "alpha", "beta", "openai", "web")}
        self.controller = f"http://127.0.0.1:{self.ports['controller']}"
        self.workers = {m: f"http://127.0.0.1:{self.ports[m]}" for m in ("alpha", "beta")}
        self.openai = f"http://127.0.0.1:{self.ports['openai']}/v1"
        self.web = f"http://127.0.0.1:{self.ports['web']}"
        self.log_dir = os.path.join(tmp, "web-logs")

    def start(self, name, module, args, env=None) -> Proc:
        proc = Proc(name, module, args, self.tmp, {"OMP_NUM_THREADS": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def start_worker(self, model: str, port: int, checkpoint: str) -> Proc:
        url = f"http://127.0.0.1:{port}"
        return self.start(
            f"worker-{model}",
            "llava.serve.model_worker",
            [
                "--port",
                str(port),
                "--worker",
                url,
                "--controller",
                self.controller,
                "--model-path",
                checkpoint,
                "--model-name",
                model,
                "--device",
                "cpu",
                "--limit-model-concurrency",
                "8",
                "--heart-beat-interval",
                "0.5",
                "--max-image-pixels",
                "1000000",
                "--max-request-bytes",
                "3000000",
            ],
        )

    def stop(self):
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    alpha = tiny.model("llama", seed=11)
    alpha.config.conv_template = "llava_v1"
    beta = tiny.model("mistral", seed=5)
    beta.config.conv_template = "mistral_instruct"
    c = Cluster(str(tmp_path_factory.mktemp("cluster")), {"alpha": tiny.save_full(alpha), "beta": tiny.save_full(beta)})
    try:
        # Workers first: they keep retrying until the controller is up, so start order does not matter.
        for model in ("alpha", "beta"):
            c.start_worker(model, c.ports[model], c.checkpoints[model])
        time.sleep(1.0)
        c.start(
            "controller",
            "llava.serve.controller",
            ["--port", str(c.ports["controller"]), "--heart-beat-expiration", str(EXPIRATION)],
        )
        c.start(
            "openai",
            "llava.serve.openai_api_server",
            # the remote-image check below serves its image from loopback, which must be allowed by name
            ["--port", str(c.ports["openai"]), "--controller", c.controller, "--api-key", "test-key"]
            + ["--allow-image-urls", "--image-url-allow", "127.0.0.1/32"],
        )
        c.start(
            "web",
            "llava.serve.gradio_web_server",
            [
                "--port",
                str(c.ports["web"]),
                "--controller",
                c.controller,
                "--model-list-mode",
                "reload",
                "--log-dir",
                c.log_dir,
            ],
        )
        wait_until(
            lambda: controller_post(c.controller, "/list_models")["models"] == ["alpha", "beta"],
            120,
            "both workers to register",
            c.procs,
        )
        wait_until(lambda: http_ok(c.openai.removesuffix("/v1") + "/health"), 60, "the OpenAI server", c.procs)
        yield c
    finally:
        c.stop()


def llava_prompt(question: str, n_images: int = 1) -> str:
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\n" * n_images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def answer(chunks: list[dict], prompt: str) -> str:
    assert chunks and chunks[-1]["error_code"] == 0, chunks[-1:]
    return chunks[-1]["text"][len(prompt) :].strip()


def test_models_listed_and_requests_routed(cluster):
    c = cluster
    assert controller_post(c.controller, "/get_worker_address", {"model": "alpha"})["address"] == c.workers["alpha"]
    assert controller_post(c.controller, "/get_worker_address", {"model": "beta"})["address"] == c.workers["beta"]
    status = controller_post(c.controller, "/worker_get_status")
    assert status["model_names"] == ["alpha", "beta"] and status["workers"] == 2
    prompt = llava_prompt("What is it?")
    for model in ("alpha", "beta"):
        payload = {"model": model, "prompt": prompt, "images": [png_b64()], "temperature": 0, "max_new_tokens": 12}
        direct = answer(generate(c.workers[model] + "/worker_generate_stream", payload)[1], prompt)
        routed = answer(generate(c.controller + "/worker_generate_stream", payload)[1], prompt)
        assert routed == direct
    # two different checkpoints: the same question gets different answers
    answers = {
        m: answer(generate(c.controller + "/worker_generate_stream", {**payload, "model": m})[1], prompt)
        for m in ("alpha", "beta")
    }
    assert answers["alpha"] != answers["beta"]


def test_stream_protocol(cluster):
    prompt = llava_prompt("Describe the picture.")
    payload = {"model": "alpha", "prompt": prompt, "images": [png_b64()], "temperature": 0, "max_new_tokens": 32}
    status, chunks = generate(cluster.workers["alpha"] + "/worker_generate_stream", payload)
    assert status == 200 and len(chunks) >= 3  # the text grows over several chunks
    texts = [ch["text"] for ch in chunks]
    assert all(t.startswith(prompt) for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    assert 0 < chunks[-1]["usage"]["completion_tokens"] <= 32 and chunks[-1]["usage"]["prompt_tokens"] > 16


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_openai_client(cluster):
    from openai import AuthenticationError, NotFoundError, OpenAI

    c = cluster
    client = OpenAI(base_url=c.openai, api_key="test-key", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]
    image = png_b64(color=(200, 30, 30))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    prompt = llava_prompt("What is it?")
    payload = {"model": "alpha", "prompt": prompt, "images": [image], "temperature": 0, "max_new_tokens": 16}
    expected = answer(generate(c.workers["alpha"] + "/worker_generate_stream", payload)[1], prompt)

    reply = client.chat.completions.create(model="alpha", messages=messages, temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens <= 16 and reply.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model="alpha",
        messages=messages,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(deltas) == expected and len(deltas) >= 2 and usage.completion_tokens <= 16

    # an http(s) image URL is downloaded by the API server: same pixels, same answer
    _ImageHandler.body = base64.b64decode(image)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/red.png"
        remote = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
            }
        ]
        reply = client.chat.completions.create(model="alpha", messages=remote, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected
    finally:
        server.shutdown()

    # the other model answers in its own template (mistral_instruct), two images in one message
    two = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64()}"}},
                {"type": "text", "text": "Which is red?"},
            ],
        }
    ]
    reply = client.chat.completions.create(model="beta", messages=two, temperature=0, max_tokens=8)
    conv = get_conv_template("mistral_instruct")
    conv.append_message(conv.roles[0], "<image>\n<image>\nWhich is red?")
    conv.append_message(conv.roles[1], None)
    beta_payload = {
        "model": "beta",
        "prompt": conv.get_prompt(),
        "images": [image, png_b64()],
        "temperature": 0,
        "max_new_tokens": 8,
    }
    beta_answer = answer(generate(c.workers["beta"] + "/worker_generate_stream", beta_payload)[1], conv.get_prompt())
    assert reply.choices[0].message.content == beta_answer

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=c.openai, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(NotFoundError, match="available: alpha, beta"):
        client.chat.completions.create(model="nope", messages=messages)


def test_32_concurrent_greedy_requests_equal_one_at_a_time(cluster):
    c = cluster
    questions = ["What is it?", "Describe it.", "Which colour?", "Is it big?", "Count the shapes.", "Where?"]
    payloads = []
    for i in range(32):
        n_images = i % 3  # 0, 1 or 2 images
        prompt = llava_prompt(questions[i % len(questions)] + " " * (i % 4), n_images)
        images = [png_b64(size=(20 + 7 * i, 30), color=(7 * i % 255, 80, 160)) for _ in range(n_images)]
        payloads.append(
            {"model": "alpha", "prompt": prompt, "images": images, "temperature": 0, "max_new_tokens": 6 + i % 11}
        )
    url = c.controller + "/worker_generate_stream"
    alone = [answer(generate(url, p)[1], p["prompt"]) for p in payloads]
    before = requests.get(c.workers["alpha"] + "/health", timeout=5).json()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: generate(url, p), payloads))
    assert all(status == 200 for status, _ in results)
    together = [answer(chunks, p["prompt"]) for (_, chunks), p in zip(results, payloads)]
    assert together == alone
    after = requests.get(c.workers["alpha"] + "/health", timeout=5).json()
    assert after["max_batch_rows"] > 1 and after["batches"] - before["batches"] < 32  # they shared forward passes
    assert after["queue_length"] == 0
    # the images were seen in the one-at-a-time pass: their prefixes were reused, and the answers stayed exact
    assert after["prefix_cache"]["hits"] > before["prefix_cache"]["hits"]
    # and the worker's answers are `LlavaEngine.generate`'s (same thread count as the worker: same arithmetic)
    import torch

    from llava.inference import GenerationParams, LlavaEngine
    from llava.mm_utils import load_image_from_base64

    engine = LlavaEngine.from_pretrained(c.checkpoints["alpha"], device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for p, expected in list(zip(payloads, alone))[:8]:
            params = GenerationParams(temperature=0, max_new_tokens=p["max_new_tokens"])
            images = [load_image_from_base64(b) for b in p["images"]]
            assert engine.generate([p["prompt"]], [images], params)[0] == expected
    finally:
        torch.set_num_threads(threads)


def test_malformed_requests_get_4xx_and_the_servers_stay_up(cluster):
    c = cluster
    worker = c.workers["alpha"] + "/worker_generate_stream"
    prompt = llava_prompt("What is it?")
    good = {"model": "alpha", "prompt": prompt, "images": [png_b64()], "temperature": 0, "max_new_tokens": 4}
    expected = answer(generate(worker, good)[1], prompt)
    big = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (1100, 1000), (1, 2, 3)).save(big, format="PNG")  # 1.1 Mpx > --max-image-pixels 1 Mpx
    cases = [
        ("{not json", 400, "not valid JSON"),
        (json.dumps([1, 2]), 400, "must be a JSON object"),
        ({**good, "images": ["@@@ not base64 @@@" * 8]}, 400, "Image 1 of 1 was rejected"),
        ({**good, "images": ["data:image/png;base64,QUJD"]}, 400, "not an image"),
        ({**good, "images": []}, 400, "1 `<image>` marker(s) but 0 image(s)"),
        ({**good, "images": [png_b64(), png_b64()]}, 400, "1 `<image>` marker(s) but 2 image(s)"),
        ({**good, "images": [base64.b64encode(big.getvalue()).decode()]}, 400, "too many pixels"),
        ({**good, "prompt": llava_prompt("word " * 3000)}, 400, "exceeds the model's context"),
        ({**good, "temperature": -1}, 400, "`temperature`=-1"),
        ({**good, "top_p": 0}, 400, "`top_p`=0"),
        ({**good, "max_new_tokens": -5}, 400, "`max_new_tokens`=-5"),
        # (a huge `max_new_tokens` is cut to --max-new-tokens-limit, 1024, as the original worker did: not an error)
        ({**good, "max_new_tokens": 2.5}, 400, "`max_new_tokens` must be a whole number"),
        ({**good, "temperature": "hot"}, 400, "`temperature` must be a number"),
        ({**good, "model": "beta"}, 400, "serves `alpha`, not `beta`"),
        ({**good, "prompt": ""}, 400, "`prompt` must be a non-empty string"),
        ("x" * 3_100_000, 413, "larger than the server's limit"),
    ]
    for payload, status, message in cases:
        got_status, chunks = generate(worker, payload)
        assert got_status == status and message in chunks[0]["text"], (
            payload if len(str(payload)) < 300 else message,
            got_status,
            chunks,
        )
        assert chunks[0]["error_code"] == 1
    assert answer(generate(worker, good)[1], prompt) == expected  # still serving

    # the controller: bad JSON, no worker for the model (an error code, and the request ends there)
    assert requests.post(c.controller + "/get_worker_address", data="{", timeout=5).status_code == 400
    status, chunks = generate(c.controller + "/worker_generate_stream", {**good, "model": "nope"})
    assert status == 503 and chunks[0]["error_code"] == 2 and "No worker is serving model `nope`" in chunks[0]["text"]
    assert len(chunks) == 1

    # the OpenAI API
    headers = {"Authorization": "Bearer test-key"}
    url = c.openai + "/chat/completions"
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}}
    user = {"role": "user", "content": [image_part, {"type": "text", "text": "What is it?"}]}
    ok = {"model": "alpha", "messages": [user], "temperature": 0, "max_tokens": 4}
    bad = [
        ("{", 400, "not valid JSON"),
        ({**ok, "temperature": 9}, 400, "`temperature`"),
        ({**ok, "max_tokens": -1}, 400, "`max_tokens`"),
        (
            {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]},
            400,
            "not a base64 data URL",
        ),
        (
            {
                **ok,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ],
            },
            400,
            "must be a data: URL or an http(s) URL",
        ),
        (
            {
                **ok,
                "stream": True,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}],
                    }
                ],
            },
            400,
            "not an image",
        ),
        ({**ok, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "exceeds the model's context"),
        ({**ok, "model": "nope"}, 404, "not served here"),
    ]
    for payload, status, message in bad:
        kwargs = {"data": payload} if isinstance(payload, str) else {"json": payload}
        response = requests.post(url, headers=headers, timeout=60, **kwargs)
        assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert requests.post(url, json=ok, timeout=60).status_code == 401  # no key
    assert (
        requests.post(url, headers=headers, json=ok, timeout=60).json()["choices"][0]["message"]["content"] == expected
    )


def test_abandoned_request_leaves_the_batch(cluster):
    worker = cluster.workers["beta"]
    payload = {"model": "beta", "prompt": llava_prompt("Hi", 0), "temperature": 0, "max_new_tokens": 1500}
    response = requests.post(worker + "/worker_generate_stream", json=payload, stream=True, timeout=30)
    # The first chunk can come late (text is held back until no later token can change it), so watch the worker's
    # own count instead: the request is being decoded...
    joined = lambda: requests.get(worker + "/health", timeout=5).json()["queue_length"] == 1  # noqa: E731
    wait_until(joined, 10, "the row to join", interval=0.05)
    response.close()  # ...then the client goes away
    wait_until(lambda: requests.get(worker + "/health", timeout=5).json()["queue_length"] == 0, 10, "the row to go")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
def test_web_ui_in_headless_chromium(cluster, tmp_path):
    from playwright.sync_api import sync_playwright

    c = cluster
    wait_until(lambda: http_ok(c.web + "/"), 90, "the web UI", c.procs)
    image = tmp_path / "blue.png"
    image.write_bytes(base64.b64decode(png_b64()))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(c.web)
            page.wait_for_selector("#textbox textarea", timeout=30_000)
            # pick a model from the dropdown (both are listed)
            page.click("#model_selector input")
            options = page.locator("[role=option]")
            options.first.wait_for(timeout=10_000)
            assert sorted(t.replace("✓", "").strip() for t in options.all_inner_texts()) == ["alpha", "beta"]
            page.click("[role=option]:has-text('alpha')")
            assert page.input_value("#model_selector input") == "alpha"
            # a short answer keeps the test quick
            page.click("#parameters")
            page.fill("#max_output_tokens input[type=number]", "48")
            page.keyboard.press("Tab")
            page.set_input_files("#imagebox input[type=file]", str(image))
            page.wait_for_selector("#imagebox img", timeout=10_000)
            # record every state of the chat while the answer streams in
            page.evaluate(
                """() => { window.__states = [];
                new MutationObserver(() => window.__states.push(document.querySelector('#chatbot').innerText))
                  .observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
                }"""
            )
            page.fill("#textbox textarea", "What is in the picture?")
            page.click("#send_btn")
            page.wait_for_selector("#upvote_btn:not([disabled])", timeout=60_000)
            chat = page.inner_text("#chatbot")
            assert "What is in the picture?" in chat and "⚠️" not in chat
            streaming = {s for s in page.evaluate("window.__states") if "▌" in s}
            assert len(streaming) >= 2, "the answer should appear in several steps"
            assert page.locator("#chatbot img").count() >= 1  # the uploaded image is shown in the chat
            page.click("#upvote_btn")
            page.wait_for_selector("#upvote_btn[disabled]", timeout=10_000)
            page.click("#regenerate_btn")
            page.wait_for_selector("#regenerate_btn[disabled]", timeout=10_000)
            page.wait_for_selector("#regenerate_btn:not([disabled])", timeout=60_000)
            page.click("#clear_btn")
            page.wait_for_function(
                "() => !document.querySelector('#chatbot').innerText.includes('What is in the picture?')",
                timeout=10_000,
            )
        finally:
            browser.close()
    log_files = [f for f in os.listdir(c.log_dir) if f.endswith("-conv.json")]
    assert len(log_files) == 1
    with open(os.path.join(c.log_dir, log_files[0])) as f:
        records = [json.loads(line) for line in f]
    assert [r["type"] for r in records[-3:]] == ["chat", "upvote", "chat"]
    first = records[-3]
    assert first["model"] == "alpha" and first["state"]["messages"][0][1] == "What is in the picture?"
    assert first["state"]["messages"][1][1] and not first.get("error")
    assert len(first["images"]) == 1 and os.path.isfile(first["images"][0])
    assert records[-1]["state"]["messages"][1][1] != "", "regenerated answer"


def test_worker_death_is_noticed_and_other_models_keep_serving(cluster):
    from llava.serve.gradio_web_server import UserFacingError, WebServer, stream_reply

    c = cluster
    port = free_port()
    gamma = c.start_worker("gamma", port, c.checkpoints["beta"])
    wait_until(lambda: "gamma" in controller_post(c.controller, "/list_models")["models"], 90, "gamma", [gamma])
    web = WebServer(c.controller, str(c.tmp), "once", request_timeout=30)
    address = web.worker_for("gamma")
    prompt = llava_prompt("Hi", 0)
    assert list(stream_reply(web, address, "gamma", {"model": "gamma", "prompt": prompt, "max_new_tokens": 3}))
    # the web UI shows the worker's reason for a rejection
    too_long = {"model": "gamma", "prompt": llava_prompt("word " * 3000, 0)}
    with pytest.raises(UserFacingError, match="rejected: .*exceeds the model's context"):
        list(stream_reply(web, address, "gamma", too_long))

    gamma.kill()
    # before the heartbeat window closes the controller still lists it: the UI says the worker is not responding
    with pytest.raises(UserFacingError, match="not responding"):
        list(stream_reply(web, address, "gamma", {"model": "gamma", "prompt": prompt, "max_new_tokens": 3}))
    killed = time.monotonic()
    wait_until(
        lambda: controller_post(c.controller, "/list_models")["models"] == ["alpha", "beta"],
        EXPIRATION + 5,
        "gamma to expire",
    )
    assert time.monotonic() - killed <= EXPIRATION + 2
    with pytest.raises(UserFacingError, match="No worker is serving model `gamma`"):
        web.worker_for("gamma")
    status, chunks = generate(c.controller + "/worker_generate_stream", {"model": "gamma", "prompt": prompt})
    assert status == 503 and chunks[0]["error_code"] == 2 and "No worker is serving model `gamma`" in chunks[0]["text"]
    response = requests.post(
        c.openai + "/chat/completions",
        headers={"Authorization": "Bearer test-key"},
        json={"model": "gamma", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert response.status_code == 404 and "gamma" in response.json()["error"]["message"]
    # the other models keep serving
    for model in ("alpha", "beta"):
        payload = {"model": model, "prompt": prompt, "temperature": 0, "max_new_tokens": 4}
        status, chunks = generate(c.controller + "/worker_generate_stream", payload)
        assert status == 200 and chunks[-1]["error_code"] == 0
