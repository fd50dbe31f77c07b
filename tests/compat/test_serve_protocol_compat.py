"""The original LLaVA's controller/worker HTTP protocol against ours, both directions, with real processes (issue 12).

One cluster of six processes on free loopback ports, no cluster key (so ours must speak the original, unauthenticated
protocol): OUR controller and the ORIGINAL controller (llava-torch 1.2.2.post1 in `.venv-orig`, run from a neutral
directory), and on each of them one OUR worker and one ORIGINAL worker serving the same tiny checkpoint (written by
our code). So each controller talks to both kinds of worker (register, heartbeats, `/worker_get_status`), and:

(a) the original's clients drive our servers: its `llava.serve.test_message` and its web UI's own `get_model_list`
    and `http_bot` functions (loaded from its source and called in the original's interpreter, image included;
    see ORIGINAL_WEB_UI for why not imported) against our controller and worker;
(b) our clients drive the original's servers: our `llava.serve.test_message` and our web UI's own chat handlers
    (`add_text` and `http_bot` of its Gradio app, called without a browser) against the original controller and
    worker.

The original worker runs on CPU as shipped: `--device cpu` makes its loader map the model to the CPU, and it keeps
its hard-coded fp16 (fp16 matmuls run on CPU in the torch of its venv), so nothing is skipped. Note: transformers
4.37 does not read the tiny CLIP directory that transformers 5 saved (key layout), so the original worker runs with a
randomly initialised tower; this suite checks the protocol, not the original worker's numbers (the checkpoint tests
compare logits).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.serve_helpers import Proc, controller_post, free_port, generate, wait_until

pytestmark = pytest.mark.slow

OURS, ORIGINAL = "ours", "orig"
# Both names hold `llava` and `v1`: the original loader treats a model as multimodal only when its name says
# `llava`, and the original web UI picks the `llava_v1` template from these two words.
MODEL = {OURS: "llava-v1-tiny-ours", ORIGINAL: "llava-v1-tiny-orig"}
STARTUP_S = 300  # the original worker imports gradio-era transformers and loads in fp16: ~10 s alone, more when busy


class OrigProc(Proc):
    """A server of the ORIGINAL release: `.venv-orig/bin/python -m <module>` from a neutral directory."""

    def __init__(self, name: str, module: str, args: list[str], log_dir: str, orig):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self.popen = subprocess.Popen(
            [orig.python, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**orig.env(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            cwd=orig.cwd,  # `import llava` there is the original package, not our checkout
        )


class Cluster:
    def __init__(self, tmp: str, orig, checkpoint: str):
        self.tmp, self.orig, self.checkpoint = tmp, orig, checkpoint
        self.procs: list[Proc] = []
        ports = {name: free_port() for name in ("ctl-ours", "ctl-orig", "a", "b", "c", "d")}
        self.controller = {
            OURS: f"http://127.0.0.1:{ports['ctl-ours']}",
            ORIGINAL: f"http://127.0.0.1:{ports['ctl-orig']}",
        }
        # worker[(kind of worker, kind of controller it registers with)] = its port
        self.worker_port = {(OURS, OURS): ports["a"], (ORIGINAL, OURS): ports["b"]}
        self.worker_port.update({(OURS, ORIGINAL): ports["c"], (ORIGINAL, ORIGINAL): ports["d"]})

    def worker(self, kind: str, controller: str) -> str:
        return f"http://127.0.0.1:{self.worker_port[(kind, controller)]}"

    def start(self) -> None:
        port = self.controller[OURS].rsplit(":", 1)[1]
        self.procs.append(
            Proc("controller-ours", "llava.serve.controller", ["--port", port], self.tmp, {"OMP_NUM_THREADS": "1"})
        )
        port = self.controller[ORIGINAL].rsplit(":", 1)[1]
        args = ["--host", "127.0.0.1", "--port", port]
        self.procs.append(OrigProc("controller-orig", "llava.serve.controller", args, self.tmp, self.orig))
        for controller in (OURS, ORIGINAL):
            url = self.worker(OURS, controller)
            args = ["--port", url.rsplit(":", 1)[1], "--worker-address", url, "--controller-address"]
            args += [self.controller[controller], "--model-path", self.checkpoint, "--model-name", MODEL[OURS]]
            args += ["--device", "cpu", "--heart-beat-interval", "2"]
            self.procs.append(
                Proc(
                    f"worker-ours-on-{controller}", "llava.serve.model_worker", args, self.tmp, {"OMP_NUM_THREADS": "1"}
                )
            )
            url = self.worker(ORIGINAL, controller)
            args = ["--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--worker-address", url]
            args += ["--controller-address", self.controller[controller], "--model-path", self.checkpoint]
            args += ["--model-name", MODEL[ORIGINAL], "--device", "cpu"]
            name = f"worker-orig-on-{controller}"
            self.procs.append(OrigProc(name, "llava.serve.model_worker", args, self.tmp, self.orig))

    def stop(self) -> None:
        for proc in self.procs:  # each by its own PID
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.stop()


@pytest.fixture(scope="module")
def cluster(orig, tiny, tmp_path_factory):
    from llava.model.checkpoint_compat import finish_checkpoint_dir

    model = tiny.model("llama", seed=7)
    model.config.conv_template = "llava_v1"
    checkpoint = tiny.save_full(model, "llava-v1-tiny")
    finish_checkpoint_dir(checkpoint, tiny.tokenizer)  # as our trainer writes it: tokenizer.model for the original
    c = Cluster(str(tmp_path_factory.mktemp("serve-compat")), orig, checkpoint)
    try:
        c.start()
        both = sorted(MODEL.values())
        for kind in (OURS, ORIGINAL):
            wait_until(
                lambda kind=kind: sorted(controller_post(c.controller[kind], "/list_models")["models"]) == both,
                STARTUP_S,
                f"both workers to register with the {kind} controller",
                c.procs,
                interval=1.0,
            )
        yield c
    finally:
        c.stop()


def _png_b64(size=(48, 40), color=(200, 40, 40)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------------------------- controller <-> worker


@pytest.mark.parametrize("controller", [OURS, ORIGINAL])
def test_each_controller_routes_to_both_kinds_of_worker(cluster, controller):
    url = cluster.controller[controller]
    # /refresh_all_workers makes the controller call each worker's /worker_get_status again.
    assert requests.post(url + "/refresh_all_workers", timeout=30).status_code == 200
    # The original controller lists models in set order; compare as sets of names.
    assert sorted(controller_post(url, "/list_models")["models"]) == sorted(MODEL.values())
    for kind in (OURS, ORIGINAL):
        address = controller_post(url, "/get_worker_address", {"model": MODEL[kind]})["address"]
        assert address == cluster.worker(kind, controller)
    status = controller_post(url, "/worker_get_status")
    assert sorted(status["model_names"]) == sorted(MODEL.values())
    assert isinstance(status["queue_length"], int) and status["speed"] >= 2
    assert controller_post(url, "/get_worker_address", {"model": "no-such-model"})["address"] == ""


@pytest.mark.parametrize("kind", [OURS, ORIGINAL])
def test_worker_status_and_heartbeat_answers_have_the_original_shape(cluster, kind):
    status = controller_post(cluster.worker(kind, ORIGINAL), "/worker_get_status")
    assert status["model_names"] == [MODEL[kind]]
    assert isinstance(status["speed"], int) and isinstance(status["queue_length"], int)
    # A worker's heartbeat as the original worker sends it; both controllers answer {"exist": ...}.
    for controller in (OURS, ORIGINAL):
        beat = {"worker_name": cluster.worker(kind, controller), "queue_length": 0}
        assert controller_post(cluster.controller[controller], "/receive_heart_beat", beat) == {"exist": True}
        unknown = {"worker_name": "http://127.0.0.1:9", "queue_length": 0}
        assert controller_post(cluster.controller[controller], "/receive_heart_beat", unknown) == {"exist": False}


# ------------------------------------------------------------------------------ (a) the original's clients -> ours

# The original web UI's `get_model_list`, `http_bot` and `get_conv_log_filename`, loaded from its source: its module
# imports gradio 4.16 at the top, which the original's environment does not hold (setup_original.sh installs the
# release without its UI dependencies). The functions run unchanged; only what they hand to Gradio (button states,
# the `gr.Request` annotation) gets plain placeholders. Every HTTP request is the original's own code.
ORIGINAL_WEB_UI = r"""
import ast, datetime, hashlib, importlib.util, json, logging, os, sys, time, types
import requests
from PIL import Image
from llava.constants import LOGDIR
from llava.conversation import SeparatorStyle, conv_templates
from llava.utils import server_error_msg

path = os.path.join(os.path.dirname(importlib.util.find_spec("llava").origin), "serve", "gradio_web_server.py")
tree = ast.parse(open(path).read())
wanted = ("get_model_list", "http_bot", "get_conv_log_filename", "headers", "priority")
body = [n for n in tree.body if getattr(n, "name", None) in wanted
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))]
controller, model, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ns = dict(requests=requests, json=json, time=time, hashlib=hashlib, datetime=datetime, os=os, LOGDIR=LOGDIR,
          conv_templates=conv_templates, SeparatorStyle=SeparatorStyle, server_error_msg=server_error_msg,
          logger=logging.getLogger("gradio_web_server"), gr=types.SimpleNamespace(Request=object),
          no_change_btn="no_change", enable_btn="enable", disable_btn="disable",
          args=types.SimpleNamespace(controller_url=controller, moderate=False))
exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)
assert {"get_model_list", "http_bot", "headers"} <= set(ns), sorted(ns)

models = ns["get_model_list"]()
state = conv_templates["llava_v1"].copy()
image = Image.new("RGB", (48, 40), (200, 40, 40))
state.append_message(state.roles[0], ("What is in the image?\n<image>", image, "Default"))
state.append_message(state.roles[1], None)
state.skip_next = False
prompt, images = state.get_prompt(), state.get_images()
request = types.SimpleNamespace(client=types.SimpleNamespace(host="127.0.0.1"))
for out in ns["http_bot"](state, model, 0.0, 0.7, max_new_tokens, request):
    state = out[0]
print(json.dumps({"models": models, "reply": state.messages[-1][-1], "prompt": prompt, "images": images}))
"""


@pytest.mark.parametrize("kind", [OURS, ORIGINAL])
def test_original_web_ui_through_our_controller(cluster, orig, kind):
    """The original web UI's `get_model_list` and `http_bot` (its code, its payload: base64 images, `stop`, capped
    `max_new_tokens`) against OUR controller, answered by our worker and by the original worker."""
    result = orig.json(ORIGINAL_WEB_UI, cluster.controller[OURS], MODEL[kind], "12", timeout=600)
    assert sorted(result["models"]) == sorted(MODEL.values())
    reply = result["reply"]
    assert "error_code" not in reply and "NETWORK ERROR" not in reply, reply
    if kind == OURS:
        # What the original UI shows is exactly what our worker generates for that prompt and image (greedy).
        payload = {"model": MODEL[OURS], "prompt": result["prompt"], "images": result["images"]}
        payload.update(temperature=0.0, top_p=0.7, max_new_tokens=12, stop="</s>")
        code, chunks = generate(cluster.worker(OURS, OURS) + "/worker_generate_stream", payload)
        assert code == 200 and chunks[-1]["error_code"] == 0
        assert chunks[-1]["text"].startswith(result["prompt"])
        assert chunks[-1]["text"][len(result["prompt"]) :].strip() == reply


@pytest.mark.parametrize("kind", [OURS, ORIGINAL])
def test_original_test_message_through_our_controller(cluster, orig, kind):
    proc = subprocess.run(
        [orig.python, "-m", "llava.serve.test_message", "--controller-address", cluster.controller[OURS]]
        + ["--model-name", MODEL[kind], "--max-new-tokens", "8", "--message", "Tell me a story."],
        capture_output=True,
        text=True,
        timeout=300,
        env=orig.env(),
        cwd=orig.cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"Models: {sorted(MODEL.values())}" in proc.stdout
    assert f"worker_addr: {cluster.worker(kind, OURS)}" in proc.stdout
    # It prints the prompt with the template's separator (a space for `vicuna_v1`) turned into newlines, then the
    # streamed reply after the prompt.
    assert "USER:\nTell\nme\na\nstory." in proc.stdout


# ---------------------------------------------------------------------------- (b) our clients -> the original's


@pytest.mark.parametrize("kind", [OURS, ORIGINAL])
def test_our_test_message_through_the_original_controller(cluster, kind):
    proc = subprocess.run(
        [sys.executable, "-m", "llava.serve.test_message", "--controller-address", cluster.controller[ORIGINAL]]
        + ["--model-name", MODEL[kind], "--max-new-tokens", "8", "--message", "Tell me a story."],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        env={k: v for k, v in os.environ.items() if k != "LLAVA_CLUSTER_KEY"},  # no key: the original protocol
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert cluster.worker(kind, ORIGINAL) in proc.stdout


def _handler(demo, name: str):
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return next(f.fn for f in fns if getattr(f.fn, "__name__", None) == name)


@pytest.mark.parametrize("kind", [OURS, ORIGINAL])
def test_our_web_ui_against_the_original_controller(cluster, tmp_path, kind):
    """Our web UI's own chat handlers (`add_text`, `http_bot` of the Gradio app, called without a browser) against
    the ORIGINAL controller and, for `orig`, the original worker: it has no `/model_details`, so the template comes
    from the model name as in the original UI, and it needs the `stop` string the original UI always sent."""
    from PIL import Image

    from llava.serve.gradio_web_server import WebServer, build_demo, new_conversation

    server = WebServer(cluster.controller[ORIGINAL], str(tmp_path / "logs"), model_list_mode="reload")
    assert sorted(server.get_model_list()) == sorted(MODEL.values())
    address = server.worker_for(MODEL[kind])
    assert address == cluster.worker(kind, ORIGINAL)
    assert server.model_template(address, MODEL[kind]) == "llava_v1"  # ours: recorded; original's: from the name
    demo = build_demo(server)
    image_path = str(tmp_path / "red.png")
    Image.new("RGB", (48, 40), (200, 40, 40)).save(image_path)
    state = _handler(demo, "add_text")(new_conversation(), "What is in the image?", image_path, "Default")[0]
    for out in _handler(demo, "http_bot")(state, MODEL[kind], 0.0, 0.7, 8, None):
        state = out[0]
    reply = state.messages[-1][1]
    assert isinstance(reply, str) and "error" not in reply.lower() and "not responding" not in reply, reply
    # The same request again, straight to the worker (greedy): the UI showed exactly what the worker generated.
    state.messages[-1][1] = None
    payload = {"model": MODEL[kind], "prompt": state.get_prompt(), "images": state.get_images(return_pil=False)}
    payload.update(temperature=0.0, top_p=0.7, max_new_tokens=8, stop=state.sep2)
    code, chunks = generate(address + "/worker_generate_stream", payload)
    assert code == 200 and chunks[-1]["error_code"] == 0
    assert chunks[-1]["text"][len(payload["prompt"]) :].strip() == reply


def test_original_worker_streams_the_original_chunk_format(cluster):
    """What our clients parse, as the original worker sends it: NUL-terminated JSON chunks `{text, error_code}`,
    the text being prompt + reply so far."""
    prompt = "A chat between a curious human and an artificial intelligence assistant. USER: Hi ASSISTANT:"
    payload = {"model": MODEL[ORIGINAL], "prompt": prompt, "temperature": 0.0, "max_new_tokens": 6, "stop": "</s>"}
    code, chunks = generate(cluster.worker(ORIGINAL, ORIGINAL) + "/worker_generate_stream", payload)
    assert code == 200 and chunks and all(c["error_code"] == 0 for c in chunks)
    assert all(c["text"].startswith(prompt) for c in chunks)
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each chunk extends the last


def test_servers_stayed_up(cluster):
    dead = [p.name for p in cluster.procs if not p.alive()]
    assert not dead, "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in cluster.procs if p.name in dead)
