"""The serving stack under attack (issue 14, items 1-4), with real processes on 127.0.0.1: a rogue worker, calls
without the cluster key, SSRF targets on loopback and link-local, image bombs, and the web UI's uploads."""

from __future__ import annotations

import base64
import http.server
import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serve_helpers import REPO, SERVE_ENV, SLACK, Proc, free_port, wait_until

from llava.conversation import get_conv_template
from llava.serve.client import CLUSTER_KEY_ENV, CLUSTER_KEY_HEADER, stream_worker

pytestmark = pytest.mark.slow

KEY = "s3cret-cluster-key"
API_KEY = "user-key"
AUTH = {CLUSTER_KEY_HEADER: KEY}
RSS_BOUND_KB = 300 * 1024


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def png_bytes(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def prompt(question: str, n_images: int = 0) -> str:
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\n" * n_images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


class Recorder(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP server of the test's own: records every request; /redirect?to=URL redirects, anything else
    answers 200 with a secret that must never show up in an error."""

    def _answer(self):
        self.server.hits.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"TOP-SECRET-METADATA " * 10
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def start_recorder(host: str = "127.0.0.1"):
    server = http.server.ThreadingHTTPServer((host, 0), Recorder)
    server.hits = []
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Stack:
    def __init__(self, tmp: str):
        self.tmp, self.procs = tmp, []

    def start(self, name: str, module: str, args: list[str], env: dict | None = None) -> Proc:
        proc = Proc(name, module, args, self.tmp, {"OMP_NUM_THREADS": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def worker(self, name: str, port: int, controller: str, checkpoint: str, extra=(), env=None) -> Proc:
        args = ["--port", str(port), "--worker", f"http://127.0.0.1:{port}", "--controller", controller]
        args += ["--model-path", checkpoint, "--model-name", "alpha", "--device", "cpu", "--heart-beat-interval", "0.5"]
        return self.start(name, "llava.serve.model_worker", args + list(extra), env)

    def stop(self):
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def checkpoint(tiny):
    model = tiny.model("llama", seed=11)
    model.config.conv_template = "llava_v1"
    return tiny.save_full(model)


@pytest.fixture(scope="module")
def secure(checkpoint, tmp_path_factory):
    """Controller, worker, two API servers (image URLs off / on) and the web UI, all sharing KEY."""
    s = Stack(str(tmp_path_factory.mktemp("secure")))
    ports = {n: free_port() for n in ("controller", "worker", "api", "api_urls", "web")}
    s.controller = f"http://127.0.0.1:{ports['controller']}"
    s.worker_url = f"http://127.0.0.1:{ports['worker']}"
    s.api = f"http://127.0.0.1:{ports['api']}"
    s.api_urls = f"http://127.0.0.1:{ports['api_urls']}"
    s.web = f"http://127.0.0.1:{ports['web']}"
    s.uploads = os.path.join(s.tmp, "gradio-uploads")
    try:
        s.start(
            "controller",
            "llava.serve.controller",
            ["--port", str(ports["controller"]), "--cluster-key", KEY, "--heart-beat-expiration", "5"],
        )
        s.worker_proc = s.worker("worker", ports["worker"], s.controller, checkpoint, env={"LLAVA_CLUSTER_KEY": KEY})
        common = ["--controller", s.controller, "--cluster-key", KEY, "--api-key", API_KEY]
        s.start("api", "llava.serve.openai_api_server", ["--port", str(ports["api"]), *common])
        s.start(
            "api_urls",
            "llava.serve.openai_api_server",
            # URLs on, loopback allowed for 127.0.0.2 only: the redirect tests serve from there
            ["--port", str(ports["api_urls"]), *common, "--allow-image-urls", "--image-url-allow", "127.0.0.2"],
        )
        s.web_proc = s.start(
            "web",
            "llava.serve.gradio_web_server",
            ["--port", str(ports["web"]), "--controller", s.controller, "--model-list-mode", "reload"]
            + ["--log-dir", os.path.join(s.tmp, "logs"), "--max-file-size", "2mb", "--upload-max-age", "3"],
            env={"LLAVA_CLUSTER_KEY": KEY, "GRADIO_TEMP_DIR": s.uploads},
        )
        models = lambda: requests.post(s.controller + "/list_models", headers=AUTH, timeout=5).json()["models"]  # noqa: E731
        wait_until(lambda: models() == ["alpha"], 180, "the worker to register with its key", s.procs)
        for url in (s.api, s.api_urls):
            wait_until(lambda u=url: requests.get(u + "/health", timeout=2).ok, 60, "the API servers", s.procs)
        wait_until(lambda: requests.get(s.web + "/", timeout=2).ok, 120, "the web UI", s.procs)
        yield s
    finally:
        s.stop()


def chat(api: str, content, max_tokens: int = 4) -> requests.Response:
    body = {"model": "alpha", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    body["temperature"] = 0
    return requests.post(
        api + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300
    )


def image_message(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]


# ---------------------------------------------------------------------------------------------------------------------
# 1. The cluster key
# ---------------------------------------------------------------------------------------------------------------------


def test_rogue_worker_cannot_join(secure):
    rogue = start_recorder()
    name = f"http://127.0.0.1:{rogue.server_address[1]}"
    status = {"model_names": ["alpha"], "speed": 1000, "queue_length": 0}
    try:
        for headers in ({}, {CLUSTER_KEY_HEADER: "wrong"}, {CLUSTER_KEY_HEADER: KEY + "x"}):
            registered = requests.post(
                secure.controller + "/register_worker",
                json={"worker_name": name, "check_heart_beat": True, "worker_status": status},
                headers=headers,
                timeout=10,
            )
            assert registered.status_code == 401, registered.text
            assert CLUSTER_KEY_HEADER in registered.json()["text"]
            beat = requests.post(
                secure.controller + "/receive_heart_beat",
                json={"worker_name": secure.worker_url, "queue_length": 0},
                headers=headers,
                timeout=10,
            )
            assert beat.status_code == 401
        # users' requests all go to the real worker; the rogue never hears a thing
        for _ in range(4):
            response = chat(secure.api, "Hello")
            assert response.status_code == 200, response.text
        assert rogue.hits == []
        assert requests.post(secure.controller + "/list_models", headers=AUTH, timeout=10).json() == {
            "models": ["alpha"]
        }
    finally:
        rogue.shutdown()


def test_controller_and_worker_refuse_calls_without_the_key(secure):
    controller_paths = ["/register_worker", "/receive_heart_beat", "/refresh_all_workers", "/list_models"]
    controller_paths += ["/get_worker_address", "/worker_get_status", "/worker_generate_stream"]
    worker_paths = ["/worker_generate_stream", "/worker_get_status", "/model_details", "/worker_get_conv_template"]
    body = {"model": "alpha", "prompt": prompt("Hi"), "max_new_tokens": 2, "worker_name": "x"}
    targets = [secure.controller + p for p in controller_paths] + [secure.worker_url + p for p in worker_paths]
    for url in targets:
        for headers in ({}, {CLUSTER_KEY_HEADER: "nope"}, {"Authorization": f"Bearer {KEY}"}):
            response = requests.post(url, json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (url, headers, response.status_code)
    for base in (secure.controller, secure.worker_url):
        assert requests.get(base + "/health", timeout=10).status_code == 401
        assert requests.get(base + "/health", headers=AUTH, timeout=10).status_code == 200
    # with the key everything works: directly at the worker, through the controller's relay, and via client.py
    assert requests.post(secure.worker_url + "/model_details", headers=AUTH, timeout=10).json()["model_name"] == "alpha"
    for url in (secure.worker_url, secure.controller):
        chunks = list(stream_worker(url + "/worker_generate_stream", body, KEY, timeout=(10, 300)))
        assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].startswith(body["prompt"]), chunks[-1:]
    refused = list(stream_worker(secure.worker_url + "/worker_generate_stream", body, None))
    assert len(refused) == 1 and "cluster key" in refused[0]["text"] and refused[0]["error_code"]


def test_original_protocol_without_a_key_on_loopback_and_loud_warning_elsewhere(checkpoint, tmp_path):
    s = Stack(str(tmp_path))
    port, worker_port, exposed = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{port}"
    env = {"LLAVA_CLUSTER_KEY": ""}
    try:
        ctl = s.start("controller", "llava.serve.controller", ["--port", str(port)], env)
        worker = s.worker("worker", worker_port, controller, checkpoint, env=env)
        open_ctl = s.start("exposed", "llava.serve.controller", ["--host", "0.0.0.0", "--port", str(exposed)], env)
        listed = lambda: requests.post(controller + "/list_models", timeout=5).json()["models"] == ["alpha"]  # noqa: E731
        wait_until(listed, 180, "the keyless worker to register", [ctl, worker])
        body = {"model": "alpha", "prompt": prompt("Hi"), "max_new_tokens": 2}
        chunks = list(stream_worker(controller + "/worker_generate_stream", body))  # the original protocol, no key
        assert chunks[-1]["error_code"] == 0
        wait_until(lambda: "WARNING" in open_ctl.log_tail(), 60, "the exposed controller's warning", [open_ctl])
        log = open_ctl.log_tail()
        assert "WITHOUT a cluster key" in log and "--cluster-key" in log and "0.0.0.0" in log
        assert "WITHOUT a cluster key" not in ctl.log_tail() + worker.log_tail()
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------------------------------
# 2. SSRF
# ---------------------------------------------------------------------------------------------------------------------


def test_image_urls_are_off_by_default(secure):
    target = start_recorder()
    url = f"http://127.0.0.1:{target.server_address[1]}/cat.png"
    try:
        response = chat(secure.api, image_message(url))
        assert response.status_code == 400 and "--allow-image-urls" in response.json()["error"]["message"]
        body = {"model": "alpha", "prompt": prompt("What?", 1), "images": [url], "max_new_tokens": 2}
        refused = requests.post(secure.worker_url + "/worker_generate_stream", json=body, headers=AUTH, timeout=30)
        assert refused.status_code == 400 and "--allow-image-urls" in refused.json()["text"]
        assert target.hits == []
    finally:
        target.shutdown()


def test_ssrf_targets_are_refused_by_address(secure):
    recorder = start_recorder()
    here = f"http://127.0.0.1:{recorder.server_address[1]}"
    redirector = start_recorder("127.0.0.2")  # allowed by --image-url-allow 127.0.0.2
    there = f"http://127.0.0.2:{redirector.server_address[1]}"
    closed = f"http://127.0.0.2:{free_port()}"
    try:
        cases = [
            (secure.controller + "/list_models", "loopback address 127.0.0.1"),
            (secure.worker_url + "/worker_get_status", "loopback address 127.0.0.1"),
            (here + "/x.png", "loopback address 127.0.0.1"),
            ("http://localhost:1/x.png", "loopback address"),
            ("http://169.254.169.254/latest/meta-data/", "link-local address 169.254.169.254"),
            ("http://10.1.2.3/x.png", "private address 10.1.2.3"),
            ("http://[::1]:1/x.png", "loopback address ::1"),
            ("http://0.0.0.0:1/x.png", "unspecified address"),
            ("http://224.0.0.1/x.png", "multicast address"),
            (f"{there}/redirect?to={here}/x.png", "redirects to a loopback address"),
            (f"{there}/redirect?to=http://169.254.169.254/latest", "redirects to a link-local address"),
        ]
        for url, expected in cases:
            response = chat(secure.api_urls, image_message(url))
            message = response.json()["error"]["message"]
            assert response.status_code == 400 and expected in message, (url, message)
            assert "--image-url-allow" in message
        assert recorder.hits == []  # nothing reached the loopback target, directly or by redirect
        assert redirector.hits.count("/redirect?to=" + here + "/x.png") == 1
        # an allowed host that answers with something else: no byte of its answer shows, and an open port reads
        # exactly like a closed one
        answered = chat(secure.api_urls, image_message(f"{there}/secret.png")).json()["error"]["message"]
        nobody = chat(secure.api_urls, image_message(f"{closed}/secret.png")).json()["error"]["message"]
        assert "SECRET" not in answered and "TOP" not in answered
        assert answered.replace(there, "") == nobody.replace(closed, ""), (answered, nobody)
        looping = chat(secure.api_urls, image_message(f"{there}/redirect?to={there}/redirect?to={there}/x"))
        assert looping.status_code == 400 and "SECRET" not in looping.text
    finally:
        recorder.shutdown()
        redirector.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# 3. Image bombs
# ---------------------------------------------------------------------------------------------------------------------


def test_image_bombs_are_refused_cheaply_and_others_still_served(secure):
    worker = secure.worker_url + "/worker_generate_stream"
    tall, line, square = png_bytes((2, 12000)), png_bytes((1, 100000)), png_bytes((7000, 7000))
    bombs = [
        ([tall], "--max-image-aspect-ratio"),
        ([line], "--max-image-aspect-ratio"),
        ([square] * 8, "--max-request-pixels"),
    ]
    before = rss_kb(secure.worker_proc.pid)

    def bomb(case):
        images, _ = case
        body = {"model": "alpha", "prompt": prompt("What?", len(images)), "images": [data_url(i) for i in images]}
        return requests.post(worker, json={**body, "max_new_tokens": 2}, headers=AUTH, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        refused = [pool.submit(bomb, case) for case in bombs for _ in range(2)]
        normal = pool.submit(
            lambda: list(stream_worker(worker, {"prompt": prompt("Hi"), "max_new_tokens": 4}, KEY, timeout=(10, 300)))
        )
        for future, (_, flag) in zip(refused, [case for case in bombs for _ in range(2)]):
            response = future.result()
            assert response.status_code == 400 and flag in response.json()["text"], response.text[:300]
        assert normal.result()[-1]["error_code"] == 0
    assert rss_kb(secure.worker_proc.pid) - before < RSS_BOUND_KB
    # the same limits in front, at the API server, as a 400 in OpenAI's format naming the flag
    response = chat(secure.api, image_message(data_url(tall)))
    assert response.status_code == 400 and "--max-image-aspect-ratio" in response.json()["error"]["message"]
    # a large, reasonable image is shrunk before padding and answered
    wide = png_bytes((3000, 1000), (10, 200, 10))
    assert chat(secure.api, image_message(data_url(wide))).status_code == 200


# ---------------------------------------------------------------------------------------------------------------------
# 3-4. The web UI: limits before its own preprocessing, plain messages, bounded uploads
# ---------------------------------------------------------------------------------------------------------------------


def test_web_ui_refuses_image_bombs_with_a_plain_message(secure, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(secure.web, verbose=False)
    before = rss_kb(secure.web_proc.pid)
    for size, flag in (((2, 12000), "--max-image-aspect-ratio"), ((12000, 12000), "--max-image-pixels")):
        path = tmp_path / f"bomb-{size[0]}x{size[1]}.png"
        path.write_bytes(png_bytes(size))
        result = client.predict(
            "What is it?", handle_file(str(path)), "Default", api_name="/add_text"
        )  # inputs after the state
        chat_shown = result[0]
        text = " ".join(str(m.get("content")) for m in chat_shown)
        assert "⚠️" in text and flag in text, text
        assert str(tmp_path) not in text and "/tmp" not in text and "gradio" not in text.lower()
    # a header claiming 30000x30000 (beyond PIL's own bomb limit) and a file that is no image at all
    claimed = tmp_path / "claims-huge.png"
    claimed.write_bytes(png_claiming((30000, 30000)))
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"just some text, not an image " * 4)
    for path, expected in ((claimed, "--max-image-pixels"), (notes, "not an image")):
        shown = client.predict("What is it?", handle_file(str(path)), "Default", api_name="/add_text")[0]
        text = " ".join(str(m.get("content")) for m in shown)
        assert "⚠️" in text and expected in text and str(tmp_path) not in text, text
    assert rss_kb(secure.web_proc.pid) - before < RSS_BOUND_KB


def png_claiming(size: tuple[int, int]) -> bytes:
    """A small PNG whose header claims `size` (its pixel data is the 8x8 original's)."""
    import struct
    import zlib

    data = bytearray(png_bytes((8, 8)))
    ihdr = struct.pack(">II", *size) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_upload_endpoint_is_bounded_in_size_and_lifetime(secure):
    big = os.urandom(3 * 1024 * 1024)  # over --max-file-size 2mb
    response = requests.post(secure.web + "/gradio_api/upload", files={"files": ("big.bin", big)}, timeout=60)
    assert response.status_code in (400, 413), (response.status_code, response.text[:200])
    small = requests.post(secure.web + "/gradio_api/upload", files={"files": ("a.txt", b"hello")}, timeout=60)
    assert small.status_code == 200, small.text
    (path,) = small.json()
    assert os.path.isfile(path) and os.path.realpath(path).startswith(os.path.realpath(secure.uploads))
    # --upload-max-age 3: the file is gone a few seconds later
    wait_until(lambda: not os.path.exists(path), 60, "the upload to be deleted", [secure.web_proc], interval=0.5)


def test_keys_stay_separate(secure):
    """The users' API key and the cluster key are different secrets: neither opens the other's door."""
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    as_cluster = requests.post(
        secure.api + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert as_cluster.status_code == 401
    as_user = requests.post(secure.controller + "/list_models", headers={CLUSTER_KEY_HEADER: API_KEY}, timeout=10)
    assert as_user.status_code == 401


# ---------------------------------------------------------------------------------------------------------------------
# The image helpers on their own (no processes)
# ---------------------------------------------------------------------------------------------------------------------


def test_jpeg_is_decoded_at_reduced_scale_and_shrunk():
    from PIL import Image

    from llava.mm_utils import ImageLimits, load_images

    buffer = io.BytesIO()
    Image.new("RGB", (6000, 4000), (30, 60, 90)).save(buffer, format="JPEG")
    source = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    (image,) = load_images([source], ImageLimits())
    assert image.size == (2048, 1365) and image.mode == "RGB"
    (small,) = load_images([source], ImageLimits(max_side=500))
    assert small.size == (500, 333)


def test_padding_shrinks_first_and_leaves_ordinary_images_alone():
    from PIL import Image
    from transformers import CLIPImageProcessor

    from llava.mm_utils import expand2square, process_images

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = {"image_aspect_ratio": "pad"}
    fill = tuple(int(x * 255) for x in processor.image_mean)
    ordinary = Image.new("RGB", (300, 120), (200, 10, 10))
    expected = processor(expand2square(ordinary, fill), return_tensors="pt")["pixel_values"][0]
    assert (process_images([ordinary], processor, cfg)[0] == expected).all()  # unchanged within --max-image-side
    long_one = Image.new("RGB", (40000, 2000), (200, 10, 10))  # padded first this would be a 40000^2 canvas
    assert tuple(process_images([long_one], processor, cfg).shape) == (1, 3, 32, 32)


def test_url_allow_list_by_host_and_network():
    import ipaddress

    from llava.mm_utils import ImageLimits, _refused_kind

    loopback = ipaddress.ip_address("127.0.0.1")
    assert _refused_kind(loopback, "localhost", ()) == "loopback"
    assert _refused_kind(loopback, "localhost", ("localhost",)) == ""
    assert _refused_kind(ipaddress.ip_address("10.2.3.4"), "x", ("10.0.0.0/8",)) == ""
    assert _refused_kind(ipaddress.ip_address("10.2.3.4"), "x", ("10.9.0.0/16",)) == "private"
    assert _refused_kind(ipaddress.ip_address("::ffff:169.254.169.254"), "x", ()) == "link-local"
    assert _refused_kind(ipaddress.ip_address("8.8.8.8"), "dns.google", ()) == ""
    with pytest.raises(ValueError, match="--image-url-allow"):
        ImageLimits(url_allow=("not a host!",))


# ---------------------------------------------------------------------------------------------------------------------
# 1 and 3 end to end: a keyed cluster serves every client; an accepted heavy request stalls nobody
# ---------------------------------------------------------------------------------------------------------------------


def run_module(module: str, args: list[str], key: str | None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, with `key` as LLAVA_CLUSTER_KEY ("" for none)."""
    env = {**os.environ, **SERVE_ENV, CLUSTER_KEY_ENV: key or ""}
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60 * SLACK
    )


def test_keyed_cluster_answers_every_client_and_refuses_a_keyless_worker(secure, checkpoint):
    question = "Tell me a story."
    # the API server: a real answer, from the worker behind the keyed controller
    response = chat(secure.api, question, max_tokens=8)
    assert response.status_code == 200, response.text
    api_answer = response.json()["choices"][0]["message"]["content"]
    assert api_answer.strip()
    # test_message, with the key from the environment or from the flag: the same answer (temperature 0)
    message_args = ["--controller-address", secure.controller, "--message", question, "--max-new-tokens", "8"]
    for key, flag in ((KEY, []), (None, ["--cluster-key", KEY])):
        done = run_module("llava.serve.test_message", message_args + flag, key)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"Worker: {secure.worker_url} (alpha, template `llava_v1`)" in done.stdout, done.stdout
        assert api_answer.strip() in done.stdout, (api_answer, done.stdout)
    refused = run_module("llava.serve.test_message", message_args, None)
    assert refused.returncode == 1 and "401" in refused.stderr and "--cluster-key" in refused.stderr, refused.stderr
    # register_worker by hand: with the key the controller re-registers the worker; without it, 401
    register_args = ["--controller-address", secure.controller, "--worker-name", secure.worker_url]
    done = run_module("llava.serve.register_worker", register_args, KEY)
    assert done.returncode == 0 and "Registered" in done.stdout, done.stderr[-2000:]
    refused = run_module("llava.serve.register_worker", register_args, None)
    assert refused.returncode == 1 and "Registration refused" in refused.stderr and "401" in refused.stderr

    # the web UI (LLAVA_CLUSTER_KEY in its environment): a question and its streamed answer
    from gradio_client import Client

    client = Client(secure.web, verbose=False)
    client.predict(api_name="/load_demo")  # what the page does on load: lists the models (with the key)
    client.predict(question, None, "Default", api_name="/add_text")
    shown = client.predict("alpha", 0.0, 1.0, 8, api_name="/http_bot")  # the chat as the page shows it
    text = lambda message: "".join(part["text"] for part in message["content"])  # noqa: E731
    assert [m["role"] for m in shown] == ["user", "assistant"] and text(shown[0]) == question, shown
    assert text(shown[1]).strip() == api_answer.strip(), (shown, api_answer)  # the same model, the same answer

    # a worker without the key (on 0.0.0.0, so it must warn loudly) is refused and never listed
    s = Stack(secure.tmp)
    port = free_port()
    try:
        keyless = s.worker(
            "keyless-worker",
            port,
            secure.controller,
            checkpoint,
            ["--host", "0.0.0.0", "--model-name", "beta"],
            env={CLUSTER_KEY_ENV: ""},
        )
        wait_until(lambda: "answered 401" in keyless.log_tail(), 180, "the keyless worker's refusal", [keyless])
        log = keyless.log_tail(200)
        assert "WARNING: this model worker listens on 0.0.0.0 WITHOUT a cluster key" in log, log
        assert "--cluster-key" in log and "Cannot register with the controller" in log, log
        assert requests.post(secure.controller + "/list_models", headers=AUTH, timeout=10).json() == {
            "models": ["alpha"]
        }
        assert keyless.alive()  # it keeps running (and retrying); only the controller decides who joins
    finally:
        s.stop()
    assert "WITHOUT a cluster key" not in secure.worker_proc.log_tail(200)  # the keyed worker gave no warning


def test_an_accepted_heavy_request_does_not_stall_a_small_one(secure):
    """Two requests of 2 x 49 MP PNGs each (98 M pixels: under --max-image-pixels and --max-request-pixels) are
    accepted and decoded, taking both large-decode slots; a small request sent while they decode is answered long
    before them."""
    heavy_message = [{"type": "image_url", "image_url": {"url": data_url(png_bytes((7000, 7000), (30, 120, 200)))}}]
    heavy_message = heavy_message * 2 + [{"type": "text", "text": "What is it?"}]
    small_message = image_message(data_url(png_bytes((64, 48))))
    pid = secure.worker_proc.pid
    before = rss_kb(pid)
    spans = {}

    def timed(name: str, content) -> requests.Response:
        start = time.monotonic()
        response = chat(secure.api, content)
        spans[name] = (start, time.monotonic())
        return response

    with ThreadPoolExecutor(2) as pool:
        heavy = [pool.submit(timed, f"heavy {i}", heavy_message) for i in range(2)]
        # a decoded 49 MP image is ~150-200 MB: the worker has grown by that much once decoding has begun
        decoding = lambda: rss_kb(pid) - before > 100 * 1024 or any(f.done() for f in heavy)  # noqa: E731
        wait_until(decoding, 120, "the worker to start decoding the heavy images", [secure.worker_proc], 0.05)
        assert not any(f.done() for f in heavy), "the heavy requests ended before the test could send the small one"
        small = timed("small", small_message)
        assert not all(f.done() for f in heavy), "the small request waited for the heavy ones"
        for future in heavy:
            response = future.result()
            assert response.status_code == 200, response.text[:300]
    assert small.status_code == 200, small.text[:300]
    tokens = lambda response: response.json()["usage"]["prompt_tokens"]  # noqa: E731
    assert all(tokens(f.result()) > tokens(small) for f in heavy)  # both heavy images reached the model
    small_start, small_end = spans["small"]
    for name in ("heavy 0", "heavy 1"):
        heavy_start, heavy_end = spans[name]
        assert small_end < heavy_end, (name, spans)
        # relative, so a busy machine slows both alike: the small one took a fraction of the heavy one's time
        assert small_end - small_start < (heavy_end - heavy_start) / 2, (name, spans)
